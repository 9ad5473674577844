"""ModelSpec from real Hugging Face configs: dispatch, fields, loading and errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from pipesplit.errors import UserError
from pipesplit.planner.spec import HUB_IDS, ModelSpec, catalog_names, load_spec, spec_from_config

BUILT_IN = {
    "deepseek-v2-lite", "deepseek-v3", "gpt-oss-120b", "llama-3.1-70b-instruct", "llama-3.1-8b",
    "llama-3.2-1b-instruct", "mixtral-8x7b-v0.1", "qwen2.5-7b", "qwen3-235b-a22b-instruct-2507",
    "qwen3-30b-a3b", "qwen3-8b", "smollm2",
    "qwen3-32b", "llama-3.3-70b-instruct", "gpt-oss-20b", "gemma-3-27b", "glm-4.5", "qwen3-235b-a22b-fp8",
}

LLAMA_TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 100,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
}


def config_of(name: str) -> dict:
    return dict(load_spec(name).config)


def test_catalog_names_are_the_packaged_configs():
    assert set(catalog_names()) == BUILT_IN == set(HUB_IDS)
    assert catalog_names() == sorted(catalog_names())


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_every_built_in_loads(name):
    spec = load_spec(name)
    assert spec.name == name
    assert len(spec.mlp_kinds) == len(spec.layer_types) == spec.num_layers


def test_built_in_names_are_case_insensitive():
    assert load_spec("DeepSeek-V3") == load_spec("deepseek-v3")


def test_smollm2_matches_the_hub_config():
    s = load_spec("smollm2")
    assert (s.architecture, s.family, s.hidden_size, s.num_layers) == ("LlamaForCausalLM", "llama", 576, 30)
    assert (s.num_attention_heads, s.num_kv_heads, s.head_dim, s.intermediate_size) == (9, 3, 64, 1536)
    assert (s.vocab_size, s.tie_word_embeddings, s.rope_theta, s.max_position_embeddings) == (49152, True, 100000.0, 8192)
    assert (s.rms_norm_eps, s.torch_dtype, s.bos_token_id, s.eos_token_ids) == (1e-5, "bfloat16", 1, (2,))


def test_llama_fields():
    s = load_spec("llama-3.1-8b")
    assert (s.model_type, s.family, s.head_dim, s.num_kv_heads) == ("llama", "llama", 128, 8)
    assert s.rope_theta == 500000.0 and s.rope_scaling["rope_type"] == "llama3"
    assert not (s.attention_bias or s.o_proj_bias or s.qk_norm or s.is_moe or s.tie_word_embeddings)
    assert s.mla is None and s.moe is None and s.quantization.method == "none"
    assert load_spec("llama-3.1-70b-instruct").eos_token_ids == (128001, 128008, 128009)


def test_qwen2_has_qkv_bias_but_no_o_bias_and_qwen3_has_qk_norm():
    q2 = load_spec("qwen2.5-7b")
    assert q2.attention_bias and not q2.o_proj_bias and not q2.qk_norm
    q3 = load_spec("qwen3-8b")
    assert q3.qk_norm and not q3.attention_bias and q3.head_dim == 128


def test_qwen3_moe_layers_and_experts():
    s = load_spec("qwen3-30b-a3b")
    assert s.family == "mixtral" and s.mlp_kinds == ("moe",) * 48
    assert (s.moe.num_experts, s.moe.num_experts_per_tok, s.moe.intermediate_size) == (128, 8, 768)
    assert s.moe.norm_topk_prob and s.moe.num_shared_experts == 0
    cfg = config_of("qwen3-30b-a3b") | {"mlp_only_layers": [0, 5], "decoder_sparse_step": 2}
    kinds = spec_from_config(cfg).mlp_kinds
    assert [i for i, k in enumerate(kinds) if k == "moe"] == [i for i in range(48) if i % 2 == 1 and i != 5]


def test_qwen2_moe_shared_expert_and_gate():
    cfg = {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "hidden_size": 2048,
        "intermediate_size": 5632, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
        "num_experts": 60, "num_experts_per_tok": 4, "num_attention_heads": 16, "num_key_value_heads": 16,
        "num_hidden_layers": 24, "vocab_size": 151936, "max_position_embeddings": 8192, "rope_theta": 1e6,
        "mlp_only_layers": [], "decoder_sparse_step": 1, "norm_topk_prob": False,
    }
    s = spec_from_config(cfg, "qwen1.5-moe")
    assert s.attention_bias and not s.o_proj_bias
    assert (s.moe.num_shared_experts, s.moe.shared_intermediate_size, s.moe.shared_expert_gate) == (1, 5632, True)


def test_mixtral_fields():
    s = load_spec("mixtral-8x7b-v0.1")
    assert s.family == "mixtral" and s.mlp_kinds == ("moe",) * 32
    assert (s.moe.num_experts, s.moe.num_experts_per_tok, s.moe.intermediate_size) == (8, 2, 14336)
    assert s.layer_types == ("full_attention",) * 32 and s.sliding_window is None


def test_deepseek_v3_fields():
    s = load_spec("deepseek-v3")
    assert (s.model_type, s.family, s.num_layers, s.num_mtp_layers) == ("deepseek_v3", "deepseek", 61, 1)
    assert s.mlp_kinds == ("dense",) * 3 + ("moe",) * 58 and s.mtp_mlp_kinds == ("moe",)
    assert s.mla.q_lora_rank == 1536 and s.mla.kv_lora_rank == 512 and s.mla.kv_cache_dim == 576
    assert s.head_dim == 192
    m = s.moe
    assert (m.num_experts, m.num_experts_per_tok, m.intermediate_size) == (256, 8, 2048)
    assert (m.num_shared_experts, m.shared_intermediate_size) == (1, 2048)
    assert (m.scoring_func, m.topk_method, m.n_group, m.topk_group) == ("sigmoid", "noaux_tc", 8, 4)
    assert m.score_correction_bias and m.norm_topk_prob and m.routed_scaling_factor == 2.5
    assert s.quantization.method == "fp8" and s.quantization.weight_block_size == (128, 128)
    assert s.torch_dtype == "bfloat16"


def test_deepseek_v2_lite_fields():
    s = load_spec("deepseek-v2-lite")
    assert s.mla.q_lora_rank is None and s.num_mtp_layers == 0
    assert s.mlp_kinds == ("dense",) + ("moe",) * 26
    m = s.moe
    assert (m.num_shared_experts, m.shared_intermediate_size, m.scoring_func) == (2, 2816, "softmax")
    assert not m.score_correction_bias and m.topk_method == "greedy"


def test_deepseek_moe_layer_freq():
    cfg = config_of("deepseek-v2-lite") | {"moe_layer_freq": 2, "first_k_dense_replace": 3}
    kinds = spec_from_config(cfg).mlp_kinds
    assert [i for i, k in enumerate(kinds) if k == "moe"] == list(range(4, 27, 2))


def test_gpt_oss_fields():
    s = load_spec("gpt-oss-120b")
    assert (s.family, s.num_layers, s.head_dim, s.num_kv_heads) == ("gpt_oss", 36, 64, 8)
    assert s.attention_bias and s.o_proj_bias and s.attention_sinks
    assert s.moe.router_bias and s.moe.expert_bias and s.moe.num_experts == 128 and s.moe.num_experts_per_tok == 4
    assert s.quantization.method == "mxfp4" and "model.embed_tokens" in s.quantization.modules_to_not_convert
    assert s.layer_types[:2] == ("sliding_attention", "full_attention") and s.sliding_window == 128
    assert s.rope_scaling["rope_type"] == "yarn" and s.rope_theta == 150000.0


def test_kimi_k2_dispatches_on_architecture():
    cfg = config_of("deepseek-v3") | {"model_type": "kimi_k2", "n_routed_experts": 384, "num_nextn_predict_layers": 0}
    s = spec_from_config(cfg, "kimi-k2")
    assert (s.model_type, s.family, s.architecture) == ("deepseek_v3", "deepseek", "DeepseekV3ForCausalLM")
    assert s.moe.num_experts == 384 and s.num_mtp_layers == 0


def test_model_type_alone_and_architecture_alone_dispatch():
    no_arch = {k: v for k, v in LLAMA_TINY.items() if k != "architectures"}
    assert spec_from_config(no_arch).architecture == "LlamaForCausalLM"
    no_type = {k: v for k, v in config_of("qwen3-8b").items() if k != "model_type"}
    assert spec_from_config(no_type).model_type == "qwen3"


def test_dtype_key_and_default():
    assert spec_from_config(LLAMA_TINY).torch_dtype == "bfloat16"
    assert spec_from_config(LLAMA_TINY | {"dtype": "float32"}).torch_dtype == "float32"
    assert spec_from_config(LLAMA_TINY | {"torch_dtype": "float16"}).torch_dtype == "float16"


def test_transformers5_rope_parameters():
    cfg = {k: v for k, v in LLAMA_TINY.items() if k != "rope_theta"}
    s = spec_from_config(cfg | {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}})
    assert s.rope_theta == 5e5 and s.rope_scaling == {"rope_type": "llama3", "factor": 8.0}
    plain = spec_from_config(cfg | {"rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}})
    assert plain.rope_scaling is None


def test_head_dim_defaults_to_hidden_over_heads():
    assert spec_from_config(LLAMA_TINY).head_dim == 8
    assert spec_from_config(LLAMA_TINY | {"head_dim": 16}).head_dim == 16


def test_spec_is_frozen_and_ignores_raw_config_in_equality():
    s = spec_from_config(LLAMA_TINY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.num_layers = 3
    assert s == spec_from_config(LLAMA_TINY | {"initializer_range": 0.5})


def test_load_from_folder_and_config_path(tmp_path):
    folder = tmp_path / "My-Model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_TINY))
    assert load_spec(str(folder)).name == "My-Model"
    assert load_spec(str(folder / "config.json")).name == "My-Model"
    other = tmp_path / "tiny.json"
    other.write_text(json.dumps(LLAMA_TINY))
    assert load_spec(str(other)).name == "tiny"


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="smollm2") as e:
        load_spec("no-such-model")
    assert "deepseek-v3" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="holds no config.json"):
        load_spec(str(tmp_path))
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_spec(str(bad))


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(UserError) as e:
        spec_from_config({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg and "LlamaForCausalLM" in msg and "DeepseekV3ForCausalLM" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "change, key",
    [
        ({"hidden_size": None}, "hidden_size"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"num_attention_heads": 7}, "num_attention_heads"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
        ({"torch_dtype": "int8"}, "torch_dtype"),
        ({"rope_theta": -1}, "rope_theta"),
        ({"quantization_config": {"quant_method": "fp8"}}, "weight_block_size"),
        ({"quantization_config": {"quant_method": "awq"}}, "awq"),
        ({"quantization_config": {"quant_method": "mxfp4"}}, "gpt_oss"),
    ],
)
def test_malformed_config_names_the_key(change, key):
    cfg = dict(LLAMA_TINY)
    for k, v in change.items():
        if v is None:
            del cfg[k]
        else:
            cfg[k] = v
    with pytest.raises(UserError, match=key):
        spec_from_config(cfg)


def test_moe_config_without_expert_keys():
    cfg = {k: v for k, v in config_of("qwen3-30b-a3b").items() if k != "moe_intermediate_size"}
    with pytest.raises(UserError, match="moe_intermediate_size"):
        spec_from_config(cfg)
    with pytest.raises(UserError, match="num_experts_per_tok"):
        spec_from_config(config_of("mixtral-8x7b-v0.1") | {"num_experts_per_tok": 9})


def test_direct_construction_is_validated():
    good = spec_from_config(LLAMA_TINY)
    with pytest.raises(UserError, match="mlp_kinds"):
        dataclasses.replace(good, mlp_kinds=("dense",))
    with pytest.raises(UserError, match="MoE layers"):
        dataclasses.replace(good, mlp_kinds=("dense", "moe"))
    assert isinstance(good, ModelSpec) and good.mlp_kind(1) == "dense"


def test_planner_modules_import_without_torch_or_numpy():
    code = "import sys, pipesplit.planner.spec, pipesplit.planner.costs; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_gemma3_multimodal_config_plans_its_text_model():
    """gemma-3-27b-it's config.json nests the text model in text_config and omits its defaults."""
    config = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": {"head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504, "model_type": "gemma3_text",
                        "num_attention_heads": 32, "num_hidden_layers": 62, "num_key_value_heads": 16,
                        "query_pre_attn_scalar": 168, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                        "sliding_window": 1024},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152},
    }
    spec = spec_from_config(config)
    built_in = load_spec("gemma-3-27b")
    assert (spec.architecture, spec.family) == ("Gemma3ForCausalLM", "gemma")
    assert spec.layer_types == built_in.layer_types and spec.layer_types.count("full_attention") == 10
    assert (spec.vocab_size, spec.tie_word_embeddings, spec.sliding_window) == (262208, True, 1024)
    assert spec.qk_norm and spec.gemma is not None


def test_gemma2_alternates_sliding_and_full():
    spec = spec_from_config({"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 64,
                             "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "head_dim": 16, "intermediate_size": 128, "vocab_size": 100,
                             "max_position_embeddings": 64, "sliding_window": 32})
    assert spec.layer_types == ("sliding_attention", "full_attention") * 2 and not spec.qk_norm


def test_glm45_layout():
    spec = load_spec("glm-4.5")
    assert (spec.family, spec.num_layers, spec.num_mtp_layers) == ("glm4_moe", 92, 1)
    assert spec.mlp_kinds[:4] == ("dense", "dense", "dense", "moe") and spec.mtp_mlp_kinds == ("moe",)
    assert spec.attention_bias and not spec.o_proj_bias and spec.qk_norm
    assert spec.moe.num_shared_experts == 1 and spec.moe.score_correction_bias and spec.moe.scoring_func == "sigmoid"


def test_planned_only_families_say_so_at_run_time():
    from pipesplit.runtime.models import family_module

    with pytest.raises(UserError, match="can be planned but not run yet"):
        family_module(load_spec("glm-4.5"))
    assert family_module(load_spec("gemma-3-27b")).__name__.endswith(".gemma")  # gemma runs (issue 12)
