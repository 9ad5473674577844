"""Typed control messages between stage processes, and their one serializer.

Control flows down the pipeline with the activations: stage 0 sends a `StepMessage` and then the
hidden-state tensor to stage 1, which forwards both, and the last stage sends the sampled token
ids back to stage 0 as a plain int64 tensor. Messages are small frozen dataclasses encoded as
tagged JSON; tensors never go through this codec.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass
from typing import Any

from pipesplit.planner.plan import Plan, StagePlan, WindowPool
from pipesplit.runtime.sampler import SamplingParams


@dataclass(frozen=True)
class NewRequest:
    """A request the last stage has not seen: what it needs to sample for it."""

    req_id: int
    params: SamplingParams
    seed: int


@dataclass(frozen=True)
class SeqStep:
    """One sequence's share of a micro-batch: `new_slots` hold the K/V of its new tokens.

    `cached_slots`, on a request's first step after (re)admission, are the slots of its cached
    prefix: its context starts with them.

    new_window_slots: with sliding-window layers, the window pool's slots of the same new tokens;
    each stage keeps a sequence's window slots from `kv_cache.window_start` on and drops the rest.
    """

    req_id: int
    context_len: int
    new_slots: tuple[int, ...]
    sample: bool
    cached_slots: tuple[int, ...] = ()
    new_window_slots: tuple[int, ...] = ()


@dataclass(frozen=True)
class StepMessage:
    """One micro-batch, or (with `shutdown`) the order to stop.

    `preempted` requests drop their KV slots but keep their sampler; `finished` ones drop both.
    Both lists are applied before `seqs`.
    """

    step_id: int
    seqs: tuple[SeqStep, ...] = ()
    new_requests: tuple[NewRequest, ...] = ()
    preempted: tuple[int, ...] = ()
    finished: tuple[int, ...] = ()
    shutdown: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(len(s.new_slots) for s in self.seqs)

    @property
    def num_samples(self) -> int:
        return sum(1 for s in self.seqs if s.sample)


@dataclass(frozen=True)
class RunConfig:
    """What every stage process needs to build itself, sent by rank 0 at start-up."""

    model: str
    plan: Plan
    dtype: str
    device: str
    budgets: tuple[int, ...]
    mem_fraction: float
    threads: int
    mtp: bool = False
    window_pool: WindowPool | None = None  # the sliding-window pool's limits (models with windowed layers)
    progress: bool = False  # a load progress bar per stage, where the stage's stderr is a terminal
    heartbeat_port: int = 0  # under torchrun: rank 0's port that stages send heartbeats to (0: none)
    # The most tokens one step computes and the most it samples: a CPU stage builds its GEMM
    # kernels for every padded row count up to these at start-up (0: none built ahead).
    max_step_tokens: int = 0
    max_step_samples: int = 0
    # a CPU stage holding the embedding and a head tied to it gives the head a packed copy of the
    # weight (see plan_bridge.packs_tied_head; the plan charges those bytes)
    packed_tied_head: bool = False


@dataclass(frozen=True)
class StageReport:
    """A stage's start-up result, gathered by rank 0."""

    stage: int
    param_bytes: int
    kv_tokens: int
    load_seconds: float
    budget_bytes: int


MESSAGE_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (NewRequest, SeqStep, StepMessage, RunConfig, StageReport, SamplingParams, Plan, StagePlan, WindowPool)
}


def encode(message: Any) -> bytes:
    return json.dumps(_to_json(message), separators=(",", ":")).encode()


def decode(payload: bytes) -> Any:
    return _from_json(json.loads(payload))


def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        fields = {name: _to_json(getattr(value, name)) for name, _ in _field_hints(type(value))}
        return {"__type__": type(value).__name__, **fields}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


@functools.cache
def _field_hints(cls: type) -> tuple[tuple[str, Any], ...]:
    """A message class's fields with their resolved type hints, worked out once per class: each
    step's message holds one SeqStep per sequence, and resolving the hints anew for each took 70 us
    (a 32-sequence decode step: 2.5 ms to decode, on every stage but the first)."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and "__type__" in value:
        cls = MESSAGE_TYPES[value["__type__"]]
        return cls(**{name: _coerce(_from_json(value[name]), hint) for name, hint in _field_hints(cls) if name in value})
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _coerce(value: Any, hint: Any) -> Any:
    """JSON has lists only: restore tuples where the field is declared a tuple."""
    if isinstance(value, list):
        origin = typing.get_origin(hint)
        if origin is tuple:
            args = typing.get_args(hint)
            inner = args[0] if args else Any
            if inner in _PLAIN:  # numbers and strings as they are
                return tuple(value)
            return tuple(_coerce(v, inner) for v in value)
        if origin in (typing.Union, types.UnionType):
            for arg in typing.get_args(hint):
                if typing.get_origin(arg) is tuple:
                    return _coerce(value, arg)
        return tuple(value) if hint is tuple else value
    return value


_PLAIN = (int, float, str, bool)
