"""The native kernels: decode and prefill attention against attention written out per sequence,
query and head in float64; RMSNorm and rotary against their formulas in float64, rounded where torch rounds."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from pipesplit.runtime import kernels


def reference(q, k_pool, v_pool, contexts, scale, window=None, softcap=None, sinks=None):
    """One query per sequence over its context's slots, in float64."""
    heads, kv_heads = q.shape[1], k_pool.shape[1]
    out = []
    for s, slots in enumerate(contexts):
        if window is not None:
            slots = slots[-window:]
        per_head = []
        for h in range(heads):
            kv = h // (heads // kv_heads)
            keys, values = k_pool[slots, kv].double(), v_pool[slots, kv].double()
            scores = keys @ q[s, h].double() * scale
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            if sinks is not None:
                scores = torch.cat((scores, sinks[h : h + 1].double()))
            weights = scores.softmax(0)[: len(slots)]
            per_head.append(weights @ values)
        out.append(torch.stack(per_head))
    return torch.stack(out)


def pools(num_slots, kv_heads, dim, v_dim, dtype, gen):
    k_pool = torch.randn(num_slots, kv_heads, dim, generator=gen).to(dtype)
    v_pool = torch.randn(num_slots, kv_heads, v_dim, generator=gen).to(dtype)
    k_pool[::5] = float("nan")  # slots no context lists must never be read
    v_pool[::5] = float("nan")
    return k_pool, v_pool


def contexts_for(lengths, num_slots, gen):
    usable = [s for s in torch.randperm(num_slots, generator=gen).tolist() if s % 5]
    contexts = []
    for c in lengths:
        contexts.append(usable[:c])
        usable = usable[c:]
    return contexts


def flat_contexts(contexts):
    """The kernels' view of the contexts: their slots concatenated, and where each one starts."""
    slots = torch.tensor([s for c in contexts for s in c], dtype=torch.long)
    offsets = torch.tensor([0] + [len(c) for c in contexts], dtype=torch.long).cumsum(0)
    return slots, offsets


def run_kernel(q, k_pool, v_pool, contexts, scale, **options):
    return kernels.decode_attention(q, k_pool, v_pool, *flat_contexts(contexts), scale, **options)


def test_the_kernel_builds_where_a_compiler_exists():
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler on this machine")
    assert kernels.status().available, kernels.status().detail


needs_kernel = pytest.mark.skipif(not kernels.status().available, reason=kernels.status().detail)
BY_DTYPE = pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)],
                                   ids=["float32", "bfloat16"])
BY_HEAD_SHAPE = pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (6, 2, 8), (4, 4, 128), (8, 1, 24)])


@needs_kernel
@BY_DTYPE
@BY_HEAD_SHAPE
@pytest.mark.parametrize("window,softcap,sinks", [(None, None, False), (7, None, False), (None, 30.0, False),
                                                   (None, None, True), (5, 20.0, True)])
def test_decode_attention_matches_reference(dtype, tolerance, heads, kv_heads, dim, window, softcap, sinks):
    gen = torch.Generator().manual_seed(heads * dim)
    k_pool, v_pool = pools(600, kv_heads, dim, dim, dtype, gen)
    contexts = contexts_for([1, 3, 40, 9, 130, 2, 64], 600, gen)
    q = torch.randn(len(contexts), heads, dim, generator=gen).to(dtype)
    sink_values = torch.randn(heads, generator=gen) * 3 if sinks else None
    got = run_kernel(q, k_pool, v_pool, contexts, dim**-0.5, window=window, softcap=softcap, sinks=sink_values)
    want = reference(q, k_pool, v_pool, contexts, dim**-0.5, window, softcap, sink_values)
    assert got.dtype == dtype and got.shape == (len(contexts), heads, dim)
    torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=tolerance)


@needs_kernel
@BY_DTYPE
def test_decode_attention_over_a_latent_pool(dtype, tolerance):
    """MLA's absorbed form: one latent per slot is the key (latent + rope part), its first
    `rank` values the value, read through a strided view of the same pool."""
    gen = torch.Generator().manual_seed(1)
    heads, rank, rope = 16, 32, 8
    pool = torch.randn(300, rank + rope, generator=gen).to(dtype)
    keys, values = pool.view(300, 1, rank + rope), pool[:, None, :rank]
    contexts = contexts_for([5, 77, 1], 300, gen)
    q = torch.randn(3, heads, rank + rope, generator=gen).to(dtype)
    got = run_kernel(q, keys, values, contexts, 0.1)
    torch.testing.assert_close(got.double(), reference(q, keys, values, contexts, 0.1), atol=tolerance, rtol=tolerance)


@needs_kernel
def test_a_non_contiguous_query_and_many_threads_give_the_same_answer():
    gen = torch.Generator().manual_seed(2)
    k_pool, v_pool = pools(400, 2, 16, 16, torch.float32, gen)
    contexts = contexts_for([20, 30, 40, 3], 400, gen)
    qkv = torch.randn(4, 6 * 16 + 2 * 16, generator=gen)
    q = qkv[:, : 6 * 16].view(4, 6, 16)  # a view into a fused projection's output, as in GQAttention
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_kernel(q, k_pool, v_pool, contexts, 0.25)
        torch.set_num_threads(4)
        four = run_kernel(q, k_pool, v_pool, contexts, 0.25)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, four)
    torch.testing.assert_close(one.double(), reference(q, k_pool, v_pool, contexts, 0.25), atol=1e-5, rtol=1e-5)


def prefill_reference(q, k_pool, v_pool, contexts, query_lens, scale, window=None, softcap=None, sinks=None):
    """Each sequence's new tokens (its context's last query_lens) over the context up to and
    including themselves (and within the window), query by query, in float64."""
    rows = []
    for slots, q_len in zip(contexts, query_lens):
        for i in range(q_len):
            position = len(slots) - q_len + i
            seen = slots[: position + 1]
            token = len(rows)
            rows.append(reference(q[token : token + 1], k_pool, v_pool, [seen], scale, window, softcap, sinks)[0])
    return torch.stack(rows)


def run_prefill(q, k_pool, v_pool, contexts, query_lens, scale, **options):
    slots, offsets = flat_contexts(contexts)
    row_starts = torch.tensor([0, *query_lens[:-1]], dtype=torch.long).cumsum(0)
    out = q.new_full((q.shape[0], q.shape[1], v_pool.shape[2]), float("nan"))
    kernels.prefill_attention(q, k_pool, v_pool, out, slots, offsets, row_starts,
                              torch.tensor(query_lens, dtype=torch.long), scale, **options)
    return out


@needs_kernel
@BY_DTYPE
@BY_HEAD_SHAPE
@pytest.mark.parametrize("window,softcap,sinks", [(None, None, False), (7, None, False), (None, 30.0, False),
                                                   (None, None, True), (70, 20.0, True)])
def test_prefill_attention_matches_reference(dtype, tolerance, heads, kv_heads, dim, window, softcap, sinks):
    """Whole prompts and chunks after earlier context, short and longer than a key block (64)
    and a query block; windows shorter and longer than a block."""
    gen = torch.Generator().manual_seed(heads * dim + 1)
    k_pool, v_pool = pools(900, kv_heads, dim, dim, dtype, gen)
    query_lens = [2, 130, 17, 5, 66]
    contexts = contexts_for([2, 130, 150, 64, 200], 900, gen)
    q = torch.randn(sum(query_lens), heads, dim, generator=gen).to(dtype)
    sink_values = torch.randn(heads, generator=gen) * 3 if sinks else None
    got = run_prefill(q, k_pool, v_pool, contexts, query_lens, dim**-0.5, window=window, softcap=softcap,
                      sinks=sink_values)
    want = prefill_reference(q, k_pool, v_pool, contexts, query_lens, dim**-0.5, window, softcap, sink_values)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, atol=tolerance, rtol=tolerance)


@needs_kernel
def test_prefill_attention_over_a_latent_pool_leaves_other_rows_alone():
    """MLA's strided value view; rows of `out` that belong to no listed sequence (a decode's,
    which the other kernel writes) keep what they held."""
    gen = torch.Generator().manual_seed(3)
    heads, rank, rope = 16, 32, 8
    pool = torch.randn(300, rank + rope, generator=gen)
    keys, values = pool.view(300, 1, rank + rope), pool[:, None, :rank]
    contexts = contexts_for([9, 100], 300, gen)
    q = torch.randn(9 + 1 + 40, heads, rank + rope, generator=gen)
    out = torch.full((50, heads, rank), 7.0)
    slots = torch.tensor(contexts[0] + contexts[1])
    kernels.prefill_attention(q, keys, values, out, slots, torch.tensor([0, 9, 109]), torch.tensor([0, 10]),
                              torch.tensor([9, 40]), 0.1)
    want = prefill_reference(torch.cat((q[:9], q[10:])), keys, values, contexts, [9, 40], 0.1)
    torch.testing.assert_close(torch.cat((out[:9], out[10:])).double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[9], torch.full((heads, rank), 7.0))


@needs_kernel
def test_prefill_attention_is_the_same_on_one_thread_and_four():
    gen = torch.Generator().manual_seed(4)
    k_pool, v_pool = pools(700, 3, 64, 64, torch.bfloat16, gen)
    contexts = contexts_for([300, 90], 700, gen)
    q = torch.randn(300 + 20, 9, 64, generator=gen).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_prefill(q, k_pool, v_pool, contexts, [300, 20], 0.125)
        torch.set_num_threads(4)
        four = run_prefill(q, k_pool, v_pool, contexts, [300, 20], 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, four)


def _rerun_kernel_tests(env: dict[str, str], expression: str) -> None:
    """This file's tests selected by `expression`, in a fresh interpreter whose library is built
    under `env`: all of them must run and pass."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", expression],
                          env=dict(os.environ, **env), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-500:]


# the rerun tests' names hold "loops"; the reruns leave them out
KERNEL_CHECKS = "(attention or rms_norm or residual or rotary or thread) and not loops"


def test_the_portable_loops_pass_the_kernel_checks_too():
    """Where the library is built with AVX-512 or AVX2 intrinsics, the portable loops that other
    CPUs run are built and checked here as well."""
    if not {"avx2", "avx512f"} & set(kernels._cpu_flags().split()):
        pytest.skip("this CPU runs the portable loops in the other tests already")
    _rerun_kernel_tests({"PIPESPLIT_PORTABLE_KERNELS": "1"}, KERNEL_CHECKS)


def test_the_avx2_loops_pass_the_kernel_checks_on_an_avx512_cpu_too():
    """Where the CPU has AVX-512 the library uses 16 lanes; the 8-lane AVX2 loops that older x86
    CPUs run are built (-mno-avx512f) and checked here as well, SwiGLU's among them."""
    flags = set(kernels._cpu_flags().split())
    if not {"avx2", "avx512f", "fma"} <= flags:
        pytest.skip("this CPU runs the AVX2 (or portable) loops in the other tests already")
    _rerun_kernel_tests({"PIPESPLIT_AVX2_KERNELS": "1"}, f"({KERNEL_CHECKS}) or swiglu")


def test_the_vdpbf16ps_loops_pass_the_bfloat16_checks_on_an_amx_cpu_too():
    """Where the CPU has AMX tiles bfloat16 prefill chunks multiply in them; the vdpbf16ps loops
    that AVX512-BF16 CPUs without AMX run are built and checked here as well."""
    if "amx_bf16" not in kernels._cpu_flags().split():
        pytest.skip("this CPU runs the vdpbf16ps (or portable) loops in the other tests already")
    assert kernels.prefill_tiles()  # the other tests ran the tiles
    _rerun_kernel_tests({"PIPESPLIT_NO_AMX": "1"}, "bfloat16 and prefill and not loops and not amx")


def test_switching_the_kernel_off_falls_back_to_torch():
    env = dict(os.environ, PIPESPLIT_NATIVE_KERNELS="0")
    code = "from pipesplit.runtime import kernels; print(kernels.status().detail)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "torch ops (PIPESPLIT_NATIVE_KERNELS=0)"


# -- element-wise kernels ---------------------------------------------------------------------------
def rounded(x, dtype):
    return x.to(dtype).double()


def rms_norm_reference(x, weight, eps):
    """weight * to_dtype(x / sqrt(mean(x^2) + eps)), each product rounded to x's dtype (as torch)."""
    xd = x.double()
    normed = rounded(xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + eps), x.dtype)
    return rounded(weight.double() * normed, x.dtype)


def rotary_reference(x, cos, sin):
    """Rotate-half rotary per element: out[i] = x[i] cos[i] - x[i + d/2] sin[i] (first half),
    x[i] cos[i] + x[i - d/2] sin[i] (second half), each product and the sum rounded."""
    half = x.shape[-1] // 2
    xd, c, s = x.double(), cos.double()[:, None, :], sin.double()[:, None, :]
    partner = torch.cat((-xd[..., half:], xd[..., :half]), dim=-1)
    return rounded(rounded(xd * c, x.dtype) + rounded(partner * s, x.dtype), x.dtype)


@needs_kernel
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("rows,dim", [(1, 64), (47, 576), (300, 2048), (5, 7)])
def test_rms_norm_matches_its_formula(dtype, tolerance, rows, dim):
    gen = torch.Generator().manual_seed(rows + dim)
    x = (torch.randn(rows, dim, generator=gen) * 3).to(dtype)
    weight = torch.randn(dim, generator=gen).to(dtype)
    got = kernels.rms_norm(x, weight, 1e-5)
    assert got.dtype == dtype and got.shape == (rows, dim)
    # bfloat16: another order of the row's sum of squares may move a value by one ulp (2^-7 relative)
    torch.testing.assert_close(got.double(), rms_norm_reference(x, weight, 1e-5), atol=tolerance, rtol=tolerance)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_residual_add_is_exact_and_then_normed(dtype):
    gen = torch.Generator().manual_seed(5)
    residual, x = (torch.randn(33, 96, generator=gen).to(dtype) for _ in range(2))
    weight = torch.randn(96, generator=gen).to(dtype)
    normed, total = kernels.rms_norm(x, weight, 1e-6, residual=residual)
    assert torch.equal(total, residual + x)  # torch's own add, rounded once
    torch.testing.assert_close(normed, kernels.rms_norm(residual + x, weight, 1e-6), atol=0, rtol=0)


@needs_kernel
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 0.0)])
@pytest.mark.parametrize("heads,dim", [(9, 64), (2, 128), (3, 6)])
def test_rotary_matches_its_formula(dtype, tolerance, heads, dim):
    gen = torch.Generator().manual_seed(heads * dim)
    tokens = 21
    angles = torch.rand(tokens, dim // 2, generator=gen) * 100
    cos = torch.cat((angles.cos(), angles.cos()), -1).to(dtype)
    sin = torch.cat((angles.sin(), angles.sin()), -1).to(dtype)
    fused = torch.randn(tokens, (heads + 2) * dim, generator=gen).to(dtype)
    x = fused[:, : heads * dim].view(tokens, heads, dim)  # rows strided, as a view of a fused q/k/v output
    got = kernels.rotary(x, cos, sin)
    assert got.is_contiguous() and got.shape == x.shape
    torch.testing.assert_close(got.double(), rotary_reference(x, cos, sin), atol=tolerance, rtol=tolerance)


def swiglu_reference(gate, up):
    """silu(gate) rounded to the dtype, times up, rounded again (torch's two ops), in float64."""
    g = gate.double()
    return rounded(rounded(g / (1 + torch.exp(-g)), gate.dtype) * up.double(), gate.dtype)


@needs_kernel
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 0.0)])
@pytest.mark.parametrize("rows,dim", [(1, 1536), (70, 64), (3, 37)])
def test_swiglu_matches_its_formula_on_the_halves_of_a_fused_output(dtype, tolerance, rows, dim):
    """bfloat16: the float32 sigmoid is a few ulp from the exact one, far under bfloat16's ulp, so
    the rounded results agree exactly (but where a value sits on a rounding boundary: none here)."""
    gen = torch.Generator().manual_seed(rows + dim)
    fused = (torch.randn(rows, 2 * dim, generator=gen) * 6).to(dtype)
    fused[0, :4] = torch.tensor([0.0, -100.0, 100.0, -0.5])  # silu's far tails and zero
    gate, up = fused.chunk(2, dim=-1)
    if not kernels.swiglu_supported(gate, up):
        pytest.skip("the library computes SwiGLU with AVX-512 or AVX2 only; torch's ops serve elsewhere")
    got = kernels.swiglu(gate, up)
    assert got.is_contiguous() and got.shape == (rows, dim) and got.dtype == dtype
    torch.testing.assert_close(got.double(), swiglu_reference(gate, up), atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(got, torch.nn.functional.silu(gate) * up, atol=tolerance, rtol=tolerance)


@needs_kernel
def test_element_wise_kernels_give_the_same_answer_on_any_thread_count():
    """Over SERIAL_ELEMENTS elements the rows are split over the threads; at or under it one thread runs."""
    gen = torch.Generator().manual_seed(9)
    rows = 2 * kernels.SERIAL_ELEMENTS // 288 + 3  # every kernel below (SwiGLU's 288 columns too) splits
    x = torch.randn(rows, 576, generator=gen).to(torch.bfloat16)
    weight = torch.randn(576, generator=gen).to(torch.bfloat16)
    cos = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
    sin = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
    threads = torch.get_num_threads()
    answers = []
    try:
        for n in (1, 4):
            torch.set_num_threads(n)
            answers.append((kernels.rms_norm(x, weight, 1e-5), kernels.rotary(x.view(rows, 9, 64), cos, sin),
                            kernels.rms_norm(x[:5], weight, 1e-5), kernels.swiglu(x[:, :288], x[:, 288:])))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*answers))


@needs_kernel
@BY_DTYPE
@BY_HEAD_SHAPE
def test_prefills_by_sdpa_match_the_reference_beside_decodes(dtype, tolerance, heads, kv_heads, dim):
    """paged_attention with the new tokens' K/V (the route choose_prefill_attention may pick):
    fresh prompts attend by causal SDPA over the new K/V, chunks after earlier context over their
    gathered context, decodes by the kernel; every row equals the float64 reference, and the
    start-up choice is recorded on the layers."""
    from pipesplit.runtime.models.layers import AttentionBatch, GQAttention, choose_prefill_attention, paged_attention

    gen = torch.Generator().manual_seed(heads + dim)
    k_pool, v_pool = pools(900, kv_heads, dim, dim, dtype, gen)
    query_lens = [40, 1, 17, 70, 1, 2]
    contexts = contexts_for([40, 30, 60, 70, 5, 90], 900, gen)  # fresh, decode, chunk, fresh, decode, chunk
    q = torch.randn(sum(query_lens), heads, dim, generator=gen).to(dtype)
    batch = AttentionBatch.for_sequences([(c, n, True) for c, n in zip(contexts, query_lens)], "cpu")
    new = batch.slot_mapping
    got = paged_attention(q, k_pool, v_pool, batch, dim**-0.5, new_kv=(k_pool[new], v_pool[new]))
    want = prefill_reference(q, k_pool, v_pool, contexts, query_lens, dim**-0.5)
    torch.testing.assert_close(got.view(want.shape).double(), want, atol=tolerance, rtol=tolerance)

    layer = GQAttention(heads * dim, heads, kv_heads, dim, qkv_bias=False, o_bias=False, qk_norm=False, eps=1e-6,
                        window=None, dtype=dtype, device="cpu")
    phrase = choose_prefill_attention(layer, repeats=1)
    assert phrase.startswith("prefill attention: ") and f"{heads} heads" in phrase
    assert layer.sdpa_prefill == phrase.removeprefix("prefill attention: ").startswith("torch SDPA")
