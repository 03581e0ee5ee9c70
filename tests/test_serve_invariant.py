"""serve.invariant on tiny models (fast): the same bits for a token whatever shares its step.

The slow companion, tests/test_serve_batch_invariance.py, runs the real teacher.
"""

from __future__ import annotations

import pytest
import torch

from distill.export import export
from distill.quant import Int8Scheme
from serve import invariant, paged_attention
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


@pytest.fixture(params=["kernel", "sdpa"])
def attention_path(request, monkeypatch):
    """Run a test on the compiled paged-attention kernel, then on the per-row SDPA fallback.
    The kernel must build here (g++ is part of the machine): a failed build fails the test."""
    if request.param == "kernel":
        assert paged_attention.kernel() is not None, "paged attention kernel did not build"
    else:
        monkeypatch.setattr(paged_attention, "kernel", lambda: None)
    return request.param


def test_a_decode_row_equals_the_same_position_in_a_prefill_chunk(attention_path):
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


def test_engine_outputs_are_the_same_bits_alone_batched_chunked_and_cached(model, attention_path):
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


def _ragged_batch(g: torch.Generator, pool_slots: int):
    """Three decode rows of different lengths (slot tables padded with slot 0) and two prefill
    chunks, one after a prefix; slots scattered over the pool."""
    perm = torch.randperm(pool_slots, generator=g)
    lens = (1, 37, 70)
    table = torch.zeros(3, 70, dtype=torch.long)
    for i, n in enumerate(lens):
        table[i, :n] = perm[100 * i : 100 * i + n]
    ctx_a, ctx_b = perm[400:419], perm[500:590]
    positions = torch.tensor([n - 1 for n in lens] + list(range(19)) + list(range(80, 90)))
    slots = torch.cat((table[torch.arange(3), torch.tensor(lens) - 1], ctx_a, ctx_b[80:]))
    spans = [PrefillSpan(3, 19, ctx_a), PrefillSpan(22, 10, ctx_b)]
    return AttentionBatch(positions, slots, 3, table, spans, None)


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize(("heads", "kv_heads", "hd"), [(9, 3, 64), (4, 2, 128), (6, 2, 24)])
def test_kernel_matches_per_row_sdpa(monkeypatch, window, heads, kv_heads, hd):
    """The compiled kernel and the SDPA fallback compute the same attention (within float32
    rounding) for decode rows and prefill chunks, any head size (64 and 128 take the AVX2 path
    on x86; 24 the generic one), causal or windowed."""
    g = torch.Generator().manual_seed(hd)
    kv = torch.randn(1024, 2 * kv_heads, hd, generator=g)
    batch = _ragged_batch(g, 1024)
    q = torch.randn(len(batch.positions), heads, hd, generator=g)
    assert paged_attention.kernel() is not None
    fast = invariant.attend_rows(q, kv, batch, window)
    monkeypatch.setattr(paged_attention, "kernel", lambda: None)
    slow = invariant.attend_rows(q, kv, batch, window)
    assert torch.allclose(fast, slow, atol=2e-6, rtol=1e-5), (fast - slow).abs().max()


def test_kernel_refuses_ranges_outside_its_inputs():
    kv, q = torch.zeros(32, 4, 64), torch.zeros(2, 4, 64)
    slots = torch.arange(8)
    with pytest.raises(RuntimeError, match="range leaves slot_ids"):
        paged_attention.attend(q, kv, slots, torch.tensor([0, 4]), torch.tensor([4, 5]))
    with pytest.raises(RuntimeError, match="no keys"):
        paged_attention.attend(q, kv, slots, torch.tensor([0, 4]), torch.tensor([4, 0]))
    with pytest.raises(RuntimeError, match="outside the pool"):
        paged_attention.attend(
            q, kv, torch.tensor([0, 1, 2, 99]), torch.tensor([0, 0]), torch.tensor([4, 4])
        )
