"""A pipeline stage: builds and loads only its own layers, holds its KV pool, runs its steps.

Rank 0 drives its stage from the engine thread; every other rank runs `worker_loop`: receive a
step (message + hidden states) from the previous rank, run the local layers, pass the result
on, and on the last stage sample and send the token ids back to rank 0.
"""

from __future__ import annotations

import array
import contextlib
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipesplit.planner.partition import KVCapacity, kv_capacity
from pipesplit.planner.plan import StagePlan
from pipesplit.planner.spec import ModelSpec
from pipesplit.runtime.kv_cache import allocate_pools, kv_bytes_per_token_per_layer, window_start
from pipesplit.runtime.messages import RunConfig, StageReport, StepMessage, decode, encode
from pipesplit.runtime.sampler import RequestSampler, new_request_sampler, sample_tokens

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- transport ---------------------------------------------------------------------------------
@dataclass
class Link:
    """Point-to-point transport between ranks; tensors go as tensors, messages as bytes."""

    device: torch.device

    def send_step(self, message: StepMessage, hidden: torch.Tensor | None, timings: torch.Tensor, dst: int) -> list:
        payload = torch.frombuffer(bytearray(encode(message)), dtype=torch.uint8).to(self.device)
        header = torch.tensor([payload.numel()], dtype=torch.int64, device=self.device)
        tensors = [header, payload, timings.to(self.device)]
        if hidden is not None and hidden.numel():
            tensors.append(hidden.to(self.device).contiguous())
        return [(dist.isend(t, dst), t) for t in tensors]

    def recv_step(self, src: int, hidden_size: int, dtype: torch.dtype, num_stages: int):
        header = torch.empty(1, dtype=torch.int64, device=self.device)
        dist.recv(header, src)
        payload = torch.empty(int(header.item()), dtype=torch.uint8, device=self.device)
        dist.recv(payload, src)
        message: StepMessage = decode(payload.cpu().numpy().tobytes())
        timings = torch.empty(num_stages, dtype=torch.float64, device=self.device)
        dist.recv(timings, src)
        hidden = None
        if message.num_tokens and not message.shutdown:
            hidden = torch.empty(message.num_tokens, hidden_size, dtype=dtype, device=self.device)
            dist.recv(hidden, src)
        return message, hidden, timings


def broadcast_bytes(data: bytes | None, device: torch.device) -> bytes:
    """Rank 0's bytes on every rank (start-up configuration)."""
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=device)
    dist.broadcast(size, 0)
    buf = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    if data is not None:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, 0)
    return buf.cpu().numpy().tobytes()


# -- the stage ---------------------------------------------------------------------------------
class Stage:
    """One stage's model slice, KV pool and view of the requests' slots."""

    def __init__(self, config: RunConfig, rank: int, device: torch.device) -> None:
        from pipesplit.runtime.loader import load_stage, resolve_model
        from pipesplit.runtime.models import kv_cache_shapes
        from pipesplit.runtime.models.layers import tune_cpu_stage, warm_gemms

        self.config = config
        self.rank = rank
        self.device = device
        self.num_stages = len(config.plan.stages)
        self.plan: StagePlan = config.plan.stages[rank]
        self.is_first = rank == 0
        self.is_last = rank == self.num_stages - 1
        self.dtype = DTYPES[config.dtype]
        self.comm_device = device  # where tensors to other stages go; start_stage sets it

        started = time.perf_counter()
        source = resolve_model(config.model)
        self.spec = source.spec
        start, end = self.plan.layers
        with load_progress(self.plan, self.num_stages, config.progress) as on_tensor:
            self.model = load_stage(
                source, self.spec, (start, end), self.plan.embedding, self.plan.lm_head, self.dtype, device,
                mtp=self.plan.mtp, on_tensor=on_tensor,
            )
        self.model.eval()
        self.load_seconds = time.perf_counter() - started
        # after the load time: packing weights, choosing kernels and building them is not loading
        self.tuning = ""  # the start-up line's phrase for the kernel choice
        if device.type == "cpu":
            self.tuning = tune_cpu_stage(self.model, config.packed_tied_head)
            warm_gemms(self.model, config.max_step_tokens, config.max_step_samples)
        self.param_bytes = live_weight_bytes(self.model)

        self.kv_shapes = kv_cache_shapes(self.spec)
        self.kv_bytes = kv_bytes_per_token_per_layer(self.kv_shapes, self.dtype.itemsize)
        self.budget_bytes = self._budget()
        self.window_layers = [i for i in range(start, end) if self.spec.layer_types[i] == "sliding_attention"]
        self.kv_cache: dict[int, tuple[torch.Tensor, ...]] = {}
        self.slots: dict[int, array.array] = {}  # each request's context slots (int64, in order)
        self.window_slots: dict[int, tuple[int, list[int]]] = {}  # req_id -> (first position, slots)
        self.window_pool_slots = 0
        self.samplers: dict[int, RequestSampler] = {}

    def _budget(self) -> int:
        """Bytes this stage may use for weights plus KV."""
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            sharing = stages_per_gpu(self.num_stages)
            if sharing > 1:  # the stages on this GPU split its granted share (they load concurrently)
                return int(total * self.config.mem_fraction / sharing)
            # Like SGLang/vLLM: the share of the device not granted to us stays unused.
            return int(free - total * (1 - self.config.mem_fraction)) + self.param_bytes
        return self.config.budgets[self.rank]

    def report(self) -> StageReport:
        """Measured weights and budget; kv_tokens is filled in once every stage's are known."""
        return StageReport(self.rank, self.param_bytes, 0, self.load_seconds, self.budget_bytes)

    def allocate(self, num_slots: int, window_slots: int = 0) -> None:
        """The token pool for the stage's layers; with window_slots, windowed layers get a pool of
        that many slots instead."""
        start, end = self.plan.layers
        windowed = self.window_layers if window_slots else []
        full = [i for i in range(start, end) if i not in windowed]
        self.kv_cache = allocate_pools(full, self.kv_shapes, num_slots, self.dtype, self.device)
        self.kv_cache.update(allocate_pools(windowed, self.kv_shapes, window_slots, self.dtype, self.device))
        self.window_pool_slots = window_slots

    # -- one step ------------------------------------------------------------------------------
    def apply(self, message: StepMessage):
        """Updates this stage's view of the requests and returns the step's AttentionBatch."""
        from pipesplit.runtime.models.layers import AttentionBatch

        for req_id in message.preempted:
            self.slots.pop(req_id, None)
            self.window_slots.pop(req_id, None)
        for req_id in message.finished:
            self.slots.pop(req_id, None)
            self.window_slots.pop(req_id, None)
            self.samplers.pop(req_id, None)
        if self.is_last:
            for new in message.new_requests:
                self.samplers[new.req_id] = new_request_sampler(new.params, new.seed)
        seqs, window_seqs = [], []
        for seq in message.seqs:
            if seq.cached_slots:
                self.slots[seq.req_id] = array.array("q", seq.cached_slots)
            slots = self.slots.setdefault(seq.req_id, array.array("q"))
            slots.extend(seq.new_slots)
            if len(slots) != seq.context_len:
                raise RuntimeError(
                    f"stage {self.rank}: request {seq.req_id} has {len(slots)} slots, step says {seq.context_len}"
                )
            seqs.append((slots, len(seq.new_slots), seq.sample))
            if self.window_pool_slots:
                window_seqs.append((self._slide_window(seq), len(seq.new_slots), seq.sample))
        batch = AttentionBatch.for_sequences(seqs, self.device)
        if window_seqs:
            batch.window = AttentionBatch.for_sequences(window_seqs, self.device)
        return batch

    def _slide_window(self, seq) -> list[int]:
        """The sequence's window slots for this step: the front it no longer sees dropped, the
        new tokens' slots appended (as rank 0 allocated them)."""
        first, held = self.window_slots.get(seq.req_id, (0, []))
        keep_from = window_start(seq.context_len, len(seq.new_slots), self.spec.sliding_window)
        del held[: keep_from - first]
        held.extend(seq.new_window_slots)
        if len(held) != seq.context_len - keep_from or len(seq.new_window_slots) != len(seq.new_slots):
            raise RuntimeError(f"stage {self.rank}: request {seq.req_id} holds {len(held)} window slots, "
                               f"the step implies {seq.context_len - keep_from}")
        self.window_slots[seq.req_id] = (keep_from, held)
        return held

    @torch.inference_mode()
    def forward(self, message: StepMessage, inputs: torch.Tensor) -> torch.Tensor:
        batch = self.apply(message)
        return self.model(inputs.to(self.device), batch, self.kv_cache)

    @torch.inference_mode()
    def sample(self, message: StepMessage, logits: torch.Tensor) -> torch.Tensor:
        samplers = [self.samplers[s.req_id] for s in message.seqs if s.sample]
        return sample_tokens(logits.float().cpu(), samplers)


@contextlib.contextmanager
def load_progress(plan: StagePlan, num_stages: int, wanted: bool):
    """A progress bar of the stage's weight bytes on its own terminal line (line = stage), or nothing
    when not wanted (`--json`) or when this process's stderr is not a terminal."""
    if not (wanted and sys.stderr.isatty()):
        yield None
        return
    from tqdm import tqdm

    start, end = plan.layers
    bar = tqdm(total=plan.weight_bytes, unit="B", unit_scale=True, unit_divisor=1024, position=plan.stage,
               desc=f"stage {plan.stage}/{num_stages} layers {start}-{end - 1}", leave=False, file=sys.stderr,
               mininterval=0.2)
    try:
        yield bar.update
    finally:
        bar.close()


def live_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of what the stage holds as weights: parameters and persistent buffers (a router's
    score-correction bias is one), each storage counted once (a tied head shares the embedding),
    and the packed fused GEMM weights whose parts are shape-only parameters (`pack_gemm_weights`)."""
    from pipesplit.runtime.models.layers import fused_gemm_weights

    seen, total = set(), 0
    for tensor in [*model.state_dict(keep_vars=True).values(), *fused_gemm_weights(model)]:
        if tensor.is_meta:
            continue
        # a packed (opaque) tensor has no storage to look at: each is its own
        key = id(tensor) if tensor.is_mkldnn else (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def agree_capacity(stage: Stage) -> tuple[KVCapacity, list[StageReport]]:
    """All stages exchange their measured weights and budgets; each then computes every stage's
    capacity with the planner's rule (`kv_capacity`): the same answer on every rank."""
    mine = stage.report()
    row = torch.tensor(
        [mine.stage, mine.param_bytes, int(mine.load_seconds * 1e6), mine.budget_bytes],
        dtype=torch.int64,
        device=stage.device,
    )
    row = row.to(stage.comm_device)
    rows = [torch.empty_like(row) for _ in range(stage.num_stages)]
    dist.all_gather(rows, row)
    measured = [[int(v) for v in r.cpu()] for r in rows]
    weights, budgets = [r[1] for r in measured], [r[3] for r in measured]
    capacity = stage_capacity(stage.config, stage.spec, stage.kv_bytes, weights, budgets)
    reports = [StageReport(r[0], r[1], tokens, r[2] / 1e6, r[3]) for r, tokens in zip(measured, capacity.stage_tokens)]
    return capacity, reports


def stage_capacity(
    config: RunConfig, spec: ModelSpec, kv_bytes: int, weight_bytes: list[int], budgets: list[int]
) -> KVCapacity:
    """The pipeline's KV capacity from each stage's weights and budget, for the plan's layers."""
    ranges = [s.layers for s in config.plan.stages]
    windowed = [sum(spec.layer_types[i] == "sliding_attention" for i in range(a, b)) for a, b in ranges]
    pool = config.window_pool
    return kv_capacity(budgets, weight_bytes, [b - a - n for (a, b), n in zip(ranges, windowed)], windowed, kv_bytes,
                       pool.slots if pool else 0, pool.token_limit if pool else 0)


# -- process set-up -------------------------------------------------------------------------------
def stages_per_gpu(num_stages: int) -> int:
    """How many stages share one GPU when the pipeline has more stages than this node has GPUs."""
    return max(1, -(-num_stages // max(1, torch.cuda.device_count())))


def init_distributed(
    device: str, store: "dist.Store | None" = None, world: int = 1
) -> tuple[int, torch.device, torch.device]:
    """Joins the process group: through rank 0's `store` as rank 0 of `world` (the spawning
    process), as a stage process it spawned (a client of that store, at MASTER_ADDR:MASTER_PORT),
    or as described by the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    Returns (rank, compute device, transport device). Stages on distinct GPUs talk over NCCL;
    stages that share a GPU (more stages than GPUs) over gloo through host memory, because NCCL
    refuses two ranks on one device.
    """
    rank = 0
    kwargs: dict = {"store": store, "rank": 0, "world_size": world}
    if store is None:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if os.environ.get("PIPESPLIT_SPAWNED") == "1":
            client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
            kwargs = {"store": client, "rank": rank, "world_size": world}
        else:
            kwargs = {"init_method": "env://", "rank": rank, "world_size": world}
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0")) if store is None else 0
        dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
        if stages_per_gpu(world) > 1:
            dist.init_process_group("gloo", **kwargs)
            return rank, dev, torch.device("cpu")
        dist.init_process_group("nccl", device_id=dev, **kwargs)
        return rank, dev, dev
    dev = torch.device("cpu")
    dist.init_process_group("gloo", **kwargs)
    return rank, dev, dev


def start_stage(
    config_bytes: bytes | None, device_hint: str, store: "dist.Store | None" = None, world: int = 1
) -> tuple[Stage, int, list[StageReport], Link]:
    """Common start-up of every rank: config from rank 0, build, load, agree on capacity."""
    rank, device, comm_device = init_distributed(device_hint, store, world)
    config: RunConfig = decode(broadcast_bytes(config_bytes, comm_device))
    torch.set_num_threads(max(1, config.threads))
    stage = Stage(config, rank, device)
    stage.comm_device = comm_device
    capacity, reports = agree_capacity(stage)
    if capacity.max_total_num_tokens < 1:
        worst = min(reports, key=lambda r: r.kv_tokens)
        raise MemoryError(
            f"stage {worst.stage} has no room for the KV cache: its weights take {worst.param_bytes / 2**30:.2f} GiB "
            f"of a {worst.budget_bytes / 2**30:.2f} GiB budget; raise --mem-budget/--mem-fraction or add stages"
        )
    stage.allocate(capacity.max_total_num_tokens, capacity.window_slots)
    return stage, capacity, reports, Link(comm_device)


def worker_loop(stage: Stage, link: Link) -> None:
    """Ranks 1..P-1: receive, compute, forward (or sample and reply), until shutdown."""
    hidden_size = stage.spec.hidden_size
    while True:
        message, hidden, timings = link.recv_step(stage.rank - 1, hidden_size, stage.dtype, stage.num_stages)
        if message.shutdown:
            if not stage.is_last:
                for work, _ in link.send_step(message, None, timings, stage.rank + 1):
                    work.wait()
            return
        started = time.perf_counter()
        out = stage.forward(message, hidden) if message.seqs else None
        if stage.is_last:
            tokens = stage.sample(message, out) if message.num_samples else torch.empty(0, dtype=torch.long)
            timings[stage.rank] = time.perf_counter() - started
            if message.seqs:
                reply = torch.cat([tokens.to(torch.float64), timings.cpu()]).to(link.device)
                dist.send(reply, 0)
        else:
            timings[stage.rank] = time.perf_counter() - started
            for work, _ in link.send_step(message, out, timings, stage.rank + 1):
                work.wait()


def _exit_when_orphaned() -> None:
    """A spawned stage must not outlive the process that started it."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="orphan-watch").start()


def worker_main(device: str = "cpu") -> int:
    """Entry point of a stage process with rank >= 1 (spawned, or started by torchrun)."""
    if os.environ.get("PIPESPLIT_SPAWNED") == "1":
        _exit_when_orphaned()
    rank = os.environ.get("RANK", "?")
    try:
        stage, _, _, link = start_stage(None, device)
        heartbeats = None
        if stage.config.heartbeat_port:
            from pipesplit.runtime.engine import send_heartbeats

            heartbeats = send_heartbeats(os.environ["MASTER_ADDR"], stage.config.heartbeat_port, stage.rank)
        worker_loop(stage, link)
        if heartbeats is not None:
            heartbeats.set()
        dist.destroy_process_group()
        return 0
    except Exception as exc:  # noqa: BLE001 -- reported to the user with the stage named
        from pipesplit.errors import UserError

        peer_lost = isinstance(exc, RuntimeError) and "Connection closed by peer" in str(exc)
        if peer_lost:
            print(f"pipesplit: stage {rank} stopped: another stage closed its connection", file=sys.stderr, flush=True)
            return 1
        if not isinstance(exc, (UserError, MemoryError)):
            traceback.print_exc()
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        print(f"pipesplit: stage {rank} failed: {type(exc).__name__}: {first_line}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    raise SystemExit(worker_main(sys.argv[1] if len(sys.argv) > 1 else "cpu"))
