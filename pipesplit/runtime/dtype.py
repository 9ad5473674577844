"""`--dtype auto`: the dtype a run computes in, and why.

bfloat16 on CPUs that compute it natively (AVX512_BF16 or AMX-BF16 in /proc/cpuinfo), where it
is about 1.6x faster than float32 at SmolLM2's shapes; float32 on CPUs that would emulate it; on
CUDA the checkpoint's own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipesplit.errors import UserError
from pipesplit.planner.spec import DTYPES as DTYPE_NAMES

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a run uses and the reason, for the start-up line."""

    dtype: str
    reason: str

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPE_NAMES)}")


def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> dict[str, str]:
    """The fields of the first CPU listed ("model name", "cpu family", "flags", ...; empty where
    /proc/cpuinfo is unreadable)."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break  # the end of the first CPU's block
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of the first CPU listed (empty where /proc/cpuinfo is unreadable)."""
    return frozenset(cpu_info(cpuinfo).get("flags", "").split())


def choose_dtype(requested: str, device: str, checkpoint_dtype: str, flags: frozenset[str] | None = None) -> DtypeChoice:
    """`requested` as given (float32, bfloat16, float16) or, for `auto`, the rule above."""
    if requested in DTYPE_NAMES:
        return DtypeChoice(requested, "as requested")
    if requested != "auto":
        raise UserError(f"unknown dtype {requested!r}; use auto, float32, bfloat16 or float16")
    if device == "cuda":
        return DtypeChoice(checkpoint_dtype, "auto: the checkpoint's dtype on CUDA")
    flags = cpu_flags() if flags is None else flags
    native = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if native:
        return DtypeChoice("bfloat16", f"auto: this CPU computes bfloat16 natively ({native[0]})")
    return DtypeChoice("float32", "auto: this CPU has no native bfloat16 (no avx512_bf16 or amx_bf16)")
