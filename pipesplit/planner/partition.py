"""Layer partition strategies: pure functions from a split problem to layers per stage.

A partition gives each pipeline stage a contiguous run of decoder layers (at least one). The
fixed strategies reproduce what serving engines do; `min-weights` and `max-kv` are exact
optimisers (dynamic programs over stage boundaries, checked against brute force in the tests).

KV capacity ("max_total_num_tokens") of a partition, for the two targets:
- pipesplit (and vLLM): each stage holds floor((usable_s - weights_s) / (layers_s * kv)) tokens;
  the pipeline holds the minimum over stages.
- sglang: floor(min_s (usable_s - weights_s) / (kv * max_s layers_s)), SGLang's rule.
With an engine's KV allocator (SplitProblem.kv_allocator) a stage's "layers_s * kv" becomes the
bytes that engine allocates per token for the stage's layers: vLLM's hybrid KV groups or SGLang's
SWA pool for sliding-window layers, and tokens round down to its page (block) size.
With sliding-window layers and a window pool (pipesplit target), `kv_capacity` below is the rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

from pipesplit.errors import UserError

TARGETS = ("pipesplit", "sglang")
KV_ALLOCATORS = ("uniform", "vllm-hybrid", "sglang-swa")
ATTENTION_KINDS = ("full", "sliding")


def stage_kv_tokens(usable_bytes: int, weight_bytes: int, num_layers: int, kv_bytes_per_token_per_layer: int) -> int:
    """floor(max(0, usable - weights) / (num_layers * kv)): the KV tokens one stage can hold."""
    return max(0, usable_bytes - weight_bytes) // (num_layers * kv_bytes_per_token_per_layer)


# -- sliding-window layers ----------------------------------------------------------------------
# A layer with a window keeps only the last `window` tokens of each sequence, in a pool of its
# own (`window_slots` slots, the same on every stage). Between steps a running request keeps
# window - 1 of them (what its next token sees); a step adds its new tokens first. So with at
# most R running requests and M micro-batches of at most B tokens in flight, R * (window - 1) +
# M * B window slots are never exhausted (`window_pool_slots`). The pipeline then holds
#   A) the full charge: every layer a slot per token (a window pool as large as the token pool), or
#   B) a window pool of `window_slots` slots, and per stage (usable - weights - window layers *
#      kv * window_slots) / (full layers * kv) tokens for its full-attention layers,
# whichever holds more tokens (`kv_capacity`); max-kv maximises over both, so it stays exact.


def window_pool_slots(window: int, max_running_requests: int, max_batch_tokens: int, micro_batches: int) -> int:
    """Slots the sliding-window pool needs so that it is never the one that runs out."""
    for name, value in (("window", window), ("max_running_requests", max_running_requests),
                        ("max_batch_tokens", max_batch_tokens), ("micro_batches", micro_batches)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    return max_running_requests * (window - 1) + micro_batches * max_batch_tokens


def windowed_stage_kv_tokens(
    usable_bytes: int,
    weight_bytes: int,
    full_layers: int,
    window_layers: int,
    kv_bytes_per_token_per_layer: int,
    window_slots: int,
    token_limit: int,
) -> int:
    """Tokens one stage holds for its full-attention layers once its windowed layers have their
    `window_slots`; a stage of windowed layers only is not bounded by tokens: it gives
    `token_limit` (0 when its window pool does not fit)."""
    free = usable_bytes - weight_bytes - window_layers * kv_bytes_per_token_per_layer * window_slots
    if free < 0:
        return 0
    if not full_layers:
        return token_limit
    return free // (full_layers * kv_bytes_per_token_per_layer)


@dataclass(frozen=True)
class KVCapacity:
    """What the stages hold: tokens per stage, the pipeline's max_total_num_tokens, and the slots
    of the sliding-window pool (0: no windowed layers)."""

    stage_tokens: tuple[int, ...]
    max_total_num_tokens: int
    window_slots: int


def kv_capacity(
    usable_bytes: Sequence[int],
    weight_bytes: Sequence[int],
    full_layers: Sequence[int],
    window_layers: Sequence[int],
    kv_bytes_per_token_per_layer: int,
    window_slots: int = 0,
    token_limit: int = 0,
) -> KVCapacity:
    """The KV capacity of a pipeline, stage by stage: the one rule of the planner (pipesplit
    target) and of the runtime (from its measured weights). window_slots: the window pool that
    never runs out (`window_pool_slots`), 0 to charge windowed layers in full; token_limit: the
    tokens a pipeline of windowed layers only may hold."""
    kv = kv_bytes_per_token_per_layer
    stages = list(zip(usable_bytes, weight_bytes, full_layers, window_layers))
    full_charge = tuple(stage_kv_tokens(u, w, f + n, kv) for u, w, f, n in stages)
    tokens = min(full_charge)
    if not any(window_layers):
        return KVCapacity(full_charge, tokens, 0)
    best = KVCapacity(full_charge, tokens, tokens)
    if window_slots:
        pooled = [windowed_stage_kv_tokens(u, w, f, n, kv, window_slots, token_limit) for u, w, f, n in stages]
        bounded = [t for t, f in zip(pooled, full_layers) if f or not t]  # stages whose tokens are bounded
        pooled_tokens = min(bounded) if bounded else token_limit
        if pooled_tokens > tokens:
            # a stage of windowed layers only holds whatever the others hold
            pooled = [t if f or not t else max(t, pooled_tokens) for t, f in zip(pooled, full_layers)]
            best = KVCapacity(tuple(pooled), pooled_tokens, window_slots)
    return best


@dataclass(frozen=True)
class SplitProblem:
    """Everything a partition strategy may look at, in bytes per TP rank.

    stage_extra_bytes[s] is what stage s holds besides its decoder layers: the embedding on the
    first stage, final norm + lm_head (+ MTP) on the last, all of it on a single stage.
    """

    layer_weight_bytes: tuple[int, ...]
    usable_bytes: tuple[int, ...]
    stage_extra_bytes: tuple[int, ...]
    kv_bytes_per_token_per_layer: int
    target: str = "pipesplit"
    # For `balanced`: FLOPs per token of each layer, of each stage's extras (the lm_head on the
    # last stage), and each device's relative throughput. Empty means equal layers / devices.
    layer_flops: tuple[int, ...] = ()
    stage_extra_flops: tuple[int, ...] = ()
    stage_speed: tuple[float, ...] = ()
    # How the engine lays out the KV cache: which layers are sliding-window (vLLM's hybrid
    # groups and SGLang's SWA pool charge them differently), and its page (block) size.
    layer_attention: tuple[str, ...] = ()
    kv_allocator: str = "uniform"
    swa_full_tokens_ratio: float = 0.8
    page_size: int = 1
    # Sliding-window layers (pipesplit target): which layers have a window, the window pool's
    # slots (0: windowed layers charged in full) and the token limit of windowed-only pipelines.
    window_layers: tuple[bool, ...] = ()
    window_slots: int = 0
    token_limit: int = 0

    def __post_init__(self) -> None:
        check_stage_count(len(self.layer_weight_bytes), len(self.usable_bytes))
        if self.window_layers and len(self.window_layers) != len(self.layer_weight_bytes):
            raise ValueError("window_layers needs one entry per layer")
        if self.window_slots < 0 or (self.window_slots and self.token_limit < 1):
            raise ValueError("window_slots must not be negative, and a window pool needs a positive token_limit")
        if len(self.stage_extra_bytes) != len(self.usable_bytes):
            raise ValueError("stage_extra_bytes needs one entry per stage")
        if self.layer_flops and len(self.layer_flops) != len(self.layer_weight_bytes):
            raise ValueError("layer_flops needs one entry per layer")
        for name in ("stage_extra_flops", "stage_speed"):
            if getattr(self, name) and len(getattr(self, name)) != len(self.usable_bytes):
                raise ValueError(f"{name} needs one entry per stage")
        if any(v <= 0 for v in self.stage_speed):
            raise ValueError("stage_speed entries must be positive")
        if self.kv_bytes_per_token_per_layer <= 0:
            raise ValueError("kv_bytes_per_token_per_layer must be positive")
        check_target(self.target)
        if self.layer_attention and (len(self.layer_attention) != len(self.layer_weight_bytes)
                                     or set(self.layer_attention) - set(ATTENTION_KINDS)):
            raise ValueError(f"layer_attention needs one entry of {ATTENTION_KINDS} per layer")
        if self.kv_allocator not in KV_ALLOCATORS:
            raise ValueError(f"kv_allocator must be one of {KV_ALLOCATORS}, got {self.kv_allocator!r}")
        if self.page_size < 1:
            raise ValueError("page_size must be at least 1")
        if not 0 < self.swa_full_tokens_ratio <= 1:
            raise ValueError("swa_full_tokens_ratio must be in (0, 1]")
        sliding = [0]
        for kind in self.layer_attention or ("full",) * self.num_layers:
            sliding.append(sliding[-1] + (kind == "sliding"))
        object.__setattr__(self, "_sliding_prefix", tuple(sliding))

    # -- KV per stage ------------------------------------------------------------------------
    def _counts(self, a: int, b: int) -> tuple[int, int]:
        """(full-attention, sliding-window) layers in [a, b)."""
        sliding = self._sliding_prefix[b] - self._sliding_prefix[a]
        return b - a - sliding, sliding

    @property
    def hybrid(self) -> bool:
        return self.kv_allocator != "uniform" and 0 < self._sliding_prefix[-1] < self.num_layers

    def _vllm_groups(self, a: int, b: int) -> tuple[int, int]:
        """(layers per KV group, number of groups) of vLLM's hybrid allocator for layers [a, b).

        vllm/v1/core/kv_cache_utils.py `_get_kv_cache_groups_uniform_page_size`: layers of one
        attention type form groups of `group_size` layers (the smaller type count, or the larger
        one when it is under 1.25x the smaller, to save padding); every group has its own block
        table and the pool holds group_size tensors of num_blocks pages each.
        """
        counts = [n for n in self._counts(a, b) if n]
        if len(counts) == 1:
            return counts[0], 1
        low, high = min(counts), max(counts)
        group = high if high < low * 1.25 else low
        return group, sum(-(-n // group) for n in counts)

    def stage_kv_cell(self, a: int, b: int) -> int | Fraction:
        """KV bytes one token costs on a stage holding layers [a, b), as its engine allocates them."""
        kv = self.kv_bytes_per_token_per_layer
        if not self.hybrid:
            return (b - a) * kv
        full, sliding = self._counts(a, b)
        if self.kv_allocator == "vllm-hybrid":
            group, groups = self._vllm_groups(a, b)
            return group * groups * kv if full and sliding else (b - a) * kv
        ratio = Fraction(self.swa_full_tokens_ratio).limit_denominator(1000)
        return kv * (full + ratio * sliding) if full and sliding else (b - a) * kv

    def stage_tokens(self, free_bytes: int, a: int, b: int) -> int:
        """KV tokens a stage with free_bytes after its weights reports for layers [a, b)."""
        return self.tokens_for_cell(free_bytes, self.stage_kv_cell(a, b))

    def tokens_for_cell(self, free_bytes: int, cell: int | Fraction) -> int:
        """floor(free / cell) rounded down to whole pages (vLLM blocks, SGLang pages)."""
        if free_bytes <= 0:
            return 0
        tokens = int(free_bytes // cell)
        return tokens // self.page_size * self.page_size

    @property
    def num_layers(self) -> int:
        return len(self.layer_weight_bytes)

    @property
    def num_stages(self) -> int:
        return len(self.usable_bytes)


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r}; give one of {', '.join(TARGETS)}")


def check_stage_count(num_layers: int, num_stages: int) -> None:
    if num_stages < 1:
        raise UserError(f"--pp is {num_stages}; give 1 or more stages")
    if num_stages > num_layers:
        raise UserError(
            f"--pp {num_stages} is more than the model's {num_layers} layers; give --pp {num_layers} or fewer"
        )


# ---------------------------------------------------------------------------------------------
# Evaluating a partition


def stage_ranges(partition: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) global layer range of every stage, end exclusive."""
    ranges, start = [], 0
    for n in partition:
        ranges.append((start, start + n))
        start += n
    return ranges


@dataclass(frozen=True)
class Evaluation:
    max_total_num_tokens: int
    fits: bool
    binding_stage: int
    stage_weight_bytes: tuple[int, ...]
    stage_tokens: tuple[int, ...]
    stage_shortfall_bytes: tuple[int, ...]  # > 0: bytes missing to hold the weights and one token
    window_slots: int = 0  # slots of the sliding-window pool (0: none)


def evaluate(problem: SplitProblem, partition: Sequence[int]) -> Evaluation:
    """Weights, KV tokens per stage and the pipeline's max_total_num_tokens under problem.target."""
    weights, windows = _Weights(problem), _WindowLayers(problem)
    ranges = stage_ranges(partition)
    cells = [problem.stage_kv_cell(a, b) for a, b in ranges]
    if problem.target == "sglang":  # every rank divides by the largest stage's KV per token
        cells = [max(cells)] * len(cells)
    stage_w, tokens, shortfall = [], [], []
    for s, ((a, b), cell) in enumerate(zip(ranges, cells)):
        w = weights.stage(s, a, b)
        stage_w.append(w)
        tokens.append(problem.tokens_for_cell(problem.usable_bytes[s] - w, cell))
        shortfall.append(w + _ceil(cell * problem.page_size) - problem.usable_bytes[s])
    capacity, window_slots = min(tokens), 0
    if problem.target == "pipesplit" and problem.kv_allocator == "uniform":  # pipesplit's own rule, windows too
        windowed = [windows.count(a, b) for a, b in ranges]
        result = kv_capacity(problem.usable_bytes, stage_w, [b - a - n for (a, b), n in zip(ranges, windowed)],
                             windowed, problem.kv_bytes_per_token_per_layer, problem.window_slots,
                             problem.token_limit)
        tokens, capacity, window_slots = list(result.stage_tokens), result.max_total_num_tokens, result.window_slots
    fits = capacity > 0
    binding = tokens.index(capacity) if fits else shortfall.index(max(shortfall))
    return Evaluation(capacity, fits, binding, tuple(stage_w), tuple(tokens), tuple(shortfall), window_slots)


def _ceil(x: int | Fraction) -> int:
    return -(-x.numerator // x.denominator) if isinstance(x, Fraction) else x


class _Weights:
    """Stage weight bytes in O(1) from prefix sums."""

    def __init__(self, problem: SplitProblem) -> None:
        self.prefix = [0]
        for w in problem.layer_weight_bytes:
            self.prefix.append(self.prefix[-1] + w)
        self.extra = problem.stage_extra_bytes

    def stage(self, s: int, a: int, b: int) -> int:
        return self.prefix[b] - self.prefix[a] + self.extra[s]


_UNBOUNDED = 1 << 62  # a stage's tokens when nothing it holds grows with them


class _WindowLayers:
    """Windowed layers in [a, b) in O(1) from prefix sums."""

    def __init__(self, problem: SplitProblem) -> None:
        self.prefix = [0]
        for windowed in problem.window_layers or (False,) * problem.num_layers:
            self.prefix.append(self.prefix[-1] + bool(windowed))

    def count(self, a: int, b: int) -> int:
        return self.prefix[b] - self.prefix[a]


# ---------------------------------------------------------------------------------------------
# Exact optimisation over contiguous partitions

StageFn = Callable[[int, int, int], int]  # (stage, start, end) -> value
StageOk = Callable[[int, int, int], bool]


def _bottleneck(P: int, L: int, value: StageFn, max_layers: int, allowed: StageOk | None = None):
    """max over partitions (every stage <= max_layers layers and allowed) of min_s value(s, a, b).

    DP over (stage, boundary): best_s[b] = max_a min(best_{s-1}[a], value(s, a, b)). Returns the
    optimum or None when no partition satisfies the constraints.
    """
    best: list[int | None] = [None] * (L + 1)
    for b in range(1, min(max_layers, L - P + 1) + 1):
        if allowed is None or allowed(0, 0, b):
            best[b] = value(0, 0, b)
    for s in range(1, P):
        new: list[int | None] = [None] * (L + 1)
        for b in range(s + 1, L - (P - 1 - s) + 1):
            top = None
            for a in range(max(s, b - max_layers), b):
                prev = best[a]
                if prev is None or (allowed is not None and not allowed(s, a, b)):
                    continue
                v = value(s, a, b)
                if prev < v:
                    v = prev
                if top is None or v > top:
                    top = v
            new[b] = top
        best = new
    return best[L]


def _first_partition(P: int, L: int, max_layers: int, allowed: StageOk) -> tuple[int, ...] | None:
    """The lexicographically smallest partition whose stages are all allowed, or None."""
    # can[s][a]: stages s..P-1 can cover layers [a, L)
    can = [[False] * (L + 1) for _ in range(P + 1)]
    can[P][L] = True
    for s in range(P - 1, -1, -1):
        for a in range(s, L - (P - s) + 1):
            can[s][a] = any(
                can[s + 1][b] and allowed(s, a, b) for b in range(a + 1, min(a + max_layers, L - (P - 1 - s)) + 1)
            )
    if not can[0][0]:
        return None
    partition, a = [], 0
    for s in range(P):
        for b in range(a + 1, min(a + max_layers, L - (P - 1 - s)) + 1):
            if can[s + 1][b] and allowed(s, a, b):
                partition.append(b - a)
                a = b
                break
    return tuple(partition)


def _smallest_cap(P: int, L: int, allowed: StageOk) -> int:
    """Smallest N such that some allowed partition has every stage <= N layers (binary search)."""
    lo, hi = -(-L // P), L - P + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _first_partition(P, L, mid, allowed) is not None:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _balanced_lightest(P: int, L: int, weights: _Weights, allowed: StageOk, max_layers: int) -> tuple[int, ...]:
    """Among allowed partitions within max_layers: smallest max stage weight, then lexicographically first."""
    neg_max_weight = _bottleneck(P, L, lambda s, a, b: -weights.stage(s, a, b), max_layers, allowed)
    limit = -neg_max_weight

    def lighter(s: int, a: int, b: int) -> bool:
        return allowed(s, a, b) and weights.stage(s, a, b) <= limit

    partition = _first_partition(P, L, max_layers, lighter)
    assert partition is not None
    return partition


def _tie_break(problem: SplitProblem, allowed: StageOk, max_layers: int | None = None) -> tuple[int, ...]:
    """Among partitions whose stages are all allowed: fewest layers on the largest stage, then the
    smallest largest stage weight, then the lexicographically first."""
    P, L = problem.num_stages, problem.num_layers
    if max_layers is None:
        max_layers = _smallest_cap(P, L, allowed)
    return _balanced_lightest(P, L, _Weights(problem), allowed, max_layers)


def _max_slack(problem: SplitProblem) -> tuple[int, ...]:
    """When nothing fits: the partition whose worst stage misses the least memory."""
    P, L = problem.num_stages, problem.num_layers
    weights, usable = _Weights(problem), problem.usable_bytes

    def slack(s: int, a: int, b: int) -> int:
        return usable[s] - weights.stage(s, a, b) - _ceil(problem.stage_kv_cell(a, b) * problem.page_size)

    best = _bottleneck(P, L, slack, L)
    return _tie_break(problem, lambda s, a, b: slack(s, a, b) >= best)


def _max_kv_pipesplit(problem: SplitProblem) -> tuple[int, ...]:
    P, L = problem.num_stages, problem.num_layers
    weights, usable = _Weights(problem), problem.usable_bytes

    def tokens(s: int, a: int, b: int) -> int:
        return problem.stage_tokens(usable[s] - weights.stage(s, a, b), a, b)

    best = _bottleneck(P, L, tokens, L)
    if problem.window_slots and any(problem.window_layers):
        # the window pool (case B of kv_capacity) where it beats the full charge of every partition
        windows = _WindowLayers(problem)

        def pooled(s: int, a: int, b: int) -> int:
            n = windows.count(a, b)
            t = windowed_stage_kv_tokens(usable[s], weights.stage(s, a, b), b - a - n, n,
                                         problem.kv_bytes_per_token_per_layer, problem.window_slots,
                                         problem.token_limit)
            return t if t == 0 or n < b - a else _UNBOUNDED  # windowed layers only: no token bound

        best_pooled = _bottleneck(P, L, pooled, L)
        if (problem.token_limit if best_pooled == _UNBOUNDED else best_pooled) > best:
            return _tie_break(problem, lambda s, a, b: pooled(s, a, b) >= best_pooled)
    if best == 0:
        return _max_slack(problem)
    return _tie_break(problem, lambda s, a, b: tokens(s, a, b) >= best)


def _max_kv_sglang_cells(problem: SplitProblem) -> tuple[int, ...]:
    """SGLang's rule when a stage's KV per token is not layers x kv (SWA pool) or pages round:
    enumerate the cap C on the largest stage's KV bytes per token over the distinct values; with
    every stage's cell <= C, maximise the least free memory F(C); tokens(F(C), C) bounds the value
    of that partition from below and the maximum over C is the optimum."""
    P, L = problem.num_stages, problem.num_layers
    weights, usable = _Weights(problem), problem.usable_bytes

    def free(s: int, a: int, b: int) -> int:
        return usable[s] - weights.stage(s, a, b)

    caps = sorted({problem.stage_kv_cell(a, b) for a in range(L) for b in range(a + 1, min(L, a + L - P + 1) + 1)})
    free_unbounded = _bottleneck(P, L, free, L - P + 1)
    best, best_cap = 0, None
    for cap in caps:
        if problem.tokens_for_cell(free_unbounded, cap) <= best:
            break  # larger caps only divide by more

        def within(s: int, a: int, b: int, cap=cap) -> bool:
            return problem.stage_kv_cell(a, b) <= cap

        free_at_cap = _bottleneck(P, L, free, L - P + 1, within)
        if free_at_cap is not None and problem.tokens_for_cell(free_at_cap, cap) > best:
            best, best_cap = problem.tokens_for_cell(free_at_cap, cap), cap
    if best == 0:
        return _max_slack(problem)

    def good(s: int, a: int, b: int) -> bool:
        return problem.stage_kv_cell(a, b) <= best_cap and problem.tokens_for_cell(free(s, a, b), best_cap) >= best

    return _tie_break(problem, good)


def _max_kv_sglang(problem: SplitProblem) -> tuple[int, ...]:
    """Enumerate the cap N on the largest stage: with every stage <= N layers, maximise the least free
    memory F(N); floor(F(N) / (kv N)) is a lower bound on the real value of that partition and the
    maximum over N is the optimum (the optimal partition is counted at its own max layer count)."""
    P, L = problem.num_stages, problem.num_layers
    weights, kv, usable = _Weights(problem), problem.kv_bytes_per_token_per_layer, problem.usable_bytes

    def free(s: int, a: int, b: int) -> int:
        return usable[s] - weights.stage(s, a, b)

    lo, hi = -(-L // P), L - P + 1
    free_unbounded = _bottleneck(P, L, free, hi)
    best = 0
    for cap in range(lo, hi + 1):
        if max(0, free_unbounded) // (kv * cap) <= best:
            break  # later caps only divide by more layers
        free_at_cap = _bottleneck(P, L, free, cap)
        if free_at_cap is not None:
            best = max(best, max(0, free_at_cap) // (kv * cap))
    if best == 0:
        return _max_slack(problem)
    for cap in range(lo, hi + 1):
        need = best * kv * cap

        def roomy(s: int, a: int, b: int, need: int = need) -> bool:
            return free(s, a, b) >= need

        if _first_partition(P, L, cap, roomy) is not None:
            return _tie_break(problem, roomy, cap)
    raise AssertionError("the optimum was found above, so some cap admits it")


# ---------------------------------------------------------------------------------------------
# Strategies: name -> pure function (num_layers, num_stages, problem or None) -> layers per stage

Strategy = Callable[[int, int, "SplitProblem | None"], tuple[int, ...]]
STRATEGIES: dict[str, Strategy] = {}
NEEDS_COSTS: set[str] = set()


def strategy(name: str, needs_costs: bool = False) -> Callable[[Strategy], Strategy]:
    def register(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        if needs_costs:
            NEEDS_COSTS.add(name)
        return fn

    return register


@strategy("sglang-legacy")
def sglang_legacy(num_layers: int, num_stages: int, problem: SplitProblem | None = None) -> tuple[int, ...]:
    """SGLang before its fix: L // P layers each, the last stage takes the whole remainder."""
    base = num_layers // num_stages
    return (base,) * (num_stages - 1) + (num_layers - base * (num_stages - 1),)


@strategy("remainder-first")
def remainder_first(num_layers: int, num_stages: int, problem: SplitProblem | None = None) -> tuple[int, ...]:
    """One extra layer on each of the first L % P stages."""
    base, extra = divmod(num_layers, num_stages)
    return tuple(base + (s < extra) for s in range(num_stages))


@strategy("remainder-last")
def remainder_last(num_layers: int, num_stages: int, problem: SplitProblem | None = None) -> tuple[int, ...]:
    """One extra layer on each of the last L % P stages."""
    base, extra = divmod(num_layers, num_stages)
    return tuple(base + (s >= num_stages - extra) for s in range(num_stages))


@strategy("vllm")
def vllm(num_layers: int, num_stages: int, problem: SplitProblem | None = None) -> tuple[int, ...]:
    """vLLM's get_pp_indices: extras go to the second-to-last stage, then the one before it, ..."""
    base, extra = divmod(num_layers, num_stages)
    parts = [base] * num_stages
    for i in range(2, extra + 2):
        parts[-i] += 1
    return tuple(parts)


def _require(problem: SplitProblem | None, name: str, num_layers: int, num_stages: int) -> SplitProblem:
    if problem is None:
        raise ValueError(f"strategy {name!r} needs the model's costs and the devices (a SplitProblem)")
    assert (problem.num_layers, problem.num_stages) == (num_layers, num_stages)
    return problem


@strategy("min-weights", needs_costs=True)
def min_weights(num_layers: int, num_stages: int, problem: SplitProblem | None = None) -> tuple[int, ...]:
    """Smallest largest stage weight (embedding, head and MTP included); ties: fewest layers on the
    largest stage, then lexicographically first."""
    problem = _require(problem, "min-weights", num_layers, num_stages)
    P, L, weights = num_stages, num_layers, _Weights(problem)
    lightest = -_bottleneck(P, L, lambda s, a, b: -weights.stage(s, a, b), L - P + 1)

    def light(s: int, a: int, b: int) -> bool:
        return weights.stage(s, a, b) <= lightest

    partition = _first_partition(P, L, _smallest_cap(P, L, light), light)
    assert partition is not None
    return partition


@strategy("max-kv", needs_costs=True)
def max_kv(num_layers: int, num_stages: int, problem: SplitProblem | None = None) -> tuple[int, ...]:
    """The partition with the highest max_total_num_tokens under problem.target (exact); ties: fewest
    layers on the largest stage, then smallest largest stage weight, then lexicographically first.
    When nothing fits: the partition whose worst stage misses the least memory."""
    problem = _require(problem, "max-kv", num_layers, num_stages)
    if problem.target == "sglang":
        return _max_kv_sglang_cells(problem) if problem.hybrid or problem.page_size > 1 else _max_kv_sglang(problem)
    return _max_kv_pipesplit(problem)


class _Seconds:
    """Relative compute time per token of a stage, from prefix sums of layer FLOPs."""

    def __init__(self, problem: SplitProblem) -> None:
        flops = problem.layer_flops or (1,) * problem.num_layers
        self.prefix = [0]
        for f in flops:
            self.prefix.append(self.prefix[-1] + f)
        self.extra = problem.stage_extra_flops or (0,) * problem.num_stages
        self.speed = problem.stage_speed or (1.0,) * problem.num_stages

    def stage(self, s: int, a: int, b: int) -> float:
        return (self.prefix[b] - self.prefix[a] + self.extra[s]) / self.speed[s]


@strategy("balanced", needs_costs=True)
def balanced(num_layers: int, num_stages: int, problem: SplitProblem | None = None) -> tuple[int, ...]:
    """The smallest largest stage compute time per token (layer FLOPs, plus the lm_head on the last
    stage, over each device's throughput) among partitions whose every stage fits: the pipeline's
    throughput bound. Ties: most KV tokens (per-stage rule), then the max-kv tie-breaks."""
    problem = _require(problem, "balanced", num_layers, num_stages)
    P, L = num_stages, num_layers
    weights, usable = _Weights(problem), problem.usable_bytes
    seconds = _Seconds(problem)

    def tokens(s: int, a: int, b: int) -> int:
        return problem.stage_tokens(usable[s] - weights.stage(s, a, b), a, b)

    def fits(s: int, a: int, b: int) -> bool:
        return tokens(s, a, b) > 0

    fastest = _bottleneck(P, L, lambda s, a, b: -seconds.stage(s, a, b), L, fits)
    if fastest is None:
        return _max_slack(problem)
    limit = -fastest * (1 + 1e-12)  # float sums: equal times must compare equal

    def quick(s: int, a: int, b: int) -> bool:
        return fits(s, a, b) and seconds.stage(s, a, b) <= limit

    most = _bottleneck(P, L, tokens, L, quick)
    return _tie_break(problem, lambda s, a, b: quick(s, a, b) and tokens(s, a, b) >= most)


DEFAULT_STRATEGY = "max-kv"


def check_strategy(name: str) -> None:
    if name not in STRATEGIES:
        raise UserError(f"unknown strategy {name!r}; give one of {', '.join(STRATEGIES)}")


def parse_partition(partition: str | Sequence[int], num_layers: int, num_stages: int) -> tuple[int, ...]:
    """An explicit partition ("8,8,8,8,8,7,7,7" or a sequence), validated against the model and --pp."""
    text = partition if isinstance(partition, str) else ",".join(str(n) for n in partition)
    hint = f"give {num_stages} numbers that sum to {num_layers}"
    try:
        parts = tuple(int(item) for item in text.split(","))
    except ValueError:
        raise UserError(f"partition {text!r} is not a comma-separated list of integers; {hint}") from None
    if len(parts) != num_stages:
        raise UserError(f"partition {text} has {len(parts)} entries but --pp is {num_stages}; {hint}")
    if min(parts) < 1:
        raise UserError(f"partition {text} has a stage with no layers; every stage needs at least 1; {hint}")
    if sum(parts) != num_layers:
        raise UserError(f"partition {text} sums to {sum(parts)} but the model has {num_layers} layers; {hint}")
    return parts


def partition_for(
    strategy_or_partition: str | Sequence[int],
    num_layers: int,
    num_stages: int,
    problem: SplitProblem | None = None,
) -> tuple[int, ...]:
    """Layers per stage from a strategy name or an explicit partition."""
    check_stage_count(num_layers, num_stages)
    if isinstance(strategy_or_partition, str) and strategy_or_partition in STRATEGIES:
        return STRATEGIES[strategy_or_partition](num_layers, num_stages, problem)
    if isinstance(strategy_or_partition, str) and not any(c.isdigit() for c in strategy_or_partition):
        check_strategy(strategy_or_partition)
    return parse_partition(strategy_or_partition, num_layers, num_stages)
