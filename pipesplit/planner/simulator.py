"""A discrete-event simulation of pipesplit's pipeline, driving the real `Scheduler` on simulated time.

The loop is the engine's (`runtime/engine.py`, `Engine._run`): rank 0 takes arrivals, asks the
scheduler for a micro-batch while fewer than M are in flight, pays its scheduling work and runs
stage 0's layers itself, then hands the batch on; every other stage is a single worker that takes
batches in order (`stage.worker_loop`); the last stage samples and replies to rank 0, which
completes the oldest batch in flight when it cannot schedule another. The scheduler's policy
(continuous batching, chunked prefill, M micro-batches, preemption at the planned capacity,
prefix cache) is the runtime's own class, so the simulation follows it as it changes.

What a step costs comes from a `StepCosts`: a measured profile (`pipesplit profile`, see
`ProfileCosts`) or a roofline of a catalog GPU (`RooflineCosts`). Stages that compute at the same
moment share the machine (`StepCosts.slowdown`: on a CPU, memory bandwidth and, beyond its cores,
the cores), so the simulation advances event by event, each stage at the speed that the stages
computing beside it leave it. Pure Python: no torch.
"""

from __future__ import annotations

import collections
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

from pipesplit.errors import UserError
from pipesplit.planner.costs import cost_model
from pipesplit.planner.hardware import GpuSpec, find_gpu
from pipesplit.planner.partition import stage_ranges
from pipesplit.planner.spec import ModelSpec
from pipesplit.runtime.kv_cache import SlotAllocator
from pipesplit.runtime.prefix_cache import PrefixCache
from pipesplit.runtime.sampler import SamplingParams
from pipesplit.runtime.scheduler import Request, ScheduledBatch, Scheduler, SchedulerConfig

PROFILE_FORMAT = 1


# -- workload ----------------------------------------------------------------------------------------
def parse_range(text: str, flag: str) -> tuple[int, int]:
    """`128` or `64-256` -> (low, high), both at least 1."""
    parts = str(text).split("-")
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, -1)
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a length or a range; give e.g. 128 or 64-256") from None
    if not 1 <= low <= high:
        raise UserError(f"{flag} {text!r} must be N or A-B with 1 <= A <= B")
    return low, high


@dataclass(frozen=True)
class Workload:
    """N requests with uniform random prompt and output lengths, arriving all at once (rate None)
    or as a Poisson process of `rate` requests per second; the same seed gives the same requests."""

    requests: int
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]
    rate: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.requests < 1:
            raise UserError(f"--requests is {self.requests}; give at least 1")
        if self.rate is not None and not self.rate > 0:
            raise UserError(f"--rate is {self.rate:g}; give a positive number of requests per second, or leave it out")
        for flag, (low, high) in (("--prompt-len", self.prompt_len), ("--output-len", self.output_len)):
            if not 1 <= low <= high:
                raise UserError(f"{flag} {low}-{high} must have 1 <= A <= B")

    @classmethod
    def from_json(cls, doc: dict) -> "Workload":
        """A workload as `dataclasses.asdict` wrote it (lengths as lists)."""
        return cls(**{**doc, "prompt_len": tuple(doc["prompt_len"]), "output_len": tuple(doc["output_len"])})

    def draw(self, vocab_size: int) -> list[tuple[float, list[int], int]]:
        """(arrival seconds, prompt token ids, output tokens) per request, in arrival order.

        Prompt tokens are random ids, so requests share no prefix (the bench sends the same ids
        to the real engine)."""
        rng = random.Random(self.seed)
        t, out = 0.0, []
        for _ in range(self.requests):
            if self.rate is not None:
                t += rng.expovariate(self.rate)
            n = rng.randint(*self.prompt_len)
            prompt = [rng.randrange(vocab_size) for _ in range(n)]
            out.append((t, prompt, rng.randint(*self.output_len)))
        return out


# -- what one step costs ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepShape:
    """What a micro-batch asks of a stage: new tokens, sequences, attention pairs (each new token
    times its context), context tokens read, and rows sampled on the last stage."""

    tokens: int
    seqs: int
    attention: int
    context: int
    samples: int

    def as_list(self) -> list[int]:
        """The shape as a JSON row (the fields in order)."""
        return [self.tokens, self.seqs, self.attention, self.context, self.samples]


def has_prefill(shape: StepShape) -> bool:
    """Whether the step computes a prefill chunk (some sequence brings more than one new token)."""
    return shape.tokens > shape.seqs


def decode_view(shape: StepShape) -> StepShape:
    """The step as if every sequence in it decoded one token over the same context: the part of a
    step with a prefill chunk that the calibration prices like a decode step."""
    return StepShape(shape.seqs, shape.seqs, shape.context, shape.context, shape.samples)


def shape_of(batch: ScheduledBatch) -> StepShape:
    seqs = batch.message.seqs
    attention = context = 0
    for s in seqs:
        q, c = len(s.new_slots), s.context_len
        attention += q * c - q * (q - 1) // 2  # causal: the i-th new token sees c - q + i + 1 keys
        context += c
    return StepShape(sum(len(s.new_slots) for s in seqs), len(seqs), attention, context, batch.message.num_samples)


class StepCosts(Protocol):
    """Seconds of each piece of a pipeline step."""

    def stage_seconds(self, stage: int, layers: tuple[int, int], first: bool, last: bool, shape: StepShape) -> float:
        """A stage's compute for one step: its layers, the embedding (first), norm + head + sampling (last)."""

    def transfer_seconds(self, num_bytes: int) -> float:
        """One stage-to-stage hand-off of `num_bytes` (hidden states plus the step message)."""

    def schedule_seconds(self, shape: StepShape) -> float:
        """Rank 0's own work per step besides stage 0's layers: scheduling, messages, completion."""

    def activation_bytes(self, shape: StepShape) -> int:
        """Bytes handed from one stage to the next."""

    def slowdown(self, computing: int, stages: int) -> float:
        """How much slower each stage computes while `computing` of the pipeline's `stages` stages
        compute at once (1.0 where stages do not share a machine)."""


@dataclass(frozen=True)
class Linear:
    """seconds = base + per_token * tokens + per_seq * seqs + per_attention * attention pairs
    + per_context * context tokens + per_sample * rows sampled (coefficients fitted by the profiler)."""

    base: float = 0.0
    per_token: float = 0.0
    per_seq: float = 0.0
    per_attention: float = 0.0
    per_context: float = 0.0
    per_sample: float = 0.0

    FEATURES = ("base", "per_token", "per_seq", "per_attention", "per_context", "per_sample")

    def __call__(self, shape: StepShape) -> float:
        return (self.base + self.per_token * shape.tokens + self.per_seq * shape.seqs
                + self.per_attention * shape.attention + self.per_context * shape.context
                + self.per_sample * shape.samples)

    @staticmethod
    def features(shape: StepShape) -> list[float]:
        return [1.0, shape.tokens, shape.seqs, shape.attention, shape.context, shape.samples]


def layer_kind(spec: ModelSpec, layer: int) -> str:
    """The profile's name for what layer `layer` is: its MLP kind, with `mla-` for MLA attention."""
    return ("mla-" if spec.mla is not None else "") + spec.mlp_kind(layer)


@dataclass(frozen=True)
class Profile:
    """Measured step costs of one model on one machine (written by `pipesplit profile`)."""

    model: str
    device: str
    dtype: str
    threads: int
    hidden_size: int
    activation_itemsize: int
    layers: dict[str, Linear]  # per layer kind (see layer_kind)
    embedding: Linear
    head: Linear  # final norm + lm_head + sampling, on the last stage
    stage_step: Linear  # per stage and step: its view of the slots and the AttentionBatch
    schedule: Linear  # rank 0 per step: Scheduler.schedule + message encoding + Scheduler.complete
    transfer_latency: float  # seconds per hand-off
    transfer_per_byte: float  # seconds per byte
    # a layer's time while every other core group (cores // threads in all) runs a stage too, over
    # its time alone: shared memory bandwidth and caches (CPU; 1.0 where not measured)
    corun_slowdown: float = 1.0
    # how much dearer every step of a pipeline with more stages than cores is, beyond the cores'
    # processor sharing (CPU, one thread per stage; fitted by `pipesplit profile --calibrate` on a
    # run with one stage more than the cores; 1.0 where not measured): see `cpu_contention`
    oversubscribed_slowdown: float = 1.0
    # the real engine's stage step times over what the pieces (and on a CPU the co-running model)
    # charge for them, on a calibration workload with `threads` per stage (`pipesplit profile`):
    # over the steps with a prefill chunk, and over the decode-only steps
    prefill_scale: float = 1.0
    decode_scale: float = 1.0
    meta: dict | None = None

    def __post_init__(self) -> None:
        for name in ("prefill_scale", "decode_scale", "corun_slowdown", "oversubscribed_slowdown"):
            if not getattr(self, name) > 0:
                raise UserError(f"the profile's {name} is {getattr(self, name)}; rerun `pipesplit profile`")

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["format"] = PROFILE_FORMAT
        return doc

    @classmethod
    def from_json(cls, doc: dict) -> "Profile":
        if doc.get("format") != PROFILE_FORMAT:
            raise UserError(f"profile format {doc.get('format')!r} is not {PROFILE_FORMAT}; rerun `pipesplit profile`")
        doc = {k: v for k, v in doc.items() if k != "format"}
        lin = lambda d: Linear(**d)  # noqa: E731
        doc["layers"] = {k: lin(v) for k, v in doc["layers"].items()}
        for key in ("embedding", "head", "stage_step", "schedule"):
            doc[key] = lin(doc[key])
        return cls(**doc)


def load_profile(path: str) -> Profile:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"profile {path} does not exist; write one with `pipesplit profile MODEL --out {path}`") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"profile {path} is not JSON ({exc}); write it with `pipesplit profile`") from None
    return Profile.from_json(doc)


@dataclass(frozen=True)
class ProfileCosts:
    """Step costs from a measured profile: each stage sums its layers' fitted times.

    The profile timed the pieces alone, and the engine on a calibration workload: its prefill and
    decode scales stretch the sum to what the engine's steps took. On a CPU, stages that compute
    at the same time share its memory bandwidth and caches, and beyond its cores its cores too
    (`slowdown`, see `cpu_contention`).
    """

    profile: Profile
    spec: ModelSpec

    def __post_init__(self) -> None:
        missing = sorted({layer_kind(self.spec, i) for i in range(self.spec.num_layers)} - set(self.profile.layers))
        if missing:
            raise UserError(f"the profile of {self.profile.model} has no {', '.join(missing)} layers that "
                            f"{self.spec.name} needs; profile {self.spec.name} itself")

    def pieces_seconds(self, layers: tuple[int, int], first: bool, last: bool, shape: StepShape) -> float:
        """A stage's step as the profile's pieces add up: its layers, the embedding (first), norm +
        head + sampling (last), its per-step bookkeeping; no calibration."""
        p = self.profile
        counts = collections.Counter(layer_kind(self.spec, i) for i in range(*layers))
        t = p.stage_step(shape) + sum(n * p.layers[kind](shape) for kind, n in counts.items())
        if first:
            t += p.embedding(shape)
        if last and shape.samples:
            t += p.head(shape)
        return t

    def split_seconds(self, layers: tuple[int, int], first: bool, last: bool, shape: StepShape) -> tuple[float, float]:
        """The pieces of a stage's step as (its decode view, what the prefill chunk adds to it); a
        decode-only step is all decode view."""
        whole = self.pieces_seconds(layers, first, last, shape)
        if not has_prefill(shape):
            return whole, 0.0
        view = min(whole, self.pieces_seconds(layers, first, last, decode_view(shape)))
        return view, whole - view

    def stage_seconds(self, stage: int, layers: tuple[int, int], first: bool, last: bool, shape: StepShape) -> float:
        """The pieces, calibrated: the decode view at the decode scale, the prefill chunk's addition
        at the prefill scale (a small chunk beside decodes costs mostly what the decodes do)."""
        view, added = self.split_seconds(layers, first, last, shape)
        return view * self.profile.decode_scale + added * self.profile.prefill_scale

    def transfer_seconds(self, num_bytes: int) -> float:
        return self.profile.transfer_latency + self.profile.transfer_per_byte * num_bytes

    def schedule_seconds(self, shape: StepShape) -> float:
        return self.profile.schedule(shape)

    def activation_bytes(self, shape: StepShape) -> int:
        return shape.tokens * self.profile.hidden_size * self.profile.activation_itemsize

    def slowdown(self, computing: int, stages: int) -> float:
        return cpu_contention(self.profile, computing, stages)


# -- the roofline ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinkSpec:
    name: str
    bandwidth_gbs: float  # GB/s one way, per GPU
    latency_us: float  # one small message, including the communication library's launch


LINKS: dict[str, LinkSpec] = {
    # NVIDIA H100/H200 datasheets: NVLink 4, 900 GB/s per GPU (both directions together) -> 450 one way.
    # Latency: NCCL point-to-point over NVLink is a few microseconds (NCCL tests, small messages).
    "nvlink": LinkSpec("nvlink", 450.0, 5.0),
    # PCI-SIG PCIe 5.0 x16: 32 GT/s x 16 lanes = 64 GB/s one way (about 55 achievable).
    "pcie": LinkSpec("pcie", 55.0, 10.0),
    # NVIDIA ConnectX-7 / Quantum-2 NDR InfiniBand: 400 Gb/s = 50 GB/s per port; GPUDirect RDMA.
    "ib": LinkSpec("ib", 50.0, 15.0),
    # 100 GbE (IEEE 802.3ba/bj): 12.5 GB/s; TCP sockets (NCCL's socket transport) add tens of microseconds.
    "ethernet": LinkSpec("ethernet", 12.5, 50.0),
}


@dataclass(frozen=True)
class Efficiency:
    """Shares of a GPU's datasheet numbers that kernels reach (documented assumptions, not measured):
    HBM streams reach ~80% of peak bandwidth (STREAM-like copies, decode GEMVs); large BF16 GEMMs
    reach ~60% of dense peak in serving engines' prefill; every layer pays fixed kernel launches
    (~12 kernels of ~5 us without CUDA graphs; decode engines capture graphs, which hides most of it)."""

    bandwidth: float = 0.8
    compute: float = 0.6
    layer_overhead_s: float = 30e-6
    step_overhead_s: float = 2e-3  # rank 0's scheduling and bookkeeping per step (a Python scheduler)
    stage_overhead_s: float = 0.2e-3  # each stage per step: metadata, receiving, launching

    def __post_init__(self) -> None:
        for name in ("bandwidth", "compute"):
            if not 0 < getattr(self, name) <= 1:
                raise UserError(f"efficiency {name} is {getattr(self, name)}; give a share in (0, 1]")


@dataclass(frozen=True)
class RooflineCosts:
    """Step costs of a catalog GPU: each layer takes the longer of its bytes over bandwidth and its
    FLOPs over peak (times the efficiency factors), plus a fixed launch cost; links per `LINKS`."""

    spec: ModelSpec
    gpus: tuple[GpuSpec, ...]  # per stage
    tp: int = 1
    link: LinkSpec = LINKS["nvlink"]
    efficiency: Efficiency = Efficiency()
    kv_dtype: str = "auto"

    def __post_init__(self) -> None:
        cost = cost_model(self.spec, self.tp, self.kv_dtype, weight_dtype=None)
        object.__setattr__(self, "_cost", cost)
        object.__setattr__(self, "_expert_bytes", self._routed_expert_bytes())
        # Layers with equal bytes and FLOPs cost the same: a stage sums (count x one of them).
        kinds = [(cost.layer_weight_bytes[i], self._expert_bytes[i], cost.layer_flops_per_token[i])
                 for i in range(self.spec.num_layers)]
        object.__setattr__(self, "_kind", tuple(kinds.index(k) for k in kinds))

    def _routed_expert_bytes(self) -> tuple[int, ...]:
        from pipesplit.planner.costs import layer_tensors

        out = []
        for i in range(self.spec.num_layers):
            out.append(sum(t.nbytes for t in layer_tensors(self.spec, i, self.tp) if ".experts." in t.name))
        return tuple(out)

    def _attention_flops(self, shape: StepShape) -> float:
        s = self.spec
        heads = max(1, s.num_attention_heads // self.tp)
        if s.mla is not None:
            # Prefill runs MLA as multi-head attention (qk_head_dim scores, v_head_dim values), decode
            # in the absorbed form over the latent cache (kv_lora + rope, then kv_lora); the cheaper one.
            absorbed = 2 * heads * (2 * s.mla.kv_lora_rank + s.mla.qk_rope_head_dim)
            mha = 2 * heads * (s.mla.qk_head_dim + s.mla.v_head_dim)
            per_pair = min(absorbed, mha)
        else:
            per_pair = 2 * heads * 2 * s.head_dim
        return per_pair * shape.attention

    def _layer_seconds(self, layer: int, gpu: GpuSpec, shape: StepShape) -> float:
        c, e = self._cost, self.efficiency
        weights = c.layer_weight_bytes[layer]
        experts = self._expert_bytes[layer]
        if experts and self.spec.moe is not None:  # only the experts some token routes to are read
            moe = self.spec.moe
            touched = moe.num_experts * (1 - (1 - moe.num_experts_per_tok / moe.num_experts) ** shape.tokens)
            weights = weights - experts + experts * touched / moe.num_experts
        kv_read = shape.context * c.kv_bytes_per_token_per_layer
        moved = weights + kv_read + 2 * shape.tokens * self.spec.hidden_size * 2
        flops = c.layer_flops_per_token[layer] * shape.tokens + self._attention_flops(shape)
        return max(moved / (gpu.bandwidth_gbs * 1e9 * e.bandwidth), flops / (gpu.bf16_tflops * 1e12 * e.compute)) \
            + e.layer_overhead_s

    def _head_seconds(self, gpu: GpuSpec, shape: StepShape) -> float:
        c, e = self._cost, self.efficiency
        moved = c.head_bytes + shape.samples * self.spec.vocab_size * 4
        flops = c.head_flops_per_token * shape.samples
        return max(moved / (gpu.bandwidth_gbs * 1e9 * e.bandwidth), flops / (gpu.bf16_tflops * 1e12 * e.compute)) \
            + 3 * e.layer_overhead_s

    def stage_seconds(self, stage: int, layers: tuple[int, int], first: bool, last: bool, shape: StepShape) -> float:
        gpu = self.gpus[stage]
        counts = collections.Counter(self._kind[i] for i in range(*layers))
        t = self.efficiency.stage_overhead_s + sum(n * self._layer_seconds(k, gpu, shape) for k, n in counts.items())
        if first:
            t += shape.tokens * self.spec.hidden_size * 2 / (gpu.bandwidth_gbs * 1e9 * self.efficiency.bandwidth)
        if last and shape.samples:
            t += self._head_seconds(gpu, shape)
        return t

    def transfer_seconds(self, num_bytes: int) -> float:
        return self.link.latency_us * 1e-6 + num_bytes / (self.link.bandwidth_gbs * 1e9)

    def schedule_seconds(self, shape: StepShape) -> float:
        return self.efficiency.step_overhead_s

    def activation_bytes(self, shape: StepShape) -> int:
        return shape.tokens * self.spec.hidden_size * 2  # bf16 hidden states, replicated over TP ranks

    def slowdown(self, computing: int, stages: int) -> float:
        return 1.0  # each stage on GPUs of its own


def roofline_costs(spec: ModelSpec, gpu: str, num_stages: int, tp: int = 1, link: str = "nvlink",
                   kv_dtype: str = "auto") -> RooflineCosts:
    """`--gpu NAME` or `--gpu A,B,...` (one per stage) and `--link` as a RooflineCosts."""
    names = [g.strip() for g in gpu.split(",")]
    if len(names) == 1:
        names *= num_stages
    if len(names) != num_stages:
        raise UserError(f"--gpu lists {len(names)} GPUs but --pp is {num_stages}; give 1 or {num_stages}")
    if link not in LINKS:
        raise UserError(f"unknown --link {link!r}; give one of {', '.join(LINKS)}")
    return RooflineCosts(spec, tuple(find_gpu(n) for n in names), tp, LINKS[link], kv_dtype=kv_dtype)


# -- the simulation -----------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan for no values."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class RequestTimes:
    arrival: float
    first_token: float
    finished: float
    output_tokens: int

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        return (self.finished - self.first_token) / (self.output_tokens - 1) if self.output_tokens > 1 else None


@dataclass(frozen=True)
class SimResult:
    partition: tuple[int, ...]
    max_total_num_tokens: int
    output_tokens_per_s: float
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    makespan: float
    stage_busy: tuple[float, ...]  # share of the makespan each stage computes (rank 0 includes scheduling)
    steps: int
    preemptions: int

    def to_json(self) -> dict:
        return asdict(self)


def summarize(partition: Sequence[int], capacity: int, times: Sequence[RequestTimes], start: float, end: float,
              busy: Sequence[float], steps: int, preemptions: int) -> SimResult:
    """The metrics of a run (simulated or measured, the same definitions)."""
    makespan = end - start
    tpots = [t.tpot for t in times if t.tpot is not None]
    return SimResult(
        partition=tuple(partition),
        max_total_num_tokens=capacity,
        output_tokens_per_s=sum(t.output_tokens for t in times) / makespan if makespan > 0 else math.inf,
        ttft_p50=percentile([t.ttft for t in times], 50),
        ttft_p99=percentile([t.ttft for t in times], 99),
        tpot_p50=percentile(tpots, 50),
        tpot_p99=percentile(tpots, 99),
        makespan=makespan,
        stage_busy=tuple(b / makespan if makespan > 0 else 0.0 for b in busy),
        steps=steps,
        preemptions=preemptions,
    )


@dataclass(frozen=True)
class PipelineConfig:
    """The engine settings the simulation follows (the runtime's defaults; micro_batches None = P)."""

    micro_batches: int | None = None
    max_batch_tokens: int = 2048
    max_running_requests: int = 256
    chunked_prefill_size: int = 512
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        for flag, value in (("--micro-batches", self.micro_batches), ("--max-batch-tokens", self.max_batch_tokens),
                            ("--max-running-requests", self.max_running_requests),
                            ("--chunked-prefill-size", self.chunked_prefill_size)):
            if value is not None and value < 1:
                raise UserError(f"{flag} is {value}; give at least 1")

    @classmethod
    def of(cls, config: SchedulerConfig) -> "PipelineConfig":
        """The settings an engine ran with."""
        return cls(config.micro_batches, config.max_batch_tokens, config.max_running_requests,
                   config.chunked_prefill_size, config.prefix_caching)

    def scheduler_config(self, num_stages: int) -> SchedulerConfig:
        micro_batches = num_stages if self.micro_batches is None else self.micro_batches
        return SchedulerConfig(micro_batches, self.max_batch_tokens, self.max_running_requests,
                               self.chunked_prefill_size, self.prefix_caching)


@dataclass(eq=False)
class _Flight:
    """A micro-batch on its way through the stages (simulation state)."""

    batch: ScheduledBatch
    shape: StepShape
    hop: float  # one stage-to-stage hand-off of its hidden states
    seconds: list[float]  # each stage's compute for it, as it ran (stretched by the stages beside it)
    reply_at: float = math.inf  # when the last stage's answer reaches rank 0


@dataclass(eq=False)
class _Job:
    """The step a stage computes now: work left in seconds of the stage computing alone."""

    flight: _Flight
    left: float
    started: float
    schedule_share: float = 0.0  # rank 0: the share of the job that is its scheduling work


StepTrace = Callable[[StepShape, Sequence[float]], None]


def simulate(spec: ModelSpec, partition: Sequence[int], capacity: int, costs: StepCosts, workload: Workload,
             config: PipelineConfig = PipelineConfig(), on_step: StepTrace | None = None) -> SimResult:
    """Runs the workload through the pipeline on simulated time, event by event; deterministic.

    Rank 0 follows the engine's loop: it schedules a micro-batch while fewer than M are in flight
    and computes stage 0's layers itself; otherwise it waits for the oldest batch's answer (and,
    with a micro-batch slot free, for a new request) and completes it. Every other stage computes
    the batches handed to it in order. Stages that compute at the same time share the machine:
    while k of them compute, each advances at 1 / `costs.slowdown(k, P)` of its speed alone.
    `on_step(shape, seconds)` hears each completed step with every stage's compute seconds
    (rank 0's scheduling work left out, as the engine times it).
    """
    partition = tuple(partition)
    num_stages = len(partition)
    if sum(partition) != spec.num_layers:
        raise UserError(f"partition {','.join(map(str, partition))} sums to {sum(partition)}; "
                        f"{spec.name} has {spec.num_layers} layers")
    if capacity < 1:
        raise UserError("the split holds no KV tokens; pick a split that fits")
    ranges = stage_ranges(partition)
    last = num_stages - 1
    sched_config = config.scheduler_config(num_stages)
    scheduler = Scheduler(sched_config, SlotAllocator(capacity), PrefixCache() if config.prefix_caching else None)
    max_context = min(spec.max_position_embeddings, capacity)
    arrivals = collections.deque()
    for req_id, (t, prompt, n_out) in enumerate(workload.draw(spec.vocab_size)):
        if len(prompt) >= max_context:
            raise UserError(f"a {len(prompt)}-token prompt does not fit a context of {max_context} tokens "
                            f"(KV capacity {capacity}); shorten --prompt-len")
        params = SamplingParams(max_tokens=n_out, ignore_eos=True)
        arrivals.append((t, Request(req_id, prompt, params, req_id, max_context)))

    now = 0.0
    jobs: list[_Job | None] = [None] * num_stages
    handed: list[collections.deque] = [collections.deque() for _ in range(num_stages)]  # (ready at, flight)
    busy = [0.0] * num_stages
    inflight: collections.deque[_Flight] = collections.deque()
    arrival_of: dict[int, float] = {}
    first_token: dict[int, float] = {}
    finished: list[RequestTimes] = []
    steps = 0

    def complete(flight: _Flight) -> None:
        batch = flight.batch
        if on_step is not None:
            on_step(flight.shape, list(flight.seconds))
        for request, token in scheduler.complete(batch, [0] * batch.message.num_samples):
            if token is None:
                continue
            request.output_ids.append(token)
            first_token.setdefault(request.req_id, now)
            if len(request.output_ids) >= request.params.max_tokens or request.num_tokens >= request.max_context:
                scheduler.finish(request, "length")
                finished.append(RequestTimes(arrival_of[request.req_id], first_token[request.req_id], now,
                                             len(request.output_ids)))

    def rank0_acts() -> None:
        """Rank 0 between steps: admits arrivals, schedules a batch or completes the oldest answered one."""
        nonlocal steps
        while jobs[0] is None:
            while arrivals and arrivals[0][0] <= now:
                t, request = arrivals.popleft()
                arrival_of[request.req_id] = t
                scheduler.add(request)
            batch = scheduler.schedule() if len(inflight) < sched_config.micro_batches else None
            if batch is not None:
                steps += 1
                shape = shape_of(batch)
                flight = _Flight(batch, shape, costs.transfer_seconds(costs.activation_bytes(shape)), [0.0] * num_stages)
                scheduling = costs.schedule_seconds(shape)
                work = scheduling + costs.stage_seconds(0, ranges[0], True, num_stages == 1, shape)
                jobs[0] = _Job(flight, work, now, scheduling / work if work > 0 else 0.0)
            elif inflight and inflight[0].reply_at <= now:
                complete(inflight.popleft())
            else:
                return

    def finish(stage: int) -> None:
        job = jobs[stage]
        jobs[stage] = None
        flight = job.flight
        busy[stage] += now - job.started
        flight.seconds[stage] = (now - job.started) * (1 - job.schedule_share)
        if stage == last:
            if num_stages == 1:
                complete(flight)
            else:
                flight.reply_at = now + costs.transfer_seconds(8 * (flight.shape.samples + num_stages))
            return
        if stage == 0:
            inflight.append(flight)
        handed[stage + 1].append((now + flight.hop, flight))

    stretch_of = [costs.slowdown(k, num_stages) for k in range(num_stages + 1)]
    stages = range(num_stages)
    while True:
        if jobs[0] is None:
            rank0_acts()
        # the next event: a stage finishes, a hand-off lands, an answer or (slot free) a request reaches rank 0
        upcoming = math.inf
        for s in stages:
            if jobs[s] is None and s and handed[s]:
                ready, flight = handed[s][0]
                if ready <= now:
                    handed[s].popleft()
                    jobs[s] = _Job(flight, costs.stage_seconds(s, ranges[s], False, s == last, flight.shape), now)
                else:
                    upcoming = min(upcoming, ready)
        computing = [s for s in stages if jobs[s] is not None]
        stretch = stretch_of[len(computing)]
        ends = [now + jobs[s].left * stretch for s in computing]
        upcoming = min(upcoming, *ends) if ends else upcoming
        if jobs[0] is None:
            if inflight:
                upcoming = min(upcoming, inflight[0].reply_at)
            if arrivals and len(inflight) < sched_config.micro_batches:
                upcoming = min(upcoming, arrivals[0][0])
        if upcoming == math.inf:
            if scheduler.num_unfinished or arrivals:
                raise UserError(f"the simulated scheduler cannot make progress: a request needs more than the "
                                f"{capacity} KV tokens of this split; shorten the requests or pick a split with more")
            break
        progress = (upcoming - now) / stretch
        now = upcoming
        for s, end in zip(computing, ends):
            if end <= upcoming:
                finish(s)
            else:
                jobs[s].left -= progress
    first_arrival = min(arrival_of.values())
    return summarize(partition, capacity, finished, first_arrival, now, busy, steps, scheduler.num_preemptions)


def chunk_pipeline_ttft(spec: ModelSpec, partition: Sequence[int], costs: StepCosts, prompt_len: int,
                        chunk: int, context_grows: bool = True) -> float:
    """TTFT of one prompt whose chunks are pipelined (chunk k+1 enters stage 0 while chunk k is on
    stage 1, as SGLang's PP scheduler does; pipesplit's scheduler waits for a request's previous chunk).

    A permutation flow shop: chunk j leaves stage s at C[j][s] = max(C[j-1][s], C[j][s-1] + hop) + p[j][s],
    where chunk j attends to every earlier token and rank 0 adds its scheduling work to stage 0.
    context_grows=False prices every chunk like the first (to isolate the effect of attention growth).
    """
    ranges = stage_ranges(partition)
    last = len(partition) - 1
    done = [0.0] * len(partition)  # when each stage finished its previous chunk
    for begin in range(0, prompt_len, chunk):
        q = min(chunk, prompt_len - begin)
        final = begin + q == prompt_len
        c = begin + q if context_grows else q
        shape = StepShape(q, 1, q * c - q * (q - 1) // 2, c, 1 if final else 0)
        hop = costs.transfer_seconds(costs.activation_bytes(shape))
        ready = 0.0
        for s, layers in enumerate(ranges):
            work = costs.stage_seconds(s, layers, s == 0, s == last, shape)
            if s == 0:
                work += costs.schedule_seconds(shape)
            done[s] = max(done[s], ready) + work
            ready = done[s] + hop
    return done[-1]


def cpu_contention(profile: Profile, computing: int, stages: int) -> float:
    """How much slower a CPU stage computes while `computing` of the pipeline's `stages` stages
    compute at once: 1.0 alone or off the CPU.

    Up to g = cores // threads stages each have cores of their own but share the memory bandwidth,
    the caches and (on a VM) the host: every step of a stage in a pipeline of P <= g stages is
    stretched by 1 + (s - 1)(P - 1)/(g - 1), s the co-run slowdown (`corun_slowdown`; the profiler
    times a layer while g - 1 processes run it too, and `--calibrate` fits it on a PP g run),
    whether or not the other stages compute at that moment. On a 2-core Zen 3 (2026-12-08), the
    stage with 24 of SmolLM2's 30 layers took 1.12-1.28x its decode steps' time alone at PP2 beside
    a 6-layer stage that computed a quarter of the time, and an even split's stages 1.13-1.44x:
    the stretch did not follow how often the other stage computed, as the model of 2026-12-07
    (the slowdown only while both compute) had it, which left the uneven splits 16-21% optimistic.

    Beyond g stages they share the cores too. While k compute, each is stretched by
    1 + (s - 1) min(1, (k - 1)/(g - 1)) for what they share, max(1, k x threads / cores) for the
    cores (processor sharing: three one-thread stages on two cores take turns), and every step by
    `oversubscribed_slowdown` besides, however many compute: its stages wait for a core after
    every hand-off (a woken process queues behind the running ones) and gloo's receive threads
    take cores too (on the same Zen 3, 2026-12-07, three one-thread stages left the cores idle 15%
    of a run in which all three had work).
    """
    cores = (profile.meta or {}).get("cpu_count") or 0
    if profile.device != "cpu" or cores < 1 or computing < 1:
        return 1.0
    groups = max(1, cores // profile.threads)
    if stages <= groups:
        return 1.0 if stages == 1 else 1 + (profile.corun_slowdown - 1) * (stages - 1) / (groups - 1)
    over = profile.oversubscribed_slowdown
    if computing == 1:
        return over
    shared = 1.0 if groups == 1 else min(1.0, (computing - 1) / (groups - 1))
    return (1 + (profile.corun_slowdown - 1) * shared) * max(1.0, computing * profile.threads / cores) * over


@dataclass(frozen=True)
class MeasuredRun:
    """The real engine on a calibration workload (`pipesplit profile --calibrate`): the split, its
    capacity and settings, and each step's shape with every stage's compute seconds for it."""

    partition: tuple[int, ...]
    capacity: int
    config: PipelineConfig
    workload: Workload
    steps: list[tuple[StepShape, list[float]]]
    seconds: float
    drift: float = 1.0  # what its seconds were divided by (`rescaled`)

    def to_json(self) -> dict:
        return {"partition": list(self.partition), "max_total_num_tokens": self.capacity,
                "config": asdict(self.config), "workload": asdict(self.workload), "seconds": self.seconds,
                "drift": self.drift, "steps": [[*shape.as_list(), *t] for shape, t in self.steps]}

    def rescaled(self, drift: float) -> "MeasuredRun":
        """The run as measured at the machine's earlier speed, when around the run a fixed piece of
        work took `drift` times its earlier time: every second divided by `drift` (which the run
        keeps, so that its JSON says what was done)."""
        steps = [(shape, [t / drift for t in seconds]) for shape, seconds in self.steps]
        return replace(self, steps=steps, seconds=self.seconds / drift, drift=self.drift * drift)

    @classmethod
    def from_json(cls, doc: dict) -> "MeasuredRun":
        pp = len(doc["partition"])
        steps = [(StepShape(*map(int, row[:5])), list(row[5:5 + pp])) for row in doc["steps"]]
        return cls(tuple(doc["partition"]), doc["max_total_num_tokens"], PipelineConfig(**doc["config"]),
                   Workload.from_json(doc["workload"]), steps, doc["seconds"], doc.get("drift", 1.0))


def _simulated_run(spec: ModelSpec, profile: Profile, run: MeasuredRun, on_step: StepTrace) -> None:
    """The run's workload through the simulator with `profile`, each step heard by `on_step`."""
    simulate(spec, run.partition, run.capacity, ProfileCosts(profile, spec), run.workload, run.config, on_step=on_step)


def calibration_scales(spec: ModelSpec, profile: Profile, runs: Sequence[MeasuredRun]) -> tuple[float, float]:
    """(prefill scale, decode scale): the engine's stage seconds in `runs` against what the simulator
    charges for the same workloads with the profile's pieces alone (and its co-run slowdown).

    The decode scale is the ratio of the sums over the decode-only steps of all runs. Over the
    steps with a prefill chunk, the decode view of each step (`decode_view`) is charged at the
    decode scale and the prefill scale makes up the rest: (measured - decode scale x simulated
    decode views) / the simulated prefill additions. 1.0 for a kind without steps."""
    pieces = replace(profile, prefill_scale=1.0, decode_scale=1.0)
    costs = ProfileCosts(pieces, spec)
    measured = {True: 0.0, False: 0.0}
    decode_simulated = view_simulated = added_simulated = 0.0
    for run in runs:
        for shape, seconds in run.steps:
            measured[has_prefill(shape)] += sum(seconds)
        ranges, last = stage_ranges(run.partition), len(run.partition) - 1

        def charge(shape: StepShape, seconds: Sequence[float]) -> None:
            nonlocal decode_simulated, view_simulated, added_simulated
            for stage, ran in enumerate(seconds):  # each stage's stretched seconds, split as its pieces
                view, added = costs.split_seconds(ranges[stage], stage == 0, stage == last, shape)
                if added == 0.0:
                    decode_simulated += ran
                else:
                    view_simulated += ran * view / (view + added)
                    added_simulated += ran * added / (view + added)

        _simulated_run(spec, pieces, run, charge)
    decode = measured[False] / decode_simulated if measured[False] > 0 and decode_simulated > 0 else 1.0
    prefill = 1.0
    if measured[True] > 0 and added_simulated > 0:
        rest = measured[True] - decode * view_simulated
        # a chunk's addition cannot take less than nothing: where the decode views alone overrun
        # what was measured, the whole prefill steps' plain ratio stands
        prefill = rest / added_simulated if rest > 0 else measured[True] / (view_simulated + added_simulated)
    return prefill, decode


def calibrated(spec: ModelSpec, pieces: Profile, alone: Sequence[MeasuredRun], together: Sequence[MeasuredRun] = (),
               oversubscribed: Sequence[MeasuredRun] = ()) -> Profile:
    """`pieces` with the scales fitted on the runs `alone` (one stage), then where given the co-run
    slowdown fitted on the runs `together` (stages co-running on cores of their own) and the
    oversubscribed slowdown on the runs `oversubscribed` (more stages than cores), each with what
    was fitted before it."""
    prefill, decode = calibration_scales(spec, pieces, alone)
    profile = replace(pieces, prefill_scale=prefill, decode_scale=decode)
    if together:
        profile = replace(profile, corun_slowdown=fit_corun_slowdown(spec, profile, together))
    if oversubscribed:
        profile = replace(profile, oversubscribed_slowdown=fit_slowdown(spec, profile, oversubscribed,
                                                                        "oversubscribed_slowdown"))
    return profile


def fit_corun_slowdown(spec: ModelSpec, profile: Profile, runs: Sequence[MeasuredRun], most: float = 4.0) -> float:
    """The co-run slowdown at which the simulator charges the stages of `runs` (stages that co-run on
    their own cores) as many seconds as the engine measured, the profile's scales as they are;
    by bisection in [1, most]."""
    return fit_slowdown(spec, profile, runs, "corun_slowdown", most)


def fit_slowdown(spec: ModelSpec, profile: Profile, runs: Sequence[MeasuredRun], field: str,
                 most: float = 4.0) -> float:
    """The value of the profile's slowdown `field` at which the simulator charges the stages of
    `runs` as many seconds as the engine measured in all of them, the rest of the profile as it
    is; by bisection in [1, most]."""
    measured = sum(sum(seconds) for run in runs for _, seconds in run.steps)

    def charged(slowdown: float) -> float:
        total = 0.0

        def add(shape: StepShape, seconds: Sequence[float]) -> None:
            nonlocal total
            total += sum(seconds)

        trial = replace(profile, **{field: slowdown})
        for run in runs:
            _simulated_run(spec, trial, run, add)
        return total

    low, high = 1.0, most
    if charged(low) >= measured:
        return low
    if charged(high) <= measured:
        return high
    while high - low > 1e-3:
        mid = (low + high) / 2
        if charged(mid) < measured:
            low = mid
        else:
            high = mid
    return (low + high) / 2
