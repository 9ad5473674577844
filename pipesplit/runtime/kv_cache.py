"""The KV token pool: slot allocation (rank 0) and the per-stage cache tensors.

Every stage holds the same number of token slots, `max_total_num_tokens`, agreed at start-up as
the minimum of what each stage can hold. A slot index means the same token on every stage, so
rank 0 allocates and the other stages only follow the indices it sends.
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
        # Pop from the end: low slots are used first, which keeps a small batch's gathers local.
        self._free = list(range(capacity - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV slots, {len(self._free)} free")
        slots = [self._free.pop() for _ in range(n)]
        self._used.update(slots)
        return slots

    def free(self, slots: Iterable[int]) -> None:
        for slot in slots:
            if slot not in self._used:
                raise ValueError(f"slot {slot} freed twice or never allocated")
            self._used.remove(slot)
            self._free.append(slot)


def allocate_pools(
    layer_indices: Sequence[int],
    per_token_shapes: Sequence[tuple[int, ...]],
    num_slots: int,
    dtype: "torch.dtype",
    device: "torch.device | str",
) -> dict[int, tuple["torch.Tensor", ...]]:
    """One tensor per cache component per local layer, indexed by global layer index."""
    import torch

    return {
        layer: tuple(torch.zeros((num_slots, *shape), dtype=dtype, device=device) for shape in per_token_shapes)
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
