"""Shared layers: RMSNorm, rotary embeddings, SwiGLU MLP and paged GQA attention.

Attention reads and writes a paged KV pool: each token owns one slot of a
`[num_slots, kv_heads, head_dim]` tensor per layer, and a sequence's context is the list of its
slots. `AttentionBatch` describes one forward: the new tokens of every sequence, flattened in
sequence order, and where their context lives. What the layers derive from it (gather indices,
masks) is built once per forward and memoised on the batch, not per layer.
"""

from __future__ import annotations

import array
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from pipesplit.errors import UserError
from pipesplit.runtime import kernels

if TYPE_CHECKING:
    from pipesplit.planner.spec import ModelSpec


# -- the batch ---------------------------------------------------------------------------------
@dataclass
class AttentionBatch:
    """One forward's tokens: new tokens of each sequence, flattened in sequence order.

    positions: absolute position of each new token, LongTensor[T].
    slot_mapping: pool slot each new token's K/V is written to, LongTensor[T].
    query_lens: new tokens per sequence (sum T).
    context_lens: tokens in each sequence's context, the new ones included (they come last).
    context_slots: per sequence, the pool slots of its whole context in order (len == context_len).
    logits_indices: rows of [0, T) whose logits the last stage returns.
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_lens: list[int]
    context_lens: list[int]
    context_slots: list[torch.Tensor]
    logits_indices: torch.Tensor
    # The same tokens over the sliding-window pool (its slots, contexts cut to what the window
    # sees), for windowed layers whose K/V live there; None: every layer uses the token pool.
    window: AttentionBatch | None = field(default=None, compare=False)
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (len(self.query_lens) == len(self.context_lens) == len(self.context_slots)):
            raise ValueError("query_lens, context_lens and context_slots need one entry per sequence")
        if sum(self.query_lens) != self.positions.numel() or self.slot_mapping.numel() != self.positions.numel():
            raise ValueError(
                f"query_lens sum to {sum(self.query_lens)} but there are {self.positions.numel()} positions "
                f"and {self.slot_mapping.numel()} slots"
            )
        for q, c, slots in zip(self.query_lens, self.context_lens, self.context_slots):
            if not 0 < q <= c or slots.numel() != c:
                raise ValueError(f"a sequence has query_len {q}, context_len {c} and {slots.numel()} context slots")

    @classmethod
    def for_sequences(
        cls, seqs: Sequence[tuple[Sequence[int], int, bool]], device: torch.device | str
    ) -> "AttentionBatch":
        """The batch of `seqs`, each (its whole context's slots, how many of them are new: the
        last ones, whether its last new token is sampled). Slots held as array('q') (as a Stage
        holds them) are copied in one memcpy each: a decode step of 32 sequences of 300 tokens
        took 0.54 ms to build from lists, 0.02 ms from arrays, on every stage."""
        flat, positions, slot_mapping = array.array("q"), array.array("q"), array.array("q")
        query_lens, context_lens, logits_indices = [], [], []
        offset = 0
        for slots, q, sample in seqs:
            c = len(slots)
            flat.extend(slots)
            positions.extend(range(c - q, c))
            slot_mapping.extend(slots[c - q :])
            query_lens.append(q)
            context_lens.append(c)
            offset += q
            if sample:
                logits_indices.append(offset - 1)
        as_tensor = lambda xs: _long_tensor(xs, device)  # noqa: E731
        whole = as_tensor(flat)
        batch = cls(as_tensor(positions), as_tensor(slot_mapping), query_lens, context_lens,
                    list(whole.split(context_lens)), as_tensor(logits_indices))
        batch._memo["all_context_slots"] = whole  # the contexts' slots concatenated, in order
        return batch

    @property
    def num_tokens(self) -> int:
        return self.positions.numel()

    def memo(self, key: Any, build: Callable[[], Any]) -> Any:
        """`build()` once per batch (per key); later calls return the same object."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]


def _long_tensor(values: "array.array | list[int]", device: torch.device | str) -> torch.Tensor:
    """int64 values as a tensor on device: an array('q') without a Python int per element."""
    if isinstance(values, array.array) and len(values):
        return torch.frombuffer(values, dtype=torch.long).to(device)
    return torch.tensor(list(values), dtype=torch.long, device=device)


@dataclass
class _AttentionGroup:
    """Sequences attended together: queries padded to [B, Q], keys gathered to [B, C]."""

    batch: int  # B
    queries: int  # Q
    query_rows: torch.Tensor | None  # [B*Q] row of the new-token tensor for each padded query (None: identity)
    output_rows: torch.Tensor | None  # real rows of the padded [B*Q] output, in token order (None: all)
    token_rows: torch.Tensor | None  # the tokens those rows belong to (None: the group is every token, in order)
    key_slots: torch.Tensor  # [B, C] pool slot of each context position; padding repeats a real slot
    query_pos: torch.Tensor  # [B, Q] context position of each padded query
    masks: dict = field(default_factory=dict)  # (window, n_rep, dtype) -> additive mask [B, 1, n_rep*Q, C]
    buffers: dict = field(default_factory=dict)  # gather targets, reused by every layer of the forward

    def gather(self, pool: torch.Tensor, which: str) -> torch.Tensor:
        """The context rows of `pool`, [B, C, *pool.shape[1:]], copied into a reused buffer."""
        b, c = self.key_slots.shape
        shape = (b * c, *pool.shape[1:])
        key = (which, pool.dtype, pool.device, shape)
        if key not in self.buffers:
            self.buffers[key] = pool.new_empty(shape)
        # index_select into a kept buffer: no page faults from a fresh allocation on every layer
        out = torch.index_select(pool, 0, self.flat_slots, out=self.buffers[key])
        return out.view(b, c, *pool.shape[1:])

    @property
    def flat_slots(self) -> torch.Tensor:
        return self.key_slots.view(-1)

    def mask(self, window: int | None, n_rep: int, dtype: torch.dtype) -> torch.Tensor:
        key = (window, n_rep, dtype)
        if key not in self.masks:
            context = self.key_slots.shape[1]
            key_pos = torch.arange(context, device=self.key_slots.device)
            allowed = key_pos[None, None, :] <= self.query_pos[:, :, None]
            if window is not None:
                allowed &= key_pos[None, None, :] > self.query_pos[:, :, None] - window
            additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            additive.masked_fill_(~allowed, float("-inf"))
            b, q, c = additive.shape
            self.masks[key] = additive[:, None].expand(b, n_rep, q, c).reshape(b, 1, n_rep * q, c)
        return self.masks[key]


# Decodes are attended in groups of similar context length: a group's keys are padded to its
# longest context, and the padding may add at most this share to the real keys' work. One group
# padded to the longest context of the batch cost 3-7x more here (SmolLM2 decode, 48 sequences
# of 100-640 tokens): the CPU flash kernel pays for every masked key.
_DECODE_PADDING_WASTE = 1.1


def _attention_groups(batch: AttentionBatch, device: torch.device) -> list[_AttentionGroup]:
    """Each prefill alone (no padded queries); decodes (query_len 1) sorted by context length into
    groups whose key padding stays under _DECODE_PADDING_WASTE."""
    seqs = range(len(batch.query_lens))
    plans = [[i] for i in seqs if batch.query_lens[i] > 1]
    decodes = sorted((i for i in seqs if batch.query_lens[i] == 1), key=lambda i: batch.context_lens[i])
    group: list[int] = []
    keys = 0
    for i in decodes:
        c = batch.context_lens[i]
        if group and (len(group) + 1) * c > _DECODE_PADDING_WASTE * (keys + c):
            plans.append(group)
            group, keys = [], 0
        group.append(i)
        keys += c
    if group:
        plans.append(group)
    starts = _running_sums(batch.query_lens)
    whole = len(plans) == 1 and plans[0] == list(seqs)
    return [_build_group(batch, members, starts, whole, device) for members in plans]


def _running_sums(counts: Sequence[int]) -> list[int]:
    """[0, counts[0], counts[0] + counts[1], ...]: where each sequence's rows start (and the end)."""
    return list(itertools.accumulate(counts, initial=0))


@dataclass
class _KernelRows:
    """Some sequences of a batch for a native kernel: their contexts' slots concatenated (sequence
    i's at slots[offsets[i]:offsets[i+1]]), the first row of each one's new tokens, and their
    counts. rows None: the sequences are the whole batch, one token each (decode_attention's
    output is then the batch's, in order)."""

    rows: torch.Tensor | None
    slots: torch.Tensor
    offsets: torch.Tensor
    query_lens: torch.Tensor


def _kernel_rows(batch: AttentionBatch, members: list[int], whole: bool = False) -> _KernelRows | None:
    """The sequences `members` of the batch for a native kernel (None if there are none)."""
    if not members:
        return None
    starts = _running_sums(batch.query_lens)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    context_slots = lambda: torch.cat([batch.context_slots[i].to(dtype=torch.long) for i in members])  # noqa: E731
    return _KernelRows(
        None if whole else as_long([starts[i] for i in members]),
        # every sequence's: the concatenation `for_sequences` built them from
        batch.memo("all_context_slots", context_slots) if len(members) == len(batch.context_slots) else context_slots(),
        as_long(_running_sums([batch.context_lens[i] for i in members])),
        as_long([batch.query_lens[i] for i in members]),
    )


def _native_rows(batch: AttentionBatch) -> tuple[_KernelRows | None, _KernelRows | None]:
    """The batch's decodes and its prefill chunks (query_len > 1), for the two kernels."""
    decodes = [i for i, q in enumerate(batch.query_lens) if q == 1]
    prefills = [i for i, q in enumerate(batch.query_lens) if q > 1]
    return _kernel_rows(batch, decodes, len(decodes) == len(batch.query_lens)), _kernel_rows(batch, prefills)


def _lower_right_causal(n: int, c: int, device: torch.device):
    """The mask of n queries that are the last of c positions, each attending itself and every
    earlier position. On the CPU the boolean mask torch's `causal_lower_right` materialises there
    too; building it here spares importing that module, which imports torch._dynamo (about 2 s of
    every stage's start-up). On CUDA the bias object, which reaches the flash kernel."""
    if device.type == "cpu":
        return torch.ones(n, c, dtype=torch.bool).tril(c - n)
    from torch.nn.attention.bias import causal_lower_right

    return causal_lower_right(n, c)


def _sdpa_prefill(q: torch.Tensor, new_kv: tuple[torch.Tensor, torch.Tensor], k_pool: torch.Tensor,
                  v_pool: torch.Tensor, batch: AttentionBatch, out: torch.Tensor, scale: float) -> None:
    """Each prefill chunk (query_len > 1) by torch's SDPA (its CPU flash kernel), written into out
    [T, heads, v_dim]: a chunk whose context is all new (no cached prefix, no earlier chunk) over
    the new K/V with a causal flag, no pool read; one after earlier context over its context
    gathered from the pools, its queries the context's last (a lower-right causal mask)."""
    k_new, v_new = new_kv
    starts = _running_sums(batch.query_lens)
    for i, (n, c) in enumerate(zip(batch.query_lens, batch.context_lens)):
        if n == 1:
            continue
        rows = slice(starts[i], starts[i] + n)
        if n == c:
            keys, values, mask, causal = k_new[rows], v_new[rows], None, True
        else:
            slots = batch.context_slots[i].to(dtype=torch.long)
            keys, values = k_pool.index_select(0, slots), v_pool.index_select(0, slots)
            mask, causal = _lower_right_causal(n, c, q.device), False
        o = F.scaled_dot_product_attention(q[rows].transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                           values.transpose(0, 1)[None], attn_mask=mask, is_causal=causal,
                                           scale=scale, enable_gqa=True)
        out[rows] = o[0].transpose(0, 1)


def _build_group(
    batch: AttentionBatch, members: list[int], starts: list[int], whole: bool, device: torch.device
) -> _AttentionGroup:
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    q_lens = as_long([batch.query_lens[i] for i in members])
    c_lens = as_long([batch.context_lens[i] for i in members])
    first_row = as_long([starts[i] for i in members])
    b, q_max = len(members), max(batch.query_lens[i] for i in members)
    step = torch.arange(q_max, device=device)[None, :]
    # padded queries repeat the sequence's last real query, so every padded row has a valid mask
    clamped = torch.minimum(step, q_lens[:, None] - 1)
    query_rows = (first_row[:, None] + clamped).reshape(-1)
    query_pos = c_lens[:, None] - q_lens[:, None] + clamped
    real = (step < q_lens[:, None]).reshape(-1)

    slots = [batch.context_slots[i].to(device=device, dtype=torch.long) for i in members]
    key_slots = torch.nn.utils.rnn.pad_sequence(slots, batch_first=True, padding_value=-1)
    last_slot = key_slots[torch.arange(b, device=device), c_lens - 1]
    # padding gathers a real (written) slot, never uninitialised memory: 0 * NaN would leak
    key_slots = torch.where(key_slots < 0, last_slot[:, None], key_slots)

    no_padding = q_max == 1 or b == 1  # every padded query is a real one
    if no_padding and whole:
        query_rows = output_rows = token_rows = None
    elif no_padding:
        output_rows, token_rows = None, query_rows
    elif whole:
        output_rows, token_rows = real.nonzero().squeeze(1), None
    else:
        output_rows = real.nonzero().squeeze(1)
        token_rows = query_rows[output_rows]
    return _AttentionGroup(b, q_max, query_rows, output_rows, token_rows, key_slots, query_pos)


# -- projections ---------------------------------------------------------------------------------------
# On the CPU every GEMM's row count is rounded up to one of a few sizes (exact up to 16, then at
# most 1/8 more rows: 8 sizes per doubling). oneDNN, which computes bfloat16 GEMMs under F.linear
# and float32 ones here, builds and keeps a kernel per input shape; with a new token count every
# step it kept building them. 6,000 GEMMs over SmolLM2's weight shapes with random row counts
# (1-1024), on this project's AVX-512 machine: bfloat16 232 GFLOPS and 1.5 GB resident at the
# end, 302 GFLOPS and a flat 0.47 GB with the rounding (270 shapes in all); float32 through oneDNN
# 172 GFLOPS and 1.8 GB, with the rounding 224 GFLOPS and 0.56 GB (MKL's sgemm: 127, 0.40 GB).
ROWS_EXACT_UP_TO = 16


def padded_rows(rows: int) -> int:
    """`rows` rounded up to the next GEMM size: itself up to ROWS_EXACT_UP_TO, else a multiple of
    1/8 of its power of two (17 -> 18, 100 -> 104, 513 -> 576)."""
    if rows <= ROWS_EXACT_UP_TO:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


# So float32 goes to oneDNN too, rather than to MKL's sgemm under F.linear: PP1 float32 on the
# throughput bench's workload went from 117 to 187 tok/s on that machine.
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; on the CPU with the rows padded to `padded_rows` (the padding rows are zeros and
    are cut off again), float32 and packed weights (`pack_weight`) computed by oneDNN."""
    if not x.is_cpu or (not weight.is_mkldnn and (x.dim() != 2 or x.shape[0] == 0)):
        return F.linear(x, weight, bias)
    if x.dim() != 2:
        return linear(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
    rows = x.shape[0]
    if rows == 0:
        return x.new_empty(0, weight.shape[0])
    padded = padded_rows(rows)
    if padded != rows:
        x = torch.cat((x, x.new_zeros(padded - rows, x.shape[1])))
    if weight.is_mkldnn or (x.dtype == torch.float32 and _ONEDNN_LINEAR):
        out = torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")
    else:
        out = F.linear(x, weight, bias)
    return out if padded == rows else out[:rows]


# -- packed GEMM weights -----------------------------------------------------------------------------
# oneDNN computes a GEMM from a weight reordered once into the blocked layout its kernel for this
# CPU reads (`_reorder_linear_weight`, what torch.compile's CPU freezing does), rather than
# reordering the plain [out, in] weight on every call. SmolLM2's shapes at 1-128 rows on the
# project's AMX-BF16 Xeon: bfloat16 1.3-2.4x the GFLOPS of F.linear; float32 0.7-1.6x (a wash
# over a step). The packed tensor holds the same bytes as the plain one and replaces it.
def can_pack(weight: torch.Tensor) -> bool:
    """Whether `pack_weight` applies: a CPU float32 weight, or bfloat16 where oneDNN computes it."""
    if not (_ONEDNN_LINEAR and weight.device.type == "cpu" and weight.dim() == 2 and not weight.is_mkldnn):
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's packed copy of a GEMM weight [out, in] (an opaque tensor `linear` accepts)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


# The fused GEMM weights modules hold (set by their fuse()), and the projections fused into each.
FUSED_PARTS = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def pack_gemm_weights(model: nn.Module, tied_head: bool = False) -> int:
    """Every GEMM weight of a CPU stage that only `linear` reads, packed in place: a `Linear`'s
    weight becomes the packed tensor; a fused q/k/v or gate/up weight is packed and its parts
    become shape-only (meta) parameters, the packed whole counted by `fused_gemm_weights`.
    The embedding and weights read otherwise (DeepSeek's kv_b_proj, absorbed into batched
    matmuls) stay plain. A head tied to the embedding of the same stage reads the plain
    embedding weight, or with `tied_head` a packed copy of it of its own (bytes the plan must
    charge: `plan_bridge.packs_tied_head`). Returns the number of weights packed."""
    count = 0
    if tied_head and isinstance(model, DecoderStage) and model.has_embedding and model.has_lm_head \
            and not hasattr(model, "lm_head") and can_pack(weight := model.model.embed_tokens.weight):
        model.lm_head = Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device="meta")
        model.lm_head.weight = nn.Parameter(pack_weight(weight), requires_grad=False)
        count += 1
    for module in model.modules():
        for name, parts in FUSED_PARTS.items():
            fused = getattr(module, name, None)
            if isinstance(fused, tuple) and can_pack(fused[0]):
                setattr(module, name, (pack_weight(fused[0]), fused[1]))
                for part in (getattr(module, p) for p in parts):
                    part.weight = nn.Parameter(part.weight.to("meta"), requires_grad=False)
                count += 1
    for module in model.modules():
        if isinstance(module, Linear) and not module.weight.is_meta and can_pack(module.weight):
            module.weight = nn.Parameter(pack_weight(module.weight), requires_grad=False)
            count += 1
    return count


def tune_cpu_stage(model: nn.Module, packed_tied_head: bool = False) -> str:
    """What a CPU stage does after loading, before it serves (and the profiler, to time what runs):
    packs its GEMM weights (a tied head too with `packed_tied_head`) and chooses each attention
    shape's path for prefill chunks. Returns the start-up line's phrase for the choice ("" where
    there is none)."""
    pack_gemm_weights(model, packed_tied_head)
    return choose_prefill_attention(model)


# -- prefill chunks: the native kernel or torch's SDPA ---------------------------------------------------
# torch's CPU flash kernel attends a prefill chunk over contiguous K/V: the new tokens' own where
# the context is all new, else the context gathered from the pools. Which is faster depends on
# the CPU: on the project's AMX-BF16 Xeon, SDPA was 2.6x faster in bfloat16 and 1.4x in float32
# for 8 fresh prompts of 32-512 tokens, 1.9x (bfloat16) with the gather for 16 questions of 32-128
# tokens after a shared 512-token prefix (SmolLM2's heads), until the native kernel multiplied in
# AMX tiles there: then it was 1.9-2.5x faster than SDPA in bfloat16 (0.4-0.6 against 1.0-1.3 ms
# on the probe below; 512 queries over 1,536 keys: 2.1-2.3 against 4.0-4.7 ms on 2 cores), while
# SDPA stays 1.4-1.6x faster in float32. The native kernel was written on a Zen 5 where SDPA (then
# over gathered, padded contexts with a mask) was 3.6-4.4x slower. So each stage times both at
# start-up on a fresh 256-token prompt and a 128-token chunk after 256 tokens of context, for
# each attention shape, and keeps the faster.
PREFILL_PROBE = ((256, 256), (384, 128))  # (context, new tokens) per probe sequence


def _sdpa_eligible(module: nn.Module) -> bool:
    return (isinstance(module, GQAttention) and module.window is None and module.sinks is None
            and module.softcap is None)


def choose_prefill_attention(model: nn.Module, repeats: int = 5) -> str:
    """Sets `sdpa_prefill` on the stage's full-attention layers (no window, sinks or soft-cap)
    where torch's SDPA attended the PREFILL_PROBE chunks faster than the native kernel."""
    shapes: dict[tuple, list[GQAttention]] = {}
    for module in model.modules():
        if _sdpa_eligible(module):
            dtype = module.o_proj.weight.dtype
            shapes.setdefault((module.heads, module.kv_heads, module.head_dim, dtype, module.scale), []).append(module)
    phrases = []
    for (heads, kv_heads, dim, dtype, scale), modules in shapes.items():
        slots = sum(c for c, _ in PREFILL_PROBE)
        k_pool, v_pool = (torch.randn(slots, kv_heads, dim, dtype=dtype) for _ in range(2))
        q = torch.randn(sum(n for _, n in PREFILL_PROBE), heads, dim, dtype=dtype)
        if not kernels.supports(q, k_pool, v_pool):
            continue
        seqs, first = [], 0
        for c, n in PREFILL_PROBE:
            seqs.append((list(range(first, first + c)), n, True))
            first += c
        batch = AttentionBatch.for_sequences(seqs, "cpu")
        new_kv = (k_pool[batch.slot_mapping], v_pool[batch.slot_mapping])
        seconds = []
        for given in (None, new_kv):
            with torch.inference_mode():
                paged_attention(q, k_pool, v_pool, batch, scale, new_kv=given)  # warm
                times = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    paged_attention(q, k_pool, v_pool, batch, scale, new_kv=given)
                    times.append(time.perf_counter() - started)
            seconds.append(sorted(times)[repeats // 2])
        native, sdpa = seconds
        for module in modules:
            module.sdpa_prefill = sdpa < 0.9 * native
        tiles = dtype == torch.bfloat16 and dim % 32 == 0 and kernels.prefill_tiles()
        kernel = "native kernel (AMX tiles)" if tiles else "native kernel"
        phrases.append(f"{'torch SDPA' if sdpa < 0.9 * native else kernel} for prefill chunks "
                       f"({sdpa * 1e3:.1f} ms SDPA, {native * 1e3:.1f} ms native, {heads} heads)")
    return "prefill attention: " + "; ".join(phrases) if phrases else ""


def fused_gemm_weights(model: nn.Module) -> list[torch.Tensor]:
    """The packed fused weights (`pack_gemm_weights`): held by their modules, not as parameters."""
    return [fused[0] for module in model.modules() for name in FUSED_PARTS
            if isinstance(fused := getattr(module, name, None), tuple) and fused[0].is_mkldnn]


class Linear(nn.Linear):
    """nn.Linear through `linear`: the checkpoint's names and init, this project's GEMM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.is_meta:
            raise RuntimeError("this projection's weight was packed into its module's fused GEMM weight: "
                               "compute it through that (qkv, gate_up)")
        return linear(x, self.weight, self.bias)


def warm_gemms(stage: nn.Module, max_rows: int, max_head_rows: int) -> int:
    """Runs each distinct GEMM of a CPU stage once per padded row count up to max_rows (the head's
    up to max_head_rows), so that oneDNN builds every kernel the stage will use before serving:
    the resident memory they take (about 0.3 GB for the tiny test model, where a soak's grew
    for a minute and then stayed flat) is taken at start-up, not while serving. Returns the
    number of GEMMs run."""
    gemms: dict[tuple, tuple[torch.Tensor, torch.Tensor | None, int]] = {}

    def add(weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> None:
        key = (tuple(weight.shape), weight.dtype, bias is not None)
        gemms[key] = (weight, bias, max(rows, gemms.get(key, (None, None, 0))[2]))

    # the layers the stage runs (not held-only ones such as DeepSeek's MTP module), and the head
    run = [m for _, layer in getattr(stage, "_layers", []) for m in layer.modules()]
    fused_parts = set()
    for module in run:
        for name, parts in FUSED_PARTS.items():
            if isinstance(fused := getattr(module, name, None), tuple):
                add(*fused, max_rows)
                fused_parts.update(id(getattr(module, p)) for p in parts)
    for module in run:
        if isinstance(module, Linear) and id(module) not in fused_parts:
            add(module.weight, module.bias, max_rows)
    if getattr(stage, "has_lm_head", False):
        add(stage.head_weight(), None, max_head_rows)
    sizes = sorted({padded_rows(rows) for rows in range(1, max(max_rows, max_head_rows) + 1)})
    count = 0
    with torch.inference_mode():
        for weight, bias, most in gemms.values():
            for rows in (r for r in sizes if r <= most):
                linear(torch.zeros(rows, weight.shape[1], dtype=weight.dtype, device=weight.device), weight, bias)
                count += 1
    return count


# -- fused projections -------------------------------------------------------------------------------
def fuse_linears(linears: Sequence[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for linears that read the same input, concatenated along the output;
    each linear's parameters become views into it, so the checkpoint names, the state dict and
    the stage's weight bytes stay exactly what they were (one GEMM instead of several)."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    has_bias = [linear.bias is not None for linear in linears]
    if any(has_bias) and not all(has_bias):
        raise ValueError("fused linears need a bias each or none")
    bias = torch.cat([linear.bias.detach() for linear in linears]) if all(has_bias) else None
    offset = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(weight[offset : offset + rows], requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias[offset : offset + rows], requires_grad=False)
        offset += rows
    return weight, bias


def fuse_projections(model: nn.Module) -> None:
    """After loading: every module that can fuses its projections (q/k/v, gate/up)."""
    for module in model.modules():
        if isinstance(module, (GQAttention, SwiGLUMLP)):
            module.fuse()


# -- norms, MLP ------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and kernels.rows_supported(x, self.weight):
            return kernels.rms_norm(x, self.weight, self.eps)  # one pass, the same rounding
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_and_norm(self, residual: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this norm of residual + x, residual + x): the residual add and the next norm in one pass
        where the native kernel can (and the subclass keeps this norm's formula)."""
        if type(self).forward is RMSNorm.forward and residual.dim() == 2 and kernels.rows_supported(
                residual, x, self.weight):
            return kernels.rms_norm(x, self.weight, self.eps, residual=residual)
        total = residual + x
        return self(total), total


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(
        self, hidden: int, intermediate: int, bias: bool, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=bias, dtype=dtype, device=device)
        self.up_proj = Linear(hidden, intermediate, bias=bias, dtype=dtype, device=device)
        self.down_proj = Linear(intermediate, hidden, bias=bias, dtype=dtype, device=device)
        self.gate_up: tuple[torch.Tensor, torch.Tensor | None] | None = None  # set by fuse()

    def fuse(self) -> None:
        self.gate_up = fuse_linears([self.gate_proj, self.up_proj])

    def gate_and_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gate_up is None:
            return self.gate_proj(x), self.up_proj(x)
        return linear(x, *self.gate_up).chunk(2, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_and_up(x)
        if gate.dim() == 2 and kernels.swiglu_supported(gate, up):
            hidden = kernels.swiglu(gate, up)  # one pass, the same rounding
        else:
            hidden = F.silu(gate) * up
        return linear(hidden, self.down_proj.weight, self.down_proj.bias)


# -- rotary embeddings ---------------------------------------------------------------------------
def default_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(scale) + 1 for scale > 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(dim: int, theta: float, scaling: dict, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, ramp between.

    Returns (inv_freq, attention_factor); cos/sin are multiplied by attention_factor.
    """
    original = int(scaling.get("original_max_position_embeddings") or max_position_embeddings)
    # DeepSeek-V3 style configs may omit factor: the context extension ratio stands in for it
    factor = float(scaling.get("factor") or max_position_embeddings / original)
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = default_inv_freq(dim, theta)
    interpolation = extrapolation / factor
    extrapolation_share = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_share) + extrapolation * extrapolation_share
    return inv_freq, float(attention_factor)


def rope_parameters(
    dim: int, theta: float, scaling: dict | None, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2] float32, attention_scaling) for a rope config."""
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind == "default":
        return default_inv_freq(dim, theta), 1.0
    if kind == "linear":
        return default_inv_freq(dim, theta) / float(scaling["factor"]), 1.0
    if kind == "llama3":
        return llama3_inv_freq(default_inv_freq(dim, theta), scaling), 1.0
    if kind == "yarn":
        return yarn_inv_freq(dim, theta, scaling, max_position_embeddings)
    raise UserError(f"rope_scaling type {kind!r} is not supported; supported: default, linear, llama3, yarn")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the new tokens' positions (the "rotate half" layout of HF checkpoints)."""

    def __init__(self, dim: int, theta: float, scaling: dict | None, max_position_embeddings: int) -> None:
        super().__init__()
        inv_freq, self.attention_scaling = rope_parameters(dim, theta, scaling, max_position_embeddings)
        # not a buffer: it is derived from the config, never loaded, and must survive meta construction
        self.inv_freq = inv_freq

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos[:, None, :], sin[:, None, :]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [T, heads, dim] rotated by the (cos, sin) of its tokens, each [T, 1, dim]."""
    cos, sin = rope
    tokens, _, dim = x.shape
    if (cos.shape == sin.shape == (tokens, 1, dim) and x.stride(1) == dim and cos.is_contiguous()
            and sin.is_contiguous() and kernels.rows_supported(x, cos, sin)):
        return kernels.rotary(x, cos.view(tokens, dim), sin.view(tokens, dim))  # one pass, the same rounding
    return x * cos + _rotate_half(x) * sin


# -- attention --------------------------------------------------------------------------------------
def paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    window: int | None = None,
    *,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of the new tokens' queries q [T, heads, dim] over their contexts in the pools.

    The new tokens' K/V must already be in the pools. Returns [T, heads * v_dim].
    sinks [heads]: one extra logit per head in the softmax's denominator, attending to nothing
    (gpt-oss). softcap: scores become softcap * tanh(scores / softcap) before the mask (Gemma 2).
    new_kv: the new tokens' (k, v) [T, kv_heads, dim], given where `choose_prefill_attention` chose
    SDPA: prefill chunks attend by `_sdpa_prefill` instead of the native kernel.
    """
    tokens, heads, dim = q.shape
    kv_heads, v_dim = k_pool.shape[1], v_pool.shape[2]
    n_rep = heads // kv_heads
    if kernels.supports(q, k_pool, v_pool):
        sdpa_kv = new_kv if window is None and sinks is None and softcap is None else None
        return _native_attention(q, k_pool, v_pool, batch, scale, window, sinks, softcap, sdpa_kv)
    # Elsewhere (or where the kernels cannot run) the contexts are gathered and attended with torch.
    groups = batch.memo(("attention_groups", q.device), lambda: _attention_groups(batch, q.device))
    out = None
    in_order = len(groups) == 1 and groups[0].token_rows is None  # the group's rows are the tokens
    if not in_order:
        out = q.new_empty(tokens, heads * v_dim)
    for g in groups:
        b, q_len = g.batch, g.queries
        q_pad = q if g.query_rows is None else q.index_select(0, g.query_rows)
        # GQA without repeating K/V: the n_rep query heads sharing a KV head become extra query rows
        q_pad = q_pad.view(b, q_len, kv_heads, n_rep, dim).permute(0, 2, 3, 1, 4)
        q_pad = q_pad.reshape(b, kv_heads, n_rep * q_len, dim)
        keys = g.gather(k_pool, "k").transpose(1, 2)
        values = g.gather(v_pool, "v").transpose(1, 2)
        mask = g.mask(window, n_rep, q.dtype)
        if sinks is None and softcap is None:
            o = F.scaled_dot_product_attention(q_pad, keys, values, attn_mask=mask, scale=scale)
        else:
            o = _eager_attention(q_pad, keys, values, mask, scale, sinks, softcap, q_len)
        o = o.view(b, kv_heads, n_rep, q_len, v_dim).permute(0, 3, 1, 2, 4).reshape(b * q_len, heads * v_dim)
        if g.output_rows is not None:
            o = o.index_select(0, g.output_rows)
        if in_order:
            return o
        out[g.token_rows] = o
    return out


def _native_attention(q, k_pool, v_pool, batch: AttentionBatch, scale: float, window, sinks, softcap,
                      new_kv=None) -> torch.Tensor:
    """paged_attention on the CPU kernels, which read K/V in place from the pools: decodes (one
    query) with decode_attention, prefill chunks with prefill_attention (given new_kv, with
    `_sdpa_prefill`)."""
    tokens, heads, _ = q.shape
    v_dim = v_pool.shape[2]
    decodes, prefills = batch.memo("native_rows", lambda: _native_rows(batch))
    if decodes is not None:
        q_decode = q if decodes.rows is None else q.index_select(0, decodes.rows)
        o = kernels.decode_attention(q_decode, k_pool, v_pool, decodes.slots, decodes.offsets, scale, window,
                                     softcap, sinks)
        if decodes.rows is None:
            return o.view(tokens, heads * v_dim)
    out = q.new_empty(tokens, heads, v_dim)
    if decodes is not None:
        out[decodes.rows] = o
    if new_kv is not None:
        _sdpa_prefill(q, new_kv, k_pool, v_pool, batch, out, scale)
    else:
        kernels.prefill_attention(q.contiguous(), k_pool, v_pool, out, prefills.slots, prefills.offsets,
                                  prefills.rows, prefills.query_lens, scale, window, softcap, sinks)
    return out.view(tokens, heads * v_dim)


def _eager_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    sinks: torch.Tensor | None,
    softcap: float | None,
    q_len: int,
) -> torch.Tensor:
    """softmax(scores + mask) @ values with the scores soft-capped and/or a sink logit per head;
    q [B, kv_heads, n_rep * Q, dim] (row r * Q + i is query head kv * n_rep + r, token i)."""
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + mask
    if sinks is not None:
        b, kv_heads, rows, _ = scores.shape
        n_rep = rows // q_len
        sink = sinks.to(scores.dtype).view(1, kv_heads, n_rep, 1, 1).expand(b, kv_heads, n_rep, q_len, 1)
        scores = torch.cat((scores, sink.reshape(b, kv_heads, rows, 1)), dim=-1)
    probs = torch.softmax(scores - scores.amax(-1, keepdim=True), dim=-1)
    if sinks is not None:
        probs = probs[..., :-1]  # the sink takes its share of the mass and contributes nothing
    return torch.matmul(probs.to(values.dtype), values)


class GQAttention(nn.Module):
    """Grouped-query attention with optional q/k/v (and o) biases and per-head q/k RMSNorm;
    optionally a learned sink logit per head (`sinks`, gpt-oss), soft-capped scores and a
    softmax scale other than head_dim ** -0.5 (Gemma)."""

    def __init__(
        self,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
        eps: float,
        window: int | None,
        dtype: torch.dtype,
        device: torch.device | str,
        sinks: bool = False,
        softcap: float | None = None,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.window = window
        self.scale = head_dim**-0.5 if scale is None else scale
        self.softcap = softcap
        self.sinks = nn.Parameter(torch.empty(heads, dtype=dtype, device=device)) if sinks else None
        self.q_proj = Linear(hidden, heads * head_dim, bias=qkv_bias, dtype=dtype, device=device)
        self.k_proj = Linear(hidden, kv_heads * head_dim, bias=qkv_bias, dtype=dtype, device=device)
        self.v_proj = Linear(hidden, kv_heads * head_dim, bias=qkv_bias, dtype=dtype, device=device)
        self.o_proj = Linear(heads * head_dim, hidden, bias=o_bias, dtype=dtype, device=device)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps, dtype, device)
            self.k_norm = RMSNorm(head_dim, eps, dtype, device)
        else:
            self.q_norm = self.k_norm = None
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # set by fuse()
        self.sdpa_prefill = False  # set by choose_prefill_attention: prefill chunks by torch's SDPA

    def fuse(self) -> None:
        self.qkv = fuse_linears([self.q_proj, self.k_proj, self.v_proj])

    def forward(
        self,
        x: torch.Tensor,
        batch: AttentionBatch,
        kv: tuple[torch.Tensor, torch.Tensor],
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        tokens = x.shape[0]
        if self.qkv is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            kv_width = self.kv_heads * self.head_dim
            q, k, v = linear(x, *self.qkv).split_with_sizes([self.heads * self.head_dim, kv_width, kv_width], dim=-1)
        q = q.view(tokens, self.heads, self.head_dim)
        k = k.view(tokens, self.kv_heads, self.head_dim)
        v = v.view(tokens, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        k_pool, v_pool = kv
        if k_pool.dtype != q.dtype:
            raise ValueError(f"KV pool dtype {k_pool.dtype} differs from the model dtype {q.dtype}")
        if self.window is not None and batch.window is not None:
            batch = batch.window  # this layer's K/V live in the sliding-window pool
        k_pool.index_copy_(0, batch.slot_mapping, k)
        v_pool.index_copy_(0, batch.slot_mapping, v)
        out = paged_attention(q, k_pool, v_pool, batch, self.scale, self.window, sinks=self.sinks, softcap=self.softcap,
                              new_kv=(k, v) if self.sdpa_prefill else None)
        return linear(out, self.o_proj.weight, self.o_proj.bias)


def apply_rotary_interleaved(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [T, heads, dim] rotated in adjacent pairs (x0, x1), (x2, x3), ... (DeepSeek's layout).

    The result lists the pairs' first elements, then their second ones: a fixed permutation of
    the interleaved output, harmless because queries and keys are rotated alike.
    """
    cos, sin = rope
    half = x.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)


# -- decoder layers and stages ------------------------------------------------------------------------
class PreNormDecoderLayer(nn.Module):
    """h + attn(norm(h)), then h + mlp(norm(h)); the MLP is registered under `mlp_name`
    (`mlp`, or `block_sparse_moe` in Mixtral checkpoints) so parameter names match the checkpoint."""

    def __init__(
        self,
        hidden: int,
        eps: float,
        attention: nn.Module,
        mlp: nn.Module,
        dtype: torch.dtype,
        device: torch.device | str,
        mlp_name: str = "mlp",
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps, dtype, device)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(hidden, eps, dtype, device)
        setattr(self, mlp_name, mlp)
        self.mlp_name = mlp_name

    def forward(self, h: torch.Tensor, batch: AttentionBatch, kv: tuple[torch.Tensor, ...], rope) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(h), batch, kv, rope)
        normed, h = self.post_attention_layernorm.add_and_norm(h, attended)
        return h + getattr(self, self.mlp_name)(normed)


def check_buildable(spec: "ModelSpec", family: str, formats: tuple[str, ...]) -> None:
    """A family's stage builds only its own family, from checkpoint formats it can load."""
    if spec.family != family:
        raise UserError(f"{spec.model_type} models are not {family}-family; the {family} stage cannot build them")
    if spec.quantization.method not in formats:
        names = {"none": "unquantized", "fp8": "block-fp8", "mxfp4": "mxfp4"}
        raise UserError(f"{spec.quantization.method} checkpoints of {spec.model_type} models are not supported; "
                        f"use an {' or '.join(names[f] for f in formats)} checkpoint")


class DecoderStage(nn.Module):
    """Decoder layers [start, end) with, if asked, the embedding (first stage) and the final
    norm + lm_head (last stage); parameter names are the checkpoint's, global indices included.

    make_layer(index) builds decoder layer `index`. held_layers: extra modules stored under
    `model.layers.{index}` that the stage holds but never runs (DeepSeek's MTP module).
    final_norm (the norm class of `model.norm`), embed_scale (embeddings multiplied by it) and
    logit_softcap (logits -> c * tanh(logits / c)): Gemma's.
    forward(inputs, batch, kv_cache): token ids [T] on the first stage, else the residual stream
    [T, hidden]; returns float32 logits of batch.logits_indices on the last stage, else [T, hidden].
    """

    def __init__(
        self,
        spec: "ModelSpec",
        layers: tuple[int, int],
        embedding: bool,
        lm_head: bool,
        make_layer: Callable[[int], nn.Module],
        rotary: nn.Module,
        dtype: torch.dtype,
        device: torch.device | str,
        held_layers: dict[int, nn.Module] | None = None,
        final_norm: type[RMSNorm] | None = None,
        embed_scale: float | None = None,
        logit_softcap: float | None = None,
    ) -> None:
        super().__init__()
        start, end = layers
        if not 0 <= start <= end <= spec.num_layers:
            raise ValueError(f"layers {start}..{end} out of range for a model with {spec.num_layers} layers")
        self.spec = spec
        self.layer_range = (start, end)
        self.has_embedding, self.has_lm_head = embedding, lm_head
        self.model = nn.Module()
        if embedding:
            # Given a weight, nn.Embedding skips its random init: the loader overwrites it anyway,
            # and on the meta device that init alone costs seconds of lazy imports.
            weight = torch.empty(spec.vocab_size, spec.hidden_size, dtype=dtype, device=device)
            self.model.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, _weight=weight)
        self.model.layers = nn.ModuleDict({str(i): make_layer(i) for i in range(start, end)})
        for index, module in (held_layers or {}).items():
            self.model.layers[str(index)] = module
        self.embed_scale, self.logit_softcap = embed_scale, logit_softcap
        if lm_head:
            self.model.norm = (final_norm or RMSNorm)(spec.hidden_size, spec.rms_norm_eps, dtype, device)
            # tied and holding the embedding (PP=1): the head reads the embedding's weight, stored once
            if not (spec.tie_word_embeddings and embedding):
                self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False, dtype=dtype, device=device)
        self.rotary = rotary
        self._layers = [(i, self.model.layers[str(i)]) for i in range(start, end)]

    def head_weight(self) -> torch.Tensor:
        return self.lm_head.weight if hasattr(self, "lm_head") else self.model.embed_tokens.weight

    def forward(self, inputs: torch.Tensor, batch: AttentionBatch, kv_cache: dict) -> torch.Tensor:
        h = self.model.embed_tokens(inputs) if self.has_embedding else inputs
        if self.has_embedding and self.embed_scale is not None:
            h = h * torch.tensor(self.embed_scale, dtype=h.dtype)  # rounded to the model dtype first, as in HF
        if self._layers:
            rope = self.rotary(batch.positions, h.dtype)
            for index, layer in self._layers:
                h = layer(h, batch, kv_cache[index], rope)
        if not self.has_lm_head:
            return h
        h = self.model.norm(h.index_select(0, batch.logits_indices))
        logits = linear(h, self.head_weight()).float()
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits
