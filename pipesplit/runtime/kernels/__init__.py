"""Native CPU kernels, compiled on first use with the machine's C compiler.

Only decode attention is native (`decode_attention.c`): one query per sequence over a paged KV
pool, read in place. The library is built for this CPU (`-march=native`) into a cache folder
(`PIPESPLIT_CACHE_DIR`, else `$XDG_CACHE_HOME/pipesplit`, else `~/.cache/pipesplit`) under a name
that hashes the source, the flags, the compiler and the CPU's flags, so a changed machine or
source builds afresh. Without a working compiler, or with `PIPESPLIT_NATIVE_KERNELS=0`, the
runtime attends with torch (gather + SDPA) and `status()` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode_attention.c")
# Reassociation lets the compiler vectorise the dot products; infinities and NaNs keep their
# meaning (no -ffinite-math-only): the softmax starts from -inf.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-fassociative-math",
         "-fno-signed-zeros", "-fno-trapping-math", "-ffp-contract=fast")
_ENTRIES = {torch.bfloat16: "decode_attention_bf16", torch.float32: "decode_attention_f32"}
MAX_STACK_FLOATS = 65536  # as in decode_attention.c: a task's query and accumulator floats
_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_ARGTYPES = [_P, _P, _P, _P, _P, _P, _I64, _I32, _I32, _I32, _I32, _I64, _I64, _I64, _I64, _F32, _F32, _P, _I64, _I32]


@dataclass(frozen=True)
class NativeStatus:
    """Whether the native kernels are in use, and the reason given at start-up."""

    available: bool
    detail: str


def cache_dir() -> Path:
    if os.environ.get("PIPESPLIT_CACHE_DIR"):
        return Path(os.environ["PIPESPLIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pipesplit"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_flags()]).encode()).hexdigest()
    target = cache_dir() / "kernels" / f"decode_attention-{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: stage processes starting together never
    # load a half-written library.
    fd, scratch = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", scratch, str(SOURCE)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        os.replace(scratch, target)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return target


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, NativeStatus]:
    if os.environ.get("PIPESPLIT_NATIVE_KERNELS", "1") == "0":
        return None, NativeStatus(False, "torch gather + SDPA (PIPESPLIT_NATIVE_KERNELS=0)")
    compiler = _compiler()
    if compiler is None:
        return None, NativeStatus(False, "torch gather + SDPA (no C compiler found: install gcc for the native kernel)")
    try:
        path = _build(compiler)
        # torch has loaded its libgomp already: the library's libgomp.so.1 resolves to that one,
        # so both share one OpenMP thread pool.
        library = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return None, NativeStatus(False, f"torch gather + SDPA (native kernel unavailable: {exc})")
    for name in _ENTRIES.values():
        entry = getattr(library, name)
        entry.argtypes, entry.restype = _ARGTYPES, ctypes.c_int
    return library, NativeStatus(True, f"native kernel ({Path(compiler).name} -march=native)")


def status() -> NativeStatus:
    return _library()[1]


def supports(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> bool:
    """Whether decode_attention can serve these tensors (CPU, float32 or bfloat16, rows contiguous)."""
    return (
        q.device.type == "cpu"
        and q.dtype in _ENTRIES
        and k_pool.dtype == v_pool.dtype == q.dtype
        and k_pool.stride(-1) == 1
        and v_pool.stride(-1) == 1
        and q.shape[1] % k_pool.shape[1] == 0
        and q.shape[1] // k_pool.shape[1] * (q.shape[2] + v_pool.shape[2]) <= MAX_STACK_FLOATS
        and _library()[0] is not None
    )


def decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: torch.Tensor,
    offsets: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [S, heads, dim] (one query per sequence) over the pools' rows `slots[offsets[s]:offsets[s+1]]`
    (int64, the context of sequence s, in order). Returns [S, heads, v_dim]."""
    library = _library()[0]
    if library is None:
        raise RuntimeError(status().detail)
    q = q.contiguous()
    num_seqs, heads, dim = q.shape
    kv_heads, v_dim = k_pool.shape[1], v_pool.shape[2]
    if k_pool.shape[2] != dim or heads % kv_heads or offsets.numel() != num_seqs + 1:
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, k_pool {tuple(k_pool.shape)}, {offsets.numel()} offsets")
    out = q.new_empty(num_seqs, heads, v_dim)
    sink_values = None if sinks is None else sinks.detach().to(torch.float32).contiguous()
    code = getattr(library, _ENTRIES[q.dtype])(
        q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), out.data_ptr(), slots.data_ptr(), offsets.data_ptr(),
        num_seqs, heads, kv_heads, dim, v_dim, k_pool.stride(0), k_pool.stride(1), v_pool.stride(0),
        v_pool.stride(1), scale, softcap or 0.0, None if sink_values is None else sink_values.data_ptr(),
        window or 0, torch.get_num_threads(),
    )
    if code != 0:
        raise RuntimeError(f"decode_attention failed with code {code}")
    return out
