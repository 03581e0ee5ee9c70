"""serve's Idefics3 vision encoder + connector + Llama decoder vs transformers on a tiny random VLM."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Idefics3Config, Idefics3ForConditionalGeneration

from serve.engine import Engine
from serve.images import PatchConfig, expand_prompt, preprocess
from serve.prefix_cache import ImageSpan
from serve.sampler import SamplingParams

IMAGE_TOKEN = 300
PER_IMAGE = 4  # (64 / 16)² patches / 2² pixel shuffle


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    config = Idefics3Config(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=64, patch_size=16,
        ),
        text_config=dict(
            model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, initializer_range=0.2,
        ),
        image_token_id=IMAGE_TOKEN, scale_factor=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).eval()
    out = tmp_path_factory.mktemp("tiny-vlm")
    model.save_pretrained(out)
    return out, model


def prompt_with_images(n_images: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 290, (30,), generator=g).tolist()
    return text[:10] + [IMAGE_TOKEN] * (PER_IMAGE * n_images) + text[10:]


def test_logits_with_images_match_transformers(vlm):
    path, ref = vlm
    engine = Engine.from_pretrained(path, num_blocks=32, block_size=8)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    prompt = prompt_with_images(2)
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    req = engine.add_request(prompt, params, pixel_values=pixels)
    while engine.has_work():
        engine.step()
    (done,) = Engine.collect(req)
    full = torch.tensor([prompt + done.token_ids])
    with torch.no_grad():
        logits = ref(input_ids=full, pixel_values=pixels[None]).logits[0]
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
    assert done.token_ids == logp.argmax(-1).tolist()
    chosen = logp[torch.arange(6), torch.tensor(done.token_ids)]
    assert (chosen - torch.tensor(done.logprobs)).abs().max() <= 1e-4
    # The vision tower alone: image embeddings equal transformers' image features.
    with torch.no_grad():
        expected = ref.model.get_image_features(pixel_values=pixels[None]).pooler_output[0]
    assert (engine.vision(pixels).flatten(0, 1) - expected).abs().max() <= 1e-4


def test_int8_export_runs_its_int8_vision_tower_and_connector(vlm, tmp_path, tiny_teacher_dir):
    """An INT8 export quantizes the ViT's and the connector's linears too (W8A8): the runtime
    must run them as int8 with their scales. Casting the int8 weights to float without them
    gave a trained nano-VLM garbage answers ('izencitcit' for 'yes') with no error."""
    import copy

    from distill.export import export
    from distill.quant import Int8Scheme, to_int8

    path, ref = vlm
    out = export(path, tmp_path / "int8", quant="int8", tokenizer=tiny_teacher_dir)  # files only
    engine = Engine.from_pretrained(out, num_blocks=32, block_size=8)
    assert type(engine.vision.layers[0].qkv).__name__ == "Int8Linear"
    assert type(engine.vision.proj).__name__ == "Int8Linear"
    converted = to_int8(copy.deepcopy(ref), Int8Scheme())  # the export's numerics, in memory
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = converted.model.get_image_features(pixel_values=pixels[None]).pooler_output[0]
        fp32 = ref.model.get_image_features(pixel_values=pixels[None]).pooler_output[0]
    error = (engine.vision(pixels).flatten(0, 1) - expected).abs().max()
    assert error <= 1e-4 * expected.abs().max()
    assert (fp32 - expected).abs().max() > 20 * error  # the int8 grid is what it matched
    # and the whole model: greedy tokens and logprobs of an image prompt as the converted model's
    prompt = prompt_with_images(2)
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=True)
    req = engine.add_request(prompt, params, pixel_values=pixels)
    while engine.has_work():
        engine.step()
    (done,) = Engine.collect(req)
    with torch.no_grad():
        logits = converted(input_ids=torch.tensor([prompt + done.token_ids]),
                           pixel_values=pixels[None]).logits[0]  # fmt: skip
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
    assert done.token_ids == logp.argmax(-1).tolist()
    chosen = logp[torch.arange(6), torch.tensor(done.token_ids)]
    assert (chosen - torch.tensor(done.logprobs)).abs().max() <= 1e-3


def markup_ids(text: str) -> list[int]:
    """A stand-in tokenizer for this 320-token model: Idefics3's image markup → ids 300+, a
    newline → 10, other characters → their code point mod 290."""
    special = {"<image>": IMAGE_TOKEN, "<fake_token_around_image>": 301, "<global-img>": 302}
    special |= {f"<row_{r}_col_{c}>": 302 + 2 * (r - 1) + c for r in (1, 2) for c in (1, 2)}
    ids = []
    for piece in re.split(r"(<[^<>]+>)", text):
        ids += [special[piece]] if piece in special else [ord(ch) % 290 for ch in piece]
    return ids


def test_multi_tile_and_two_images_match_transformers(vlm):
    """A 150×100 image (2×2 grid + global view) and a 64×64 one (one view) in one prompt,
    preprocessed by serve.images: greedy tokens, logprobs and top-3 equal transformers'."""
    path, ref = vlm
    engine = Engine.from_pretrained(path, num_blocks=64, block_size=8)
    cfg = PatchConfig(tile_size=64, tokens_per_tile=PER_IMAGE, longest_edge=128)
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for w, h in ((150, 100), (64, 64))]  # fmt: skip
    patched = preprocess(images, cfg)
    assert [(p.rows, p.cols, p.views) for p in patched] == [(2, 2, 5), (0, 0, 1)]
    prompt = markup_ids(expand_prompt("User:<image>and<image>which?\nAssistant:", patched))
    pixels = torch.cat([p.pixel_values for p in patched])  # [6, 3, 64, 64]
    assert prompt.count(IMAGE_TOKEN) == 6 * PER_IMAGE
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    req = engine.add_request(prompt, params, pixel_values=pixels)
    while engine.has_work():
        engine.step()
    (done,) = Engine.collect(req)
    full = torch.tensor([prompt + done.token_ids])
    with torch.no_grad():
        logits = ref(input_ids=full, pixel_values=pixels[None]).logits[0]
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
    assert done.token_ids == logp.argmax(-1).tolist()
    chosen = logp[torch.arange(6), torch.tensor(done.token_ids)]
    assert (chosen - torch.tensor(done.logprobs)).abs().max() <= 1e-4
    for step, tops in enumerate(done.top_logprobs):
        ref_top = logp[step].topk(3)
        assert [t for t, _ in tops] == ref_top.indices.tolist()
        assert (
            max(abs(lp - r) for (_, lp), r in zip(tops, ref_top.values.tolist(), strict=True))
            <= 1e-4
        )


def test_image_bytes_are_part_of_the_prefix_cache_key(vlm):
    path, _ = vlm
    engine = Engine.from_pretrained(path, num_blocks=32, block_size=8)
    prompt = prompt_with_images(1)
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    greedy = SamplingParams(max_tokens=3, temperature=0)

    def run(px):
        req = engine.add_request(prompt, greedy, pixel_values=px)
        while engine.has_work():
            engine.step()
        return Engine.collect(req)[0]

    cold, warm = run(pixels), run(pixels)
    assert cold.usage["cached_tokens"] == 0 and warm.usage["cached_tokens"] == 32
    assert warm.token_ids == cold.token_ids
    changed = pixels.clone()
    changed[0, 0, 0, 0] += 1.0
    assert run(changed).usage["cached_tokens"] == 8  # only the block before the image is shared
    with pytest.raises(ValueError, match="image tokens"):
        engine.add_request(prompt, greedy, pixel_values=torch.randn(2, 3, 64, 64))


def test_prefill_chunks_that_cut_through_an_image_give_the_same_bits(vlm):
    """Chunks of 12 tokens over a prompt whose image tokens sit at 10..17: one chunk ends and
    the next starts inside the image. Tokens and logprobs equal the one-chunk prefill."""
    path, _ = vlm
    prompt = prompt_with_images(2)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=True)

    def run(**engine_kwargs):
        engine = Engine.from_pretrained(path, num_blocks=32, block_size=8, **engine_kwargs)
        req = engine.add_request(prompt, params, pixel_values=pixels)
        steps = 0
        while engine.has_work():
            engine.step()
            steps += 1
        return Engine.collect(req)[0], steps

    (whole, one), (chunked, many) = run(), run(max_tokens_per_step=12)
    assert many > one + 2  # the 38-token prompt really took 4 prefill steps
    assert chunked.token_ids == whole.token_ids and chunked.logprobs == whole.logprobs


def test_an_image_starting_on_a_blocks_last_token_is_part_of_that_blocks_key(vlm):
    path, _ = vlm
    engine = Engine.from_pretrained(path, num_blocks=32, block_size=8)
    g = torch.Generator().manual_seed(5)
    text = torch.randint(0, 290, (20,), generator=g).tolist()
    prompt = text[:7] + [IMAGE_TOKEN] * PER_IMAGE + text[7:]  # image tokens at 7..10
    greedy = SamplingParams(max_tokens=2, temperature=0)

    def cached(seed: int) -> int:
        px = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        req = engine.add_request(prompt, greedy, pixel_values=px)
        while engine.has_work():
            engine.step()
        return Engine.collect(req)[0].usage["cached_tokens"]

    assert cached(1) == 0 and cached(1) == 16
    assert cached(2) == 0  # another image: not even block 0 (7 text tokens + 1 image token)


def test_the_image_span_covers_exactly_the_placeholder_tokens(vlm):
    """Without `images`, the request records one span [first, last + 1) over the placeholder
    tokens of all its tiles (ImageSpan's contract: the block keys read it); given spans are
    kept as they are."""
    path, _ = vlm
    engine = Engine.from_pretrained(path, num_blocks=32, block_size=8)
    prompt = prompt_with_images(2)  # image tokens at 10 .. 17
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    params = SamplingParams(max_tokens=1, temperature=0)
    req = engine.add_request(prompt, params, pixel_values=pixels)
    ((start, end),) = [(im.start, im.end) for im in req.images]
    assert (start, end) == (10, 10 + 2 * PER_IMAGE)
    assert all(t == IMAGE_TOKEN for t in prompt[start:end]) and IMAGE_TOKEN not in prompt[end:]
    given = (ImageSpan(10, 14, b"a" * 16), ImageSpan(14, 18, b"b" * 16))
    assert engine.add_request(prompt, params, pixel_values=pixels, images=given).images == given


def test_an_image_prompt_batched_behind_two_decodes_gives_the_same_bits(vlm):
    """The image embeddings land on their own rows of the flat batch whatever precedes them:
    an image prompt prefilled in the same step as two decoding text requests (third in the
    batch, after rows of other sequences) gives the tokens and logprobs it gives alone."""
    path, _ = vlm
    prompt = prompt_with_images(1, seed=6)
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=True)
    text_params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=True)

    def finish(engine, req):
        while engine.has_work():
            engine.step()
        return Engine.collect(req)[0]

    fresh = lambda: Engine.from_pretrained(path, num_blocks=64, block_size=8)  # noqa: E731
    alone = fresh()
    want = finish(alone, alone.add_request(prompt, params, pixel_values=pixels))
    want_text = [finish(e := fresh(), e.add_request(p, text_params)) for p in ([1, 2, 3], [4] * 5)]

    engine = fresh()
    texts = [engine.add_request(p, text_params) for p in ([1, 2, 3], [4] * 5)]
    engine.step()  # both prompts prefilled: they decode from the next step on
    req = engine.add_request(prompt, params, pixel_values=pixels)
    engine.step()  # decode, decode, then this prompt's prefill: rows 2.. of the batch
    assert req.seqs[0].num_computed == len(prompt)
    assert [len(t.seqs[0].generated) for t in texts] == [2, 2]
    got = finish(engine, req)
    assert got.token_ids == want.token_ids and got.logprobs == want.logprobs
    for t, w in zip(texts, want_text, strict=True):
        c = finish(engine, t)
        assert c.token_ids == w.token_ids and c.logprobs == w.logprobs
