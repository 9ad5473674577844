"""Stage modules chained in one process must decode exactly what transformers decodes.

The reference is Hugging Face `generate(do_sample=False)` on the same checkpoint. Our side splits
the model into stages, gives them one paged KV pool (slots handed out in random order), and
steps a batch of prompts together: prefill chunks, decodes and mixed batches.
"""

from __future__ import annotations

import random

import pytest
import torch

from pipesplit.runtime.loader import load_stage, resolve_model
from pipesplit.runtime.models import kv_cache_shapes
from pipesplit.runtime.models.layers import AttentionBatch

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ([5, 17, 99, 3, 250], [7, 7, 8, 100, 200, 31, 64, 1, 2, 9, 45], list(range(40, 57)))
MAX_NEW = 8


def layer_ranges(partition: list[int]) -> list[tuple[int, int]]:
    bounds = [0]
    for n in partition:
        bounds.append(bounds[-1] + n)
    return list(zip(bounds, bounds[1:]))


class PipelineInOneProcess:
    """All stages of a split, one shared KV pool, and a greedy stepping loop.

    window_slots: sliding-window layers keep their K/V in a pool of that many slots of their own,
    each sequence only its last positions (`kv_cache.window_start`), freed slots reused at once.
    """

    def __init__(
        self, source, partition: list[int], num_slots: int = 512, seed: int = 0, dtype=torch.float32, device="cpu",
        window_slots: int | None = None,
    ) -> None:
        self.spec = source.spec
        self.device = torch.device(device)
        assert sum(partition) == self.spec.num_layers
        ranges = layer_ranges(partition)
        last = len(ranges) - 1
        self.stages = [
            load_stage(source, self.spec, r, i == 0, i == last, dtype, self.device) for i, r in enumerate(ranges)
        ]
        shapes = kv_cache_shapes(self.spec)
        self.kv_cache = {
            layer: tuple(torch.zeros(num_slots, *shape, dtype=dtype, device=self.device) for shape in shapes)
            for layer in range(self.spec.num_layers)
        }
        order = list(range(num_slots))
        random.Random(seed).shuffle(order)
        self.free_slots = order
        self.windowed = [i for i, t in enumerate(self.spec.layer_types) if t == "sliding_attention"] if window_slots else []
        for layer in self.windowed:
            self.kv_cache[layer] = tuple(torch.zeros(window_slots, *shape, dtype=dtype, device=self.device)
                                         for shape in shapes)
        self.free_window_slots = random.Random(seed + 1).sample(range(window_slots or 0), window_slots or 0)
        self.most_window_slots_held = 0

    def forward(self, ids: list[int], batch: AttentionBatch) -> torch.Tensor:
        x = torch.tensor(ids, dtype=torch.long, device=self.device)
        for stage in self.stages:
            x = stage(x, batch, self.kv_cache)
        return x

    @torch.inference_mode()
    def generate(self, prompts, max_new: int, chunk: int | None = None, start_steps=None) -> list[list[int]]:
        """Greedy tokens per prompt. chunk: longest prefill piece per step; start_steps: the step
        each prompt joins at (so prefills of some mix with decodes of others)."""
        start_steps = start_steps or [0] * len(prompts)
        done = [0] * len(prompts)  # prompt tokens already in the cache
        slots: list[list[int]] = [[] for _ in prompts]
        windows: list[tuple[int, list[int]]] = [(0, []) for _ in prompts]  # (first position, window slots)
        outputs: list[list[int]] = [[] for _ in prompts]
        step = 0
        while any(len(o) < max_new for o in outputs):
            ids, seqs, window_seqs, sampled = [], [], [], []
            for i, prompt in enumerate(prompts):
                if step < start_steps[i] or len(outputs[i]) >= max_new:
                    continue
                if done[i] < len(prompt):
                    piece = prompt[done[i] : done[i] + (chunk or len(prompt))]
                    done[i] += len(piece)
                    sample = done[i] == len(prompt)
                else:
                    piece, sample = [outputs[i][-1]], True
                slots[i] += [self.free_slots.pop() for _ in piece]
                ids += piece
                seqs.append((slots[i], len(piece), sample))
                if self.windowed:
                    window_seqs.append((self._slide(windows, i, len(slots[i]), len(piece)), len(piece), sample))
                if sample:
                    sampled.append(i)
            step += 1
            if not ids:
                continue
            batch = AttentionBatch.for_sequences(seqs, self.device)
            if window_seqs:
                batch.window = AttentionBatch.for_sequences(window_seqs, self.device)
                self.most_window_slots_held = max(self.most_window_slots_held, sum(len(w) for _, w in windows))
            logits = self.forward(ids, batch)
            assert logits.dtype == torch.float32 and logits.shape == (len(sampled), self.spec.vocab_size)
            for i, token in zip(sampled, logits.argmax(-1).tolist()):
                outputs[i].append(token)
        return outputs

    def _slide(self, windows, i: int, context_len: int, new: int) -> list[int]:
        """Sequence i's window slots for a step: the unseen front freed (and reused first), new ones appended."""
        from pipesplit.runtime.kv_cache import window_start

        first, held = windows[i]
        keep_from = window_start(context_len, new, self.spec.sliding_window)
        self.free_window_slots += held[: keep_from - first]
        held = held[keep_from - first :] + [self.free_window_slots.pop() for _ in range(new)]
        windows[i] = (keep_from, held)
        return held


def hf_greedy(folder_or_model, prompts, max_new: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt (one at a time: no padding involved)."""
    import transformers

    model = folder_or_model
    if not isinstance(model, torch.nn.Module):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder_or_model, dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            generated = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False, pad_token_id=0
            )
            out.append(generated[0, len(prompt) :].tolist())
    return out


@pytest.fixture(scope="module")
def hf_reference(tiny_checkpoints):
    return {name: hf_greedy(folder, PROMPTS, MAX_NEW) for name, folder in tiny_checkpoints.items()}


SPLITS = {
    "llama": [[5], [2, 3], [1, 1, 3], [0, 3, 2], [2, 1, 1, 1]],
    "llama_tied": [[4], [3, 1], [1, 2, 1], [1, 1, 1, 1]],
    "llama3_rope": [[4], [1, 3], [2, 1, 1]],
    "mistral": [[4], [2, 2], [1, 1, 1, 1]],
    "qwen2": [[4], [1, 3], [1, 2, 1]],
    "qwen3": [[6], [3, 3], [2, 2, 2], [1, 2, 2, 1]],
}
CASES = [(name, split) for name, splits in SPLITS.items() for split in splits]


@pytest.mark.parametrize("name,partition", CASES, ids=[f"{n}-{'.'.join(map(str, s))}" for n, s in CASES])
def test_batched_greedy_matches_transformers(tiny_checkpoints, hf_reference, name, partition):
    pipeline = PipelineInOneProcess(resolve_model(str(tiny_checkpoints[name])), partition)
    assert pipeline.generate(PROMPTS, MAX_NEW) == hf_reference[name]


@pytest.mark.parametrize("name", list(SPLITS))
def test_chunked_prefill_mixed_with_decodes_matches_transformers(tiny_checkpoints, hf_reference, name):
    """Prompts cut into chunks of 6 and started at different steps: batches mix decodes with
    first and later prefill chunks (query_len > 1 with earlier context)."""
    partition = SPLITS[name][-1]
    pipeline = PipelineInOneProcess(resolve_model(str(tiny_checkpoints[name])), partition, seed=1)
    assert pipeline.generate(PROMPTS, MAX_NEW, chunk=6, start_steps=[0, 1, 3]) == hf_reference[name]


def test_prompt_in_two_chunks_matches_one_chunk(tiny_checkpoints, hf_reference):
    prompt = PROMPTS[2]
    pipeline = PipelineInOneProcess(resolve_model(str(tiny_checkpoints["qwen3"])), [2, 4])
    assert pipeline.generate([prompt], MAX_NEW, chunk=len(prompt) // 2 + 1) == [hf_reference["qwen3"][2]]


@pytest.mark.parametrize("name,partition", [("llama", [2, 1, 2]), ("llama_tied", [4]), ("llama_tied", [2, 2]),
                                            ("qwen3", [3, 3])])
def test_stage_holds_only_its_own_parameters(tiny_checkpoints, name, partition):
    source = resolve_model(str(tiny_checkpoints[name]))
    spec = source.spec
    ranges = layer_ranges(partition)
    stages = PipelineInOneProcess(source, partition).stages
    for rank, ((start, end), stage) in enumerate(zip(ranges, stages)):
        first, last = rank == 0, rank == len(ranges) - 1
        names = {n for n, _ in stage.named_parameters()}
        layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
        assert layers == set(range(start, end))
        assert ("model.embed_tokens.weight" in names) == first
        assert ("model.norm.weight" in names) == last
        # tied and PP=1: the head reuses the embedding; otherwise the last stage owns lm_head.weight
        assert ("lm_head.weight" in names) == (last and not (spec.tie_word_embeddings and first))
        assert all(p.device.type == "cpu" for p in stage.parameters())
        assert not [n for n, b in stage.named_buffers()], "stages hold no buffers"


def naive_attention(q, k_pool, v_pool, batch, scale, window=None):
    """Per sequence, per head, written out: the reference for paged_attention."""
    out, row = [], 0
    heads, kv_heads = q.shape[1], k_pool.shape[1]
    for q_len, c_len, slots in zip(batch.query_lens, batch.context_lens, batch.context_slots):
        keys, values = k_pool[slots], v_pool[slots]  # [C, kv_heads, D]
        for i in range(q_len):
            pos = c_len - q_len + i
            visible = torch.arange(c_len) <= pos
            if window is not None:
                visible &= torch.arange(c_len) > pos - window
            per_head = []
            for h in range(heads):
                kv = h // (heads // kv_heads)
                scores = (keys[:, kv] @ q[row + i, h]) * scale
                weights = scores.masked_fill(~visible, float("-inf")).softmax(0)
                per_head.append(weights @ values[:, kv])
            out.append(torch.cat(per_head))
        row += q_len
    return torch.stack(out)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("query_lens,context_lens,groups", [
    ([1] * 6, [9, 1, 30, 4, 4, 17], 5),  # decodes only: grouped by length, [1] [4, 4] [9] [17] [30]
    ([1] * 4, [50, 48, 49, 51], 1),  # similar lengths: one group, padded by under 10%
    ([1, 12, 1, 10, 1], [20, 12, 2, 20, 7], 5),  # each prefill alone (no padded queries), decodes by length
    ([40, 1, 2, 1], [40, 33, 90, 5], 4),
    ([5, 3], [5, 9], 2),  # prefills only, one a chunk after earlier context
])
@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_paged_attention_matches_naive(query_lens, context_lens, groups, window, native, monkeypatch):
    from pipesplit.runtime import kernels
    from pipesplit.runtime.models.layers import paged_attention

    if not native:
        monkeypatch.setattr(kernels, "supports", lambda *tensors: False)

    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, num_slots = 6, 2, 8, 400
    k_pool = torch.randn(num_slots, kv_heads, dim, generator=gen)
    v_pool = torch.randn(num_slots, kv_heads, dim, generator=gen)
    k_pool[::7] = float("nan")  # never-written slots must never be read
    v_pool[::7] = float("nan")
    usable = [s for s in torch.randperm(num_slots, generator=gen).tolist() if s % 7]
    context_slots, slot_mapping, positions = [], [], []
    for q_len, c_len in zip(query_lens, context_lens):
        slots, usable = usable[:c_len], usable[c_len:]
        context_slots.append(torch.tensor(slots))
        slot_mapping += slots[c_len - q_len :]
        positions += range(c_len - q_len, c_len)
    batch = AttentionBatch(torch.tensor(positions), torch.tensor(slot_mapping), query_lens, context_lens,
                           context_slots, torch.tensor([0]))
    q = torch.randn(sum(query_lens), heads, dim, generator=gen)
    got = paged_attention(q, k_pool, v_pool, batch, dim**-0.5, window)
    torch.testing.assert_close(got, naive_attention(q, k_pool, v_pool, batch, dim**-0.5, window))
    if native:  # decodes and prefill chunks go to the two kernels, which gather nothing
        decodes, prefills = batch.memo("native_rows", list)
        assert (decodes is not None, prefills is not None) == (1 in query_lens, any(n > 1 for n in query_lens))
        assert batch.memo(("attention_groups", q.device), list) == []
    else:
        assert len(batch.memo(("attention_groups", q.device), list)) == groups
    # the second layer of the same forward reuses the memoised plan and buffers
    torch.testing.assert_close(paged_attention(q, k_pool, v_pool, batch, dim**-0.5, window), got)


def test_gemm_row_sizes_are_few_and_waste_at_most_an_eighth():
    from pipesplit.runtime.models.layers import ROWS_EXACT_UP_TO, padded_rows

    sizes = [padded_rows(rows) for rows in range(1, 4097)]
    assert sizes[:ROWS_EXACT_UP_TO] == list(range(1, ROWS_EXACT_UP_TO + 1))
    assert all(padded >= rows and padded <= rows * 9 / 8 for rows, padded in enumerate(sizes, start=1))
    assert sizes == sorted(sizes)  # more rows never get a smaller GEMM
    assert len(set(sizes)) <= ROWS_EXACT_UP_TO + 8 * 8  # 8 sizes per doubling from 16 to 4096


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rows", [0, 1, 17, 100, 513])
def test_linear_with_padded_rows_matches_a_float64_product(dtype, tolerance, rows):
    from pipesplit.runtime.models.layers import linear

    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=gen).to(dtype)
    weight, bias = torch.randn(40, 96, generator=gen).to(dtype), torch.randn(40, generator=gen).to(dtype)
    got = linear(x, weight, bias)
    assert got.shape == (rows, 40) and got.dtype == dtype and got.is_contiguous()
    expected = x.double() @ weight.double().T + bias.double()
    torch.testing.assert_close(got.double(), expected, atol=tolerance * 10, rtol=tolerance)


def test_bfloat16_stages_agree_with_float32(tiny_checkpoints):
    source = resolve_model(str(tiny_checkpoints["qwen3"]))
    exact = PipelineInOneProcess(source, [3, 3]).generate(PROMPTS, 1)
    half = PipelineInOneProcess(source, [3, 3], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for stage in half.stages for p in stage.parameters())
    agree = sum(a == b for a, b in zip(half.generate(PROMPTS, 1), exact))
    assert agree >= 2  # bf16 rounding may flip a near-tie, not most first tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name,partition", [("llama", [2, 3]), ("qwen3", [2, 2, 2]), ("mistral", [4])])
def test_cuda_stages_match_transformers(tiny_checkpoints, hf_reference, name, partition):
    pipeline = PipelineInOneProcess(resolve_model(str(tiny_checkpoints[name])), partition, device="cuda")
    assert all(p.is_cuda for stage in pipeline.stages for p in stage.parameters())
    assert pipeline.generate(PROMPTS, MAX_NEW, chunk=6, start_steps=[0, 1, 3]) == hf_reference[name]


ROPE_SCALINGS = [
    dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=8192),
    dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768),
    dict(rope_type="yarn", factor=32.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
         mscale=1.0, mscale_all_dim=1.0),
    dict(rope_type="yarn", factor=32.0, original_max_position_embeddings=4096, truncate=False),
    dict(rope_type="linear", factor=2.0),
]


@pytest.mark.parametrize("scaling", ROPE_SCALINGS, ids=lambda s: s["rope_type"])
def test_rope_frequencies_match_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from pipesplit.runtime.models.layers import rope_parameters

    config = LlamaConfig(hidden_size=512, num_attention_heads=4, head_dim=128, max_position_embeddings=131072,
                         rope_parameters={"rope_theta": 50000.0, **scaling})
    expected, expected_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    inv_freq, factor = rope_parameters(128, 50000.0, scaling, 131072)
    torch.testing.assert_close(inv_freq, expected, rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor)


# -- SmolLM2 GGUF vs transformers reading the same GGUF ---------------------------------------------
@pytest.fixture(scope="module")
def smollm2_reference(smollm2_gguf):
    """transformers' own GGUF conversion (dequantize + q/k un-permutation) and greedy decode."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    source = resolve_model(str(smollm2_gguf))
    config = LlamaConfig(**{k: v for k, v in source.config.items() if k not in ("model_type", "architectures")})
    model = LlamaForCausalLM(config)
    loaded = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=model)
    hf_config = loaded["config"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "rope_theta", "rms_norm_eps", "tie_word_embeddings"):
        assert source.config[key] == hf_config[key], key
    weights = {k: torch.as_tensor(v) for k, v in loaded["tensors"].items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    prompts = [[1, 9690, 198, 2683, 359, 253, 5356, 5646], [504, 3575, 282, 4649, 314]]
    return source, prompts, hf_greedy(model, prompts, 16)


@pytest.mark.slow
@pytest.mark.parametrize("partition", [[30], [10, 12, 8]])
def test_smollm2_gguf_greedy_matches_transformers(smollm2_reference, partition):
    source, prompts, expected = smollm2_reference
    pipeline = PipelineInOneProcess(source, partition)
    assert pipeline.generate(prompts, 16) == expected
