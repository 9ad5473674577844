"""GPU catalog and the devices a pipeline runs on: capacity, usable bytes, forgiving name lookup.

Memory is what the driver reports (nvidia-smi's "MiB" total, rocm-smi's VRAM total), not the
marketing figure: an "80GB" H100 shows 81559 MiB, a "141GB" H200 143771 MiB. Bandwidth (GB/s) and
dense BF16 tensor TFLOPS (no sparsity) come from the vendor datasheets named beside each entry.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from math import factorial

from pipesplit.errors import UserError

MiB = 1024**2
GiB = 1024**3

DEFAULT_RESERVE_GIB = 2.0
"""GiB kept free on every device for activations, CUDA graphs and the runtime; same for all strategies."""


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_mib: int  # as nvidia-smi / rocm-smi report the total
    bandwidth_gbs: float
    bf16_tflops: float  # dense, no sparsity
    aliases: tuple[str, ...] = ()

    @property
    def capacity_bytes(self) -> int:
        return self.memory_mib * MiB


GPUS: tuple[GpuSpec, ...] = (
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): 80 GB HBM3, 3.35 TB/s, BF16 1,979 TFLOPS with sparsity.
    GpuSpec("H100-80GB", 81559, 3350, 989.4, ("h100", "h100sxm", "h100sxm5", "h100sxm80gb", "h100sxm580gb", "h10080gbhbm3")),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): 141 GB HBM3e, 4.8 TB/s, BF16 1,979 TFLOPS with sparsity.
    GpuSpec("H200", 143771, 4800, 989.4, ("h200sxm", "h200141gb", "h200sxm141gb")),
    # NVIDIA HGX B200 datasheet, per GPU: 180 GB HBM3e, 8 TB/s, BF16 4.5 PFLOPS with sparsity.
    GpuSpec("B200", 183359, 8000, 2250.0, ("b200180gb", "b200sxm")),
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4 40GB): 1,555 GB/s, BF16 312 TFLOPS dense.
    GpuSpec("A100-40GB", 40960, 1555, 312.0, ("a10040gb", "a100sxm440gb", "a100pcie40gb", "a10040g")),
    # NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB): 2,039 GB/s, BF16 312 TFLOPS dense.
    GpuSpec("A100-80GB", 81920, 2039, 312.0, ("a10080gb", "a100sxm480gb", "a100pcie80gb", "a10080g")),
    # NVIDIA H20 product brief: 96 GB HBM3, 4.0 TB/s, BF16 148 TFLOPS dense.
    GpuSpec("H20", 97871, 4000, 148.0, ("h2096gb",)),
    # NVIDIA L40S datasheet: 48 GB GDDR6, 864 GB/s, BF16 362.05 TFLOPS with sparsity.
    GpuSpec("L40S", 46068, 864, 181.0, ("l40s48gb",)),
    # NVIDIA L4 datasheet: 24 GB GDDR6, 300 GB/s, BF16 242 TFLOPS with sparsity.
    GpuSpec("L4", 23034, 300, 121.0, ("l424gb",)),
    # NVIDIA Ada Lovelace architecture whitepaper (RTX 4090): 24 GB GDDR6X, 1,008 GB/s,
    # BF16 tensor with FP32 accumulate 165.2 TFLOPS dense.
    GpuSpec("RTX-4090", 24564, 1008, 165.2, ("4090", "rtx4090", "rtx409024gb")),
    # NVIDIA RTX Blackwell GPU architecture whitepaper (RTX 5090): 32 GB GDDR7, 1,792 GB/s,
    # BF16 tensor with FP32 accumulate 209.5 TFLOPS dense.
    GpuSpec("RTX-5090", 32607, 1792, 209.5, ("5090", "rtx5090", "rtx509032gb")),
    # NVIDIA RTX Blackwell GPU architecture whitepaper (RTX 5070 Ti): 16 GB GDDR7, 896 GB/s,
    # BF16 tensor with FP32 accumulate 87.9 TFLOPS dense.
    GpuSpec("RTX-5070-Ti", 16303, 896, 87.9, ("5070ti", "rtx5070ti", "rtx5070ti16gb")),
    # AMD Instinct MI300X datasheet: 192 GB HBM3, 5.3 TB/s, BF16 1,307.4 TFLOPS dense;
    # rocm-smi reports 205,822,885,888 B = 196,288 MiB.
    GpuSpec("MI300X", 196288, 5300, 1307.4, ("mi300x192gb", "mi300")),
)

_VENDOR_WORDS = ("nvidia", "geforce", "amd", "instinct", "tesla")


def _normalize(name: str) -> str:
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    for word in _VENDOR_WORDS:
        if key.startswith(word):
            key = key[len(word):]
    return key


def _build_index() -> dict[str, GpuSpec]:
    index: dict[str, GpuSpec] = {}
    for gpu in GPUS:
        for alias in (gpu.name, *gpu.aliases):
            key = _normalize(alias)
            assert index.setdefault(key, gpu) is gpu, f"GPU alias {alias!r} names two GPUs"
    return index


_INDEX = _build_index()


def find_gpu(name: str) -> GpuSpec:
    """The catalog entry for a name such as `H100`, `h100-80gb`, `A100-40GB`, `4090`, `RTX4090`."""
    key = _normalize(name)
    if key in _INDEX:
        return _INDEX[key]
    prefixed = sorted({g.name for k, g in _INDEX.items() if k.startswith(key)}) if key else []
    if len(prefixed) > 1:
        raise UserError(f"GPU {name!r} is ambiguous: {', '.join(prefixed)}; name one of them")
    known = ", ".join(g.name for g in GPUS)
    raise UserError(f"unknown GPU {name!r}; known GPUs: {known} (or give --gpu-mem in GiB)")


def find_gpu_or_none(name: str) -> GpuSpec | None:
    """The catalog entry of an exact catalog name or alias; None for custom devices."""
    return _INDEX.get(_normalize(name))


@dataclass(frozen=True)
class Device:
    """One pipeline stage's device (per TP rank): its name and the memory the driver reports."""

    name: str
    capacity_bytes: int


def usable_bytes(capacity_bytes: int, mem_fraction: float, reserve_gib: float = DEFAULT_RESERVE_GIB) -> int:
    """Bytes a stage may fill with weights and KV cache: capacity x mem_fraction - reserve (never negative)."""
    check_memory_settings(mem_fraction, reserve_gib)
    return max(0, int(capacity_bytes * mem_fraction) - int(reserve_gib * GiB))


def check_memory_settings(mem_fraction: float, reserve_gib: float) -> None:
    if not 0.0 < mem_fraction <= 1.0:
        raise UserError(f"--mem-fraction is {mem_fraction:g}; give a value in (0, 1], e.g. 0.9")
    if reserve_gib < 0:
        raise UserError(f"--reserve is {reserve_gib:g} GiB; give 0 or more")


def _split_list(text: str, flag: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise UserError(f"{flag} {text!r} has an empty entry; give comma-separated values without gaps")
    return items


def _per_stage(items: list, flag: str, num_stages: int) -> list:
    if len(items) == 1:
        return items * num_stages
    if len(items) != num_stages:
        raise UserError(
            f"{flag} lists {len(items)} devices but --pp is {num_stages}; give 1 or {num_stages}"
        )
    return items


def _gib_label(gib: float) -> str:
    return f"{gib:g}GiB"


def resolve_devices(gpu: str | None, gpu_mem: str | None, num_stages: int) -> tuple[Device, ...]:
    """One Device per stage from `--gpu NAME`, `--gpu A,B,C`, or `--gpu-mem 80,80,40` (GiB)."""
    if gpu and gpu_mem:
        raise UserError("give --gpu or --gpu-mem, not both")
    if gpu:
        specs = [find_gpu(name) for name in _split_list(gpu, "--gpu")]
        return tuple(Device(s.name, s.capacity_bytes) for s in _per_stage(specs, "--gpu", num_stages))
    if gpu_mem:
        sizes = []
        for item in _split_list(gpu_mem, "--gpu-mem"):
            try:
                gib = float(item)
            except ValueError:
                raise UserError(f"--gpu-mem entry {item!r} is not a number; give GiB per device, e.g. 80,80,40") from None
            if not gib > 0:
                raise UserError(f"--gpu-mem entry {item!r} must be a positive number of GiB")
            sizes.append(gib)
        return tuple(Device(_gib_label(g), int(g * GiB)) for g in _per_stage(sizes, "--gpu-mem", num_stages))
    known = ", ".join(g.name for g in GPUS)
    raise UserError(f"name the devices: --gpu NAME (one of {known}) or --gpu-mem GiB")


def distinct_orders(devices: tuple[Device, ...], limit: int) -> list[tuple[Device, ...]]:
    """Every distinct order of a multiset of devices, the given order first; refuses more than `limit`."""
    counts = Counter(devices)
    total = factorial(len(devices))
    for c in counts.values():
        total //= factorial(c)
    if total > limit:
        raise UserError(
            f"--reorder would try {total} device orders (more than {limit}); group identical devices or drop --reorder"
        )
    orders = [devices]
    seen = {devices}

    def extend(prefix: list[Device], remaining: Counter) -> None:
        if not remaining:
            order = tuple(prefix)
            if order not in seen:
                seen.add(order)
                orders.append(order)
            return
        for device in list(dict.fromkeys(d for d in devices if remaining[d])):
            remaining[device] -= 1
            if remaining[device] == 0:
                del remaining[device]
            prefix.append(device)
            extend(prefix, remaining)
            prefix.pop()
            remaining[device] += 1

    extend([], Counter(counts))
    return orders
