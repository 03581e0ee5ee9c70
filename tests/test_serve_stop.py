"""Stop conditions that can fire: stop strings naming special tokens, and settings that cannot
take effect refused up front. Real SmolLM2 tokenizer; the engine runs a tiny random Llama with
that tokenizer, its output scripted through the token-mask hook."""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer

from serve.detokenizer import TextStream, special_token_texts
from serve.engine import Engine
from serve.sampler import SamplingParams

IM_START, IM_END = "<|im_start|>", "<|im_end|>"


@pytest.fixture(scope="module")
def engine_tokenizer(tiny_teacher_dir) -> Tokenizer:
    """The engine's kind of tokenizer (`tokenizers`), from the same tokenizer.json."""
    return Tokenizer.from_file(str(tiny_teacher_dir / "tokenizer.json"))


def ids_of(tokenizer, text: str) -> list[int]:
    """Token ids with special tokens recognised (both tokenizer kinds)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


def stream(tokenizer, ids: list[int], stop=()) -> tuple[str, bool, int]:
    """(streamed text, whether a stop fired, tokens consumed) feeding `ids` one at a time."""
    s = TextStream(tokenizer, stop)
    out = ""
    for n, t in enumerate(ids, 1):
        delta, hit = s.add(t)
        out += delta
        for stop_string in stop:
            assert stop_string not in out  # never streamed, even in part of a delta
        if hit:
            return out + s.flush(), True, n
    return out + s.flush(), False, len(ids)


@pytest.fixture(params=["transformers", "tokenizers"])
def any_tokenizer(request, tokenizer, engine_tokenizer):
    return tokenizer if request.param == "transformers" else engine_tokenizer


def test_special_tokens_are_the_ones_decode_skips(any_tokenizer):
    specials = special_token_texts(any_tokenizer)
    assert specials[1] == IM_START and specials[2] == IM_END and len(specials) == 17
    for i, text in specials.items():
        assert any_tokenizer.decode([i], skip_special_tokens=True) == ""
        assert any_tokenizer.decode([i], skip_special_tokens=False) == text


def test_stop_string_that_is_a_special_token_stops_on_it(any_tokenizer):
    ids = ids_of(any_tokenizer, f"The answer is 42.{IM_START}assistant\nMore text")
    im_start_at = ids.index(1)
    # before the fix: decoded with specials skipped, the stop never fired
    assert IM_START not in any_tokenizer.decode(ids, skip_special_tokens=True)
    text, hit, used = stream(any_tokenizer, ids, stop=(IM_START,))
    assert hit and used == im_start_at + 1 and text == "The answer is 42."
    # a stop string spanning a special token and ordinary text
    text, hit, used = stream(any_tokenizer, ids, stop=(f"{IM_START}assistant",))
    assert hit and text == "The answer is 42."
    # the special token alone is not that string: no stop, and the text is the plain decode
    text, hit, _ = stream(any_tokenizer, ids, stop=(f"{IM_START}user",))
    assert not hit and text == any_tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_on_end_of_turn_then_newline(any_tokenizer):
    ids = ids_of(any_tokenizer, f"Hi there{IM_END}\n{IM_START}user")
    text, hit, used = stream(any_tokenizer, ids, stop=(f"{IM_END}\n",))
    assert hit and text == "Hi there" and ids[used - 1] != 2  # fired on the newline after it
    ids = ids_of(any_tokenizer, f"Hi there{IM_END}again")
    text, hit, _ = stream(any_tokenizer, ids, stop=(f"{IM_END}\n",))
    assert not hit and text == "Hi thereagain"


def test_stop_string_spelled_with_ordinary_tokens_still_fires(tokenizer):
    spelled = tokenizer.encode(
        f"x {IM_START} y", add_special_tokens=False, split_special_tokens=True
    )
    assert 1 not in spelled
    text, hit, _ = stream(tokenizer, spelled, stop=(IM_START,))
    assert hit and text == "x "


def test_streamed_text_equals_plain_decode_with_specials_mixed_in(any_tokenizer):
    """Special tokens between multibyte characters: deltas + flush == decode(skip specials)."""
    rng = random.Random(0)
    pieces = ["café ", "🙂", " naïve", "\n", "日本語", " x", IM_START, IM_END, "<|endoftext|>"]
    for trial in range(30):
        text = "".join(rng.choice(pieces) for _ in range(12))
        ids = ids_of(any_tokenizer, text)
        out, hit, _ = stream(any_tokenizer, ids, stop=("never-in-this-text",))
        assert not hit
        assert out == any_tokenizer.decode(ids, skip_special_tokens=True), (trial, text)


def scripted(script: list[int]):
    """A token-mask hook that allows exactly script[len(generated)] at each step."""

    def mask(generated: list[int]) -> torch.Tensor:
        allowed = torch.zeros(49152, dtype=torch.bool)
        allowed[script[min(len(generated), len(script) - 1)]] = True
        return allowed

    return mask


def test_engine_stops_on_a_special_token_stop_string(tiny_teacher_dir, engine_tokenizer):
    engine = Engine.from_pretrained(tiny_teacher_dir, num_blocks=32, block_size=16)
    script = ids_of(engine_tokenizer, f"Sure, here it is.{IM_START}user\nAnd more words follow")
    prompt = ids_of(engine_tokenizer, "Say something")
    base = dict(max_tokens=len(script), temperature=0, ignore_eos=True)

    def run(**kw) -> tuple:
        req = engine.add_request(prompt, SamplingParams(**base, **kw), token_mask=scripted(script))
        while engine.has_work():
            engine.step()
        (c,) = Engine.collect(req)
        return c.token_ids, c.text, c.finish_reason

    ids, text, reason = run()
    assert ids == script and reason == "length"
    assert text == engine_tokenizer.decode(script, skip_special_tokens=True)
    ids, text, reason = run(stop=[IM_START])
    assert reason == "stop" and ids == script[: script.index(1) + 1]
    assert text == "Sure, here it is."


def test_settings_that_cannot_take_effect_are_refused(tiny_teacher_dir):
    engine = Engine.from_pretrained(tiny_teacher_dir, num_blocks=8, block_size=16)
    vocab = engine.args.vocab_size
    with pytest.raises(ValueError, match=rf"stop_token_ids \[{vocab}\] reach outside the vocab"):
        engine.add_request([5, 6], SamplingParams(stop_token_ids=[vocab]))
    with pytest.raises(ValueError, match=r"stop_token_ids must be token ids >= 0, got \[-1\]"):
        SamplingParams(stop_token_ids=[-1])
    with pytest.raises(ValueError, match=r"stop must be non-empty strings, got \[''\]"):
        SamplingParams(stop=[""])
    with pytest.raises(ValueError, match=r"stop must be non-empty strings, got \[2\]"):
        SamplingParams(stop=[2])
    tokenizerless = Engine(engine.model, tokenizer=None, num_blocks=8, block_size=16)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        tokenizerless.add_request([5, 6], SamplingParams(stop=[IM_END]))
    # the boundary is accepted: the last id of the vocabulary can be generated
    engine.add_request([5, 6], SamplingParams(stop_token_ids=[vocab - 1]))
