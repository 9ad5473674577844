"""MoE and MLA stages (mixtral, qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3) against transformers.

Chained stages in one process decode what transformers' greedy `generate` decodes on the same
tiny random checkpoints, at PP 1, 2 and 3 (splits between dense and MoE layers included). The
pieces are checked on their own too: routers against transformers' router modules, the
expert-grouped MoE forward against a dense all-experts sum, the MLA cache rows against
transformers' latent cache, and the FP8 block-scale loader against the quantized values.
"""

from __future__ import annotations

import pytest
import torch

from pipesplit.runtime.loader import SafetensorsSource, dequantize_fp8_blocks, load_stage, resolve_model
from pipesplit.runtime.models import kv_cache_shapes
from pipesplit.runtime.models.layers import AttentionBatch
from pipesplit.runtime.stage import live_weight_bytes
from tests.runtime.test_loader import RecordingSource
from tests.runtime.test_models import MAX_NEW, PROMPTS, PipelineInOneProcess, hf_greedy, layer_ranges

pytestmark = pytest.mark.usefixtures("one_thread")


# mlp kinds (d dense, m MoE): mixtral mmmm, qwen2_moe dmdm, qwen3_moe dmmdm, deepseek_v2 dmmm, deepseek_v3 ddmmm
SPLITS = {
    "mixtral": [[4], [2, 2], [1, 2, 1]],
    "qwen2_moe": [[4], [1, 3], [2, 1, 1]],
    "qwen3_moe": [[5], [3, 2], [1, 2, 2]],
    "deepseek_v2": [[4], [1, 3], [1, 1, 2]],
    "deepseek_v2_groups": [[4], [2, 2], [1, 2, 1]],
    "deepseek_v3": [[5], [2, 3], [1, 2, 2]],
}
CASES = [(name, split) for name, splits in SPLITS.items() for split in splits]


def _model(folder):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_models(tiny_moe_checkpoints):
    return {name: _model(folder) for name, folder in tiny_moe_checkpoints.items()}


@pytest.fixture(scope="module")
def moe_reference(hf_models):
    return {name: hf_greedy(model, PROMPTS, MAX_NEW) for name, model in hf_models.items()}


def _pipeline(folder, partition, **kwargs) -> PipelineInOneProcess:
    return PipelineInOneProcess(resolve_model(str(folder)), partition, **kwargs)


@pytest.mark.parametrize("name,partition", CASES, ids=[f"{n}-{'.'.join(map(str, s))}" for n, s in CASES])
def test_batched_greedy_matches_transformers(tiny_moe_checkpoints, moe_reference, name, partition):
    assert _pipeline(tiny_moe_checkpoints[name], partition).generate(PROMPTS, MAX_NEW) == moe_reference[name]


@pytest.mark.parametrize("name", list(SPLITS))
def test_chunked_prefill_mixed_with_decodes_matches_transformers(tiny_moe_checkpoints, moe_reference, name):
    pipeline = _pipeline(tiny_moe_checkpoints[name], SPLITS[name][-1], seed=1)
    assert pipeline.generate(PROMPTS, MAX_NEW, chunk=6, start_steps=[0, 1, 3]) == moe_reference[name]


def _prefill_batch(prompt_len: int, slots: list[int], all_logits: bool = True) -> AttentionBatch:
    rows = list(range(prompt_len)) if all_logits else [prompt_len - 1]
    return AttentionBatch(
        positions=torch.arange(prompt_len), slot_mapping=torch.tensor(slots), query_lens=[prompt_len],
        context_lens=[prompt_len], context_slots=[torch.tensor(slots)], logits_indices=torch.tensor(rows),
    )


@pytest.mark.parametrize("name", list(SPLITS))
def test_prefill_logits_match_transformers(tiny_moe_checkpoints, hf_models, name):
    """Every position's logits, not just the argmax: small errors (a wrong norm eps, a missing
    softmax-scale factor) show here before they flip a greedy token."""
    prompt = PROMPTS[2]
    pipeline = _pipeline(tiny_moe_checkpoints[name], SPLITS[name][1])
    with torch.inference_mode():
        ours = pipeline.forward(prompt, _prefill_batch(len(prompt), list(range(100, 100 + len(prompt)))))
        expected = hf_models[name](torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_mla_cache_holds_the_normalised_latent_and_the_roped_key(tiny_moe_checkpoints, hf_models):
    """One row per token and layer, [kv_lora_rank + qk_rope_head_dim]: transformers' compressed
    cache (c_kv after kv_a_layernorm, then k_pe after rotary), not per-head K and V."""
    folder, prompt = tiny_moe_checkpoints["deepseek_v3"], PROMPTS[1]
    pipeline = _pipeline(folder, [2, 3])
    spec = pipeline.spec
    assert kv_cache_shapes(spec) == ((spec.mla.kv_lora_rank + spec.mla.qk_rope_head_dim,),)
    slots = [7 * i + 3 for i in range(len(prompt))]
    with torch.inference_mode():
        pipeline.forward(prompt, _prefill_batch(len(prompt), slots, all_logits=False))
        cache = hf_models["deepseek_v3"](torch.tensor([prompt]), use_cache=True).past_key_values
    for layer in range(spec.num_layers):
        (pool,) = pipeline.kv_cache[layer]
        latent, rope_key = cache.layers[layer].keys[0, 0], cache.layers[layer].values[0, 0]
        torch.testing.assert_close(pool[slots], torch.cat((latent, rope_key), dim=-1), rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3"])
def test_bfloat16_stages_agree_with_float32(tiny_moe_checkpoints, name):
    exact = _pipeline(tiny_moe_checkpoints[name], SPLITS[name][1]).generate(PROMPTS, 2)
    half = _pipeline(tiny_moe_checkpoints[name], SPLITS[name][1], dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for stage in half.stages for t in stage.state_dict().values())
    agree = sum(a[0] == b[0] for a, b in zip(half.generate(PROMPTS, 2), exact))
    assert agree >= 2  # bf16 rounding may flip a near-tie (or a routing choice), not most first tokens

# -- stages hold and read only their own tensors ---------------------------------------------------


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


@pytest.mark.parametrize("name,partition", [("mixtral", [1, 2, 1]), ("qwen2_moe", [2, 2]), ("deepseek_v3", [2, 1, 2])])
def test_stage_reads_and_holds_only_its_own_layers_and_experts(tiny_moe_checkpoints, name, partition):
    source = resolve_model(str(tiny_moe_checkpoints[name]))
    spec = source.spec
    ranges = layer_ranges(partition)
    for rank, (start, end) in enumerate(ranges):
        first, last = rank == 0, rank == len(ranges) - 1
        recording = RecordingSource(source)
        stage = load_stage(recording, spec, (start, end), first, last)
        state = stage.state_dict()
        assert set(recording.read_names) == set(state)
        assert {_layer_of(n) for n in state} - {None} == set(range(start, end))
        assert ("model.embed_tokens.weight" in state) == first
        assert ("lm_head.weight" in state) == last
        for layer in range(start, end):
            moe = "block_sparse_moe" if name == "mixtral" else "mlp"
            expert = "w1" if name == "mixtral" else "gate_proj"
            has_experts = f"model.layers.{layer}.{moe}.experts.{spec.moe.num_experts - 1}.{expert}.weight" in state
            assert has_experts == (spec.mlp_kinds[layer] == "moe")
            if spec.moe.score_correction_bias and spec.mlp_kinds[layer] == "moe":
                # a persistent buffer: in the state dict, so counted by live_weight_bytes
                assert f"model.layers.{layer}.mlp.gate.e_score_correction_bias" in state
        assert live_weight_bytes(stage) == sum(t.numel() * t.element_size() for t in state.values())


def test_mtp_module_is_read_only_when_asked(tiny_moe_checkpoints):
    """The checkpoint stores model.layers.5.* (MTP); the last stage reads it only with mtp=True."""
    source = resolve_model(str(tiny_moe_checkpoints["deepseek_v3"]))
    spec = source.spec
    mtp_prefix = f"model.layers.{spec.num_layers}."
    plain = RecordingSource(source)
    load_stage(plain, spec, (3, 5), False, True)
    assert not [n for n in plain.read_names if n.startswith(mtp_prefix)]
    with_mtp = RecordingSource(source)
    stage = load_stage(with_mtp, spec, (3, 5), False, True, mtp=True)
    from safetensors import safe_open

    # the reference is what the checkpoint stores (laid out as DeepSeek-V3's, see add_mtp_tensors)
    with safe_open(tiny_moe_checkpoints["deepseek_v3"] / "model-mtp.safetensors", "pt") as f:
        expected = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    held = {n: tuple(t.shape) for n, t in stage.state_dict().items() if n.startswith(mtp_prefix)}
    assert held == expected
    assert sorted(n for n in with_mtp.read_names if n.startswith(mtp_prefix)) == sorted(expected)
    torch.testing.assert_close(stage.state_dict()[f"{mtp_prefix}eh_proj.weight"],
                               source.read(f"{mtp_prefix}eh_proj.weight"))
    with pytest.raises(ValueError, match="last stage"):
        load_stage(source, spec, (0, 2), True, False, mtp=True)


# -- routers and the expert loop --------------------------------------------------------------------
def _hf_router(kind: str):
    """(transformers router module, its config) for one routing scheme, 16 experts over hidden 32."""
    import transformers
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3
    from transformers.models.mixtral import modeling_mixtral as mixtral
    from transformers.models.qwen2_moe import modeling_qwen2_moe as qwen2
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3

    common = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2, vocab_size=64,
                  intermediate_size=48)
    deepseek = dict(n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=8, q_lora_rank=None,
                    first_k_dense_replace=0, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4)
    qwen = dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=8)
    if kind == "mixtral":
        config = transformers.MixtralConfig(**common, num_local_experts=16, num_experts_per_tok=4)
        return mixtral.MixtralTopKRouter(config), config
    if kind == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(**common, **qwen, shared_expert_intermediate_size=8)
        return qwen2.Qwen2MoeTopKRouter(config), config
    if kind == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**common, **qwen, norm_topk_prob=True)
        return qwen3.Qwen3MoeTopKRouter(config), config
    if kind == "v2_greedy":
        config = transformers.DeepseekV2Config(**common, **deepseek, routed_scaling_factor=1.3)
        return v2.DeepseekV2TopkRouter(config), config
    if kind == "v2_group_limited":
        config = transformers.DeepseekV2Config(**common, **deepseek, topk_method="group_limited_greedy", n_group=4,
                                               topk_group=2)
        return v2.DeepseekV2TopkRouter(config), config
    config = transformers.DeepseekV3Config(**common, **deepseek, n_group=4, topk_group=2, norm_topk_prob=True,
                                           routed_scaling_factor=2.5)
    return v3.DeepseekV3TopkRouter(config), config


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe", "v2_greedy", "v2_group_limited", "v3_noaux_tc"])
def test_router_matches_transformers(kind):
    from pipesplit.planner.spec import spec_from_config
    from pipesplit.runtime.models.moe import Router

    hf, config = _hf_router(kind)
    spec = spec_from_config(config.to_dict())
    ours = Router(spec.hidden_size, spec.moe, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(ours.weight.shape, generator=gen))
        hf.weight.copy_(ours.weight)
        if ours.e_score_correction_bias is not None:
            ours.e_score_correction_bias.copy_(torch.randn(16, generator=gen) * 0.2)
            hf.e_score_correction_bias.copy_(ours.e_score_correction_bias)
        x = torch.randn(500, 32, generator=gen)
        weights, experts = ours(x)
        _, hf_weights, hf_experts = hf(x)
    order, hf_order = experts.argsort(-1), hf_experts.argsort(-1)
    assert torch.equal(experts.gather(1, order), hf_experts.gather(1, hf_order))
    torch.testing.assert_close(weights.gather(1, order), hf_weights.float().gather(1, hf_order), rtol=1e-6, atol=1e-7)


def test_moe_runs_only_the_experts_that_received_tokens():
    """The expert-grouped forward equals the dense sum over all experts weighted by the routing,
    and calls exactly the experts some token was routed to, each once."""
    from pipesplit.planner.spec import MoESpec
    from pipesplit.runtime.models.moe import SparseMoE

    moe = MoESpec(num_experts=16, num_experts_per_tok=2, intermediate_size=8, num_shared_experts=1,
                  shared_intermediate_size=8, shared_expert_gate=True, norm_topk_prob=True)
    gen = torch.Generator().manual_seed(0)
    block = SparseMoE(24, moe, torch.float32, "cpu", shared_name="shared_expert")
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    calls = []
    for e, expert in enumerate(block.experts):
        expert.register_forward_hook(lambda module, args, out, e=e: calls.append((e, args[0].shape[0])))
    x = torch.randn(5, 24, generator=gen)
    with torch.no_grad():
        got = block(x)
        weights, experts = block.gate(x)
        dense = torch.zeros_like(x)
        for e, expert in enumerate(block.experts):
            share = (weights * (experts == e)).sum(-1, keepdim=True)
            dense += share * expert(x)
        dense += torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    routed = calls[: len(calls) - len(block.experts)]
    counts = torch.bincount(experts.reshape(-1), minlength=16)
    assert routed == [(e, int(n)) for e, n in enumerate(counts.tolist()) if n]
    assert len(routed) < len(block.experts)  # 5 tokens x top-2 cannot reach all 16 experts
    torch.testing.assert_close(got, dense)


# -- FP8 block-scale checkpoints --------------------------------------------------------------------
def test_fp8_weights_dequantize_to_the_stored_values(tiny_fp8_checkpoints):
    from safetensors.torch import load_file

    from tests.conftest import fp8_quantized_names

    original = load_file(tiny_fp8_checkpoints["original"] / "model.safetensors")
    expected = load_file(tiny_fp8_checkpoints["dequantized"] / "model.safetensors")
    stored = load_file(tiny_fp8_checkpoints["fp8"] / "model.safetensors")
    source = SafetensorsSource(tiny_fp8_checkpoints["fp8"])
    names = fp8_quantized_names(original)
    shapes = {tuple(original[n].shape) for n in names}
    assert {(152, 160), (200, 160), (160, 200), (136, 160), (160, 136)} <= shapes  # partial 128-blocks
    for name in names:
        assert stored[name].dtype == torch.float8_e4m3fn
        got = source.read(name)
        assert got.dtype == torch.float32 and got.shape == original[name].shape
        assert torch.equal(got, expected[name]), name
        # e4m3 keeps 3 mantissa bits: relative error <= 2^-4, plus the subnormal step of the block scale
        scale = stored[f"{name}_scale_inv"].repeat_interleave(128, 0).repeat_interleave(128, 1)
        scale = scale[: got.shape[0], : got.shape[1]]
        assert ((got - original[name]).abs() <= original[name].abs() / 16 + scale / 2**9).all(), name
        assert not torch.equal(got, original[name])
    assert torch.equal(source.read("model.embed_tokens.weight"), original["model.embed_tokens.weight"])


def test_planner_fp8_accounting_equals_the_stored_checkpoint(tiny_fp8_checkpoints):
    from safetensors import safe_open

    from pipesplit.planner.costs import checkpoint_tensors, weight_bytes_total
    from pipesplit.planner.spec import load_spec

    folder = tiny_fp8_checkpoints["fp8"]
    spec = load_spec(str(folder))
    assert spec.quantization.method == "fp8" and spec.quantization.weight_block_size == (128, 128)
    stored, payload = {}, 0
    with safe_open(folder / "model.safetensors", "pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            stored[name] = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
            payload += tensor.numel() * tensor.element_size()
    assert {t.name: (t.shape, t.dtype) for t in checkpoint_tensors(spec)} == stored
    assert weight_bytes_total(spec) == payload


@pytest.mark.parametrize("partition", [[3], [1, 2]])
def test_fp8_checkpoint_generates_like_its_dequantized_weights(tiny_fp8_checkpoints, partition):
    """Loaded, the FP8 checkpoint is the model of its dequantized weights (reference: transformers
    on those weights as float32), and each stage holds the planner's float32 weight bytes."""
    from pipesplit.runtime.plan_bridge import runtime_plan

    folder = tiny_fp8_checkpoints["fp8"]
    pipeline = _pipeline(folder, partition)
    assert pipeline.generate(PROMPTS, MAX_NEW) == hf_greedy(str(tiny_fp8_checkpoints["dequantized"]), PROMPTS, MAX_NEW)
    plan = runtime_plan(pipeline.spec, len(partition), None, partition, "float32", (1 << 26,) * len(partition))
    assert [live_weight_bytes(s) for s in pipeline.stages] == [s.weight_bytes for s in plan.stages]


def test_fp8_dequantization_of_a_hand_computed_block_example():
    """Independent of the fixture (whose expected weights use the loader's own formula): a 3x5 weight
    in 2x4 blocks, values exact in e4m3, each multiplied by its block's scale by hand. (transformers'
    FP8 loader does not dequantize to float32 on a CPU-only machine, so it cannot be the reference.)"""
    weight = torch.tensor([[1.0, 2.0, -1.0, 0.5, 4.0],
                           [3.0, -0.5, 1.5, 2.0, -2.0],
                           [0.25, 1.0, -3.0, 6.0, 1.0]]).to(torch.float8_e4m3fn)
    scale_inv = torch.tensor([[2.0, 10.0],
                              [0.5, 0.125]])
    expected = torch.tensor([[2.0, 4.0, -2.0, 1.0, 40.0],
                             [6.0, -1.0, 3.0, 4.0, -20.0],
                             [0.125, 0.5, -1.5, 3.0, 0.125]])
    got = dequantize_fp8_blocks(weight, scale_inv, (2, 4))
    assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_fp8_scale_of_the_wrong_shape_is_a_user_error():
    from pipesplit.errors import UserError

    weight = torch.zeros(200, 130).to(torch.float8_e4m3fn)
    with pytest.raises(UserError, match=r"expected \[2, 2\]"):
        dequantize_fp8_blocks(weight, torch.ones(2, 1), (128, 128))


# -- real configs: the stage modules hold exactly the planner's tensors ------------------------------
@pytest.mark.parametrize("name,layers", [("mixtral-8x7b-v0.1", (0, 2)), ("qwen3-30b-a3b", (46, 48)),
                                         ("deepseek-v2-lite", (0, 2)), ("deepseek-v3", (59, 61))])
def test_real_configs_build_the_planners_tensors(name, layers):
    """Built on the meta device (no memory), a last stage of the real model holds exactly the
    tensors of costs' inventory, by name and shape, MTP module included; and the MLA softmax scale
    equals transformers' YaRN adjustment."""
    from pipesplit.planner import costs
    from pipesplit.planner.spec import load_spec
    from pipesplit.runtime.models import build_stage
    from pipesplit.runtime.models.deepseek import softmax_scale

    spec = load_spec(name)
    mtp = spec.num_mtp_layers > 0
    stage = build_stage(spec, layers, True, True, torch.bfloat16, "meta", mtp=mtp)
    held = {n: tuple(t.shape) for n, t in stage.state_dict().items()}
    expected = costs.embedding_tensors(spec, weight_dtype="bfloat16") + costs.head_tensors(spec, weight_dtype="bfloat16")
    for layer in range(*layers):
        expected += costs.layer_tensors(spec, layer, weight_dtype="bfloat16")
    if mtp:
        expected += costs.mtp_tensors(spec, weight_dtype="bfloat16")
    assert held == {t.name: t.shape for t in expected}
    assert all(t.dtype == torch.bfloat16 for t in stage.state_dict().values())
    if spec.mla is not None:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

        rope = {**spec.rope_scaling, "rope_type": spec.rope_scaling.get("rope_type") or spec.rope_scaling["type"]}
        assert softmax_scale(spec) == pytest.approx(yarn_apply_mscale(rope, spec.mla.qk_head_dim**-0.5))
        assert softmax_scale(spec) != pytest.approx(spec.mla.qk_head_dim**-0.5)  # both configs use YaRN mscale
