"""Exact weight and KV-cache costs of a model, per tensor-parallel rank.

The inventory lists every tensor by its Hugging Face checkpoint name, with global layer indices
(`model.layers.{i}.*`; DeepSeek MTP modules continue at `model.layers.{num_layers + i}.*`).
With tp > 1 the shapes are those one rank holds:
- column-parallel Linears (q/k/v, gate/up, MLA q_b/kv_b, experts' gate/up) split their output
  dimension, row-parallel ones (o_proj, down_proj, experts' down) their input dimension;
- the embedding and lm_head are vocab-parallel (ceil(vocab / tp) rows);
- norms, routers, MLA's q_a/kv_a projections and the biases of row-parallel outputs are replicated;
- k/v heads split as num_kv_heads / tp, or one head per rank (replicated) when tp > num_kv_heads.
Experts are split by their intermediate size (tensor parallel), not spread over ranks.

weight_dtype=None gives the tensors as stored (FP8 weights + float32 block scales, MXFP4 blocks and
scales); a dtype gives what a runtime holds after loading in that dtype: every tensor in that
dtype, quantized weights dequantized and no scale tensors. Dequantized gpt-oss experts follow
transformers' GptOssExperts: `mlp.experts.gate_up_proj` [E, hidden, 2 * inter] and
`mlp.experts.down_proj` [E, inter, hidden] (plus their `_bias`).
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass

from pipesplit.errors import UserError
from pipesplit.planner.spec import DTYPES, ModelSpec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "uint8": 1}
KV_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
MXFP4_BLOCK = 32  # elements per MXFP4 block: 16 bytes of packed nibbles + one uint8 scale


@dataclass(frozen=True)
class CostModel:
    """What the partitioner needs to know about a model, per TP rank, in bytes."""

    layer_weight_bytes: tuple[int, ...]
    embedding_bytes: int
    head_bytes: int
    tied_head_bytes: int
    mtp_bytes: int
    kv_bytes_per_token_per_layer: int
    # Compute per token (2 x multiply-adds of the weight matrices a token passes through; routed
    # experts count top_k / num_experts of theirs; attention over the context is left out).
    layer_flops_per_token: tuple[int, ...] = ()
    head_flops_per_token: int = 0
    window_layers: tuple[bool, ...] = ()  # per layer: sliding-window attention (keeps only its window)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: checkpoint name, shape (per TP rank where sharded) and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def kv_heads_per_rank(spec: ModelSpec, tp: int = 1) -> int:
    """K/V heads one TP rank holds: num_kv_heads / tp, or 1 (replicated) when tp > num_kv_heads."""
    return max(1, spec.num_kv_heads // tp)


def _tp_problem(spec: ModelSpec, tp: int) -> str | None:
    """Why tp does not split the model evenly, or None."""
    checks = [("attention heads", spec.num_attention_heads)]
    if spec.mla is None:
        kv = spec.num_kv_heads
        if kv % tp and tp % kv:
            return f"{kv} key/value heads need tp dividing {kv} or a multiple of it"
    kinds = spec.mlp_kinds + spec.mtp_mlp_kinds
    if "dense" in kinds:
        checks.append(("MLP intermediate size", spec.intermediate_size))
    if spec.moe is not None:
        checks.append(("expert intermediate size", spec.moe.intermediate_size))
        if spec.moe.shared_intermediate_size:
            checks.append(("shared expert intermediate size", spec.moe.shared_intermediate_size))
    for what, n in checks:
        if n % tp:
            return f"{what} ({n}) not divisible by {tp}"
    return None


def valid_tp_sizes(spec: ModelSpec) -> list[int]:
    """Every tp that splits the model evenly (up to the number of attention heads)."""
    return [t for t in range(1, spec.num_attention_heads + 1) if _tp_problem(spec, t) is None]


def check_tp(spec: ModelSpec, tp: int) -> None:
    """Raise UserError unless tp splits heads and MLP widths of the model evenly."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise UserError(f"tp must be a positive integer, got {tp!r}")
    problem = _tp_problem(spec, tp)
    if problem:
        valid = ", ".join(map(str, valid_tp_sizes(spec)))
        raise UserError(f"tp {tp} does not fit {spec.name}: {problem}; use tp in {valid}")


def _check_weight_dtype(weight_dtype: str | None) -> None:
    if weight_dtype is not None and weight_dtype not in DTYPES:
        raise UserError(f"weight dtype {weight_dtype!r} is not supported; use {', '.join(DTYPES)} or none (as stored)")


class _Inventory:
    """Builds the tensors of one TP rank, in checkpoint names."""

    def __init__(self, spec: ModelSpec, tp: int = 1, weight_dtype: str | None = None) -> None:
        check_tp(spec, tp)
        _check_weight_dtype(weight_dtype)
        self.spec = spec
        self.tp = tp
        self.dtype = weight_dtype or spec.torch_dtype
        self.dequantized = weight_dtype is not None
        self.quant = spec.quantization

    # -- building blocks ---------------------------------------------------------------------
    def _quantized(self, method: str, module: str) -> bool:
        if self.dequantized or self.quant.method != method:
            return False
        for pattern in self.quant.modules_to_not_convert:
            if module == pattern or module.startswith(pattern + ".") or fnmatch.fnmatchcase(module, pattern) \
                    or fnmatch.fnmatchcase(module, pattern + ".*"):
                return False
        return True

    def vector(self, name: str, n: int, stored_dtype: str | None = None) -> list[TensorInfo]:
        dtype = self.dtype if self.dequantized else (stored_dtype or self.dtype)
        return [TensorInfo(name, (n,), dtype)]

    def linear(self, module: str, out: int, in_: int, split: str | None = None, bias: bool = False,
               quantizable: bool = True) -> list[TensorInfo]:
        """`module.weight` [out, in] (+ FP8 block scales, + bias); split: "col" | "row" | None."""
        if split == "col":
            out = _ceil_div(out, self.tp)
        elif split == "row":
            in_ = _ceil_div(in_, self.tp)
        if quantizable and self._quantized("fp8", module):
            b0, b1 = self.quant.weight_block_size
            tensors = [
                TensorInfo(f"{module}.weight", (out, in_), "float8_e4m3fn"),
                TensorInfo(f"{module}.weight_scale_inv", (_ceil_div(out, b0), _ceil_div(in_, b1)), "float32"),
            ]
        else:
            tensors = [TensorInfo(f"{module}.weight", (out, in_), self.dtype)]
        if bias:
            tensors.append(TensorInfo(f"{module}.bias", (out,), self.dtype))
        return tensors

    def embedding(self, name: str) -> list[TensorInfo]:
        return [TensorInfo(name, (_ceil_div(self.spec.vocab_size, self.tp), self.spec.hidden_size), self.dtype)]

    # -- attention ---------------------------------------------------------------------------
    def attention(self, p: str) -> list[TensorInfo]:
        s = self.spec
        if s.mla is not None:
            return self.mla_attention(p)
        hidden, hd = s.hidden_size, s.head_dim
        q_out = s.num_attention_heads * hd
        kv_out = kv_heads_per_rank(s, self.tp) * hd  # already per rank
        t = self.linear(f"{p}.q_proj", q_out, hidden, "col", s.attention_bias)
        t += self.linear(f"{p}.k_proj", kv_out, hidden, None, s.attention_bias)
        t += self.linear(f"{p}.v_proj", kv_out, hidden, None, s.attention_bias)
        t += self.linear(f"{p}.o_proj", hidden, q_out, "row", s.o_proj_bias)
        if s.qk_norm:
            t += self.vector(f"{p}.q_norm.weight", hd) + self.vector(f"{p}.k_norm.weight", hd)
        if s.attention_sinks:
            t += self.vector(f"{p}.sinks", s.num_attention_heads // self.tp)
        return t

    def mla_attention(self, p: str) -> list[TensorInfo]:
        s, m = self.spec, self.spec.mla
        hidden, heads = s.hidden_size, s.num_attention_heads
        if m.q_lora_rank:
            t = self.linear(f"{p}.q_a_proj", m.q_lora_rank, hidden)
            t += self.vector(f"{p}.q_a_layernorm.weight", m.q_lora_rank)
            t += self.linear(f"{p}.q_b_proj", heads * m.qk_head_dim, m.q_lora_rank, "col")
        else:
            t = self.linear(f"{p}.q_proj", heads * m.qk_head_dim, hidden, "col")
        t += self.linear(f"{p}.kv_a_proj_with_mqa", m.kv_lora_rank + m.qk_rope_head_dim, hidden)
        t += self.vector(f"{p}.kv_a_layernorm.weight", m.kv_lora_rank)
        t += self.linear(f"{p}.kv_b_proj", heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank, "col")
        t += self.linear(f"{p}.o_proj", hidden, heads * m.v_head_dim, "row")
        return t

    # -- MLPs --------------------------------------------------------------------------------
    def gated_mlp(self, p: str, width: int, bias: bool = False, names=("gate_proj", "up_proj", "down_proj")):
        hidden = self.spec.hidden_size
        gate, up, down = names
        return (self.linear(f"{p}.{gate}", width, hidden, "col", bias)
                + self.linear(f"{p}.{up}", width, hidden, "col", bias)
                + self.linear(f"{p}.{down}", hidden, width, "row", bias))

    def moe(self, layer_prefix: str) -> list[TensorInfo]:
        s, moe = self.spec, self.spec.moe
        hidden, experts = s.hidden_size, moe.num_experts
        if s.model_type == "gpt_oss":
            p = f"{layer_prefix}.mlp"
            return (self.linear(f"{p}.router", experts, hidden, bias=True, quantizable=False)
                    + self.fused_experts(f"{p}.experts"))
        if s.model_type == "mixtral":
            p, expert_names = f"{layer_prefix}.block_sparse_moe", ("w1", "w3", "w2")
        else:
            p, expert_names = f"{layer_prefix}.mlp", ("gate_proj", "up_proj", "down_proj")
        t = self.linear(f"{p}.gate", experts, hidden, quantizable=False)
        if moe.score_correction_bias:
            t += self.vector(f"{p}.gate.e_score_correction_bias", experts, stored_dtype="float32")
        for e in range(experts):
            t += self.gated_mlp(f"{p}.experts.{e}", moe.intermediate_size, names=expert_names)
        if moe.num_shared_experts:
            shared = "shared_expert" if s.model_type == "qwen2_moe" else "shared_experts"
            t += self.gated_mlp(f"{p}.{shared}", moe.shared_intermediate_size)
        if moe.shared_expert_gate:
            t += self.linear(f"{p}.shared_expert_gate", 1, hidden, quantizable=False)
        return t

    def fused_experts(self, p: str) -> list[TensorInfo]:
        """gpt-oss experts: one tensor per projection for all experts, with biases."""
        s = self.spec
        experts, hidden = s.moe.num_experts, s.hidden_size
        width = _ceil_div(s.moe.intermediate_size, self.tp)
        biases = [TensorInfo(f"{p}.gate_up_proj_bias", (experts, 2 * width), self.dtype),
                  TensorInfo(f"{p}.down_proj_bias", (experts, hidden), self.dtype)]
        if not self._quantized("mxfp4", p):
            return [TensorInfo(f"{p}.gate_up_proj", (experts, hidden, 2 * width), self.dtype),
                    TensorInfo(f"{p}.down_proj", (experts, width, hidden), self.dtype)] + biases
        t = []
        for proj, out, in_ in (("gate_up_proj", 2 * width, hidden), ("down_proj", hidden, width)):
            blocks = _ceil_div(in_, MXFP4_BLOCK)
            t.append(TensorInfo(f"{p}.{proj}_blocks", (experts, out, blocks, MXFP4_BLOCK // 2), "uint8"))
            t.append(TensorInfo(f"{p}.{proj}_scales", (experts, out, blocks), "uint8"))
        return t + biases

    # -- whole pieces ------------------------------------------------------------------------
    def layer(self, layer: int) -> list[TensorInfo]:
        s = self.spec
        p = f"model.layers.{layer}"
        t = self.vector(f"{p}.input_layernorm.weight", s.hidden_size)
        t += self.vector(f"{p}.post_attention_layernorm.weight", s.hidden_size)
        if s.gemma is not None:  # norms around the MLP too
            t += self.vector(f"{p}.pre_feedforward_layernorm.weight", s.hidden_size)
            t += self.vector(f"{p}.post_feedforward_layernorm.weight", s.hidden_size)
        t += self.attention(f"{p}.self_attn")
        if s.mlp_kind(layer) == "moe":
            t += self.moe(p)
        else:
            t += self.gated_mlp(f"{p}.mlp", s.intermediate_size, s.mlp_bias)
        return t

    def head(self) -> list[TensorInfo]:
        return self.vector("model.norm.weight", self.spec.hidden_size) + self.embedding("lm_head.weight")

    def mtp(self) -> list[TensorInfo]:
        s = self.spec
        t = []
        for layer in range(s.num_layers, s.num_layers + s.num_mtp_layers):
            p = f"model.layers.{layer}"
            t += self.embedding(f"{p}.embed_tokens.weight")
            t += self.vector(f"{p}.enorm.weight", s.hidden_size) + self.vector(f"{p}.hnorm.weight", s.hidden_size)
            t += self.linear(f"{p}.eh_proj", s.hidden_size, 2 * s.hidden_size, quantizable=False)
            t += self.vector(f"{p}.shared_head.norm.weight", s.hidden_size)
            t += self.embedding(f"{p}.shared_head.head.weight")
            t += self.layer(layer)
        return t


# -------------------------------------------------------------------------------------------
# Public inventory


def layer_tensors(spec: ModelSpec, layer: int, tp: int = 1, weight_dtype: str | None = None) -> list[TensorInfo]:
    """Tensors of decoder layer `layer` (global index; MTP decoder layers allowed) on one TP rank."""
    if not 0 <= layer < spec.num_layers + spec.num_mtp_layers:
        raise IndexError(f"layer {layer} out of range for {spec.num_layers} layers")
    return _Inventory(spec, tp, weight_dtype).layer(layer)


def embedding_tensors(spec: ModelSpec, tp: int = 1, weight_dtype: str | None = None) -> list[TensorInfo]:
    """`model.embed_tokens.weight` (vocab-parallel)."""
    return _Inventory(spec, tp, weight_dtype).embedding("model.embed_tokens.weight")


def head_tensors(spec: ModelSpec, tp: int = 1, weight_dtype: str | None = None) -> list[TensorInfo]:
    """`model.norm.weight` and `lm_head.weight`, as the last stage holds them.

    With tied embeddings the checkpoint stores no lm_head.weight: this entry is the last stage's
    copy of `model.embed_tokens.weight` (needed when that stage is not also the first).
    """
    return _Inventory(spec, tp, weight_dtype).head()


def mtp_tensors(spec: ModelSpec, tp: int = 1, weight_dtype: str | None = None) -> list[TensorInfo]:
    """The MTP (NextN) modules, `model.layers.{num_layers + i}.*`; empty if the model has none."""
    return _Inventory(spec, tp, weight_dtype).mtp()


def checkpoint_tensors(spec: ModelSpec, weight_dtype: str | None = None) -> list[TensorInfo]:
    """Every tensor the checkpoint stores: tied embeddings once, MTP modules included."""
    inv = _Inventory(spec, 1, weight_dtype)
    tensors = inv.embedding("model.embed_tokens.weight")
    for layer in range(spec.num_layers):
        tensors += inv.layer(layer)
    head = inv.head()
    if spec.tie_word_embeddings:
        head = [t for t in head if t.name != "lm_head.weight"]
    return tensors + head + inv.mtp()


def params_total(spec: ModelSpec, weight_dtype: str | None = None) -> int:
    """Elements of every stored tensor, scales included (the Hub's safetensors total).

    With a weight_dtype: elements after dequantizing (MXFP4 experts unpacked, no scales), the
    figure published for gpt-oss.
    """
    return sum(t.numel for t in checkpoint_tensors(spec, weight_dtype))


def weight_bytes_total(spec: ModelSpec, weight_dtype: str | None = None) -> int:
    """Tensor payload bytes of the checkpoint (safetensors headers excluded), or in weight_dtype."""
    return sum(t.nbytes for t in checkpoint_tensors(spec, weight_dtype))


def _nbytes(tensors: list[TensorInfo]) -> int:
    return sum(t.nbytes for t in tensors)


# -------------------------------------------------------------------------------------------
# Cost model


def kv_dtype_bytes(spec: ModelSpec, kv_dtype: str = "auto") -> int:
    """Bytes per cached element; auto is the checkpoint's unquantized dtype."""
    name = spec.torch_dtype if kv_dtype == "auto" else kv_dtype
    if name not in KV_DTYPE_BYTES:
        raise UserError(f"kv dtype {kv_dtype!r} is not supported; use auto, {', '.join(KV_DTYPE_BYTES)}")
    return KV_DTYPE_BYTES[name]


def kv_bytes_per_token(spec: ModelSpec, tp: int = 1, kv_dtype: str = "auto") -> int:
    """KV-cache bytes per token per layer on one TP rank.

    GQA: K and V for the rank's kv heads. MLA: the compressed latent plus the rope key
    (kv_lora_rank + qk_rope_head_dim), which every rank holds whole.
    """
    size = kv_dtype_bytes(spec, kv_dtype)
    if spec.mla is not None:
        return spec.mla.kv_cache_dim * size
    return 2 * kv_heads_per_rank(spec, tp) * spec.head_dim * size


@functools.lru_cache(maxsize=64)
def cost_model(spec: ModelSpec, tp: int = 1, kv_dtype: str = "auto", mtp: bool = False,
               weight_dtype: str | None = None) -> CostModel:
    """Per-TP-rank bytes of every pipeline piece, and the KV bytes per token per layer."""
    inv = _Inventory(spec, tp, weight_dtype)
    if mtp and not spec.num_mtp_layers:
        raise UserError(f"{spec.name} has no MTP layers (num_nextn_predict_layers); drop --mtp")
    head = _nbytes(inv.head())
    norm = _nbytes(inv.vector("model.norm.weight", spec.hidden_size))
    logical = _Inventory(spec, tp, weight_dtype or "bfloat16")  # dequantized shapes for FLOPs
    return CostModel(
        layer_weight_bytes=tuple(_nbytes(inv.layer(i)) for i in range(spec.num_layers)),
        embedding_bytes=_nbytes(inv.embedding("model.embed_tokens.weight")),
        head_bytes=head,
        tied_head_bytes=norm if spec.tie_word_embeddings else head,
        mtp_bytes=_nbytes(inv.mtp()) if mtp else 0,
        kv_bytes_per_token_per_layer=kv_bytes_per_token(spec, tp, kv_dtype),
        layer_flops_per_token=tuple(_flops_per_token(spec, logical.layer(i)) for i in range(spec.num_layers)),
        head_flops_per_token=_flops_per_token(spec, logical.head()),
        window_layers=tuple(t == "sliding_attention" for t in spec.layer_types),
    )


def _flops_per_token(spec: ModelSpec, tensors: list[TensorInfo]) -> int:
    """2 x the multiply-adds of the weight matrices (not norms or biases) one token goes through."""
    macs = 0
    for t in tensors:
        if len(t.shape) < 2:
            continue
        if ".experts." in t.name and spec.moe is not None:  # routed experts: only top_k of them run
            macs += t.numel * spec.moe.num_experts_per_tok // spec.moe.num_experts
        else:
            macs += t.numel
    return 2 * macs
