"""Model families: registry key (ModelSpec.family) -> module, imported on first use.

Each family module provides `build_stage(spec, layers, embedding, lm_head, dtype, device)` and
`kv_cache_shapes(spec)`; families with MTP modules (deepseek) also take `mtp=True`. The shared
layers live in `layers.py` (attention, norms, rotary, stage skeleton) and `moe.py` (routers, experts).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from pipesplit.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipesplit.spec import ModelSpec

FAMILY_MODULES = {
    "llama": "pipesplit.models.llama",
    "mixtral": "pipesplit.models.mixtral",
    "deepseek": "pipesplit.models.deepseek",
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

    extra = {"mtp": True} if mtp else {}
    return family_module(spec).build_stage(
        spec, tuple(layers), embedding, lm_head, dtype or torch.float32, device, **extra
    )


def kv_cache_shapes(spec: "ModelSpec") -> tuple[tuple[int, ...], ...]:
    """Per-token shape of each cache tensor of one layer (the same for every layer)."""
    return family_module(spec).kv_cache_shapes(spec)
