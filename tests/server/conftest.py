"""Server fixtures: tiny random checkpoints with a real (byte-level) tokenizer, so that the
server's text paths run against a model that answers in milliseconds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import make_tiny_checkpoint

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def add_byte_tokenizer(folder) -> None:
    """A byte-level BPE tokenizer with one id per byte (no merges): any text encodes, ids 0..255."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    assert len(vocab) == 256
    tokenizer = Tokenizer(models.BPE(vocab, [], fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory):
    folder = make_tiny_checkpoint("llama", tmp_path_factory.mktemp("fuzz") / "tiny")
    add_byte_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def long_context_model(tiny_checkpoints, tmp_path_factory) -> Path:
    """The tiny llama with the byte tokenizer and a 4,096-token context (plain rope: the weights
    do not depend on it), so that long streams are still running when a test needs them."""
    folder = tmp_path_factory.mktemp("faults") / "llama4k"
    shutil.copytree(tiny_checkpoints["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (folder / "config.json").write_text(json.dumps(config))
    add_byte_tokenizer(folder)
    return folder


