"""What `LLM` users read: text, stop strings, EOS and streaming, with SmolLM2 at PP 2.

The reference is transformers (its GGUF loader, tokenizer and chat template); pipesplit's
tokenizer, detokenizer and stop logic are what is under test. Stop strings are cut from the
reference text so that they start inside one token and end inside the 2nd, 3rd or 4th token after.
"""

from __future__ import annotations

import pytest

from pipesplit import LLM, SamplingParams

pytestmark = pytest.mark.slow

EOS_PROMPT = "The capital of France is"  # greedy: 29 tokens, then <|im_end|> (id 2)
JAPANESE = [{"role": "user", "content": "Say hello in Japanese."}]  # every character is 2 tokens
MULTI_TURN = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of Italy?"},
    {"role": "assistant", "content": "The capital of Italy is Rome."},
    {"role": "user", "content": "And of Spain?"},
]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    with LLM("smollm2", pp=2, dtype="float32", mem_budget_gib=0.5, log=False) as llm:
        yield llm


@pytest.fixture(scope="module")
def eos_reference(smollm2_hf, llm):
    ids = llm.tokenizer.encode(EOS_PROMPT)
    assert ids == smollm2_hf.tokenizer.encode(EOS_PROMPT)
    smollm2_hf.greedy(ids, MAX_TOKENS, stop_at_eos=False)  # one reference run serves both EOS tests
    out = smollm2_hf.greedy(ids, MAX_TOKENS)
    assert out[-1] in smollm2_hf.tokenizer.all_special_ids and len(out) < MAX_TOKENS, "the reference must end on EOS"
    return ids, out


def token_offsets(reference, ids: list[int]) -> list[int]:
    """offsets[i]: length of the reference text of the first i tokens."""
    return [len(reference.text(ids[:i])) for i in range(len(ids) + 1)]


def spanning_stop(reference, ids: list[int], span: int) -> tuple[str, int, int]:
    """(stop, cut, tokens): a stop string that starts inside token k and ends inside token k + span - 1,
    occurring first there; `cut` is where the text ends, `tokens` how many tokens are generated."""
    text, offsets = reference.text(ids), token_offsets(reference, ids)
    for k in range(len(ids) - span):
        last = k + span - 1
        if offsets[k + 1] - offsets[k] < 2:  # the stop starts after the token's first character
            continue
        stop = text[offsets[k] + 1 : offsets[last] + 1]
        if text.find(stop) == offsets[k] + 1 and stop.strip():
            return stop, offsets[k] + 1, last + 1
    raise AssertionError(f"no stop string spans {span} tokens of {text!r}")


def streamed(llm, prompt, params, chat=False):
    outputs = list(llm.stream(prompt, params, chat=chat))
    assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
    return outputs


# -- EOS -------------------------------------------------------------------------------------------
def test_eos_ends_with_finish_reason_stop(llm, smollm2_hf, eos_reference):
    ids, expected = eos_reference
    out = llm.generate(EOS_PROMPT, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))[0]
    assert list(out.prompt_token_ids) == ids
    assert list(out.token_ids) == expected and out.finish_reason == "stop"
    assert out.text == smollm2_hf.text(expected) and "<|im_end|>" not in out.text


def test_ignore_eos_continues_like_transformers_without_eos(llm, smollm2_hf, eos_reference):
    """ignore_eos (as in vLLM): EOS is generated like any token but does not end the request."""
    ids, until_eos = eos_reference
    n = MAX_TOKENS
    expected = smollm2_hf.greedy(ids, n, stop_at_eos=False)
    assert expected[: len(until_eos)] == until_eos
    out = llm.generate(EOS_PROMPT, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]
    assert list(out.token_ids) == expected and out.finish_reason == "length"
    assert out.text == smollm2_hf.text(expected)


# -- stop strings ----------------------------------------------------------------------------------
@pytest.mark.parametrize("span", [2, 3, 4])
def test_stop_string_spanning_tokens(llm, smollm2_hf, eos_reference, span):
    _, expected = eos_reference
    stop, cut, tokens = spanning_stop(smollm2_hf, expected, span)
    text = smollm2_hf.text(expected)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=("never-produced", stop))
    out = llm.generate(EOS_PROMPT, params)[0]
    assert (out.text, out.finish_reason) == (text[:cut], "stop"), stop
    assert list(out.token_ids) == expected[:tokens]  # generation ends on the token that completes the stop
    outputs = streamed(llm, EOS_PROMPT, params)
    deltas = [o.delta_text for o in outputs]
    assert "".join(deltas) == out.text and outputs[-1].finish_reason == "stop"
    # no chunk carries any part of the matched stop: everything streamed lies before the cut
    assert all(o.text == out.text[: len(o.text)] for o in outputs)


@pytest.mark.parametrize("span", [2, 4])
def test_partial_stop_that_never_completes_is_released(llm, smollm2_hf, eos_reference, span):
    _, expected = eos_reference
    prefix, cut, _ = spanning_stop(smollm2_hf, expected, span)
    text = smollm2_hf.text(expected)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=(prefix + "\u2603",))  # never generated
    outputs = streamed(llm, EOS_PROMPT, params)
    assert "".join(o.delta_text for o in outputs) == outputs[-1].text == text
    assert outputs[-1].finish_reason == "stop" and list(outputs[-1].token_ids) == expected  # ended by EOS
    # while the text ended in a prefix of the stop it was held back (and released afterwards)
    held = [smollm2_hf.text(o.token_ids)[len(o.text):] for o in outputs if not o.finished]
    held = [h for h in held if h]
    assert held and all(prefix.startswith(h) for h in held), held
    assert llm.generate(EOS_PROMPT, params)[0].text == text


# -- UTF-8 and chat ----------------------------------------------------------------------------------
def test_multi_token_characters_never_stream_a_replacement_char(llm, smollm2_hf):
    ids = smollm2_hf.chat_ids(JAPANESE)
    assert llm.tokenizer.apply_chat_template(JAPANESE) == ids
    expected = smollm2_hf.greedy(ids, 16)
    text = smollm2_hf.text(expected)
    assert "\ufffd" not in text and any("\ufffd" in smollm2_hf.text([t]) for t in expected)  # split characters
    outputs = streamed(llm, ids, SamplingParams(temperature=0, max_tokens=16))
    assert [t for o in outputs for t in o.delta_token_ids] == expected
    assert not any("\ufffd" in o.delta_text for o in outputs)
    assert "".join(o.delta_text for o in outputs) == text


def test_chat_with_assistant_turns_equals_transformers(llm, smollm2_hf):
    ids = smollm2_hf.chat_ids(MULTI_TURN)
    assert llm.tokenizer.apply_chat_template(MULTI_TURN) == ids
    expected = smollm2_hf.greedy(ids, 12)
    out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=12))[0]
    assert list(out.token_ids) == expected and out.text == smollm2_hf.text(expected)
    single = smollm2_hf.chat_ids(JAPANESE)
    assert llm.encode_prompt(JAPANESE[0]["content"], chat=True) == single
