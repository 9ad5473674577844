"""Tensor inventory and per-rank costs against published totals and Hugging Face transformers."""

from __future__ import annotations

import json
import os
import struct

import pytest

from pipesplit.errors import UserError
from pipesplit.planner.costs import (
    CostModel,
    TensorInfo,
    check_tp,
    checkpoint_tensors,
    cost_model,
    embedding_tensors,
    head_tensors,
    kv_bytes_per_token,
    layer_tensors,
    mtp_tensors,
    params_total,
    valid_tp_sizes,
    weight_bytes_total,
)
from pipesplit.planner.spec import load_spec, spec_from_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Hub safetensors parameter totals and index total_size (= tensor payload bytes) of the BF16 checkpoints.
BF16_TOTALS = {
    "llama-3.1-8b": (8_030_261_248, 16_060_522_496),
    "llama-3.1-70b-instruct": (70_553_706_496, 141_107_412_992),
    "llama-3.2-1b-instruct": (1_235_814_400, None),  # one file: 2,471,645,608 bytes, header included
    "qwen2.5-7b": (7_615_616_512, 15_231_233_024),
    "qwen3-8b": (8_190_735_360, 16_381_470_720),
    "qwen3-30b-a3b": (30_532_122_624, 61_064_245_248),
    "qwen3-235b-a22b-instruct-2507": (235_093_634_560, 470_187_269_120),
    "mixtral-8x7b-v0.1": (46_702_792_704, 93_405_585_408),
    "deepseek-v2-lite": (15_706_484_224, 31_412_968_448),
    "smollm2": (134_515_008, None),
    # Hub safetensors totals of Qwen/Qwen3-32B and meta-llama/Llama-3.3-70B-Instruct
    "qwen3-32b": (32_762_123_264, None),
    "llama-3.3-70b-instruct": (70_553_706_496, 141_107_412_992),
}


def test_glm45_matches_the_hub_total():
    """zai-org/GLM-4.5: 358,337,791,296 parameters, the MTP layer 92 included (its router
    e_score_correction_bias is float32, so the bytes are not twice the count)."""
    assert params_total(load_spec("glm-4.5")) == 358_337_791_296


def test_gpt_oss_20b_matches_the_model_card():
    """openai/gpt-oss-20b model card: 20.91B parameters (experts unpacked from MXFP4)."""
    assert round(params_total(load_spec("gpt-oss-20b"), "bfloat16") / 1e7) == 2091


@pytest.fixture(scope="module")
def deepseek_v3():
    spec = load_spec("deepseek-v3")
    return spec, checkpoint_tensors(spec)


@pytest.mark.parametrize("name", sorted(BF16_TOTALS))
def test_bf16_params_and_bytes_match_the_hub_exactly(name):
    spec = load_spec(name)
    params, payload = BF16_TOTALS[name]
    assert params_total(spec) == params
    assert weight_bytes_total(spec) == (payload if payload is not None else 2 * params)


def test_tied_embeddings_are_stored_once():
    spec = load_spec("llama-3.2-1b-instruct")
    names = [t.name for t in checkpoint_tensors(spec)]
    assert "lm_head.weight" not in names and names.count("model.embed_tokens.weight") == 1
    payload = weight_bytes_total(spec)
    assert 0 < 2_471_645_608 - payload < 100_000  # the rest is the safetensors header


def test_deepseek_v3_published_totals(deepseek_v3):
    spec, tensors = deepseek_v3
    assert len(tensors) == 91_991
    assert sum(t.numel for t in tensors) == 684_531_386_000
    mtp = {t.name for t in mtp_tensors(spec)}
    main_weights = sum(t.numel for t in tensors if t.name not in mtp and not t.name.endswith("_scale_inv"))
    assert main_weights == 671_026_419_200
    payload = sum(t.nbytes for t in tensors)
    assert payload < 688_586_727_753  # shard files, headers included
    assert abs(payload - 688_586_727_753) / 688_586_727_753 < 1e-4


def test_deepseek_v3_dtypes_and_scale_shapes(deepseek_v3):
    _, tensors = deepseek_v3
    by_name = {t.name: t for t in tensors}
    assert by_name["model.layers.3.self_attn.q_b_proj.weight"] == TensorInfo(
        "model.layers.3.self_attn.q_b_proj.weight", (24576, 1536), "float8_e4m3fn")
    assert by_name["model.layers.3.self_attn.q_b_proj.weight_scale_inv"].shape == (192, 12)
    assert by_name["model.layers.3.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (5, 56)  # 576 rows
    assert by_name["model.layers.3.mlp.experts.255.down_proj.weight_scale_inv"] == TensorInfo(
        "model.layers.3.mlp.experts.255.down_proj.weight_scale_inv", (56, 16), "float32")
    assert by_name["model.layers.3.mlp.gate.weight"].dtype == "bfloat16"
    assert by_name["model.layers.3.mlp.gate.e_score_correction_bias"] == TensorInfo(
        "model.layers.3.mlp.gate.e_score_correction_bias", (256,), "float32")
    assert by_name["model.layers.0.mlp.gate_proj.weight"].shape == (18432, 7168)
    assert "model.layers.2.mlp.gate.weight" not in by_name
    assert by_name["model.layers.61.embed_tokens.weight"].shape == (129280, 7168)
    assert by_name["model.layers.61.shared_head.head.weight"].shape == (129280, 7168)
    assert by_name["model.layers.61.eh_proj.weight"] == TensorInfo(
        "model.layers.61.eh_proj.weight", (7168, 14336), "bfloat16")
    assert by_name["model.layers.61.mlp.experts.0.up_proj.weight"].dtype == "float8_e4m3fn"
    assert not any(".layers.62." in t.name for t in tensors)


def test_gpt_oss_mxfp4_payload_and_parameter_count():
    spec = load_spec("gpt-oss-120b")
    assert weight_bytes_total(spec) == 65_248_815_744
    # The published 116,829,156,672 counts the experts unpacked (two FP4 values per byte, no scales).
    assert params_total(spec) == 63_081_444_672
    assert params_total(spec, weight_dtype="bfloat16") == 116_829_156_672
    by_name = {t.name: t for t in layer_tensors(spec, 0)}
    p = "model.layers.0.mlp.experts."
    assert by_name[p + "gate_up_proj_blocks"] == TensorInfo(p + "gate_up_proj_blocks", (128, 5760, 90, 16), "uint8")
    assert by_name[p + "gate_up_proj_scales"].shape == (128, 5760, 90)
    assert by_name[p + "down_proj_blocks"].shape == (128, 2880, 90, 16)
    assert by_name[p + "down_proj_bias"] == TensorInfo(p + "down_proj_bias", (128, 2880), "bfloat16")
    assert by_name["model.layers.0.self_attn.sinks"].shape == (64,)
    assert by_name["model.layers.0.mlp.router.bias"].shape == (128,)
    deq = {t.name: t for t in layer_tensors(spec, 0, weight_dtype="bfloat16")}
    assert deq[p + "gate_up_proj"].shape == (128, 2880, 5760) and deq[p + "down_proj"].shape == (128, 2880, 2880)
    assert not any(n.endswith(("_blocks", "_scales")) for n in deq)


def test_weight_dtype_dequantizes_and_drops_scales(deepseek_v3):
    spec, tensors = deepseek_v3
    deq = checkpoint_tensors(spec, weight_dtype="bfloat16")
    assert {t.dtype for t in deq} == {"bfloat16"}
    weights = sum(t.numel for t in tensors if not t.name.endswith("_scale_inv"))
    assert sum(t.nbytes for t in deq) == 2 * weights
    llama = load_spec("llama-3.1-8b")
    assert cost_model(llama, weight_dtype="float32").layer_weight_bytes[0] == 2 * cost_model(llama).layer_weight_bytes[0]
    with pytest.raises(UserError, match="weight dtype"):
        cost_model(llama, weight_dtype="int4")


def test_kv_bytes_per_token_per_layer():
    llama = load_spec("llama-3.1-8b")
    assert cost_model(llama).kv_bytes_per_token_per_layer == 2 * 8 * 128 * 2 == 4096
    assert kv_bytes_per_token(llama, kv_dtype="fp8") == 2048
    assert kv_bytes_per_token(llama, kv_dtype="float32") == 8192
    assert kv_bytes_per_token(llama, tp=2) == 2048
    assert kv_bytes_per_token(llama, tp=8) == 512
    assert kv_bytes_per_token(llama, tp=16) == 512  # 8 kv heads over 16 ranks: one head each, replicated
    ds = load_spec("deepseek-v3")
    assert cost_model(ds).kv_bytes_per_token_per_layer == 576 * 2 == 1152
    assert kv_bytes_per_token(ds, tp=8) == 1152  # the MLA latent is not split
    assert kv_bytes_per_token(ds, kv_dtype="fp8") == 576
    assert kv_bytes_per_token(load_spec("gpt-oss-120b")) == 2 * 8 * 64 * 2  # auto: bfloat16 for MXFP4
    with pytest.raises(UserError, match="kv dtype"):
        cost_model(llama, kv_dtype="int8")


def _replicated_bytes(spec, layer):
    """Norms and the router: the tensors every TP rank holds whole."""
    return sum(t.nbytes for t in layer_tensors(spec, layer) if t.name.endswith(("layernorm.weight", ".gate.weight")))


@pytest.mark.parametrize("name, tp", [("llama-3.1-8b", 2), ("llama-3.1-8b", 8), ("qwen2.5-7b", 4), ("mixtral-8x7b-v0.1", 8)])
def test_tp_splits_everything_but_norms_and_routers(name, tp):
    spec = load_spec(name)
    one, split = cost_model(spec), cost_model(spec, tp=tp)
    replicated = _replicated_bytes(spec, 0)
    routers = spec.moe.num_experts if spec.is_moe else 0
    assert replicated == (2 + routers) * spec.hidden_size * 2
    assert tp * split.layer_weight_bytes[0] == one.layer_weight_bytes[0] + (tp - 1) * replicated
    assert tp * split.embedding_bytes == one.embedding_bytes
    assert tp * (split.head_bytes - 2 * spec.hidden_size) == one.head_bytes - 2 * spec.hidden_size


def test_tp_shapes_per_rank():
    llama = load_spec("llama-3.1-8b")
    shapes = {t.name.split(".", 3)[3]: t.shape for t in layer_tensors(llama, 5, tp=16)}
    assert shapes["self_attn.q_proj.weight"] == (256, 4096)
    assert shapes["self_attn.k_proj.weight"] == (128, 4096)  # one replicated kv head
    assert shapes["self_attn.o_proj.weight"] == (4096, 256)
    assert shapes["mlp.down_proj.weight"] == (4096, 896)
    ds = load_spec("deepseek-v3")
    shapes = {t.name.split(".", 3)[3]: t.shape for t in layer_tensors(ds, 3, tp=8)}
    assert shapes["self_attn.q_a_proj.weight"] == (1536, 7168)  # replicated
    assert shapes["self_attn.q_b_proj.weight"] == (3072, 1536)
    assert shapes["self_attn.q_b_proj.weight_scale_inv"] == (24, 12)
    assert shapes["self_attn.kv_b_proj.weight"] == (4096, 512)
    assert shapes["self_attn.o_proj.weight"] == (7168, 2048)
    assert shapes["mlp.experts.7.gate_proj.weight"] == (256, 7168)
    assert shapes["mlp.experts.7.down_proj.weight_scale_inv"] == (56, 2)
    assert shapes["mlp.gate.weight"] == (256, 7168)
    oss = load_spec("gpt-oss-120b")
    shapes = {t.name.split(".", 3)[3]: t.shape for t in layer_tensors(oss, 0, tp=2)}
    assert shapes["self_attn.sinks"] == (32,) and shapes["self_attn.o_proj.bias"] == (2880,)
    assert shapes["mlp.experts.gate_up_proj_blocks"] == (128, 2880, 90, 16)
    assert shapes["mlp.experts.down_proj_blocks"] == (128, 2880, 45, 16)
    assert shapes["mlp.experts.down_proj_bias"] == (128, 2880)
    assert embedding_tensors(oss, tp=8)[0].shape == (201088 // 8, 2880)


def test_tp_that_does_not_divide_says_which_work():
    llama = load_spec("llama-3.1-8b")
    assert valid_tp_sizes(llama) == [1, 2, 4, 8, 16, 32]
    with pytest.raises(UserError, match=r"tp 3 .* use tp in 1, 2, 4, 8, 16, 32"):
        cost_model(llama, tp=3)
    with pytest.raises(UserError, match="key/value heads"):
        check_tp(load_spec("qwen2.5-7b"), 14)  # 28 heads split, but 4 kv heads do not
    with pytest.raises(UserError, match="positive integer"):
        cost_model(llama, tp=0)


def test_cost_model_pieces_add_up_to_the_checkpoint():
    for name in ("llama-3.1-8b", "llama-3.2-1b-instruct", "qwen3-30b-a3b", "deepseek-v2-lite"):
        spec = load_spec(name)
        c = cost_model(spec)
        assert isinstance(c, CostModel) and len(c.layer_weight_bytes) == spec.num_layers
        assert c.embedding_bytes + sum(c.layer_weight_bytes) + c.tied_head_bytes == weight_bytes_total(spec)


def test_tied_head_bytes():
    tied = load_spec("llama-3.2-1b-instruct")
    c = cost_model(tied)
    assert c.tied_head_bytes == 2048 * 2  # the final norm only: the head is the embedding
    assert c.head_bytes == 2048 * 2 + 128256 * 2048 * 2 == c.tied_head_bytes + c.embedding_bytes
    assert [t.name for t in head_tensors(tied)] == ["model.norm.weight", "lm_head.weight"]
    untied = cost_model(load_spec("llama-3.1-8b"))
    assert untied.tied_head_bytes == untied.head_bytes


def test_mtp_bytes(deepseek_v3):
    spec, _ = deepseek_v3
    assert cost_model(spec).mtp_bytes == 0
    with_mtp = cost_model(spec, mtp=True)
    assert with_mtp.mtp_bytes == sum(t.nbytes for t in mtp_tensors(spec))
    assert with_mtp.mtp_bytes > 2 * 129280 * 7168 * 2
    assert cost_model(spec, tp=8, mtp=True).mtp_bytes < with_mtp.mtp_bytes
    with pytest.raises(UserError, match="no MTP"):
        cost_model(load_spec("llama-3.1-8b"), mtp=True)


def test_layer_index_out_of_range():
    with pytest.raises(IndexError):
        layer_tensors(load_spec("llama-3.1-8b"), 32)


# ----------------------------------------------------------------------------------------------
# Independent reference: tiny transformers models written with save_pretrained.

_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "U8": "uint8", "F8_E4M3": "float8_e4m3fn"}
_COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8)
_TINY = {
    "llama-tied-biases": ("LlamaConfig", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", dict(head_dim=16)),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                                         shared_expert_intermediate_size=24, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                                         decoder_sparse_step=2)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "deepseek_v2": ("DeepseekV2Config", dict(_MLA, q_lora_rank=None, n_shared_experts=2, first_k_dense_replace=1)),
    "deepseek_v3": ("DeepseekV3Config", dict(_MLA, q_lora_rank=12, n_shared_experts=1, first_k_dense_replace=1,
                                             n_group=2, topk_group=1)),
    "gpt_oss": ("GptOssConfig", dict(head_dim=8, num_local_experts=4, num_experts_per_tok=2)),
}


def _read_safetensors_header(path) -> set[tuple[str, tuple[int, ...], str]]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return {(k, tuple(v["shape"]), _SAFETENSORS_DTYPES[v["dtype"]]) for k, v in header.items()}


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """family -> (config.json dict, stored tensors, live parameter bytes of the float32 model)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    out = {}
    for family, (config_class, extra) in _TINY.items():
        config = getattr(transformers, config_class)(**(_COMMON | extra))
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        # parameters plus persistent buffers (DeepSeek's e_score_correction_bias), tied ones once
        unique = {t.data_ptr(): t for t in model.state_dict().values()}
        live = sum(t.numel() * t.element_size() for t in unique.values())
        stored = _read_safetensors_header(folder / "model.safetensors")
        out[family] = (json.loads((folder / "config.json").read_text()), stored, live)
    return out


@pytest.mark.parametrize("family", sorted(_TINY))
def test_inventory_matches_transformers_checkpoint(tiny_checkpoints, family):
    config, stored, live = tiny_checkpoints[family]
    spec = spec_from_config(config, family)
    mtp = {t.name for t in mtp_tensors(spec)}
    expected = {(t.name, t.shape, t.dtype) for t in checkpoint_tensors(spec) if t.name not in mtp}
    assert expected == stored
    # transformers does not model the MTP modules: nothing past the last decoder layer is saved
    assert not any(name.startswith(f"model.layers.{spec.num_layers}.") for name, _, _ in stored)
    # what the float32 model holds equals the planner's weight_dtype="float32" bytes
    main = [t for t in checkpoint_tensors(spec, weight_dtype="float32") if t.name not in mtp]
    assert sum(t.nbytes for t in main) == live


def test_tiny_deepseek_v3_declares_an_mtp_layer_that_is_not_saved(tiny_checkpoints):
    config, stored, _ = tiny_checkpoints["deepseek_v3"]
    spec = spec_from_config(config)
    assert spec.num_mtp_layers == 1
    names = {t.name for t in mtp_tensors(spec)}
    assert "model.layers.3.eh_proj.weight" in names and "model.layers.3.mlp.gate.e_score_correction_bias" in names
    assert not names & {name for name, _, _ in stored}


def test_tiny_families_cover_every_supported_type(tiny_checkpoints):
    types = {spec_from_config(cfg).model_type for cfg, _, _ in tiny_checkpoints.values()}
    assert types == {"llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral",
                     "deepseek_v2", "deepseek_v3", "gpt_oss"}
