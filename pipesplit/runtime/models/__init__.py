"""Model families: registry key (ModelSpec.family) -> module, imported on first use.

Each family module provides:
- `FORMATS`: the checkpoint formats it loads (`"none"`, `"fp8"`, ...);
- `decoder_layer(spec, index, dtype, device)`: decoder layer `index`;
- `rotary(spec)`: the stage's rotary embedding;
- `kv_cache_shapes(spec)`: per-token shapes of one layer's cache tensors;
- optionally `check_spec(spec)` (more checks), `held_layers(spec, dtype, device)` (modules the
  last stage holds with --mtp but never runs) and `stage_extras(spec)` (DecoderStage keywords:
  final_norm, embed_scale, logit_softcap).
`build_stage` below puts them on the shared skeleton (`layers.DecoderStage`). The shared layers
live in `layers.py` (attention, norms, rotary, stage skeleton) and `moe.py` (routers, experts).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from pipesplit.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipesplit.planner.spec import ModelSpec

FAMILY_MODULES = {
    "llama": "pipesplit.runtime.models.llama",
    "mixtral": "pipesplit.runtime.models.mixtral",
    "deepseek": "pipesplit.runtime.models.deepseek",
    "gpt_oss": "pipesplit.runtime.models.gpt_oss",
    "gemma": "pipesplit.runtime.models.gemma",
}


def family_module(spec: "ModelSpec") -> ModuleType:
    try:
        name = FAMILY_MODULES[spec.family]
    except KeyError:
        raise UserError(
            f"{spec.model_type} models ({spec.family} family) can be planned but not run yet; "
            f"runnable families: {', '.join(FAMILY_MODULES)}"
        ) from None
    return importlib.import_module(name)


def build_stage(
    spec: "ModelSpec",
    layers: tuple[int, int],
    embedding: bool,
    lm_head: bool,
    dtype: "torch.dtype | None" = None,
    device: "torch.device | str" = "cpu",
    mtp: bool = False,
) -> "nn.Module":
    """The stage module holding decoder layers [start, end), plus embedding / final norm + head,
    and with mtp=True (last stage) the MTP modules, held but not run.

    device="meta" builds it without memory, for the loader to fill.
    """
    import torch

    from pipesplit.runtime.models.layers import DecoderStage, check_buildable

    family = family_module(spec)
    check_buildable(spec, spec.family, family.FORMATS)
    if hasattr(family, "check_spec"):
        family.check_spec(spec)
    dtype = dtype or torch.float32
    held = None
    if mtp:
        if not lm_head:
            raise ValueError("the MTP modules belong to the last stage (the one with the lm_head)")
        if not hasattr(family, "held_layers"):
            raise UserError(f"{spec.model_type} models have no MTP modules the runtime can hold; drop --mtp")
        held = family.held_layers(spec, dtype, device)
    extras = family.stage_extras(spec) if hasattr(family, "stage_extras") else {}
    return DecoderStage(
        spec, tuple(layers), embedding, lm_head, lambda i: family.decoder_layer(spec, i, dtype, device),
        family.rotary(spec), dtype, device, held, **extras,
    )


def kv_cache_shapes(spec: "ModelSpec") -> tuple[tuple[int, ...], ...]:
    """Per-token shape of each cache tensor of one layer (the same for every layer)."""
    return family_module(spec).kv_cache_shapes(spec)
