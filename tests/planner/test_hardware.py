"""GPU catalog, forgiving lookup, per-stage devices and usable bytes."""

from __future__ import annotations

import pytest

from pipesplit.errors import UserError
from pipesplit.planner.hardware import (
    DEFAULT_RESERVE_GIB,
    GPUS,
    Device,
    GiB,
    MiB,
    distinct_orders,
    find_gpu,
    resolve_devices,
    usable_bytes,
)

REQUIRED = ["H100-80GB", "H200", "B200", "A100-40GB", "A100-80GB", "H20", "L40S", "L4", "RTX-4090", "RTX-5090", "RTX-5070-Ti", "MI300X"]


def test_catalog_has_the_required_gpus_with_driver_reported_memory():
    names = [g.name for g in GPUS]
    assert all(name in names for name in REQUIRED)
    # nvidia-smi / rocm-smi totals, not marketing sizes
    assert find_gpu("H100").memory_mib == 81559
    assert find_gpu("H200").memory_mib == 143771
    assert find_gpu("MI300X").capacity_bytes == 205_822_885_888
    for gpu in GPUS:
        assert gpu.memory_mib > 0 and gpu.bandwidth_gbs > 0 and gpu.bf16_tflops > 0


@pytest.mark.parametrize(
    "name, expected",
    [
        ("H100", "H100-80GB"),
        ("h100-80gb", "H100-80GB"),
        ("A100-40GB", "A100-40GB"),
        ("a100_80gb", "A100-80GB"),
        ("4090", "RTX-4090"),
        ("RTX4090", "RTX-4090"),
        ("NVIDIA GeForce RTX 5070 Ti", "RTX-5070-Ti"),
        ("l40s", "L40S"),
        ("L4", "L4"),
        ("mi300x", "MI300X"),
    ],
)
def test_forgiving_lookup(name, expected):
    assert find_gpu(name).name == expected


def test_unknown_gpu_lists_the_known_names():
    with pytest.raises(UserError, match="unknown GPU 'V100'; known GPUs: H100-80GB, H200"):
        find_gpu("V100")


def test_ambiguous_gpu_names_the_candidates():
    with pytest.raises(UserError, match="A100-40GB, A100-80GB"):
        find_gpu("A100")


def test_one_gpu_for_all_stages_or_one_per_stage():
    assert resolve_devices("H200", None, 3) == (Device("H200", 143771 * MiB),) * 3
    mixed = resolve_devices("H100,H100,A100-40GB", None, 3)
    assert [d.name for d in mixed] == ["H100-80GB", "H100-80GB", "A100-40GB"]


def test_wrong_device_count_says_what_to_give():
    with pytest.raises(UserError) as err:
        resolve_devices("H100,H100,A100-40GB", None, 4)
    assert str(err.value) == "--gpu lists 3 devices but --pp is 4; give 1 or 4"


def test_custom_memory_in_gib():
    devices = resolve_devices(None, "80,80,40", 3)
    assert [d.capacity_bytes for d in devices] == [80 * GiB, 80 * GiB, 40 * GiB]
    assert resolve_devices(None, "24", 2) == (Device("24GiB", 24 * GiB),) * 2
    with pytest.raises(UserError, match="not a number"):
        resolve_devices(None, "80,abc", 2)
    with pytest.raises(UserError, match="positive"):
        resolve_devices(None, "0", 2)


def test_devices_are_required():
    with pytest.raises(UserError, match="--gpu NAME"):
        resolve_devices(None, None, 2)
    with pytest.raises(UserError, match="not both"):
        resolve_devices("H100", "80", 2)


def test_usable_bytes_is_fraction_minus_reserve():
    assert DEFAULT_RESERVE_GIB == 2.0
    assert usable_bytes(80 * GiB, 0.9) == int(80 * GiB * 0.9) - 2 * GiB
    assert usable_bytes(80 * GiB, 1.0, 0.0) == 80 * GiB
    assert usable_bytes(1 * GiB, 0.5, 2.0) == 0


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.01])
def test_mem_fraction_outside_unit_interval(fraction):
    with pytest.raises(UserError, match=r"\(0, 1\]"):
        usable_bytes(80 * GiB, fraction)


def test_negative_reserve():
    with pytest.raises(UserError, match="--reserve"):
        usable_bytes(80 * GiB, 0.9, -1.0)


def test_distinct_orders_of_a_multiset():
    a, b = Device("A", 1), Device("B", 2)
    orders = distinct_orders((a, a, b, b), limit=100)
    assert orders[0] == (a, a, b, b)
    assert len(orders) == len(set(orders)) == 6
    with pytest.raises(UserError, match="--reorder would try 6 device orders"):
        distinct_orders((a, a, b, b), limit=5)
