"""What a model is, read from its Hugging Face config.json: `ModelSpec` and `load_spec`.

Pure Python (no torch): the planner and the runtime both start from this spec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pipesplit.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")
MLP_KINDS = ("dense", "moe")
LAYER_TYPES = ("full_attention", "sliding_attention")

# Supported config types -> runtime family (the model registry key).
FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "mixtral": "mixtral",
    "qwen2_moe": "mixtral",
    "qwen3_moe": "mixtral",
    "deepseek_v2": "deepseek",
    "deepseek_v3": "deepseek",
    "gpt_oss": "gpt_oss",
    "gemma2": "gemma",
    "gemma3_text": "gemma",
    "glm4_moe": "glm4_moe",  # planned, not run yet (the runtime's registry says so)
}
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "GptOssForCausalLM": "gpt_oss",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Glm4MoeForCausalLM": "glm4_moe",
}
MULTIMODAL_TEXT = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}
"""Vision-language checkpoints planned as their text model (text_config; the vision tower is left out)."""
GEMMA3_TEXT_DEFAULTS = {
    # transformers models/gemma3/configuration_gemma3.py Gemma3TextConfig defaults: multimodal
    # checkpoints (gemma-3-27b-it) omit these keys from their text_config
    "vocab_size": 262208, "max_position_embeddings": 131072, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6,
    "sliding_window_pattern": 6, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}


@dataclass(frozen=True)
class Quantization:
    """How the checkpoint stores its weights.

    method "none": every tensor in the model's dtype. "fp8": attention and MLP Linears (experts
    included) as float8_e4m3fn with one float32 `weight_scale_inv` per weight_block_size block.
    "mxfp4": gpt-oss experts as uint8 `*_blocks` [E, out, in/32, 16] and `*_scales` [E, out, in/32].
    Modules matching `modules_to_not_convert` (names or fnmatch patterns) stay unquantized.
    """

    method: str = "none"
    weight_block_size: tuple[int, int] | None = None
    modules_to_not_convert: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in ("none", "fp8", "mxfp4"):
            raise UserError(f"quantization method {self.method!r} is not supported; use none, fp8 or mxfp4")
        if self.method == "fp8":
            block = self.weight_block_size
            if block is None or len(block) != 2 or any(not isinstance(b, int) or b <= 0 for b in block):
                raise UserError("fp8 quantization needs weight_block_size as two positive integers, e.g. [128, 128]")
        elif self.weight_block_size is not None:
            raise UserError(f"weight_block_size applies to fp8 only, not {self.method}")


@dataclass(frozen=True)
class MoESpec:
    """Routed experts (and optional shared experts) of the MoE layers."""

    num_experts: int
    num_experts_per_tok: int
    intermediate_size: int  # width of one routed expert
    num_shared_experts: int = 0  # deepseek: n_shared_experts; qwen2_moe: 1
    shared_intermediate_size: int = 0  # total width of the shared MLP (deepseek: n_shared * width)
    shared_expert_gate: bool = False  # qwen2_moe: sigmoid gate [1, hidden] on the shared expert
    norm_topk_prob: bool = False  # renormalise the top-k weights to sum to 1
    scoring_func: str = "softmax"  # softmax | sigmoid
    topk_method: str = "greedy"  # greedy | group_limited_greedy | noaux_tc
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    score_correction_bias: bool = False  # router `e_score_correction_bias` (noaux_tc)
    router_bias: bool = False  # gpt-oss router has a bias
    expert_bias: bool = False  # gpt-oss experts have biases
    # gpt-oss's clamped SwiGLU: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)
    swiglu_alpha: float | None = None
    swiglu_limit: float | None = None

    def __post_init__(self) -> None:
        _positive("num_experts", self.num_experts)
        _positive("num_experts_per_tok", self.num_experts_per_tok)
        _positive("moe_intermediate_size", self.intermediate_size)
        if self.num_experts_per_tok > self.num_experts:
            raise UserError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the number of experts ({self.num_experts})"
            )
        if self.num_shared_experts < 0 or self.shared_intermediate_size < 0:
            raise UserError("shared experts: counts and sizes must not be negative")
        if (self.num_shared_experts > 0) != (self.shared_intermediate_size > 0):
            raise UserError("shared experts need both a count and an intermediate size")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise UserError("shared_expert_gate needs a shared expert")
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise UserError(f"scoring_func {self.scoring_func!r} is not supported; use softmax or sigmoid")
        if self.n_group <= 0 or self.num_experts % self.n_group:
            raise UserError(f"n_group ({self.n_group}) must divide the number of experts ({self.num_experts})")
        if not 0 < self.topk_group <= self.n_group:
            raise UserError(f"topk_group ({self.topk_group}) must be between 1 and n_group ({self.n_group})")
        if (self.swiglu_alpha is None) != (self.swiglu_limit is None):
            raise UserError("the clamped SwiGLU needs both swiglu_alpha and swiglu_limit")
        if self.swiglu_limit is not None and self.swiglu_limit <= 0:
            raise UserError(f"swiglu_limit must be positive, got {self.swiglu_limit}")


@dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek): low-rank q and compressed kv."""

    q_lora_rank: int | None  # None: a plain q_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    def __post_init__(self) -> None:
        if self.q_lora_rank is not None:
            _positive("q_lora_rank", self.q_lora_rank)
        for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _positive(key, getattr(self, key))

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Elements cached per token per layer: the latent plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class GemmaSpec:
    """Gemma 2 / 3 specifics: scores scaled by query_pre_attn_scalar ** -0.5 and optionally
    soft-capped (c * tanh(x / c)), final logits likewise; Gemma 3's local (sliding) layers rotate
    with their own rope theta and scaling (None: the global rope)."""

    query_pre_attn_scalar: float
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    local_rope_theta: float | None = None
    local_rope_scaling: dict | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for key in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "local_rope_theta"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise UserError(f"config key {key!r} must be positive, got {value}")


@dataclass(frozen=True)
class ModelSpec:
    """The architecture facts pipesplit needs, validated at construction."""

    name: str
    model_type: str  # the supported type the config was read as (kimi_k2 -> deepseek_v3)
    architecture: str
    family: str  # runtime model registry key: llama | mixtral | deepseek | gpt_oss | gemma
    vocab_size: int
    hidden_size: int
    num_layers: int  # decoder layers that get split; MTP layers not included
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int  # q/k head dim (MLA: qk_nope_head_dim + qk_rope_head_dim)
    intermediate_size: int  # dense MLP width (gpt-oss: the expert width)
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v biases
    qk_norm: bool  # per-head RMSNorm on q and k (qwen3)
    torch_dtype: str  # unquantized dtype of the checkpoint
    quantization: Quantization = field(default_factory=Quantization)
    o_proj_bias: bool = False  # llama with attention_bias, gpt-oss
    mlp_bias: bool = False  # llama mlp_bias: biases on gate/up/down
    attention_sinks: bool = False  # gpt-oss: one learned sink logit per head
    mlp_kinds: tuple[str, ...] = ()  # per decoder layer: "dense" | "moe"; empty means all dense
    layer_types: tuple[str, ...] = ()  # per decoder layer: full_attention | sliding_attention
    sliding_window: int | None = None
    moe: MoESpec | None = None
    mla: MLASpec | None = None
    gemma: GemmaSpec | None = None
    num_mtp_layers: int = 0  # DeepSeek NextN modules, stored as model.layers.{num_layers + i}
    mtp_mlp_kinds: tuple[str, ...] = ()  # MLP kind of each MTP module's decoder layer
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    rope_scaling: dict | None = field(default=None, compare=False)
    config: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.family not in set(FAMILIES.values()):
            raise UserError(f"family {self.family!r} is unknown; use one of {sorted(set(FAMILIES.values()))}")
        for key in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads",
                    "head_dim", "intermediate_size", "max_position_embeddings"):
            _positive(key, getattr(self, key))
        if self.num_attention_heads % self.num_kv_heads:
            raise UserError(
                f"num_key_value_heads ({self.num_kv_heads}) must divide num_attention_heads ({self.num_attention_heads})"
            )
        if self.torch_dtype not in DTYPES:
            raise UserError(f"torch_dtype {self.torch_dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        if not self.mlp_kinds:
            object.__setattr__(self, "mlp_kinds", ("dense",) * self.num_layers)
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_layers)
        if self.num_mtp_layers < 0:
            raise UserError(f"num_nextn_predict_layers must not be negative, got {self.num_mtp_layers}")
        if not self.mtp_mlp_kinds and self.num_mtp_layers:
            object.__setattr__(self, "mtp_mlp_kinds", (self.mlp_kinds[-1],) * self.num_mtp_layers)
        if len(self.mlp_kinds) != self.num_layers or set(self.mlp_kinds) - set(MLP_KINDS):
            raise UserError(f"mlp_kinds needs {self.num_layers} entries of {MLP_KINDS}, got {self.mlp_kinds}")
        if len(self.mtp_mlp_kinds) != self.num_mtp_layers or set(self.mtp_mlp_kinds) - set(MLP_KINDS):
            raise UserError(f"mtp_mlp_kinds needs {self.num_mtp_layers} entries of {MLP_KINDS}")
        if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
            raise UserError(
                f"layer_types needs {self.num_layers} entries of {LAYER_TYPES}, got {len(self.layer_types)}"
            )
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise UserError("sliding_attention layers need a positive sliding_window")
        uses_moe = "moe" in self.mlp_kinds + self.mtp_mlp_kinds
        if uses_moe and self.moe is None:
            raise UserError("MoE layers need the experts' settings (num_experts, num_experts_per_tok, ...)")
        if self.moe is not None and not uses_moe:
            raise UserError("the config describes experts but no layer uses them; check mlp_only_layers")
        if self.quantization.method == "mxfp4" and self.family != "gpt_oss":
            raise UserError("mxfp4 quantization is supported for gpt_oss models only")
        if self.quantization.method == "fp8" and self.family == "gpt_oss":
            raise UserError("fp8 quantization is not supported for gpt_oss models; use the mxfp4 checkpoint")

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    @property
    def num_moe_layers(self) -> int:
        return self.mlp_kinds.count("moe")

    def mlp_kind(self, layer: int) -> str:
        """MLP kind of a global layer index; indices >= num_layers are the MTP modules."""
        if 0 <= layer < self.num_layers:
            return self.mlp_kinds[layer]
        if self.num_layers <= layer < self.num_layers + self.num_mtp_layers:
            return self.mtp_mlp_kinds[layer - self.num_layers]
        raise IndexError(f"layer {layer} out of range for {self.num_layers} + {self.num_mtp_layers} MTP layers")


def _positive(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{key} must be a positive integer, got {value!r}")


# ---------------------------------------------------------------------------------------------
# config.json -> ModelSpec

_MISSING = object()
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               list: "a list", dict: "an object", type(None): "null"}


class _Config:
    """Typed reads from a config dict; every error names the key."""

    def __init__(self, config: dict, model_type: str) -> None:
        self.config = config
        self.model_type = model_type

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        value = self.config.get(key, _MISSING)
        if value is _MISSING or (value is None and default is not _MISSING):
            if default is _MISSING:
                raise UserError(f"config.json lacks {key!r}, which {self.model_type} models need")
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = " or ".join(_TYPE_WORDS.get(k, k.__name__) for k in kinds)
            raise UserError(f"config key {key!r} must be {names}, got {value!r}")
        return value

    def positive(self, key: str, default: Any = _MISSING) -> int:
        value = self.get(key, int, default)
        if value <= 0:
            raise UserError(f"config key {key!r} must be a positive integer, got {value}")
        return value


def _supported_line() -> str:
    return "supported architectures: " + ", ".join(ARCHITECTURES)


def _model_type_of(config: dict) -> tuple[str, str]:
    """(supported model type, architecture) by model_type first, then architectures[0]."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise UserError(f"config key 'architectures' must be a list of names, got {architectures!r}")
    architecture = architectures[0] if architectures else ""
    if model_type in FAMILIES:
        if not architecture:
            architecture = next(a for a, t in ARCHITECTURES.items() if t == model_type)
        return model_type, architecture
    if architecture in ARCHITECTURES:
        return ARCHITECTURES[architecture], architecture
    shown = architecture or model_type or "no model_type or architectures"
    raise UserError(f"unsupported model {shown!r}; {_supported_line()}")


def _dtype_of(cfg: _Config) -> str:
    dtype = cfg.config.get("torch_dtype") or cfg.config.get("dtype") or "bfloat16"
    if dtype not in DTYPES:
        raise UserError(f"config key 'torch_dtype' must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def _rope_of(cfg: _Config) -> tuple[float, dict | None]:
    """rope_theta and rope_scaling from the old keys or transformers 5's rope_parameters."""
    params = cfg.config.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise UserError(f"config key 'rope_parameters' must be a dict, got {params!r}")
    params = params or {}
    theta = cfg.config.get("rope_theta")
    theta = params.get("rope_theta", 10000.0) if theta is None else theta
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise UserError(f"config key 'rope_theta' must be a positive number, got {theta!r}")
    scaling = cfg.config.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None and not isinstance(scaling, dict):
        raise UserError(f"config key 'rope_scaling' must be a dict or null, got {scaling!r}")
    return float(theta), scaling


def _quantization_of(cfg: _Config) -> Quantization:
    qc = cfg.config.get("quantization_config")
    if qc is None:
        return Quantization()
    if not isinstance(qc, dict):
        raise UserError(f"config key 'quantization_config' must be a dict, got {qc!r}")
    method = qc.get("quant_method")
    skip = qc.get("modules_to_not_convert") or []
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise UserError(f"quantization_config 'modules_to_not_convert' must be a list of names, got {skip!r}")
    if method == "fp8":
        block = qc.get("weight_block_size")
        if not isinstance(block, list) or len(block) != 2 or not all(isinstance(b, int) for b in block):
            raise UserError(
                f"quantization_config 'weight_block_size' must be two integers (only block-scaled fp8 is "
                f"supported), got {block!r}"
            )
        return Quantization("fp8", (block[0], block[1]), tuple(skip))
    if method == "mxfp4":
        return Quantization("mxfp4", None, tuple(skip))
    raise UserError(
        f"quantization_config quant_method {method!r} is not supported; use an unquantized, block-fp8 or mxfp4 checkpoint"
    )


def _eos_of(cfg: _Config) -> tuple[int, ...]:
    eos = cfg.config.get("eos_token_id")
    if eos is None:
        return ()
    eos = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
        raise UserError(f"config key 'eos_token_id' must be an integer or a list of integers, got {eos!r}")
    return tuple(eos)


def _layer_types_of(cfg: _Config, model_type: str, num_layers: int) -> tuple[tuple[str, ...], int | None]:
    window = cfg.get("sliding_window", (int, type(None)), None) or None
    given = cfg.config.get("layer_types")
    if given is not None:
        if not isinstance(given, list) or len(given) != num_layers or set(given) - set(LAYER_TYPES):
            raise UserError(
                f"config key 'layer_types' must list {num_layers} entries of {', '.join(LAYER_TYPES)}"
            )
        types = tuple(given)
    elif model_type in ("mistral", "mixtral") and window:
        types = ("sliding_attention",) * num_layers
    elif model_type == "gemma2":  # local and global layers alternate, local first
        types = tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers))
    elif model_type == "gemma3_text":  # every sliding_window_pattern-th layer global
        pattern = cfg.positive("sliding_window_pattern", 6)
        types = tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers))
    elif model_type.startswith("qwen") and window and cfg.config.get("use_sliding_window"):
        first = cfg.get("max_window_layers", int, num_layers)
        types = tuple("sliding_attention" if i >= first else "full_attention" for i in range(num_layers))
    else:
        types = ("full_attention",) * num_layers
    return types, (window if "sliding_attention" in types else None)


GEMMA_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")


def _gemma(cfg: _Config, model_type: str, rope_theta: float, rope_scaling: dict | None):
    """(GemmaSpec, global rope theta, global rope scaling): Gemma 3's two ropes come as
    rope_parameters per layer type (transformers 5) or as rope_theta + rope_local_base_freq."""
    activation = cfg.config.get("hidden_activation") or cfg.config.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in GEMMA_ACTIVATIONS:
        raise UserError(f"config key 'hidden_activation' must be gelu_pytorch_tanh for gemma, got {activation!r}")
    local_theta = local_scaling = None
    if model_type == "gemma3_text":
        params = cfg.config.get("rope_parameters")
        if isinstance(params, dict) and "full_attention" in params:
            rope_theta, rope_scaling = _rope_pair(params["full_attention"], 1_000_000.0)
            local_theta, local_scaling = _rope_pair(params.get("sliding_attention") or {}, 10_000.0)
        else:
            local_theta = float(cfg.get("rope_local_base_freq", (int, float), 10_000.0))
    softcap = lambda key: cfg.get(key, (int, float, type(None)), None)  # noqa: E731
    gemma = GemmaSpec(
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar", (int, float), 256)),
        attn_logit_softcapping=softcap("attn_logit_softcapping"),
        final_logit_softcapping=softcap("final_logit_softcapping"),
        local_rope_theta=local_theta,
        local_rope_scaling=local_scaling,
    )
    return gemma, rope_theta, rope_scaling


def _rope_pair(params: dict, default_theta: float) -> tuple[float, dict | None]:
    """(theta, scaling or None) of one rope_parameters entry."""
    if not isinstance(params, dict):
        raise UserError(f"rope_parameters entries must be dicts, got {params!r}")
    theta = params.get("rope_theta", default_theta)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise UserError(f"rope_parameters rope_theta must be a positive number, got {theta!r}")
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return float(theta), (scaling if scaling.get("rope_type", "default") != "default" else None)


def _head_dim_of(cfg: _Config, hidden: int, heads: int) -> int:
    head_dim = cfg.get("head_dim", int, None)
    if head_dim is not None:
        return head_dim
    if hidden % heads:
        raise UserError(
            f"config key 'num_attention_heads' ({heads}) must divide hidden_size ({hidden}) when head_dim is not given"
        )
    return hidden // heads


def _moe_layers(num_layers: int, is_moe: Any) -> tuple[str, ...]:
    return tuple("moe" if is_moe(i) else "dense" for i in range(num_layers))


def _qwen_moe(cfg: _Config, model_type: str, num_layers: int) -> tuple[MoESpec, tuple[str, ...]]:
    # transformers 5 writes num_local_experts where the Hub configs say num_experts
    key = "num_local_experts" if "num_local_experts" in cfg.config and "num_experts" not in cfg.config else "num_experts"
    num_experts = cfg.positive(key)
    skip = cfg.get("mlp_only_layers", list, [])
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in skip):
        raise UserError(f"config key 'mlp_only_layers' must be a list of layer indices, got {skip!r}")
    step = cfg.positive("decoder_sparse_step", 1)
    kinds = _moe_layers(num_layers, lambda i: i not in skip and (i + 1) % step == 0)
    shared = cfg.positive("shared_expert_intermediate_size") if model_type == "qwen2_moe" else 0
    moe = MoESpec(
        num_experts=num_experts,
        num_experts_per_tok=cfg.positive("num_experts_per_tok"),
        intermediate_size=cfg.positive("moe_intermediate_size"),
        num_shared_experts=1 if shared else 0,
        shared_intermediate_size=shared,
        shared_expert_gate=bool(shared),
        norm_topk_prob=cfg.get("norm_topk_prob", bool, False),
    )
    return moe, kinds


def _deepseek(cfg: _Config, model_type: str, num_layers: int, num_mtp: int):
    mla = MLASpec(
        q_lora_rank=cfg.get("q_lora_rank", (int, type(None)), None),
        kv_lora_rank=cfg.positive("kv_lora_rank"),
        qk_nope_head_dim=cfg.positive("qk_nope_head_dim"),
        qk_rope_head_dim=cfg.positive("qk_rope_head_dim"),
        v_head_dim=cfg.positive("v_head_dim"),
    )
    num_experts = cfg.get("n_routed_experts", (int, type(None)), None)
    if not num_experts:
        return mla, None, ("dense",) * num_layers, ("dense",) * num_mtp
    first_dense = cfg.get("first_k_dense_replace", int, 0)
    freq = cfg.positive("moe_layer_freq", 1)
    is_moe = lambda i: i >= first_dense and i % freq == 0  # noqa: E731
    v3 = model_type == "deepseek_v3"
    topk_method = cfg.get("topk_method", str, "noaux_tc" if v3 else "greedy")
    width = cfg.positive("moe_intermediate_size")
    n_shared = cfg.get("n_shared_experts", int, 0)
    moe = MoESpec(
        num_experts=num_experts,
        num_experts_per_tok=cfg.positive("num_experts_per_tok"),
        intermediate_size=width,
        num_shared_experts=n_shared,
        shared_intermediate_size=n_shared * width,
        norm_topk_prob=cfg.get("norm_topk_prob", bool, False),
        scoring_func=cfg.get("scoring_func", str, "sigmoid" if v3 else "softmax"),
        topk_method=topk_method,
        n_group=cfg.positive("n_group", 1),
        topk_group=cfg.positive("topk_group", 1),
        routed_scaling_factor=cfg.get("routed_scaling_factor", float, 1.0),
        score_correction_bias=topk_method == "noaux_tc",
    )
    kinds = _moe_layers(num_layers, is_moe)
    mtp_kinds = tuple("moe" if is_moe(num_layers + i) else "dense" for i in range(num_mtp))
    return mla, moe, kinds, mtp_kinds


def _glm4_moe(cfg: _Config, num_layers: int, num_mtp: int):
    """GLM-4.5: dense layers before first_k_dense_replace, then routed + shared experts with a
    sigmoid router and an e_score_correction_bias (transformers models/glm4_moe)."""
    first_dense = cfg.get("first_k_dense_replace", int, 0)
    width = cfg.positive("moe_intermediate_size")
    n_shared = cfg.get("n_shared_experts", int, 0)
    moe = MoESpec(
        num_experts=cfg.positive("n_routed_experts"),
        num_experts_per_tok=cfg.positive("num_experts_per_tok"),
        intermediate_size=width,
        num_shared_experts=n_shared,
        shared_intermediate_size=n_shared * width,
        norm_topk_prob=cfg.get("norm_topk_prob", bool, True),
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        n_group=cfg.positive("n_group", 1),
        topk_group=cfg.positive("topk_group", 1),
        routed_scaling_factor=cfg.get("routed_scaling_factor", float, 1.0),
        score_correction_bias=True,
    )
    kinds = _moe_layers(num_layers, lambda i: i >= first_dense)
    return moe, kinds, ("moe" if num_layers >= first_dense else "dense",) * num_mtp


def spec_from_config(config: dict, name: str = "") -> ModelSpec:
    """Read a Hugging Face config.json dict into a validated ModelSpec."""
    if not isinstance(config, dict):
        raise UserError(f"a model config must be a JSON object, got {type(config).__name__}")
    architectures = config.get("architectures") or []
    if isinstance(architectures, list) and architectures and architectures[0] in MULTIMODAL_TEXT:
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise UserError(f"{architectures[0]} config.json lacks its 'text_config' object")
        config = {**GEMMA3_TEXT_DEFAULTS, **text, "architectures": [MULTIMODAL_TEXT[architectures[0]]],
                  "model_type": "gemma3_text", "_name_or_path": config.get("_name_or_path", "")}
    model_type, architecture = _model_type_of(config)
    cfg = _Config(config, model_type)
    hidden = cfg.positive("hidden_size")
    heads = cfg.positive("num_attention_heads")
    kv_heads = cfg.positive("num_key_value_heads", heads)
    if heads % kv_heads:
        raise UserError(f"config key 'num_key_value_heads' ({kv_heads}) must divide num_attention_heads ({heads})")
    num_layers = cfg.positive("num_hidden_layers")
    num_mtp = cfg.get("num_nextn_predict_layers", int, 0) if model_type.startswith(("deepseek", "glm4_moe")) else 0
    rope_theta, rope_scaling = _rope_of(cfg)
    layer_types, window = _layer_types_of(cfg, model_type, num_layers)
    bos = cfg.get("bos_token_id", (int, type(None)), None)

    attention_bias = cfg.get("attention_bias", bool, False)
    o_proj_bias = attention_bias if model_type in ("llama", "qwen3", "qwen3_moe", "gpt_oss", "gemma2", "gemma3_text") \
        else False
    if model_type in ("qwen2", "qwen2_moe"):
        attention_bias = cfg.get("qkv_bias", bool, True)
    elif model_type in ("mistral", "mixtral"):
        attention_bias = False  # these attention modules have no bias, whatever the config says
    mlp_bias = cfg.get("mlp_bias", bool, False) if model_type in ("llama", "deepseek_v2") else False
    if model_type.startswith("deepseek") and (attention_bias or mlp_bias):
        raise UserError("config keys 'attention_bias' and 'mlp_bias' must be false for deepseek models")

    mla = moe = None
    mlp_kinds: tuple[str, ...] = ("dense",) * num_layers
    mtp_kinds: tuple[str, ...] = ()
    head_dim = 0
    if model_type in ("qwen2_moe", "qwen3_moe"):
        moe, mlp_kinds = _qwen_moe(cfg, model_type, num_layers)
    elif model_type == "mixtral":
        moe = MoESpec(
            num_experts=cfg.positive("num_local_experts"),
            num_experts_per_tok=cfg.positive("num_experts_per_tok"),
            intermediate_size=cfg.positive("intermediate_size"),
            norm_topk_prob=True,
        )
        mlp_kinds = ("moe",) * num_layers
    elif model_type == "gpt_oss":
        moe = MoESpec(
            num_experts=cfg.positive("num_local_experts"),
            num_experts_per_tok=cfg.positive(
                "num_experts_per_tok" if "num_experts_per_tok" in cfg.config else "experts_per_token"
            ),
            intermediate_size=cfg.positive("intermediate_size"),
            norm_topk_prob=True,
            router_bias=True,
            expert_bias=True,
            swiglu_alpha=cfg.get("swiglu_alpha", float, 1.702),
            swiglu_limit=cfg.get("swiglu_limit", float, 7.0),
        )
        mlp_kinds = ("moe",) * num_layers
        attention_bias = o_proj_bias = cfg.get("attention_bias", bool, True)
    elif model_type.startswith("deepseek"):
        mla, moe, mlp_kinds, mtp_kinds = _deepseek(cfg, model_type, num_layers, num_mtp)
        head_dim = mla.qk_head_dim
    elif model_type == "glm4_moe":  # DeepSeek-V3's MoE and MTP layout with GQA attention (q/k/v biases)
        moe, mlp_kinds, mtp_kinds = _glm4_moe(cfg, num_layers, num_mtp)
        attention_bias = cfg.get("attention_bias", bool, False)
    gemma = None
    if model_type.startswith("gemma"):
        gemma, rope_theta, rope_scaling = _gemma(cfg, model_type, rope_theta, rope_scaling)
        o_proj_bias = attention_bias

    return ModelSpec(
        name=name or str(config.get("_name_or_path") or model_type),
        model_type=model_type,
        architecture=architecture,
        family=FAMILIES[model_type],
        vocab_size=cfg.positive("vocab_size"),
        hidden_size=hidden,
        num_layers=num_layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim or _head_dim_of(cfg, hidden, heads),
        intermediate_size=cfg.positive("intermediate_size"),
        rms_norm_eps=cfg.get("rms_norm_eps", float, 1e-6),
        rope_theta=rope_theta,
        max_position_embeddings=cfg.positive("max_position_embeddings"),
        tie_word_embeddings=cfg.get("tie_word_embeddings", bool, model_type.startswith("gemma")),
        attention_bias=attention_bias,
        qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text") or (
            model_type == "glm4_moe" and cfg.get("use_qk_norm", bool, False)),
        torch_dtype=_dtype_of(cfg),
        quantization=_quantization_of(cfg),
        o_proj_bias=o_proj_bias,
        mlp_bias=mlp_bias,
        attention_sinks=model_type == "gpt_oss",
        mlp_kinds=mlp_kinds,
        layer_types=layer_types,
        sliding_window=window,
        moe=moe,
        mla=mla,
        gemma=gemma,
        num_mtp_layers=num_mtp,
        mtp_mlp_kinds=mtp_kinds,
        bos_token_id=bos,
        eos_token_ids=_eos_of(cfg),
        rope_scaling=rope_scaling,
        config=config,
    )


# ---------------------------------------------------------------------------------------------
# Loading: a config.json path, a folder holding one, or a built-in name


def _catalog_files() -> dict[str, Any]:
    folder = resources.files("pipesplit.planner") / "catalog"
    return {p.name[: -len(".json")]: p for p in folder.iterdir() if p.name.endswith(".json")}


HUB_IDS = {
    # the Hugging Face repository each built-in config.json was published in (engines' launch lines)
    "deepseek-v2-lite": "deepseek-ai/DeepSeek-V2-Lite",
    "deepseek-v3": "deepseek-ai/DeepSeek-V3",
    "gemma-3-27b": "google/gemma-3-27b-it",
    "glm-4.5": "zai-org/GLM-4.5",
    "gpt-oss-120b": "openai/gpt-oss-120b",
    "gpt-oss-20b": "openai/gpt-oss-20b",
    "llama-3.1-70b-instruct": "meta-llama/Llama-3.1-70B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.3-70b-instruct": "meta-llama/Llama-3.3-70B-Instruct",
    "mixtral-8x7b-v0.1": "mistralai/Mixtral-8x7B-v0.1",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen3-235b-a22b-fp8": "Qwen/Qwen3-235B-A22B-FP8",
    "qwen3-235b-a22b-instruct-2507": "Qwen/Qwen3-235B-A22B-Instruct-2507",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "qwen3-32b": "Qwen/Qwen3-32B",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}


def hub_id_of(model: str) -> str:
    """The Hub id to hand an engine for a model argument: built-in names map to their repository."""
    return HUB_IDS.get(model.lower(), model)


def catalog_names() -> list[str]:
    """Built-in model names (catalog file stems), sorted."""
    return sorted(_catalog_files())


def _read_json(text: str, where: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where} is not valid JSON: {e}") from None


def load_spec(model: str, allow_download: bool = True) -> ModelSpec:
    """ModelSpec from a config.json path, a folder holding config.json, a built-in name or a Hub id.

    A Hub id (`Qwen/Qwen3-32B`) reads config.json from the local Hugging Face cache, or downloads
    that one file when allow_download and HF_HUB_OFFLINE is not set (see planner/hub.py).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise UserError(f"folder {model} holds no config.json; give a Hugging Face model folder or a config.json")
        return spec_from_config(_read_json(config_path.read_text(), str(config_path)), name=path.resolve().name)
    if path.is_file():
        name = path.resolve().parent.name if path.name == "config.json" else path.stem
        return spec_from_config(_read_json(path.read_text(), model), name=name)
    catalog = _catalog_files()
    key = model.lower()
    if key in catalog:
        return spec_from_config(_read_json(catalog[key].read_text(), f"built-in {key}"), name=key)
    from pipesplit.planner.hub import hub_config_path, is_hub_id

    if is_hub_id(model):
        config_path = hub_config_path(model, allow_download=allow_download)
        return spec_from_config(_read_json(config_path.read_text(), f"{model} config.json"), name=model)
    raise UserError(
        f"no model {model!r}: not a config.json, a folder holding one, a Hugging Face id (Org/Name) or a "
        f"built-in name ({', '.join(sorted(catalog))})"
    )
