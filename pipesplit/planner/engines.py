"""The KV capacity vLLM and SGLang will report for a plan: each engine's memory model, per stage.

`--engine pipesplit` keeps pipesplit's own rule (capacity x --mem-fraction - --reserve, the same
for every stage). `--engine vllm` and `--engine sglang` follow what those engines do at start-up:

vLLM (v0.17 to v0.20, the versions of the calibration logs; vllm/v1/worker/gpu_worker.py
`determine_available_memory`, vllm/utils/mem_utils.py `memory_profiling`): per worker,
KV = total x --gpu-memory-utilization - weights - peak activation of a profile run with
--max-num-batched-tokens tokens (logits and the sampler warm-up on the last stage) - non-torch
memory (NCCL, custom all-reduce); blocks = KV // (--block-size x KV bytes per token of its local
layers, in hybrid groups for sliding-window models); the engine takes the minimum over workers.

SGLang (python/sglang/srt/model_executor/model_runner.py `profile_max_num_token`): `total` is the
free memory before loading, the minimum over all ranks; after loading,
rest = min free over ranks - total x (1 - --mem-fraction-static); tokens = rest / (KV bytes per
token of the rank's layers), rounded to --page-size, then the minimum over PP ranks. CUDA graphs are
captured from what is left afterwards, so they do not lower the pool. The default
--mem-fraction-static is server_args.py's heuristic on GPU memory and TP x PP.

Every constant below names the engine source or the published log it comes from
(tests/planner/data/field_cases.json holds the logs and the tests that hold the models to them).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipesplit.errors import UserError
from pipesplit.planner.costs import DTYPE_BYTES, kv_heads_per_rank
from pipesplit.planner.hardware import Device, GiB, MiB, find_gpu_or_none
from pipesplit.planner.spec import ModelSpec

ENGINES = ("pipesplit", "sglang", "vllm")

# -- both engines ------------------------------------------------------------------------------
CUDA_CONTEXT_BYTES = int(0.51 * GiB)
"""CUDA context + allocator init: llm-d-planner accuracy report (vLLM 0.19, H100): total 79.19 GiB,
free at start 78.68 GiB. SGLang measures its `total` after the context exists."""

UNLOGGED_VISIBLE_LOSS_MIB = 500
"""GPUs without a logged CUDA total: what cudaMemGetInfo reports is the driver's total less about
this much (H100: 81,559 MiB vs 79.19 GiB = 468 MiB; A100-40GB: 40,960 MiB vs 39.38 GiB = 635 MiB)."""

VISIBLE_GIB = {
    # torch.cuda.mem_get_info()[1] as engines log it
    "H100-80GB": 79.19,  # llm-d-planner accuracy report (vLLM 0.19 logs); vllm#21348
    "A100-40GB": 39.38,  # vllm-project/vllm#16570 (A100 40GB: 39.38 GiB)
}

# -- vLLM --------------------------------------------------------------------------------------
VLLM_DEFAULT_UTIL = 0.9  # vllm/config/cache.py gpu_memory_utilization default
VLLM_DEFAULT_BLOCK = 16  # vllm/config/cache.py block_size default on CUDA
VLLM_BIG_GPU_BYTES = 70 * GiB
"""vllm/engine/arg_utils.py `_set_default_args`: GPUs with >= 70 GiB (not A100) default `vllm serve`
to max_num_batched_tokens 8192 and max_num_seqs 1024; smaller ones to 2048 and 256."""
VLLM_SAMPLER_LOGITS_COPIES = 1.56
"""Peak activation of the last stage beyond the layers' own: max_num_seqs x vocab x fp32 logits
this many times over (the dummy sampler run). Calibrated on field case V1 (Llama-3.1-8B, vLLM 0.19,
activation 1.89 GiB at PP1): the layers' part from activation_bytes_per_token is 1.125 GiB there,
within 2% of the 1.10 GiB that the logits-free rank 0 of PP2 logged (case V4)."""
VLLM_NON_TORCH_TP1_PP1 = 0.25 * GiB  # field case V1: "non-torch 0.25 GiB" (vLLM 0.19, TP1 PP1)
VLLM_NON_TORCH_TP1_PP = 0.07 * GiB  # field case V4: 0.07 GiB on rank 0 of PP2 and PP4 (vLLM 0.19)
VLLM_NON_TORCH_TP_BASE, VLLM_NON_TORCH_TP_PER_RANK = 2.01 * GiB, 0.03 * GiB
"""field case V3 (vLLM 0.19): non-torch 2.07 GiB per rank at TP2, 2.13 at TP4 (NCCL and custom
all-reduce buffers): 2.01 + 0.03 x TP."""

# -- SGLang ------------------------------------------------------------------------------------
SGLANG_SWA_FULL_TOKENS_RATIO = 0.8  # server_args.py swa_full_tokens_ratio default
SGLANG_DEFAULT_PAGE = 1  # server_args.py page_size default (None -> 1 for the default backends)
SGLANG_COMM_TP_BYTES = {4: int(1.70 * GiB), 8: int(2.01 * GiB)}
"""Memory `init_torch_distributed` takes per rank with TP (NCCL + custom all-reduce):
sgl-project/sglang#11716 logs `Init torch distributed ends. mem usage=2.01 GB` at TP8; at TP4 the
field case S1 (vllm#21348) implies 1.70 GiB. Other TP sizes interpolate linearly in TP."""


@dataclass(frozen=True)
class EngineSettings:
    """The user's engine flags; None means the engine's own default."""

    engine: str = "pipesplit"
    memory_fraction: float | None = None  # vllm --gpu-memory-utilization, sglang --mem-fraction-static
    max_num_batched_tokens: int | None = None  # vllm --max-num-batched-tokens, sglang --chunked-prefill-size
    max_num_seqs: int | None = None  # vllm --max-num-seqs
    max_model_len: int | None = None  # vllm --max-model-len, sglang --context-length
    page_size: int | None = None  # vllm --block-size, sglang --page-size
    cuda_graph_max_bs: int | None = None  # sglang --cuda-graph-max-bs
    reserve_gib: float | None = None  # replaces the modelled overhead per stage

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise UserError(f"unknown engine {self.engine!r}; give one of {', '.join(ENGINES)}")
        if self.memory_fraction is not None and not 0 < self.memory_fraction <= 1:
            raise UserError(f"memory fraction {self.memory_fraction:g} must be in (0, 1], e.g. 0.9")
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "page_size", "cuda_graph_max_bs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} is {value}; give a positive integer")
        if self.reserve_gib is not None and self.reserve_gib < 0:
            raise UserError(f"--reserve is {self.reserve_gib:g} GiB; give 0 or more")


@dataclass(frozen=True)
class StageOverhead:
    """What a stage's engine spends besides weights and KV, and the budget it divides, in bytes."""

    budget: int  # the bytes weights + KV + overhead must fit in
    context: int = 0
    communicator: int = 0
    activation: int = 0
    logits: int = 0
    buffers: int = 0  # allocated beside the weights (vLLM's rotary cache)
    reserve: int = 0  # --reserve, when it replaces the modelled terms

    @property
    def total(self) -> int:
        return self.context + self.communicator + self.activation + self.logits + self.buffers + self.reserve

    @property
    def usable(self) -> int:
        """Bytes left for weights and KV cache."""
        return max(0, self.budget - self.total)


def visible_bytes(device: Device) -> int:
    """What cudaMemGetInfo reports as the device total (engines budget from it, not nvidia-smi's)."""
    gpu = find_gpu_or_none(device.name)
    if gpu is not None and gpu.name in VISIBLE_GIB:
        return int(VISIBLE_GIB[gpu.name] * GiB)
    return device.capacity_bytes - UNLOGGED_VISIBLE_LOSS_MIB * MiB


# -------------------------------------------------------------------------------------------
# SGLang's defaults (server_args.py `_handle_gpu_memory_settings`, 2025-12)


@dataclass(frozen=True)
class SglangDefaults:
    chunked_prefill_size: int
    cuda_graph_max_bs: int
    mem_fraction_static: float


def sglang_defaults(gpu_mem_mib: int, tp: int, pp: int, chunked_prefill_size: int | None = None,
                    cuda_graph_max_bs: int | None = None) -> SglangDefaults:
    """SGLang's chunked-prefill size, CUDA-graph batch and mem_fraction_static for this GPU and TP x PP.

    gpu_mem_mib is the smallest GPU's total as nvidia-smi reports it (get_device_memory_capacity).
    Tiers (MiB): < 20 Gi: 2048 / 8; < 35 Gi: 2048 / 24 (80 at TP >= 4); < 60 Gi: 4096 / 32 (160);
    < 90 Gi and < 160 Gi: 8192 / 256 (512); larger: 16384 / 512. Reserved MiB = 512 + 1.5 x
    max(chunked, 2048) + 2 x cuda_graph_max_bs + TP x PP / 8 x 1024, at least 10 GiB on GPUs over
    60 GiB; fraction = round((gpu_mem - reserved) / gpu_mem, 3).
    """
    tiers = ((20 * 1024, 2048, 8, 8), (35 * 1024, 2048, 24, 80), (60 * 1024, 4096, 32, 160),
             (160 * 1024, 8192, 256, 512))
    chunk, small_bs, big_bs = 16384, 512, 512
    for limit, c, s, b in tiers:
        if gpu_mem_mib < limit:
            chunk, small_bs, big_bs = c, s, b
            break
    chunk = chunked_prefill_size or chunk
    bs = cuda_graph_max_bs or (small_bs if tp < 4 else big_bs)
    reserved = 512 + max(chunk, 2048) * 1.5 + bs * 2 + tp * pp / 8 * 1024
    if gpu_mem_mib > 60 * 1024:
        reserved = max(reserved, 10 * 1024)
    return SglangDefaults(chunk, bs, round((gpu_mem_mib - reserved) / gpu_mem_mib, 3))


def _sglang_comm_bytes(tp: int) -> int:
    if tp == 1:
        return 0
    (t0, b0), (t1, b1) = sorted(SGLANG_COMM_TP_BYTES.items())
    return max(0, int(b0 + (b1 - b0) * (tp - t0) / (t1 - t0)))


# -------------------------------------------------------------------------------------------
# vLLM's profile run


def vllm_batch_defaults(device: Device) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) `vllm serve` picks for this GPU."""
    big = visible_bytes(device) >= VLLM_BIG_GPU_BYTES and not device.name.upper().startswith("A100")
    return (8192, 1024) if big else (2048, 256)


def activation_bytes_per_token(spec: ModelSpec, tp: int, dtype_bytes: int = 2) -> int:
    """Peak activation bytes per batched token of one decoder layer on one TP rank.

    The MLP's gate/up output and its activated half (3 x width / TP; for MoE the routed top-k
    widths plus shared experts), q/k/v (per rank) and six hidden-size buffers (residual, norm
    output, attention output, o_proj output, MLP output, the next layer's input).
    """
    if spec.moe is not None and "moe" in spec.mlp_kinds:
        width = spec.moe.num_experts_per_tok * spec.moe.intermediate_size + spec.moe.shared_intermediate_size
        width = max(width, spec.intermediate_size if "dense" in spec.mlp_kinds else 0)
    else:
        width = spec.intermediate_size
    if spec.mla is not None:
        qkv = spec.num_attention_heads * spec.mla.qk_head_dim // tp + spec.mla.kv_cache_dim
    else:
        qkv = spec.num_attention_heads * spec.head_dim // tp + 2 * kv_heads_per_rank(spec, tp) * spec.head_dim
    return dtype_bytes * (3 * width // tp + qkv + 6 * spec.hidden_size)


def rotary_cache_bytes(spec: ModelSpec, dtype_bytes: int = 2) -> int:
    """vLLM's rotary cos/sin cache (vllm/model_executor/layers/rotary_embedding: max positions x
    rotary dim in the model dtype), allocated once per worker and counted in its weights."""
    head = spec.mla.qk_rope_head_dim if spec.mla is not None else spec.head_dim
    return spec.max_position_embeddings * head * dtype_bytes


# -------------------------------------------------------------------------------------------
# Per stage


def stage_overheads(spec: ModelSpec, devices: tuple[Device, ...], tp: int, settings: EngineSettings,
                    mem_fraction: float = 0.9, reserve_gib: float = 2.0) -> tuple[StageOverhead, ...]:
    """Budget and overhead of every pipeline stage under the chosen engine's memory model."""
    pp = len(devices)
    if settings.engine == "pipesplit":
        return tuple(
            StageOverhead(int(d.capacity_bytes * mem_fraction), reserve=int(reserve_gib * GiB)) for d in devices
        )
    reserve = None if settings.reserve_gib is None else int(settings.reserve_gib * GiB)
    if settings.engine == "vllm":
        util = engine_fraction(devices, tp, settings, mem_fraction)
        out = []
        for s, device in enumerate(devices):
            budget = int(visible_bytes(device) * util)
            if reserve is not None:
                out.append(StageOverhead(budget, reserve=reserve))
                continue
            tokens, seqs = vllm_batch_defaults(device)
            tokens = settings.max_num_batched_tokens or tokens
            seqs = settings.max_num_seqs or seqs
            if tp == 1:
                non_torch = VLLM_NON_TORCH_TP1_PP1 if pp == 1 else VLLM_NON_TORCH_TP1_PP
            else:
                non_torch = VLLM_NON_TORCH_TP_BASE + VLLM_NON_TORCH_TP_PER_RANK * tp
            logits = 0
            if s == pp - 1:
                logits = int(seqs * -(-spec.vocab_size // tp) * 4 * VLLM_SAMPLER_LOGITS_COPIES)
            dtype = DTYPE_BYTES[spec.torch_dtype]
            out.append(StageOverhead(budget, communicator=int(non_torch), logits=logits,
                                     activation=tokens * activation_bytes_per_token(spec, tp, dtype),
                                     buffers=rotary_cache_bytes(spec, dtype)))
        return tuple(out)
    # sglang: total = min over ranks of free memory before loading; rest per rank
    # = free_before_r - weights_r - total x (1 - f): the budget of rank r is free_before_r - total x (1 - f).
    fraction = engine_fraction(devices, tp, settings, mem_fraction)
    overhead = reserve if reserve is not None else CUDA_CONTEXT_BYTES + _sglang_comm_bytes(tp)
    free_before = [visible_bytes(d) - overhead for d in devices]
    held_back = int(min(free_before) * (1 - fraction))
    if reserve is not None:
        return tuple(StageOverhead(visible_bytes(d) - held_back, reserve=reserve) for d in devices)
    return tuple(
        StageOverhead(visible_bytes(d) - held_back, context=CUDA_CONTEXT_BYTES, communicator=_sglang_comm_bytes(tp))
        for d in devices
    )


def engine_fraction(devices: tuple[Device, ...], tp: int, settings: EngineSettings, mem_fraction: float) -> float:
    """The memory fraction the engine will use (its flag's value, or its default)."""
    if settings.engine == "pipesplit":
        return mem_fraction
    if settings.memory_fraction is not None:
        return settings.memory_fraction
    if settings.engine == "vllm":
        return VLLM_DEFAULT_UTIL
    # SGLang sizes its defaults from the smallest GPU (get_device_memory_capacity: min over GPUs)
    return sglang_defaults(min(d.capacity_bytes for d in devices) // MiB, tp, len(devices),
                           settings.max_num_batched_tokens, settings.cuda_graph_max_bs).mem_fraction_static


def kv_layout(spec: ModelSpec, settings: EngineSettings) -> dict:
    """SplitProblem keywords for the engine's KV allocator: target rule, hybrid layout, page size."""
    attention = tuple("sliding" if t == "sliding_attention" else "full" for t in spec.layer_types)
    if settings.engine == "vllm":
        return dict(target="pipesplit", layer_attention=attention, kv_allocator="vllm-hybrid",
                    page_size=settings.page_size or VLLM_DEFAULT_BLOCK)
    if settings.engine == "sglang":
        return dict(target="sglang", layer_attention=attention, kv_allocator="sglang-swa",
                    swa_full_tokens_ratio=SGLANG_SWA_FULL_TOKENS_RATIO,
                    page_size=settings.page_size or SGLANG_DEFAULT_PAGE)
    return dict(target="pipesplit")


@dataclass(frozen=True)
class EngineModel:
    """An engine's memory model for one model at one TP size: what make_plan needs beside the costs."""

    spec: ModelSpec
    tp: int
    settings: EngineSettings

    @property
    def engine(self) -> str:
        return self.settings.engine

    def overheads(self, devices: tuple[Device, ...], mem_fraction: float, reserve_gib: float) -> tuple[StageOverhead, ...]:
        return stage_overheads(self.spec, tuple(devices), self.tp, self.settings, mem_fraction, reserve_gib)

    def layout(self) -> dict:
        return kv_layout(self.spec, self.settings)

    def fraction(self, devices: tuple[Device, ...], mem_fraction: float) -> float:
        return engine_fraction(tuple(devices), self.tp, self.settings, mem_fraction)
