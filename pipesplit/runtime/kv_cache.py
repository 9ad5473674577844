"""The KV token pool: slot allocation (rank 0) and the per-stage cache tensors.

Every stage holds the same number of token slots, `max_total_num_tokens`, agreed at start-up as
the minimum of what each stage can hold. A slot index means the same token on every stage, so
rank 0 allocates and the other stages only follow the indices it sends. Sliding-window layers
keep their K/V in a pool of their own (`WindowSlots`), whose slots are released as the window
slides; they too are allocated by rank 0 and followed by the stages.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class SlotAllocator:
    """Free list of token slots; never hands out a slot twice, never loses one."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1 token, got {capacity}")
        self.capacity = capacity
        # Freed slots are reused last-in first-out; slots never used come in increasing order
        # after them (lazily, so a large capacity costs nothing). Low slots are used first, which
        # keeps a small batch's gathers local.
        self._free: list[int] = []
        self._fresh = 0
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free) + self.capacity - self._fresh

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise MemoryError(f"asked for {n} KV slots, {self.num_free} free")
        reused = min(n, len(self._free))
        slots = [self._free.pop() for _ in range(reused)]
        slots += range(self._fresh, self._fresh + n - reused)
        self._fresh += n - reused
        self._used.update(slots)
        return slots

    def free(self, slots: Iterable[int]) -> None:
        for slot in slots:
            if slot not in self._used:
                raise ValueError(f"slot {slot} freed twice or never allocated")
            self._used.remove(slot)
            self._free.append(slot)


def window_start(context_len: int, new_tokens: int, window: int) -> int:
    """First position a step's queries can see in a sliding-window layer: a sequence keeps its
    window slots from here on (its new tokens are the last `new_tokens` of `context_len`)."""
    return max(0, context_len - new_tokens - window + 1)


class WindowSlots:
    """The pool of the sliding-window layers (rank 0): each sequence holds the slots of its last
    positions only, from `window_start` on; `slide` releases the ones no query will see again.

    The pool is sized so that it is not the one that runs out (planner `window_pool_slots`); the
    scheduler still checks it before it allocates.
    """

    def __init__(self, window: int, capacity: int) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1 token, got {window}")
        self.window = window
        self.slots = SlotAllocator(capacity)

    def slide(self, held: list[int], first_position: int, context_len: int) -> int:
        """Frees the front of `held` (positions first_position...) that a step after context_len
        tokens no longer sees; returns the new first position."""
        keep_from = window_start(context_len, 0, self.window)
        drop = keep_from - first_position
        if drop > 0:
            self.slots.free(held[:drop])
            del held[:drop]
            return keep_from
        return first_position


def allocate_pools(
    layer_indices: Sequence[int],
    per_token_shapes: Sequence[tuple[int, ...]],
    num_slots: int,
    dtype: "torch.dtype",
    device: "torch.device | str",
) -> dict[int, tuple["torch.Tensor", ...]]:
    """One tensor per cache component per local layer, indexed by global layer index.

    Written through at start-up (not calloc'd zeros the OS maps on first touch): the pool is
    resident from the start, as the budget says, and the process does not grow as the prefix cache
    spreads over fresh slots.
    """
    import torch

    return {
        layer: tuple(torch.empty((num_slots, *shape), dtype=dtype, device=device).fill_(0) for shape in per_token_shapes)
        for layer in layer_indices
    }


def kv_bytes_per_token_per_layer(per_token_shapes: Sequence[tuple[int, ...]], element_size: int) -> int:
    total = 0
    for shape in per_token_shapes:
        elements = 1
        for dim in shape:
            elements *= dim
        total += elements * element_size
    return total
