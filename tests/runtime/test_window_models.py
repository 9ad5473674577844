"""Sliding-window families against transformers: gpt-oss (sinks, alternating sliding / full layers,
biased router, clamped SwiGLU, YaRN) and its MXFP4 checkpoints, Gemma 2 / 3 (local and global
layers, soft-capping, pre- and post-norms, scaled embeddings, q/k norms, two ropes), and Mistral /
Qwen2 with sliding_window; windowed layers in a pool of their own or masked in the token pool.

Windows are shorter than the prompts and the generations, so a wrong window shows in the tokens.
"""

from __future__ import annotations

import json

import pytest
import torch

from pipesplit.runtime.loader import SafetensorsSource, dequantize_mxfp4, load_stage, resolve_model
from pipesplit.runtime.stage import live_weight_bytes
from tests.runtime.test_models import PROMPTS, PipelineInOneProcess, hf_greedy, layer_ranges
from tests.runtime.test_moe_models import _layer_of, _prefill_batch

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_NEW = 10  # longer than every window below
SPLITS = {"gpt_oss": [[4], [1, 3], [2, 1, 1]], "mistral_window": [[4], [2, 2], [1, 2, 1]],
          "qwen2_window": [[4], [1, 3], [2, 1, 1]], "gemma2": [[4], [1, 3], [1, 1, 2]],
          "gemma3": [[5], [2, 3], [1, 3, 1]]}
CASES = [(name, split) for name, splits in SPLITS.items() for split in splits]
# Fewer window slots than the positions the prompts and generations pass through: slots released
# as the windows slide must be reused for the tokens to come out right.
WINDOW_SLOTS = 40


@pytest.fixture(scope="module")
def window_checkpoints(tiny_window_checkpoints):
    return tiny_window_checkpoints


@pytest.fixture(scope="module")
def window_reference(window_checkpoints):
    return {name: hf_greedy(str(folder), PROMPTS, MAX_NEW) for name, folder in window_checkpoints.items()}


def _pipeline(folder, partition, **kwargs) -> PipelineInOneProcess:
    return PipelineInOneProcess(resolve_model(str(folder)), partition, **kwargs)


@pytest.mark.parametrize("name,partition", CASES, ids=[f"{n}-{'.'.join(map(str, s))}" for n, s in CASES])
def test_batched_greedy_matches_transformers(window_checkpoints, window_reference, name, partition):
    """Windowed layers in their own small pool (slots freed as the window slides) ..."""
    pipeline = _pipeline(window_checkpoints[name], partition, window_slots=WINDOW_SLOTS)
    assert pipeline.generate(PROMPTS, MAX_NEW) == window_reference[name]
    positions = sum(len(p) + MAX_NEW - 1 for p in PROMPTS)
    assert pipeline.most_window_slots_held < WINDOW_SLOTS < positions


@pytest.mark.parametrize("name", list(SPLITS))
def test_windowed_layers_in_the_token_pool_match_transformers(window_checkpoints, window_reference, name):
    """... or in the token pool with the window as a mask: the same tokens."""
    assert _pipeline(window_checkpoints[name], SPLITS[name][1]).generate(PROMPTS, MAX_NEW) == window_reference[name]


@pytest.mark.parametrize("name", list(SPLITS))
def test_chunked_prefill_mixed_with_decodes_matches_transformers(window_checkpoints, window_reference, name):
    pipeline = _pipeline(window_checkpoints[name], SPLITS[name][-1], seed=1, window_slots=WINDOW_SLOTS)
    assert pipeline.generate(PROMPTS, MAX_NEW, chunk=3, start_steps=[0, 1, 3]) == window_reference[name]


@pytest.mark.parametrize("name", list(SPLITS))
def test_prefill_logits_match_transformers(window_checkpoints, name):
    import transformers

    prompt = PROMPTS[2]
    hf = transformers.AutoModelForCausalLM.from_pretrained(window_checkpoints[name], dtype=torch.float32).eval()
    pipeline = _pipeline(window_checkpoints[name], SPLITS[name][1])
    with torch.inference_mode():
        ours = pipeline.forward(prompt, _prefill_batch(len(prompt), list(range(100, 100 + len(prompt)))))
        expected = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(SPLITS))
def test_the_window_changes_the_tokens(window_checkpoints, window_reference, tmp_path, name):
    """The reference itself depends on the window: a test passing with it ignored would prove nothing."""
    import shutil

    wide = tmp_path / "wide"
    shutil.copytree(window_checkpoints[name], wide)
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "sliding_window": 256}))
    assert hf_greedy(str(wide), PROMPTS, MAX_NEW) != window_reference[name]


def test_the_sinks_change_the_tokens(window_checkpoints, window_reference, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = window_checkpoints["gpt_oss"]
    no_sinks = tmp_path / "no_sinks"
    shutil.copytree(folder, no_sinks)
    tensors = load_file(no_sinks / "model.safetensors")
    for name in [n for n in tensors if n.endswith(".sinks")]:
        tensors[name] = torch.full_like(tensors[name], -1e4)  # exp(-1e4) = 0: no sink at all
    save_file(tensors, no_sinks / "model.safetensors", metadata={"format": "pt"})
    assert hf_greedy(str(no_sinks), PROMPTS, MAX_NEW) != window_reference["gpt_oss"]


@pytest.mark.parametrize("name,change", [("gemma2", {"attn_logit_softcapping": None}),
                                         ("gemma2", {"final_logit_softcapping": None}),
                                         ("gemma3", {"rope_parameters": {
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                                             "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                "rope_theta": 1000000.0}}})])
def test_gemma_soft_caps_and_local_rope_change_the_logits(window_checkpoints, tmp_path, name, change):
    """Each Gemma feature the runtime implements moves transformers' logits (so the logit test
    above checks it), and the runtime follows the config when it changes."""
    import shutil

    import transformers

    changed = tmp_path / "changed"
    shutil.copytree(window_checkpoints[name], changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, **change}))
    prompt = PROMPTS[2]
    batch = lambda: _prefill_batch(len(prompt), list(range(len(prompt))))  # noqa: E731
    with torch.inference_mode():
        logits = {}
        for kind, folder in (("original", window_checkpoints[name]), ("changed", changed)):
            hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            logits[kind] = (_pipeline(folder, SPLITS[name][1]).forward(prompt, batch()), hf(torch.tensor([prompt])).logits[0])
    torch.testing.assert_close(*logits["changed"], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits["original"][1], logits["changed"][1], atol=1e-3)


@pytest.mark.parametrize("config_class,layers", [("Gemma2Config", (24, 26)), ("Gemma3TextConfig", (10, 12))])
def test_gemma_default_configs_build_transformers_tensors(config_class, layers):
    """Full-size Gemma 2 and Gemma 3 defaults, on the meta device: a last stage holds
    exactly transformers' tensors of its layers (names and shapes), which are costs' inventory."""
    import transformers

    from pipesplit.planner import costs
    from pipesplit.planner.spec import spec_from_config
    from pipesplit.runtime.models import build_stage

    config = getattr(transformers, config_class)()
    spec = spec_from_config(config.to_dict())
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    stage = build_stage(spec, layers, True, True, torch.bfloat16, "meta")
    held = {n: tuple(t.shape) for n, t in stage.state_dict().items()}
    prefixes = tuple(f"model.layers.{i}." for i in range(*layers))
    reference = {n: tuple(t.shape) for n, t in hf.state_dict().items()
                 if (n.startswith(prefixes) or not n.startswith("model.layers.")) and n != "lm_head.weight"}
    assert spec.tie_word_embeddings  # the head is the embedding, stored once
    assert held == reference
    expected = costs.embedding_tensors(spec, weight_dtype="bfloat16") + costs.head_tensors(spec, weight_dtype="bfloat16")
    expected += [t for i in range(*layers) for t in costs.layer_tensors(spec, i, weight_dtype="bfloat16")]
    assert held == {t.name: t.shape for t in expected if t.name != "lm_head.weight"}  # tied: one matrix
    kinds = [stage.model.layers[str(i)].layer_type for i in range(*layers)]
    assert kinds == list(config.layer_types[layers[0]:layers[1]])


# -- MXFP4 ---------------------------------------------------------------------------------------
def test_mxfp4_loads_to_the_weights_of_its_unquantized_twin(tiny_mxfp4_checkpoints):
    from safetensors.torch import load_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    stored = load_file(tiny_mxfp4_checkpoints["mxfp4"] / "model.safetensors")
    twin = load_file(tiny_mxfp4_checkpoints["dequantized"] / "model.safetensors")
    original = load_file(tiny_mxfp4_checkpoints["original"] / "model.safetensors")
    source = SafetensorsSource(tiny_mxfp4_checkpoints["mxfp4"])
    names = sorted(n for n in twin if n.endswith(("experts.gate_up_proj", "experts.down_proj")))
    assert len(names) == 2 * source.spec.num_layers
    for name in names:
        assert name not in stored and stored[f"{name}_blocks"].dtype == torch.uint8
        got = source.read(name)
        assert source.shape(name) == tuple(got.shape) == tuple(original[name].shape)
        assert torch.equal(got, twin[name]), name
        # the packing is lossy (e2m1 keeps 1 mantissa bit) but within half a grid step of the block scale
        assert not torch.equal(got, original[name])
        blocks, scales = stored[f"{name}_blocks"], stored[f"{name}_scales"]
        step = torch.exp2(scales.float() - 127).repeat_interleave(32, -1).transpose(1, 2)
        assert ((got - original[name]).abs() <= step + original[name].abs() / 4).all()
        torch.testing.assert_close(dequantize_mxfp4(blocks, scales),
                                   convert_moe_packed_tensors(blocks, scales, dtype=torch.float32), rtol=0, atol=0)
    assert torch.equal(source.read("model.layers.0.self_attn.sinks"), original["model.layers.0.self_attn.sinks"])


@pytest.mark.parametrize("partition", [[4], [2, 2], [1, 2, 1]])
def test_mxfp4_checkpoint_generates_like_its_twin_and_holds_the_planned_bytes(tiny_mxfp4_checkpoints, partition):
    from pipesplit.runtime.plan_bridge import runtime_plan

    pipeline = _pipeline(tiny_mxfp4_checkpoints["mxfp4"], partition)
    assert pipeline.spec.quantization.method == "mxfp4"
    assert pipeline.generate(PROMPTS, MAX_NEW) == hf_greedy(str(tiny_mxfp4_checkpoints["dequantized"]), PROMPTS, MAX_NEW)
    plan = runtime_plan(pipeline.spec, len(partition), None, partition, "float32", (1 << 26,) * len(partition))
    assert [live_weight_bytes(s) for s in pipeline.stages] == [s.weight_bytes for s in plan.stages]


def test_mxfp4_stage_reads_only_its_own_blocks_and_scales(tiny_mxfp4_checkpoints, monkeypatch):
    """Stored tensors (blocks and scales included) read by each stage: exactly its layers' ones."""
    from safetensors import safe_open

    folder = tiny_mxfp4_checkpoints["mxfp4"]
    with safe_open(folder / "model.safetensors", "pt") as f:
        stored_names = set(f.keys())
    reads: list[str] = []
    original = SafetensorsSource._stored
    monkeypatch.setattr(SafetensorsSource, "_stored", lambda self, name: (reads.append(name), original(self, name))[1])
    source = resolve_model(str(folder))
    spec = source.spec
    for rank, (start, end) in enumerate(layer_ranges([1, 2, 1])):
        reads.clear()
        first, last = rank == 0, rank == 2
        load_stage(source, spec, (start, end), first, last)
        expected = {n for n in stored_names if _layer_of(n) in range(start, end)}
        expected |= {"model.embed_tokens.weight"} if first else set()
        expected |= {"model.norm.weight", "lm_head.weight"} if last else set()
        assert set(reads) == expected and len(reads) == len(expected)
        assert any(n.endswith("_blocks") for n in reads)


def test_planner_mxfp4_accounting_equals_the_stored_checkpoint(tiny_mxfp4_checkpoints):
    from safetensors import safe_open

    from pipesplit.planner.costs import checkpoint_tensors
    from pipesplit.planner.spec import load_spec

    folder = tiny_mxfp4_checkpoints["mxfp4"]
    stored = {}
    with safe_open(folder / "model.safetensors", "pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            stored[name] = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
    assert {t.name: (t.shape, t.dtype) for t in checkpoint_tensors(load_spec(str(folder)))} == stored


def test_real_gpt_oss_config_builds_the_planners_tensors():
    from pipesplit.planner import costs
    from pipesplit.planner.spec import load_spec
    from pipesplit.runtime.models import build_stage

    spec = load_spec("gpt-oss-120b")
    layers = (34, 36)
    stage = build_stage(spec, layers, True, True, torch.bfloat16, "meta")
    held = {n: tuple(t.shape) for n, t in stage.state_dict().items()}
    expected = costs.embedding_tensors(spec, weight_dtype="bfloat16") + costs.head_tensors(spec, weight_dtype="bfloat16")
    for layer in range(*layers):
        expected += costs.layer_tensors(spec, layer, weight_dtype="bfloat16")
    assert held == {t.name: t.shape for t in expected}
    attention = [stage.model.layers[str(i)].self_attn for i in range(*layers)]
    assert [a.window for a in attention] == [128, None] and all(a.sinks is not None for a in attention)
