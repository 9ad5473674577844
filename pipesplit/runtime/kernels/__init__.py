"""Native CPU kernels, compiled on first use with the machine's C compiler.

`decode_attention.c`: one query per sequence over a paged KV pool, read in place.
`prefill_attention.c`: causal attention of several new tokens per sequence over the pool, read in
place, skipping the key blocks the mask hides (flash attention in float32).
`elementwise.c`: RMSNorm (after the residual add, if asked), rotate-half rotary embeddings and
SwiGLU's silu(gate) * up, each one pass over the rows instead of several torch ops.

Where the compiler targets AVX-512, the kernels run 16-lane intrinsics; with AVX512-BF16 bfloat16
attention sums its products with vdpbf16ps, and where it targets AMX (and Linux grants the tiles)
bfloat16 prefill chunks multiply in tiles (PIPESPLIT_NO_AMX=1: vdpbf16ps there too). Where it
targets AVX2 with FMA but not AVX-512 (or with PIPESPLIT_AVX2_KERNELS=1), decode attention, RMSNorm,
rotary and SwiGLU run the same steps in 8-lane intrinsics, and float32 prefill blocks multiply in
register tiles of 6 rows x 16 columns. Elsewhere (or with
PIPESPLIT_PORTABLE_KERNELS=1) portable C loops that the compiler vectorises.
The library is built for this CPU (`-march=native`) into a cache folder (`PIPESPLIT_CACHE_DIR`,
else `$XDG_CACHE_HOME/pipesplit`, else `~/.cache/pipesplit`) under a name that hashes the
sources, the flags, the compiler and the CPU's flags, so a changed machine or source builds
afresh. Without a working compiler, or with `PIPESPLIT_NATIVE_KERNELS=0`, the runtime uses torch
ops (gather + SDPA for attention) and `status()` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipesplit.runtime.dtype import cpu_info

FOLDER = Path(__file__).parent
SOURCES = tuple(FOLDER / name for name in ("decode_attention.c", "prefill_attention.c", "elementwise.c"))
HEADERS = (FOLDER / "common.h",)
# Reassociation lets the compiler vectorise the dot products; infinities and NaNs keep their
# meaning (no -ffinite-math-only): the softmax starts from -inf.
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-fassociative-math",
         "-fno-signed-zeros", "-fno-trapping-math", "-ffp-contract=fast")
_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}
MAX_STACK_FLOATS = 65536  # as in decode_attention.c: a task's query and accumulator floats
_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_ARGTYPES = {
    "decode_attention": [_P, _P, _P, _P, _P, _P, _I64, _I32, _I32, _I32, _I32, _I64, _I64, _I64, _I64, _F32, _F32, _P,
                         _I64, _I32],
    "prefill_attention": [_P, _P, _P, _P, _P, _P, _P, _P, _I64, _I32, _I32, _I32, _I32, _I64, _I64, _I64, _I64, _F32,
                          _F32, _P, _I64, _I32],
    "rms_norm": [_P, _I64, _P, _I64, _P, _P, _P, _I64, _I32, _F32, _I32],
    "rotary": [_P, _I64, _P, _P, _P, _I64, _I32, _I32, _I32],
    "swiglu": [_P, _P, _I64, _P, _I64, _I32, _I32],
}


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
    info = cpu_info()
    return info.get("flags") or info.get("Features", "")  # x86 or Arm


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _flags() -> tuple[str, ...]:
    """FLAGS, and with PIPESPLIT_PORTABLE_KERNELS=1 the portable C loops even where the CPU has
    vector intrinsics (what a CPU without AVX2 runs), with PIPESPLIT_AVX2_KERNELS=1 the 8-lane AVX2
    loops even where it has AVX-512 (what a Zen 3 or Haswell runs), with PIPESPLIT_NO_AMX=1 the
    vdpbf16ps loops even where it has AMX tiles (what an AVX512-BF16 CPU without AMX runs); the
    tests check all four."""
    flags = FLAGS
    if os.environ.get("PIPESPLIT_PORTABLE_KERNELS") == "1":
        flags = (*flags, "-DPIPESPLIT_PORTABLE")
    if os.environ.get("PIPESPLIT_NO_AMX") == "1":
        flags = (*flags, "-DPIPESPLIT_NO_AMX")
    if os.environ.get("PIPESPLIT_AVX2_KERNELS") == "1":
        flags = (*flags, "-mno-avx512f")
    return flags


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    texts = [path.read_text() for path in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\0".join([*texts, " ".join(_flags()), version, _cpu_flags()]).encode()).hexdigest()
    target = cache_dir() / "kernels" / f"pipesplit-kernels-{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: stage processes starting together never
    # load a half-written library.
    fd, scratch = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *_flags(), f"-I{FOLDER}", "-o", scratch, *map(str, SOURCES)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            output = (done.stderr or done.stdout).strip().splitlines()
            first_error = next((line for line in output if "error" in line), output[-1] if output else "")
            raise RuntimeError(f"{compiler} failed: {first_error.strip()}")
        os.replace(scratch, target)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)
    return target


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, NativeStatus]:
    if os.environ.get("PIPESPLIT_NATIVE_KERNELS", "1") == "0":
        return None, NativeStatus(False, "torch ops (PIPESPLIT_NATIVE_KERNELS=0)")
    compiler = _compiler()
    if compiler is None:
        return None, NativeStatus(False, "torch ops (no C compiler found: install gcc for the native kernels)")
    try:
        path = _build(compiler)
        # torch has loaded its libgomp already: the library's libgomp.so.1 resolves to that one,
        # so both share one OpenMP thread pool.
        library = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        return None, NativeStatus(False, f"torch ops (native kernels unavailable: {exc})")
    for name, argtypes in _ARGTYPES.items():
        for suffix in _SUFFIX.values():
            entry = getattr(library, f"{name}_{suffix}")
            entry.argtypes, entry.restype = argtypes, ctypes.c_int
    return library, NativeStatus(True, f"native kernels ({Path(compiler).name} -march=native)")


def status() -> NativeStatus:
    return _library()[1]


def supports(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> bool:
    """Whether decode_attention can serve these tensors (CPU, float32 or bfloat16, rows contiguous)."""
    return (
        q.is_cpu
        and q.dtype in _SUFFIX
        and k_pool.dtype == v_pool.dtype == q.dtype
        and k_pool.stride(-1) == 1
        and v_pool.stride(-1) == 1
        and q.shape[1] % k_pool.shape[1] == 0
        and q.shape[1] // k_pool.shape[1] * (q.shape[2] + v_pool.shape[2]) <= MAX_STACK_FLOATS
        and _library()[0] is not None
    )


# Element-wise kernels over at most SERIAL_ELEMENTS elements (64 rows of a 576-wide hidden state)
# run on one thread: on the AVX-512 machines a second thread saved 1-4 us at 16-48 such rows (decode
# steps), and an OpenMP team then waits for whichever of its threads the OS has descheduled (in
# `serve`, the event loop shares the cores). Wider rows (SwiGLU's 1,536) split sooner: on a 2-core
# AVX2 Zen 3, 32 of them took 43 us on one thread and 23 us on two.
SERIAL_ELEMENTS = 64 * 576


@functools.cache
def _entry(name: str, dtype: torch.dtype):
    """The library's function for kernel `name` in `dtype` (looked up once: a step calls a few
    hundred of them); raises if the library is missing."""
    library = _library()[0]
    if library is None:
        raise RuntimeError(status().detail)
    return getattr(library, f"{name}_{_SUFFIX[dtype]}")


def _call(name: str, dtype: torch.dtype, *args, elements: int | None = None) -> None:
    """The kernel `name` for `dtype` on torch's thread count (on one thread for an element-wise
    kernel over at most SERIAL_ELEMENTS `elements`); raises if the library is missing or the kernel fails."""
    threads = 1 if elements is not None and elements <= SERIAL_ELEMENTS else torch.get_num_threads()
    code = _entry(name, dtype)(*args, threads)
    if code != 0:
        raise RuntimeError(f"{name} failed with code {code}")


def _sinks_f32(sinks: torch.Tensor | None) -> torch.Tensor | None:
    """The attention kernels' sink logits: float32, contiguous (kept alive by the caller)."""
    return None if sinks is None else sinks.detach().to(torch.float32).contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


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
    q = q.contiguous()
    num_seqs, heads, dim = q.shape
    kv_heads, v_dim = k_pool.shape[1], v_pool.shape[2]
    if k_pool.shape[2] != dim or heads % kv_heads or offsets.numel() != num_seqs + 1:
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, k_pool {tuple(k_pool.shape)}, {offsets.numel()} offsets")
    out = q.new_empty(num_seqs, heads, v_dim)
    sink_values = _sinks_f32(sinks)
    _call("decode_attention", q.dtype, q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), out.data_ptr(),
          slots.data_ptr(), offsets.data_ptr(), num_seqs, heads, kv_heads, dim, v_dim, k_pool.stride(0),
          k_pool.stride(1), v_pool.stride(0), v_pool.stride(1), scale, softcap or 0.0, _ptr(sink_values), window or 0)
    return out


def prefill_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    out: torch.Tensor,
    slots: torch.Tensor,
    offsets: torch.Tensor,
    row_starts: torch.Tensor,
    query_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> None:
    """Causal attention of q [T, heads, dim] (contiguous) into out [T, heads, v_dim] (contiguous) for
    the sequences s whose query_lens[s] new tokens are rows row_starts[s] .. of q and the last
    tokens of their contexts, the pools' rows slots[offsets[s]:offsets[s+1]] (int64, in order).
    Rows of `out` no sequence owns are left as they are."""
    num_seqs = query_lens.numel()
    heads, dim = q.shape[1], q.shape[2]
    kv_heads, v_dim = k_pool.shape[1], v_pool.shape[2]
    if (not (q.is_contiguous() and out.is_contiguous()) or out.shape != (q.shape[0], heads, v_dim)
            or k_pool.shape[2] != dim or heads % kv_heads or offsets.numel() != num_seqs + 1
            or row_starts.numel() != num_seqs):
        raise ValueError(f"prefill_attention: q {tuple(q.shape)}, out {tuple(out.shape)}, k_pool {tuple(k_pool.shape)}, "
                         f"{offsets.numel()} offsets for {num_seqs} sequences")
    sink_values = _sinks_f32(sinks)
    _call("prefill_attention", q.dtype, q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), out.data_ptr(),
          slots.data_ptr(), offsets.data_ptr(), row_starts.data_ptr(), query_lens.data_ptr(), num_seqs, heads,
          kv_heads, dim, v_dim, k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1), scale,
          softcap or 0.0, _ptr(sink_values), window or 0)


# -- element-wise kernels ----------------------------------------------------------------------------
def rows_supported(*tensors: torch.Tensor) -> bool:
    """Whether the element-wise kernels can serve these tensors: on the CPU, all of one dtype
    (float32 or bfloat16), each with a contiguous last dimension (shapes are the caller's check)."""
    dtype = tensors[0].dtype
    if dtype not in _SUFFIX or _library()[0] is None:
        return False
    for t in tensors:  # a loop, not all(...): this runs several times per layer and step
        if not t.is_cpu or t.dtype != dtype or t.stride(-1) != 1:
            return False
    return True


def _row_stride(x: torch.Tensor) -> int:
    """Elements between rows (along dim 0) of a tensor whose rows are each contiguous."""
    return x.stride(0) if x.shape[0] > 1 else math.prod(x.shape[1:])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """weight * to_dtype(x * rsqrt(mean(x^2) + eps)) over the last dimension of x [rows, dim].
    With `residual`: (that of s, s) where s = residual + x, rounded to the dtype (the new residual)."""
    rows, dim = x.shape
    weight = weight.contiguous()
    out = x.new_empty(rows, dim)
    total = None if residual is None else x.new_empty(rows, dim)
    _call("rms_norm", x.dtype, x.data_ptr(), _row_stride(x), _ptr(residual),
          0 if residual is None else _row_stride(residual), weight.data_ptr(), out.data_ptr(), _ptr(total), rows, dim,
          eps, elements=rows * dim)
    return out if residual is None else (out, total)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin for x [tokens, heads, dim] (heads packed in each token's row)
    and cos, sin [tokens, dim] contiguous; returns a contiguous [tokens, heads, dim]."""
    tokens, heads, dim = x.shape
    if x.stride(1) != dim or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError("rotary needs each token's heads packed and contiguous cos/sin tables")
    out = x.new_empty(tokens, heads, dim)
    _call("rotary", x.dtype, x.data_ptr(), _row_stride(x), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), tokens, heads,
          dim, elements=tokens * heads * dim)
    return out


def swiglu_supported(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether `swiglu` serves these tensors: as `rows_supported`, and only where the library
    computes it with AVX-512 or AVX2 intrinsics (its plain loops are slower than torch's two ops)."""
    return rows_supported(gate, up) and _swiglu_vectorised()


def prefill_tiles() -> bool:
    """Whether bfloat16 prefill chunks (head dims that are multiples of 32) multiply in AMX tiles."""
    library = _library()[0]
    return library is not None and bool(library.prefill_tiles())


@functools.cache
def _swiglu_vectorised() -> bool:
    return bool(_library()[0].swiglu_vectorised())


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate, up [rows, dim] with the same row stride (the halves of a fused
    gate/up GEMM's output), each op's result rounded as torch's; returns a contiguous [rows, dim]."""
    rows, dim = gate.shape
    if up.shape != gate.shape or (rows > 1 and up.stride(0) != gate.stride(0)):
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} need one shape and row stride")
    out = gate.new_empty(rows, dim)
    _call("swiglu", gate.dtype, gate.data_ptr(), up.data_ptr(), _row_stride(gate), out.data_ptr(), rows, dim, elements=rows * dim)
    return out
