"""Engine behaviour on a tiny random Llama saved with save_pretrained and loaded like the server does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.models.tiny import save_tiny_llama
from serve.engine import Completion, Engine
from serve.sampler import SamplingParams

VOCAB = 320
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # A wide init so the random model's greedy outputs vary instead of repeating one token.
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"), vocab_size=VOCAB, initializer_range=0.3)


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (k,), generator=g).tolist() for k in lengths]


def one_at_a_time(engine: Engine, ps, params=GREEDY) -> list[list[int]]:
    return [engine.generate([p], params)[0][0].token_ids for p in ps]


def test_greedy_same_with_and_without_batching_and_prefix_cache(model_dir):
    shared = prompts(1, seed=5, lo=40, hi=41)[0]
    ps = [shared + p for p in prompts(5, seed=6)] + prompts(3, seed=7)
    alone = one_at_a_time(Engine.from_pretrained(model_dir, num_blocks=64, block_size=8), ps)
    assert len({tuple(t) for t in alone}) > 1
    # Batched, with small chunks so prompts prefill over several steps beside running decodes.
    engine = Engine.from_pretrained(model_dir, num_blocks=128, block_size=8, max_tokens_per_step=16)
    first = engine.generate(ps, GREEDY)
    assert [c[0].token_ids for c in first] == alone
    # Again on the warm engine: prompts now reuse cached blocks.
    second = engine.generate(ps, GREEDY)
    assert [c[0].token_ids for c in second] == alone
    assert all(c[0].usage["cached_tokens"] >= 40 for c in second[:5])
    assert first[0][0].usage["cache_creation_tokens"] >= 40


def test_reused_prefix_blocks_survive_churn_in_a_small_pool(model_dir):
    """A running sequence's cached prefix blocks are not evicted for other requests: with a
    10-block pool, a long request reusing 4 cached blocks decodes beside short requests that
    take every other block, and all outputs equal each prompt alone on a fresh engine."""
    shared = prompts(1, seed=30, lo=33, hi=34)[0]
    long_prompt = shared + [5, 6, 7]  # 36 tokens: reuses the 4 full blocks of `shared`
    long_params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    short_params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    churn = prompts(6, seed=31, lo=6, hi=9)  # ≤ 16 tokens each: 2 blocks
    fresh = lambda: Engine.from_pretrained(model_dir, num_blocks=64, block_size=8)  # noqa: E731
    want_long = fresh().generate([long_prompt], long_params)[0][0].token_ids
    want_churn = [fresh().generate([p], short_params)[0][0].token_ids for p in churn]

    engine = Engine.from_pretrained(model_dir, num_blocks=10, block_size=8)
    engine.generate([shared], SamplingParams(max_tokens=1, temperature=0))  # caches 4 blocks
    long_req = engine.add_request(long_prompt, long_params)
    short_reqs = [engine.add_request(p, short_params) for p in churn]
    engine.step()
    assert long_req.cached_tokens == 32
    while engine.has_work():
        engine.step()
    assert Engine.collect(long_req)[0].token_ids == want_long
    assert [Engine.collect(r)[0].token_ids for r in short_reqs] == want_churn
    assert engine.pool.num_available() == 10


def test_cached_prefix_prefills_only_the_rest(model_dir):
    engine = Engine.from_pretrained(model_dir, num_blocks=64, block_size=8)
    p = prompts(1, seed=3, lo=30, hi=31)[0]
    cold = engine.generate([p], GREEDY)[0][0]
    warm = engine.generate([p], GREEDY)[0][0]
    # 3 full blocks of prompt are newly cached; the 6 tokens of the last block are not.
    assert cold.usage["cached_tokens"] == 0 and cold.usage["cache_creation_tokens"] == 24
    # 29 usable tokens → 3 full blocks of 8 reused; the last token is always recomputed.
    assert warm.usage["cached_tokens"] == 24 and warm.usage["cache_creation_tokens"] == 0
    assert warm.token_ids == cold.token_ids
    other_tenant = engine.generate([p], GREEDY, salt="tenant-b")[0][0]
    assert other_tenant.usage["cached_tokens"] == 0


def test_abort_frees_blocks_at_once(model_dir):
    engine = Engine.from_pretrained(model_dir, num_blocks=32, block_size=8)
    total = engine.pool.num_available()
    req = engine.add_request(
        prompts(1, lo=30, hi=31)[0], SamplingParams(max_tokens=50, temperature=0)
    )
    for _ in range(3):
        engine.step()
    assert engine.pool.num_available() < total
    assert engine.abort(req.request_id)
    assert engine.pool.num_available() == total
    assert not engine.has_work() and engine.step() == []
    assert not engine.abort(req.request_id)


def test_paused_request_does_not_block_others(model_dir):
    engine = Engine.from_pretrained(model_dir, num_blocks=64, block_size=8)
    slow = engine.add_request([1, 2, 3], GREEDY, queue_size=2)
    fast = engine.add_request([4, 5, 6], GREEDY)
    for _ in range(8):
        engine.step()
    assert slow.outputs.qsize() == 2 and slow.paused  # not consumed: paused after 2 tokens
    assert fast.outputs.qsize() == 8
    slow.outputs.get_nowait()  # the consumer reads one → the request runs one more step
    engine.step()
    assert slow.outputs.qsize() == 2 and fast.outputs.qsize() == 9
    while engine.has_work():
        engine.step()
        while not slow.outputs.empty():
            slow.outputs.get_nowait()
    assert fast.seqs[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible(model_dir):
    engine = Engine.from_pretrained(model_dir, num_blocks=64, block_size=8)
    p = prompts(1, seed=9)[0]

    def run(seed, **kw):
        params = SamplingParams(max_tokens=16, temperature=1.0, seed=seed, ignore_eos=True, **kw)
        return [c.token_ids for c in engine.generate([p], params)[0]]

    assert run(1) == run(1)
    assert run(1) != run(2)
    n3 = run(4, n=3, top_k=50, top_p=0.9)
    assert n3 == run(4, n=3, top_k=50, top_p=0.9) and len({tuple(c) for c in n3}) == 3


def test_n_choices_share_one_prompt_prefill(model_dir):
    engine = Engine.from_pretrained(model_dir, num_blocks=64, block_size=8)
    p = prompts(1, seed=12, lo=33, hi=34)[0]
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=3, n=3)
    req = engine.add_request(p, params, salt="n3")
    engine.step()  # choice 1 prefills all 33 tokens; choices 2 and 3 wait for it
    assert [s.num_computed for s in req.seqs] == [33, 0, 0]
    engine.step()  # choices 2 and 3 reuse its 4 full blocks: the same physical blocks
    assert req.seqs[1].blocks[:4] == req.seqs[2].blocks[:4] == req.seqs[0].blocks[:4]
    while engine.has_work():
        engine.step()
    choices = Engine.collect(req)
    assert len(choices) == 3
    # Billed once: the prompt is 33 tokens, none came from an earlier request's cache.
    assert choices[0].usage == {
        "prompt_tokens": 33,
        "completion_tokens": 15,
        "cached_tokens": 0,
        "cache_creation_tokens": 32,
    }


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("length", [7, 8, 9, 15, 16, 17, 21, 24, 25])
def test_usage_counts_add_up_over_n_lengths_and_cache_states(model_dir, n, length):
    """prompt counted once whatever n; cached + uncached = prompt; creation ≤ uncached —
    cold, warm (the same prompt again) and partly warm (a shared prefix)."""
    bs = 8
    engine = Engine.from_pretrained(model_dir, num_blocks=64, block_size=bs)
    p = prompts(1, seed=length, lo=length, hi=length + 1)[0]
    params = SamplingParams(max_tokens=3, temperature=1.0, seed=0, n=n, ignore_eos=True)

    def usage(prompt):
        (choices,) = engine.generate([prompt], params)
        assert len({id(c.usage) for c in choices}) == 1  # one usage per request
        return choices[0].usage

    cold, warm = usage(p), usage(p)
    assert cold == {
        "prompt_tokens": length,
        "completion_tokens": 3 * n,
        "cached_tokens": 0,
        "cache_creation_tokens": length // bs * bs,
    }
    # The last prompt token is always recomputed (its logits pick the first output token).
    assert warm["cached_tokens"] == (length - 1) // bs * bs
    assert warm["cache_creation_tokens"] == 0 and warm["prompt_tokens"] == length
    longer = usage(p + [5] * 9)  # shares p's full blocks, then 9 new tokens
    assert longer["cached_tokens"] == length // bs * bs
    assert longer["cache_creation_tokens"] == (length + 9) // bs * bs - length // bs * bs


def test_token_mask_hook_constrains_sampling(model_dir):
    engine = Engine.from_pretrained(model_dir, num_blocks=64, block_size=8)
    allowed = torch.zeros(VOCAB, dtype=torch.bool)
    allowed[[7, 11, 13]] = True

    for temperature in (0.0, 1.0):
        seen = []

        def mask(generated, seen=seen):
            seen.append(list(generated))
            return allowed

        params = SamplingParams(max_tokens=6, temperature=temperature, seed=0, ignore_eos=True)
        req = engine.add_request([1, 2, 3], params, token_mask=mask)
        while engine.has_work():
            engine.step()
        out = Engine.collect(req)[0].token_ids
        assert set(out) <= {7, 11, 13} and len(out) == 6
        # Called once per sampled token with the tokens generated so far, never the prompt.
        assert seen == [out[:i] for i in range(6)]


def test_stop_token_ids_max_tokens_and_length(model_dir):
    engine = Engine.from_pretrained(model_dir, num_blocks=64, block_size=8)
    p = prompts(1, seed=11)[0]
    (free,) = engine.generate([p], GREEDY)[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    stop_at = free.token_ids[4]
    params = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop_at,))
    (stopped,) = engine.generate([p], params)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(stop_at) + 1]


def test_memory_budget_waits_or_rejects(model_dir):
    engine = Engine.from_pretrained(model_dir, num_blocks=6, block_size=8)  # 48 tokens
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request([1] * 30, SamplingParams(max_tokens=30))
    a = engine.add_request([1] * 20, SamplingParams(max_tokens=12, temperature=0))  # 4 blocks
    b = engine.add_request([2] * 20, SamplingParams(max_tokens=12, temperature=0))
    engine.step()
    assert a.seqs[0].status.value == "running" and b.seqs[0].status.value == "waiting"
    while engine.has_work():
        engine.step()
    assert len(Engine.collect(b)[0].token_ids) == 12


def test_invalid_requests_get_clear_errors(model_dir):
    engine = Engine.from_pretrained(model_dir, num_blocks=8, block_size=8)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(ValueError, match="outside"):
        engine.add_request([VOCAB], GREEDY)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request([1], SamplingParams(stop=("x",)))
    with pytest.raises(ValueError, match="top_logprobs"):
        SamplingParams(top_logprobs=21)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_engine_applies_repetition_penalties(model_dir):
    """The engine hands each row's generated tokens to the sampler: a strong frequency
    penalty makes greedy decoding stop repeating tokens."""
    engine = Engine.from_pretrained(model_dir, num_blocks=64, block_size=8)
    p = prompts(1, seed=21)[0]
    plain = engine.generate([p], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    penalised = engine.generate(
        [p], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, frequency_penalty=2.0)
    )
    plain_ids, penalised_ids = plain[0][0].token_ids, penalised[0][0].token_ids
    assert len(set(plain_ids)) < len(plain_ids)  # the random model repeats itself
    assert len(set(penalised_ids)) > len(set(plain_ids))


def test_kv_memory_sizes_the_block_pool(model_dir):
    """Without num_blocks the pool holds kv_memory_bytes of fp32 K and V (at least one block)."""
    from serve.loader import load_model

    model = load_model(model_dir)
    a = model.args
    per_block = 2 * a.num_layers * a.num_kv_heads * a.head_dim * 4 * 8  # K and V, fp32, 8 slots
    engine = Engine(model, kv_memory_bytes=10 * per_block + per_block // 2, block_size=8)
    assert engine.pool.num_blocks == 10 and engine.kv.kv.shape[1] == 10 * 8
    assert engine.kv.bytes_per_slot * 8 == per_block
    assert Engine(model, kv_memory_bytes=per_block - 1, block_size=8).pool.num_blocks == 1
    assert Engine(model, num_blocks=3, block_size=8).pool.num_blocks == 3


def test_add_request_accepts_the_edges_and_rejects_just_past_them(model_dir):
    engine = Engine.from_pretrained(model_dir, num_blocks=300, block_size=8)
    ctx = engine.args.max_position_embeddings
    engine.add_request([0, VOCAB - 1], GREEDY, request_id="edges")
    with pytest.raises(ValueError, match="outside"):
        engine.add_request([-1, 5], GREEDY)
    with pytest.raises(ValueError, match=f"{ctx} tokens; the context length is {ctx}"):
        engine.add_request([1] * ctx, GREEDY)
    near = engine.add_request([1] * (ctx - 1), SamplingParams(max_tokens=50), request_id="near")
    assert near.seqs[0].max_len == ctx  # max_tokens is cut at the context length
    engine.add_request([1], SamplingParams(stop_token_ids=(VOCAB - 1,)), request_id="stop-ok")
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.add_request([1], SamplingParams(stop_token_ids=(3, VOCAB)))
    engine.add_request([1], SamplingParams(n=2), queue_size=2, request_id="queue-ok")
    with pytest.raises(ValueError, match="queue_size 1 cannot hold one output of each of n=2"):
        engine.add_request([1], SamplingParams(n=2), queue_size=1)
    with pytest.raises(ValueError, match="'edges' is already running"):
        engine.add_request([1], GREEDY, request_id="edges")
    auto = engine.add_request([1], GREEDY)
    assert auto.request_id.startswith("req-") and auto.request_id in engine.requests
    assert engine.requests["edges"].prompt == [0, VOCAB - 1]


def test_eos_stops_unless_ignored(model_dir):
    engine = Engine.from_pretrained(model_dir, num_blocks=64, block_size=8)
    p = prompts(1, seed=11)[0]
    (free,) = engine.generate([p], GREEDY)[0]
    eos = free.token_ids[3]
    first = free.token_ids.index(eos)
    with_eos = Engine.from_pretrained(model_dir, num_blocks=64, block_size=8, eos_token_ids=[eos])
    plain = SamplingParams(max_tokens=12, temperature=0)
    (stopped,) = with_eos.generate([p], plain)[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[: first + 1]
    (ignored,) = with_eos.generate([p], GREEDY)[0]  # ignore_eos=True
    assert ignored.finish_reason == "length" and ignored.token_ids == free.token_ids


def test_choice_i_is_seeded_with_seed_plus_i(model_dir):
    """n choices of seed s are the single choices of seeds s, s + 1, …: any one is reproducible."""
    engine = Engine.from_pretrained(model_dir, num_blocks=64, block_size=8)
    p = prompts(1, seed=13)[0]
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=40, n=3, ignore_eos=True)
    together = [c.token_ids for c in engine.generate([p], params)[0]]
    alone = [
        engine.generate([p], SamplingParams(**{**vars(params), "n": 1, "seed": 40 + i}))[0][0]
        for i in range(3)
    ]
    assert together == [c.token_ids for c in alone]


def test_usage_refuses_counts_that_break_its_invariants(model_dir):
    engine = Engine.from_pretrained(model_dir, num_blocks=64, block_size=8)
    req = engine.add_request(list(range(1, 18)), GREEDY)
    assert engine.usage(req) == {
        "prompt_tokens": 17, "completion_tokens": 0, "cached_tokens": 0,
        "cache_creation_tokens": 0,
    }  # fmt: skip
    req.cached_tokens = 17  # the whole prompt cached: allowed
    assert engine.usage(req)["cached_tokens"] == 17
    req.cached_tokens = 18
    with pytest.raises(RuntimeError, match="usage invariants"):
        engine.usage(req)
    req.cached_tokens = -1
    with pytest.raises(RuntimeError, match="usage invariants"):
        engine.usage(req)
    req.cached_tokens, req.created_blocks = 0, {0, 1}  # 16 of 17 uncached tokens: allowed
    assert engine.usage(req)["cache_creation_tokens"] == 16
    req.cached_tokens = 8  # 16 created > 9 uncached
    with pytest.raises(RuntimeError, match="usage invariants"):
        engine.usage(req)


def test_collect_returns_text_logprobs_and_finish_per_choice(model_dir):
    engine = Engine.from_pretrained(model_dir, num_blocks=64, block_size=8)
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=True, top_logprobs=2, n=2)
    req = engine.add_request(prompts(1, seed=14)[0], params)
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert not engine.requests  # a finished request leaves the engine (nothing to abort)
    assert {o.request_id for o in outs} == {req.request_id}
    choices = Engine.collect(req)
    assert len(choices) == 2 and choices[0].token_ids == choices[1].token_ids  # greedy
    for i, c in enumerate(choices):
        mine = [o for o in outs if o.index == i]
        assert c.token_ids == [o.token_id for o in mine] and len(c.token_ids) == 4
        assert c.logprobs == [o.logprob for o in mine] and all(lp < 0 for lp in c.logprobs)
        assert [len(t) for t in c.top_logprobs] == [2] * 4
        assert c.top_logprobs[0][0][0] == c.token_ids[0]  # greedy picks the top entry
        assert c.finish_reason == "length" and c.text == ""  # no tokenizer: no text
    assert choices[0].usage is choices[1].usage and choices[0].usage["completion_tokens"] == 8
    assert Engine.collect(req) == [
        Completion([], "", None, [], [], None) for _ in range(2)
    ]  # drained: nothing left


def test_error_messages_are_exact(model_dir):
    engine = Engine.from_pretrained(model_dir, num_blocks=8, block_size=8)
    for prompt, params, kwargs, message in [
        ([], GREEDY, {}, "prompt is empty"),
        ([1], SamplingParams(stop=("x",)), {}, "stop strings need a tokenizer; this engine has none"),
        ([1], GREEDY, {"pixel_values": torch.zeros(1, 3, 8, 8)},
         "this model has no vision encoder; send text only"),
    ]:  # fmt: skip
        with pytest.raises(ValueError) as err:
            engine.add_request(prompt, params, **kwargs)
        assert str(err.value) == message


def test_abort_marks_every_choice_and_sends_empty_text(model_dir):
    engine = Engine.from_pretrained(model_dir, num_blocks=32, block_size=8)
    req = engine.add_request([1, 2, 3], SamplingParams(max_tokens=20, temperature=0, n=2))
    for _ in range(3):
        engine.step()
    assert engine.abort(req.request_id)
    assert [s.finish_reason for s in req.seqs] == ["abort", "abort"]
    finals = [o for o in list(req.outputs.queue) if o.finish_reason == "abort"]
    assert len(finals) == 2 and all(o.text == "" for o in finals)  # no tokenizer: no text


def test_unseeded_sampling_runs_and_differs_between_requests(model_dir):
    engine = Engine.from_pretrained(model_dir, num_blocks=64, block_size=8)
    params = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    p = prompts(1, seed=15)[0]
    a, b = (engine.generate([p], params)[0][0].token_ids for _ in range(2))
    assert len(a) == len(b) == 16 and a != b  # 320-token vocabulary: equal draws are ~impossible


def test_requests_without_a_salt_share_the_empty_salts_cache(model_dir):
    engine = Engine.from_pretrained(model_dir, num_blocks=64, block_size=8)
    p = prompts(1, seed=16, lo=20, hi=21)[0]
    engine.generate([p], GREEDY, salt="")
    assert engine.generate([p], GREEDY)[0][0].usage["cached_tokens"] == 16


def test_engine_defaults_are_the_documented_ones(model_dir):
    """The server builds its engine with these defaults (README: kv_memory_mb=1024
    max_seqs=64 max_tokens_per_step=512)."""
    from serve.loader import load_model

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "kv_memory_mb=1024 max_seqs=64" in readme and "max_tokens_per_step=512" in readme
    engine = Engine(load_model(model_dir))
    a = engine.args
    per_block = 2 * a.num_layers * a.num_kv_heads * a.head_dim * 4 * 16
    assert engine.pool.block_size == 16 and engine.pool.num_blocks == (1 << 30) // per_block
    s = engine.scheduler
    assert (s.max_tokens_per_step, s.max_seqs, s.background_tokens_per_step) == (512, 64, 8)
    assert s.batch_tokens_per_step == 64  # README: "else 64 (`batch_tokens_per_step`"
    assert "else 64 (`batch_tokens_per_step`" in readme


def test_kv_cache_is_kept_in_the_models_dtype(model_dir):
    """The KV pool takes the model's dtype (a float64 model writes float64 keys and values),
    kv_memory_bytes counts that dtype's bytes, and a float64 engine picks the float32 engine's
    greedy tokens."""
    from serve.loader import load_model

    p = prompts(1, seed=17)[0]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=True)
    runs = {}
    for dtype in (torch.float32, torch.float64):
        engine = Engine(load_model(model_dir, dtype=dtype), num_blocks=16, block_size=8)
        assert engine.kv.kv.dtype == dtype
        a = engine.args
        assert (
            engine.kv.bytes_per_slot
            == 2 * a.num_layers * a.num_kv_heads * a.head_dim * dtype.itemsize
        )
        runs[dtype] = engine.generate([p], params)[0][0]
        per_block = engine.kv.bytes_per_slot * 8
        sized = Engine(engine.model, kv_memory_bytes=10 * per_block + per_block // 2, block_size=8)
        assert (
            sized.pool.num_blocks == 10 and sized.kv.kv.numel() * dtype.itemsize == 10 * per_block
        )
    assert runs[torch.float64].token_ids == runs[torch.float32].token_ids
    lp32, lp64 = (torch.tensor(runs[d].logprobs) for d in (torch.float32, torch.float64))
    assert (lp32 - lp64).abs().max() <= 1e-4
