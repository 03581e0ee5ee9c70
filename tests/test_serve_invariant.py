"""serve.invariant on tiny models (fast): the same bits for a token whatever shares its step.

The slow companion, tests/test_serve_batch_invariance.py, runs the real teacher.
"""

from __future__ import annotations

import pytest
import torch

from distill.export import export
from distill.quant import Int8Scheme
from serve import invariant
from serve.engine import Completion, Engine
from serve.llama import AttentionBatch, PrefillSpan
from serve.loader import load_model
from serve.sampler import SamplingParams

PARAMS = SamplingParams(max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, ignore_eos=True)


def test_fp32_linear_rows_do_not_depend_on_the_row_count():
    g = torch.Generator().manual_seed(0)
    w, v = torch.randn(96, 64, generator=g), torch.randn(64, generator=g)
    alone = invariant.linear(v[None], w)[0]
    for rows in (2, 3, 5, 7, 9, 33):
        for pos in (0, rows - 1):
            x = torch.randn(rows, 64, generator=g)
            x[pos] = v
            assert torch.equal(invariant.linear(x, w)[pos], alone), (rows, pos)


def test_a_decode_row_equals_the_same_position_in_a_prefill_chunk():
    """attend_rows gives a token the same bits as a decode row and inside a chunk."""
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, hd, length = 6, 2, 16, 21
    kv = torch.randn(64, 2 * kv_heads, hd, generator=g)
    q = torch.randn(length, heads, hd, generator=g)
    ctx = torch.arange(length)
    whole = AttentionBatch(ctx, ctx, 0, None, [PrefillSpan(0, length, ctx)], None)
    out = invariant.attend_rows(q, kv, whole)
    for window in (None, 5):
        out = invariant.attend_rows(q, kv, whole, window)
        for p in (0, 4, 13, length - 1):  # as a lone decode row with a padded slot table
            slots = torch.cat((ctx[: p + 1], torch.zeros(7, dtype=torch.long)))[None]
            decode = AttentionBatch(torch.tensor([p]), ctx[p : p + 1], 1, slots, [], None)
            assert torch.equal(invariant.attend_rows(q[p : p + 1], kv, decode, window)[0], out[p])
        # in a later chunk (positions 13..20) beside a decode row of another sequence
        chunk = AttentionBatch(
            torch.cat((torch.tensor([3]), ctx[13:])),
            torch.cat((torch.tensor([40]), ctx[13:])),
            1,
            torch.arange(40, 44)[None],
            [PrefillSpan(1, 8, ctx)],
            None,
        )
        rows = invariant.attend_rows(torch.cat((q[:1], q[13:])), kv, chunk, window)
        assert torch.equal(rows[1:], out[13:])


@pytest.fixture(scope="module", params=["fp32", "int8"])
def model(request, tiny_teacher_dir, tmp_path_factory):
    if request.param == "fp32":
        return load_model(tiny_teacher_dir)
    out = tmp_path_factory.mktemp("int8") / "export"
    return load_model(
        export(tiny_teacher_dir, out, quant="int8", scheme=Int8Scheme(embeddings=True))
    )


def fingerprint(c: Completion) -> tuple:
    return (c.token_ids, c.logprobs, c.top_logprobs)


def test_engine_outputs_are_the_same_bits_alone_batched_chunked_and_cached(model):
    g = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(0, 49152, (n,), generator=g).tolist() for n in (5, 19, 34, 19, 2)
    ]  # two of equal length
    # Each prompt alone on a fresh engine: no neighbours, no cache, one prefill chunk.
    alone = [
        fingerprint(Engine(model, num_blocks=64, block_size=8).generate([p], PARAMS)[0][0])
        for p in prompts
    ]
    batched = Engine(model, num_blocks=128, block_size=8).generate(prompts, PARAMS)
    assert [fingerprint(c[0]) for c in batched] == alone
    for chunk in (3, 16):
        engine = Engine(model, num_blocks=128, block_size=8, max_tokens_per_step=chunk)
        assert [fingerprint(c[0]) for c in engine.generate(prompts, PARAMS)] == alone
    warm = Engine(model, num_blocks=128, block_size=8)
    warm.generate([p + [7] * 9 for p in prompts], PARAMS)  # cache each prompt's full blocks
    again = warm.generate(prompts, PARAMS)
    assert sum(c[0].usage["cached_tokens"] for c in again) >= 40
    assert [fingerprint(c[0]) for c in again] == alone
