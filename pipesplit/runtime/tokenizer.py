"""Tokenizer and chat template, from a Hugging Face folder or from GGUF metadata.

Both paths end in a `tokenizers.Tokenizer` plus the Jinja chat template the model ships, rendered
the way transformers renders it (sandboxed, trim_blocks + lstrip_blocks) and tokenized without
adding special tokens again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipesplit.errors import UserError

if TYPE_CHECKING:
    from tokenizers import Tokenizer as Backend

    from pipesplit.runtime.loader import CheckpointSource, GGUFSource


class Tokenizer:
    """encode / decode / apply_chat_template over a `tokenizers` backend."""

    def __init__(
        self,
        backend: "Backend",
        chat_template: str | None,
        eos_token_ids: set[int],
        special_tokens: dict[str, str | None] | None = None,
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.eos_token_ids = set(eos_token_ids)
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text, with the model's usual special tokens (e.g. BOS) added."""
        return self.backend.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages`, as text."""
        if not self.chat_template:
            raise UserError("this model ships no chat template; prompt it without --chat")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **self.special_tokens
        )

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        # the template writes BOS etc. itself, so nothing is added on encoding
        return self.backend.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False).ids


def _compile_template(source: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def load_tokenizer(source: "CheckpointSource") -> Tokenizer:
    """The tokenizer of a checkpoint source (Hugging Face folder or GGUF file)."""
    if source.kind == "gguf":
        return _from_gguf(source)
    return _from_folder(Path(source.path))


def load_tokenizer_or_none(source: "CheckpointSource") -> Tokenizer | None:
    """The tokenizer, or None for a checkpoint without tokenizer files (it still runs on token ids)."""
    try:
        return load_tokenizer(source)
    except UserError:
        return None


# -- Hugging Face folder ---------------------------------------------------------------------------
def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [v for v in value if isinstance(v, int)]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None


def _from_folder(folder: Path) -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"{folder} has no tokenizer.json; pipesplit needs the fast tokenizer file "
                        "(or pass token ids with --prompt-ids)")
    backend = Backend.from_file(str(folder / "tokenizer.json"))
    config = _read_json(folder / "tokenizer_config.json")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: use the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    special = {key: _token_text(config.get(key)) for key in ("bos_token", "eos_token", "unk_token", "pad_token")}

    eos: set[int] = set()
    eos_text = special.get("eos_token")
    if eos_text is not None and backend.token_to_id(eos_text) is not None:
        eos.add(backend.token_to_id(eos_text))
    for name in ("generation_config.json", "config.json"):
        eos.update(_ids(_read_json(folder / name).get("eos_token_id")))
    return Tokenizer(backend, template, eos, special)


# -- GGUF metadata ---------------------------------------------------------------------------------
# llama.cpp pre-tokenizer name -> split regexes applied in order before byte-level BPE
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {
    "default": (_GPT2_SPLIT,),
    "gpt2": (_GPT2_SPLIT,),
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "refact": (r"\p{N}", _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
}
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values matched whole in text


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str):
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = Backend(models.BPE(vocab, pairs, fuse_unk=False, ignore_merges=pre in ("llama-bpe", "llama3")))
    splits = [pre_tokenizers.Split(Regex(pattern), behavior="isolated") for pattern in _PRE_TOKENIZERS[pre]]
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _from_gguf(source: "GGUFSource") -> Tokenizer:
    from tokenizers import AddedToken, processors

    field = source.field
    model = field("tokenizer.ggml.model")
    pre = field("tokenizer.ggml.pre", "default")
    if model != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise UserError(
            f"{source.path.name}: GGUF tokenizer {model}/{pre} is not supported (supported: gpt2 byte-level BPE "
            f"with pre-tokenizer {', '.join(_PRE_TOKENIZERS)}); pass the Hugging Face folder instead"
        )
    tokens = field("tokenizer.ggml.tokens")
    backend = _byte_level_bpe(tokens, field("tokenizer.ggml.merges", []), pre)
    types = field("tokenizer.ggml.token_type") or []
    backend.add_special_tokens(
        [AddedToken(tokens[i], special=(t == _CONTROL), normalized=False) for i, t in enumerate(types)
         if t in (_CONTROL, _USER_DEFINED)]
    )

    def token(key: str) -> str | None:
        index = field(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    bos_id = field("tokenizer.ggml.bos_token_id")
    if field("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    eos = {i for i in (field("tokenizer.ggml.eos_token_id"), field("tokenizer.ggml.eot_token_id")) if i is not None}
    special = {"bos_token": token("bos"), "eos_token": token("eos"), "unk_token": token("unknown"),
               "pad_token": token("padding")}
    return Tokenizer(backend, field("tokenizer.chat_template"), eos, special)
