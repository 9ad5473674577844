"""`pipesplit profile`: what each piece of a pipeline step costs on this machine, measured with the
runtime's own code, fitted to the simulator's linear step-cost model (`planner.simulator.Linear`).

Measured: one decoder layer of each kind the model has (a stage built by the loader holding just
that layer, run on real `AttentionBatch`es over its own KV pool), the embedding (a first stage
without layers), the final norm + lm_head + sampling (a last stage without layers), each stage's
per-step bookkeeping (`AttentionBatch.for_sequences` and the step message), rank 0's scheduling
(`Scheduler.schedule`, message encoding, `Scheduler.complete`), and the stage-to-stage transfer by
bytes (gloo or NCCL between two local processes), and on a CPU how much slower a layer runs while
stages in other processes compute on the other cores (`corun_slowdown`: they share the memory
bandwidth and caches; the simulator charges it on every step of a pipeline whose stages have
cores of their own, see `cpu_contention`). Every measurement is a median of repeats.

With `--calibrate` the real engine then runs a short workload of its own with the same threads
per stage: first as one stage alone, twice with different requests (more prefill steps, so that
one disturbed step moves the scale less), whose steps set against what the simulator charges for
the same workloads give the profile's prefill and decode scales (over the steps with a prefill
chunk, what the chunk adds beyond the step's decode view; over the decode-only steps, the whole
step); then, on a CPU with room for more stages of those threads (PP2 for one thread on two
cores), with that many stages on the same two workloads, and the co-run slowdown becomes the one
at which the simulator charges those runs' stages what they measured (the microbenchmark's value
is kept beside it); and with one thread per stage, with one stage more than the cores (PP3 on
two), which fits the oversubscribed slowdown the same way. Each fit takes two runs, as the
scales do: on a 2-core Zen 3 (2026-12-08) one run's fits moved 1.14-1.28 (co-run) and 1.07-1.33
(oversubscribed) between two profiles taken back to back. On a CPU each run is first rescaled to the machine's speed
while the pieces were timed (`reference_timer`'s work, timed after the pieces and around each run).
The fits carry what the pieces timed apart miss (a whole stage's caches and memory traffic beside
the other stages, the allocator, the kernels the engine picks at start-up, the OS sharing cores)
into every split the simulator prices. It is off by default; bench/simulator.py profiles with it
and reports the errors with and without the fits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch

from pipesplit.errors import UserError
from pipesplit.planner.simulator import (
    Linear,
    MeasuredRun,
    PipelineConfig,
    Profile,
    StepShape,
    Workload,
    calibrated,
    layer_kind,
    shape_of,
)
from pipesplit.runtime.kv_cache import SlotAllocator, allocate_pools
from pipesplit.runtime.messages import decode, encode
from pipesplit.runtime.models.layers import AttentionBatch
from pipesplit.runtime.sampler import SamplingParams, new_request_sampler, sample_tokens
from pipesplit.runtime.scheduler import Request, Scheduler, SchedulerConfig
from pipesplit.runtime.stage import DTYPES

# (decode sequences, their context) and (prefill chunk, context before it) grids; a mixed step
# adds a prefill chunk to a decode batch. Sized for small models on CPU; a few minutes for SmolLM2.
DECODE = [(1, 16), (1, 512), (4, 128), (8, 512), (16, 64), (16, 1024), (32, 256), (64, 128), (64, 768)]
PREFILL = [(8, 0), (32, 0), (64, 256), (128, 0), (256, 0), (256, 768), (512, 0), (512, 1024)]
MIXED = [(8, 256, 128), (16, 512, 256), (32, 128, 64)]
TRANSFER_BYTES = [64, 4096, 65536, 262144, 1048576, 4194304]


def _shapes() -> list[list[tuple[int, int, bool]]]:
    """Batches as (context length, new tokens, sampled) per sequence."""
    batches = [[(c + 1, 1, True)] * b for b, c in DECODE]
    batches += [[(c + q, q, True)] for q, c in PREFILL]
    batches += [[(c + 1, 1, True)] * b + [(q, q, True)] for b, c, q in MIXED]
    return batches


def _attention_batch(batch: Sequence[tuple[int, int, bool]], device: torch.device) -> AttentionBatch:
    seqs, start = [], 0
    for c, q, sample in batch:
        seqs.append((list(range(start, start + c)), q, sample))
        start += c
    return AttentionBatch.for_sequences(seqs, device)


def _shape(batch: Sequence[tuple[int, int, bool]]) -> StepShape:
    attention = sum(q * c - q * (q - 1) // 2 for c, q, _ in batch)
    return StepShape(sum(q for _, q, _ in batch), len(batch), attention, sum(c for c, _, _ in batch),
                     sum(1 for *_, s in batch if s))


def _median_seconds(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()
    sync()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def fit(shapes: Sequence[StepShape], seconds: Sequence[float], features: Sequence[str]) -> Linear:
    """Least squares in relative error (each row scaled by 1 / its time), coefficients >= 0: the
    most negative coefficient is dropped and the rest refitted until none is negative."""
    names = list(features)
    index = {n: i for i, n in enumerate(Linear.FEATURES)}
    rows = torch.tensor([Linear.features(s) for s in shapes], dtype=torch.float64)
    y = torch.tensor(seconds, dtype=torch.float64)
    while names:
        cols = rows[:, [index[n] for n in names]]
        scale = cols.abs().amax(0).clamp_min(1e-30)
        a = cols / scale / y[:, None]
        coef = torch.linalg.lstsq(a, torch.ones_like(y)[:, None]).solution[:, 0] / scale
        if bool((coef >= 0).all()):
            return Linear(**{n: float(c) for n, c in zip(names, coef)})
        names.pop(int(torch.argmin(coef)))
    return Linear()


# A layer is timed inside a stack of consecutive layers of its kind holding at least this many
# weight bytes (or all of them), each run passing through the whole stack: a stage streams its
# layers' weights from memory on every step, where one layer timed alone keeps its own in the
# caches. SmolLM2 bfloat16 on one thread of the AMX Xeon (2026-12-03), decode of 16 sequences:
# 0.97 ms per layer alone or in a stack of 4, 1.24 ms in stacks of 15 and 30 (8 x 512: 1.10
# and 1.55 ms).
STACK_BYTES = 128 * 2**20


def stack_count(spec, index: int, dtype: torch.dtype) -> int:
    """How many consecutive layers from `index` (all of its kind) make the stack that times it."""
    from pipesplit.planner.costs import layer_tensors

    dtype_name = str(dtype).removeprefix("torch.")  # the names of DTYPES
    kind = layer_kind(spec, index)
    count, held = 0, 0
    for i in range(index, spec.num_layers):
        if layer_kind(spec, i) != kind or (count and held >= STACK_BYTES):
            break
        count += 1
        held += sum(t.nbytes for t in layer_tensors(spec, i, weight_dtype=dtype_name))
    return count


def _layer_runs(source, spec, index: int, batches, dtype, device, count: int = 1) -> list[Callable[[], object]]:
    """Decoder layers index .. index + count - 1 (a stage built by the loader holding just those,
    tuned as a Stage tunes itself, over their own KV pools of random values) on each of
    `batches`, ready to run under inference_mode."""
    from pipesplit.runtime.loader import load_stage
    from pipesplit.runtime.models import kv_cache_shapes
    from pipesplit.runtime.models.layers import tune_cpu_stage

    stage = load_stage(source, spec, (index, index + count), False, False, dtype, device).eval()
    if device.type == "cpu":  # as a Stage runs it
        tune_cpu_stage(stage)
    slots = max(sum(c for c, _, _ in b) for b in batches)
    layers = list(range(index, index + count))
    pools = allocate_pools(layers, kv_cache_shapes(spec), slots, dtype, device)
    for layer in layers:
        for pool in pools[layer]:
            pool.normal_()
    runs = []
    for batch in batches:
        ab = _attention_batch(batch, device)
        h = torch.randn(ab.num_tokens, spec.hidden_size, dtype=dtype, device=device)
        runs.append(lambda h=h, ab=ab: stage(h, ab, pools))
    return runs


def _layer_times(spec, source, dtype, device, repeats) -> tuple[dict[str, tuple[list[StepShape], list[float]]],
                                                                dict[str, int]]:
    """Per layer kind: each batch shape's time per layer, and the stack it was timed in (CPU)."""
    batches = _shapes()
    kinds: dict[str, int] = {}
    for i in range(spec.num_layers):
        kinds.setdefault(layer_kind(spec, i), i)
    out, stacks = {}, {}
    for kind, index in kinds.items():
        stacks[kind] = count = stack_count(spec, index, dtype) if device.type == "cpu" else 1
        runs = _layer_runs(source, spec, index, batches, dtype, device, count)
        with torch.inference_mode():
            seconds = [_median_seconds(run, device, repeats) / count for run in runs]
        out[kind] = ([_shape(batch) for batch in batches], seconds)
    return out, stacks


def _embedding_and_head(spec, source, dtype, device, repeats):
    from pipesplit.runtime.loader import load_stage
    from pipesplit.runtime.models.layers import tune_cpu_stage

    batches = _shapes()
    first = load_stage(source, spec, (0, 0), True, False, dtype, device).eval()
    last = load_stage(source, spec, (spec.num_layers, spec.num_layers), False, True, dtype, device).eval()
    if device.type == "cpu":  # as a Stage runs them
        tune_cpu_stage(first)
        tune_cpu_stage(last)
    sampler = new_request_sampler(SamplingParams(temperature=0), 0)
    emb, head, shapes = [], [], []
    for batch in batches:
        ab = _attention_batch(batch, device)
        ids = torch.randint(0, spec.vocab_size, (ab.num_tokens,), device=device)
        h = torch.randn(ab.num_tokens, spec.hidden_size, dtype=dtype, device=device)
        samplers = [sampler] * ab.logits_indices.numel()
        with torch.inference_mode():
            emb.append(_median_seconds(lambda: first(ids, ab, {}), device, repeats))
            head.append(_median_seconds(lambda: sample_tokens(last(h, ab, {}).float().cpu(), samplers), device, repeats))
        shapes.append(_shape(batch))
    return shapes, emb, head


def _stage_step_times(device, repeats):
    """A non-first stage's per-step bookkeeping: decode the message, build the AttentionBatch."""
    shapes, seconds = [], []
    sched_shapes, sched_seconds = [], []
    for batch in _shapes():
        scheduler, requests = _scheduler_with(batch)
        scheduled = scheduler.schedule()
        payload = encode(scheduled.message)
        seqs = [(list(range(c)), q, s) for c, q, s in batch]
        seconds.append(_median_seconds(lambda: (decode(payload), AttentionBatch.for_sequences(seqs, device)),
                                       device, repeats))
        shapes.append(_shape(batch))
        sched_seconds.append(_schedule_seconds(batch, repeats))
        sched_shapes.append(_shape(batch))
    return shapes, seconds, sched_shapes, sched_seconds


def _scheduler_with(batch: Sequence[tuple[int, int, bool]]) -> tuple[Scheduler, list[Request]]:
    """A scheduler (with the prefix cache, as the engine runs it) whose next step is about `batch`:
    decoding sequences already hold their context, prefill ones arrive fresh with q tokens."""
    from pipesplit.runtime.prefix_cache import PrefixCache

    total = sum(c for c, _, _ in batch)
    scheduler = Scheduler(SchedulerConfig(micro_batches=1, max_batch_tokens=1 << 20, chunked_prefill_size=1 << 20),
                          SlotAllocator(total + 8), PrefixCache())
    params = SamplingParams(max_tokens=1 << 20, ignore_eos=True)
    decoding = [Request(i, list(range(1, c)), params, i, 1 << 30) for i, (c, q, _) in enumerate(batch) if q == 1]
    for r in decoding:
        scheduler.add(r)
    if decoding:
        first = scheduler.schedule()
        scheduler.complete(first, [0] * first.message.num_samples)
        for r in first.requests:
            r.output_ids.append(0)
    prefill = [Request(len(batch) + i, list(range(1, q + 1)), params, i, 1 << 30)
               for i, (c, q, _) in enumerate(batch) if q > 1]
    for r in prefill:
        scheduler.add(r)
    return scheduler, decoding + prefill


def _schedule_seconds(batch: Sequence[tuple[int, int, bool]], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        scheduler, _ = _scheduler_with(batch)
        started = time.perf_counter()
        scheduled = scheduler.schedule()
        encode(scheduled.message)
        for request, token in scheduler.complete(scheduled, [0] * scheduled.message.num_samples):
            if token is not None:
                request.output_ids.append(token)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# -- transfer: two local processes -------------------------------------------------------------------
def transfer_peer(device: str, sizes: Sequence[int], repeats: int, store=None) -> list[float]:
    """One side of the ping-pong, joined as the runtime's stages join (rank 0 with its `store`, the
    spawned rank 1 from its environment); returns the one-way seconds per size (half the round trip)."""
    import torch.distributed as dist

    from pipesplit.runtime.stage import init_distributed

    rank, _, dev = init_distributed(device, store, 2)
    times = []
    for n in sizes:
        buf = torch.zeros(n, dtype=torch.uint8, device=dev)
        samples = []
        for i in range(repeats + 1):
            dist.barrier()
            started = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            if i:
                samples.append((time.perf_counter() - started) / 2)
        times.append(statistics.median(samples))
    dist.destroy_process_group()
    return times


def _transfer_times(device: str, repeats: int) -> list[float]:
    """Ping-pong between this process (rank 0) and a spawned one (rank 1), as stages talk."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PIPESPLIT_SPAWNED": "1", "RANK": "1", "LOCAL_RANK": "1",
           "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port)}
    code = (f"from pipesplit.runtime.profile import transfer_peer; "
            f"transfer_peer({device!r}, {list(TRANSFER_BYTES)!r}, {repeats})")
    peer = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        return transfer_peer(device, TRANSFER_BYTES, repeats, store)
    finally:
        try:
            peer.wait(60)
        except subprocess.TimeoutExpired:
            peer.kill()


# -- co-running stages (CPU) -----------------------------------------------------------------------------
# A decode batch and a prefill chunk, timed alone and while other processes run the same layer.
CORUN_BATCHES = ([(257, 1, True)] * 32, [(256, 256, True)])


def _corun_runs(model: str, dtype: torch.dtype) -> list[Callable[[], object]]:
    """The model's first decoder layer on each of CORUN_BATCHES, ready to run."""
    from pipesplit.runtime.loader import resolve_model

    source = resolve_model(model)
    return _layer_runs(source, source.spec, 0, CORUN_BATCHES, dtype, torch.device("cpu"),
                       stack_count(source.spec, 0, dtype))


def corun_peer(model: str, dtype: str, threads: int, seconds: float) -> None:
    """A co-runner: the same layer in a loop for `seconds` (run in its own process by
    _corun_slowdown; it says "ready" once warm)."""
    torch.set_num_threads(threads)
    runs = _corun_runs(model, DTYPES[dtype])
    deadline = time.monotonic() + seconds
    with torch.inference_mode():
        for run in runs:
            run()
        print("ready", flush=True)
        while time.monotonic() < deadline:
            for run in runs:
                run()


def _corun_slowdown(model: str, dtype: str, threads: int, repeats: int) -> float:
    """A layer's time while every other group of `threads` cores runs the same layer in its own
    process, over its time alone (geometric mean over CORUN_BATCHES; 1.0 without other groups)."""
    others = (os.cpu_count() or 1) // threads - 1
    if others < 1:
        return 1.0
    runs = _corun_runs(model, DTYPES[dtype])
    device = torch.device("cpu")
    repeats = max(repeats, 10)
    with torch.inference_mode():
        alone = [_median_seconds(run, device, repeats) for run in runs]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    code = f"from pipesplit.runtime.profile import corun_peer; corun_peer({model!r}, {dtype!r}, {threads}, 600)"
    peers = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(others)]
    try:
        for peer in peers:
            if peer.stdout.readline().strip() != "ready":
                raise UserError(f"a co-running profile process exited ({peer.wait()}) before it was ready")
        with torch.inference_mode():
            together = [_median_seconds(run, device, repeats) for run in runs]
    finally:
        for peer in peers:
            peer.kill()
            peer.wait()
    ratio = 1.0
    for a, t in zip(alone, together):
        ratio *= t / a
    return max(1.0, ratio ** (1 / len(alone)))


def reference_timer(model: str, dtype: str) -> Callable[[], float]:
    """A fixed piece of work, built once (the co-run microbenchmark's layer stack on its decode
    batch and its prefill chunk), and what times it: how long it takes on this machine now, one
    thread, the sum of their medians. Timed beside slower measurements, its ratio to an earlier
    timing says how much the machine's speed moved in between (a VM's moves with its neighbours:
    on a 2-core Zen 3 on 2026-12-07 the same 2-thread GEMM ran at 90-133 GFLOPS within 18 seconds)."""
    runs = _corun_runs(model, DTYPES[dtype])

    def seconds() -> float:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                return sum(_median_seconds(run, torch.device("cpu"), 7) for run in runs)
        finally:
            torch.set_num_threads(threads)

    return seconds


def _at_reference_speed(timer: Callable[[], float] | None, reference: float | None,
                        measure: Callable[[], list[MeasuredRun]]) -> list[MeasuredRun]:
    """The runs `measure` returns, rescaled to the machine's speed when `timer` took `reference`
    seconds: it is timed again before and after them, and the mean over `reference` is their
    drift (CPU; on a GPU, where there is no timer, the runs stay as measured)."""
    if timer is None or reference is None:
        return measure()
    before = timer()
    runs = measure()
    drift = (before + timer()) / 2 / reference
    return [run.rescaled(drift) for run in runs]


# -- calibration: the real engine against the pieces ----------------------------------------------------
# A workload unlike bench/simulator.py's (20 requests of 32-128 prompt and 16-32 output tokens):
# prefill steps of many chunks, then decode batches that shrink as requests finish. The engine
# alone runs it once per seed, one after the other: a run has only two or three prefill steps, and
# on a Zen 3 (2026-12-07) one of them slowed by another program's exit (11.4 s against 8.1-9.1 s
# in four later runs) moved the prefill scale from 1.08 to 1.22.
CALIBRATION_REQUESTS, CALIBRATION_PROMPT, CALIBRATION_OUTPUT = 16, (48, 320), (24, 48)
CALIBRATION_SEEDS = (7, 8)


def _calibration_workload(capacity: int, max_position: int, seed: int = CALIBRATION_SEEDS[0]) -> Workload:
    """The calibration requests of `seed`, shortened where a small model's context or KV pool needs it."""
    room = min(capacity // CALIBRATION_REQUESTS, max_position) - 1  # tokens one request may hold

    def clip(span: tuple[int, int], most: int) -> tuple[int, int]:
        low, high = (max(1, min(n, most)) for n in span)
        return low, high

    return Workload(CALIBRATION_REQUESTS, clip(CALIBRATION_PROMPT, room * 7 // 8), clip(CALIBRATION_OUTPUT, room // 8),
                    seed=seed)


def _engine_runs(model: str, device: str, dtype: str, threads: int, pp: int, seeds: Sequence[int]) -> list[MeasuredRun]:
    """The real engine, `pp` stages of `threads` threads, on the calibration workload of each of
    `seeds` in turn (after a warm-up): each step's shape and every stage's compute seconds for it."""
    from pipesplit.runtime.engine import LLM

    llm = LLM(model, pp=pp, dtype=dtype, device=device, threads=threads, log=False)
    runs = []
    try:
        llm.generate([[1, 2, 3, 4]] * 2, SamplingParams(max_tokens=4, ignore_eos=True))
        config = PipelineConfig.of(llm.engine.scheduler_config)
        for seed in seeds:
            workload = _calibration_workload(llm.max_total_num_tokens, llm.spec.max_position_embeddings, seed)
            draws = workload.draw(llm.spec.vocab_size)
            steps: list[tuple[StepShape, list[float]]] = []
            llm.engine.on_step = lambda batch, seconds: steps.append((shape_of(batch), seconds))
            started = time.perf_counter()
            llm.generate([prompt for _, prompt, _ in draws],
                         [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, _, n in draws])
            runs.append(MeasuredRun(tuple(llm.plan.partition), llm.max_total_num_tokens, config, workload, steps,
                                    time.perf_counter() - started))
    finally:
        llm.close()
    return runs


def _linear_fit_1d(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """y = a + b x, relative least squares, a and b >= 0."""
    shapes = [StepShape(int(x), 0, 0, 0, 0) for x in xs]
    line = fit(shapes, ys, ("base", "per_token"))
    return line.base, line.per_token


# -- the command ------------------------------------------------------------------------------------------
def profile_model(model: str, device: str = "cpu", dtype: str = "float32", threads: int | None = None,
                  repeats: int = 5, log: Callable[[str], None] = lambda s: None, calibrate: bool = False) -> Profile:
    from pipesplit.runtime.loader import resolve_model

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise UserError(f"unknown device {device!r}; use cpu or cuda")
    if repeats < 1:
        raise UserError(f"--repeats is {repeats}; give at least 1")
    threads = threads or max(1, (os.cpu_count() or 1) // 2)
    torch.set_num_threads(threads)
    dev = torch.device(device)
    torch_dtype = DTYPES[dtype]
    source = resolve_model(model)
    spec = source.spec
    started = time.perf_counter()

    log("profiling decoder layers")
    layer_data, stacks = _layer_times(spec, source, torch_dtype, dev, repeats)
    log("profiling embedding and head")
    shapes, emb, head = _embedding_and_head(spec, resolve_model(model), torch_dtype, dev, repeats)
    log("profiling per-step bookkeeping and scheduling")
    st_shapes, st_seconds, sc_shapes, sc_seconds = _stage_step_times(dev, repeats)
    log("profiling stage-to-stage transfer")
    transfer = _transfer_times(device, max(repeats, 20))
    latency, per_byte = _linear_fit_1d(TRANSFER_BYTES, transfer)
    corun = 1.0
    timer = reference = None
    if device == "cpu":
        log("profiling a layer beside co-running stages")
        corun = _corun_slowdown(model, dtype, threads, repeats)
        timer = reference_timer(model, dtype)
        reference = timer()  # the machine's speed as the pieces saw it

    alone, together, oversubscribed = None, [], []
    if calibrate:
        # PP1 prices the pieces; on a CPU with room for more stages of `threads` threads, a run
        # with that many stages prices their co-running. Each run is rescaled to the machine's
        # speed while the pieces were timed, so that the scales carry what the pieces miss and not
        # how the machine's speed moved in between.
        groups = min(max(1, (os.cpu_count() or 1) // threads), spec.num_layers) if device == "cpu" else 1

        def engine_runs(pp: int) -> list[MeasuredRun]:  # every calibration seed at `pp` stages, rescaled
            return _at_reference_speed(timer, reference,
                                       lambda: _engine_runs(model, device, dtype, threads, pp, CALIBRATION_SEEDS))

        log("calibrating against the engine at PP1")
        alone = engine_runs(1)
        if groups > 1:
            log(f"calibrating co-running stages against the engine at PP{groups}")
            together = engine_runs(groups)
        if device == "cpu" and threads == 1 and groups + 1 <= spec.num_layers:
            # the engine gives stages one thread each once they outnumber the cores
            log(f"calibrating more stages than cores against the engine at PP{groups + 1}")
            oversubscribed = engine_runs(groups + 1)
        torch.set_num_threads(threads)

    layer_features = ("base", "per_token", "per_seq", "per_attention", "per_context")
    raw = {
        "layers": {k: [[*s.as_list(), t] for s, t in zip(*v)] for k, v in layer_data.items()},
        "embedding": [[*s.as_list(), t] for s, t in zip(shapes, emb)],
        "head": [[*s.as_list(), t] for s, t in zip(shapes, head)],
        "stage_step": [[*s.as_list(), t] for s, t in zip(st_shapes, st_seconds)],
        "schedule": [[*s.as_list(), t] for s, t in zip(sc_shapes, sc_seconds)],
        "transfer": [[n, t] for n, t in zip(TRANSFER_BYTES, transfer)],
        "columns": ["tokens", "seqs", "attention", "context", "samples", "seconds"],
    }
    pieces = Profile(
        model=spec.name,
        device=device,
        dtype=dtype,
        threads=threads,
        hidden_size=spec.hidden_size,
        activation_itemsize=torch_dtype.itemsize,
        layers={k: fit(s, t, layer_features) for k, (s, t) in layer_data.items()},
        embedding=fit(shapes, emb, ("base", "per_token")),
        head=fit(shapes, head, ("base", "per_sample")),
        stage_step=fit(st_shapes, st_seconds, ("base", "per_token", "per_seq", "per_context")),
        schedule=fit(sc_shapes, sc_seconds, ("base", "per_token", "per_seq")),
        transfer_latency=latency,
        transfer_per_byte=per_byte,
        corun_slowdown=corun,
        meta={"seconds": round(time.perf_counter() - started, 1), "torch": torch.__version__,
              "cpu_count": os.cpu_count(), "repeats": repeats, "layers_per_stack": stacks,
              "reference_seconds": reference, "measurements": raw},
    )
    if alone is None:
        return pieces
    # the engine's steps over what the simulator charges for the same workload with the pieces
    raw["calibration"] = [run.to_json() for run in alone]
    if together:
        raw["corun_calibration"] = [run.to_json() for run in together]
        raw["corun_microbenchmark"] = corun
    if oversubscribed:
        raw["oversubscribed_calibration"] = [run.to_json() for run in oversubscribed]
    return dataclasses.replace(calibrated(spec, pieces, alone, together, oversubscribed),
                               meta={**pieces.meta, "seconds": round(time.perf_counter() - started, 1)})


def profile_command(args) -> int:
    profile = profile_model(args.model, args.device, args.dtype, args.threads, args.repeats,
                            log=lambda s: print(f"pipesplit profile: {s}", file=sys.stderr, flush=True),
                            calibrate=args.calibrate)
    with open(args.out, "w") as f:
        json.dump(profile.to_json(), f, indent=1)
    calibrated = (f"engine steps {profile.prefill_scale:.2f}x (prefill) and {profile.decode_scale:.2f}x (decode) "
                  f"the pieces, " if args.calibrate else "")
    print(f"wrote {args.out}: {profile.model} on {profile.device} ({profile.dtype}, {profile.threads} threads), "
          f"{len(profile.layers)} layer kind(s), co-run slowdown {profile.corun_slowdown:.2f}, "
          f"oversubscribed {profile.oversubscribed_slowdown:.2f}, {calibrated}"
          f"measured in {profile.meta['seconds']} s")
    return 0
