"""Incremental detokenization gives, at every step, the text that decoding the whole output gives."""

import random

import pytest

from pipesplit.runtime.engine import IncrementalText
from pipesplit.runtime.loader import resolve_model
from pipesplit.runtime.tokenizer import load_tokenizer

TEXT = ("Naïve café — 東京タワー 🚀🎉 costs 1,234.56 €.\n\tdef f(x):\n        return x ** 2  # ok\n"
        "  leading spaces, trailing spaces   \n\nÅngström, Ærø, ß, ğ, 😀 done.")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("smollm2"))


def _check(tokenizer, ids):
    decoder = IncrementalText(tokenizer.decode)
    grown: list[int] = []
    for token in ids:
        grown.append(token)
        whole = tokenizer.decode(grown)
        got = decoder.text(grown)
        assert got == whole or (whole.endswith("\ufffd") and whole.startswith(got.rstrip("\ufffd"))), (got, whole)
        assert decoder.text(grown) == got  # asking twice changes nothing
    assert decoder.text(grown) == tokenizer.decode(grown)


def test_text_with_multibyte_characters(tokenizer):
    _check(tokenizer, tokenizer.encode(TEXT))


def test_random_tokens_including_broken_utf8(tokenizer):
    rng = random.Random(0)
    _check(tokenizer, [rng.randrange(0, 49152) for _ in range(300)])
