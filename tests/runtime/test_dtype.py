"""`--dtype auto`: bfloat16 only where the CPU computes it natively; CUDA keeps the checkpoint's."""

import pytest

from pipesplit.errors import UserError
from pipesplit.runtime.dtype import choose_dtype, cpu_flags, cpu_info


@pytest.mark.parametrize(
    "flags,expected",
    [
        ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),
        ({"avx2", "amx_bf16", "amx_tile"}, "bfloat16"),
        ({"avx2", "avx512f"}, "float32"),  # AVX-512 without BF16 emulates it: slower than float32
        (set(), "float32"),
    ],
)
def test_auto_on_cpu_follows_the_bf16_flags(flags, expected):
    choice = choose_dtype("auto", "cpu", "bfloat16", frozenset(flags))
    assert choice.dtype == expected
    assert choice.reason.startswith("auto:")


def test_auto_on_cuda_is_the_checkpoint_dtype():
    assert choose_dtype("auto", "cuda", "float16", frozenset({"avx512_bf16"})).dtype == "float16"
    assert choose_dtype("auto", "cuda", "float32", frozenset()).dtype == "float32"


def test_explicit_dtype_wins_and_bad_names_are_user_errors():
    assert choose_dtype("float32", "cpu", "bfloat16", frozenset({"amx_bf16"})).dtype == "float32"
    with pytest.raises(UserError, match="auto, float32, bfloat16 or float16"):
        choose_dtype("fp64", "cpu", "bfloat16")


def test_cpu_flags_reads_the_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512_bf16\nbugs\t\t: none\n")
    assert cpu_flags(str(info)) == {"fpu", "sse2", "avx512_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_cpu_info_reads_the_first_cpus_fields(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 1\nflags\t\t: fpu avx2\n\n"
                    "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    assert cpu_info(str(info)) == {"processor": "0", "model name": "AMD EPYC", "cpu family": "25", "model": "1",
                                   "flags": "fpu avx2"}
    assert cpu_flags(str(info)) == {"fpu", "avx2"}
    assert cpu_info(str(tmp_path / "missing")) == {}
