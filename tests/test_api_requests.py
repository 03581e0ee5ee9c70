"""Request/response logic of the OpenAI-compatible API through FastAPI's TestClient."""

from __future__ import annotations

import dataclasses
import json

import pytest
from api_support import ENGINE, MODEL, sse_events
from fastapi import APIRouter
from fastapi.testclient import TestClient

from serve.api import ServedModel, create_app
from serve.api.routes import Principal

pytest_plugins = ["api_fixtures"]

HI = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def served(tiny_export, one_thread) -> ServedModel:
    return ServedModel.load(tiny_export, **ENGINE)


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served)) as c:
        yield c


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, **body})


def stream(client, path: str, body: dict) -> list:
    with client.stream("POST", path, json={"model": MODEL, "stream": True, **body}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r.iter_lines())


def test_one_running_app_per_engine(served, client):
    with pytest.raises(RuntimeError, match="already served"), TestClient(create_app(served)):
        pass


def test_models_and_health(client):
    assert client.get("/health").json()["status"] == "ok"
    (card,) = client.get("/v1/models").json()["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["context_length"] == 2048
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    r = client.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_chat_completion_with_logprobs(client, tokenizer):
    r = chat(client, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    prompt = tokenizer.apply_chat_template(HI, add_generation_prompt=True, tokenize=False)
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    entries = choice["logprobs"]["content"]
    assert usage["completion_tokens"] == len(entries) <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert {"cached_tokens"} <= usage["prompt_tokens_details"].keys()
    assert {"cache_creation_input_tokens", "cache_read_input_tokens"} <= usage.keys()
    for e in entries:
        assert e.keys() == {"token", "logprob", "bytes", "top_logprobs"}
        tops = [t["logprob"] for t in e["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert e["logprob"] == pytest.approx(tops[0])  # greedy picks the top token
    if choice["finish_reason"] == "length":
        raw = bytes(b for e in entries for b in e["bytes"])
        assert raw.decode("utf-8", errors="replace") == choice["message"]["content"]


def test_max_completion_tokens_n_and_seed(client):
    body = chat(client, max_completion_tokens=5, max_tokens=9, n=3, seed=7).json()
    assert len(body["choices"]) == 3 and body["usage"]["completion_tokens"] <= 15
    again = chat(client, max_completion_tokens=5, n=3, seed=7).json()
    texts = [c["message"]["content"] for c in body["choices"]]
    assert texts == [c["message"]["content"] for c in again["choices"]]
    assert len(set(texts)) > 1


def test_stop_strings(client):
    free = chat(client, max_tokens=20, temperature=0).json()["choices"][0]["message"]["content"]
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    cut = chat(client, max_tokens=20, temperature=0, stop=[stop, "never-seen"]).json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["message"]["content"] == free[: free.index(stop)]


def test_completions_with_token_prompt_and_logprobs(client, tokenizer):
    ids = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 6,
                                             "temperature": 0, "logprobs": 2})  # fmt: skip
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    (choice,) = body["choices"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
    assert all(len(t) <= 2 for t in lp["top_logprobs"])
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    text = client.post("/v1/completions", json={"model": MODEL, "max_tokens": 6,
                       "temperature": 0, "prompt": "The capital of France is"}).json()  # fmt: skip
    assert text["choices"][0]["text"] == choice["text"]  # same tokens either way


def test_identical_long_prompt_reads_the_cache(client):
    messages = [{"role": "user", "content": "cache me " * 60}]
    first = chat(client, messages=messages, max_tokens=2).json()["usage"]
    second = chat(client, messages=messages, max_tokens=2).json()["usage"]
    assert first["cache_creation_input_tokens"] >= 100
    assert second["prompt_tokens_details"]["cached_tokens"] >= first["prompt_tokens"] - 16
    assert second["cache_read_input_tokens"] == second["prompt_tokens_details"]["cached_tokens"]


def test_chat_stream_chunks(client):
    full = chat(client, max_tokens=10, temperature=0).json()
    events = stream(client, "/v1/chat/completions", {
        "messages": HI, "max_tokens": 10, "temperature": 0, "n": 2,
        "stream_options": {"include_usage": True},
    })  # fmt: skip
    assert events[-1] == "[DONE]"
    chunks, usage_chunk = events[:-2], events[-2]
    assert len({c["id"] for c in events[:-1]}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in chunks)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert [m["finish_reason"] is not None for m in mine] == [False] * (len(mine) - 1) + [True]
        text = "".join(m["delta"].get("content", "") for m in mine)
        assert text == full["choices"][0]["message"]["content"]  # greedy: both equal


def test_continuous_usage_and_completion_stream(client):
    events = stream(client, "/v1/completions", {
        "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0,
        "stream_options": {"continuous_usage_stats": True},
    })  # fmt: skip
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 6
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_penalties_are_accepted(client):
    r = chat(client, max_tokens=2, presence_penalty=0.5, frequency_penalty=-0.5)
    assert r.status_code == 200, r.text


class AllowOnly:
    """A constraints hook that allows only a few tokens, so greedy decoding repeats them."""

    def __init__(self, ids: list[int], vocab: int):
        self.ids, self.vocab = ids, vocab

    def token_mask(self, response_format, model, n):
        import torch

        allowed = torch.zeros(self.vocab, dtype=torch.bool)
        allowed[self.ids] = True
        return lambda generated: allowed


def test_frequency_penalty_spreads_repeated_tokens(tiny_export):
    served = ServedModel.load(tiny_export, **ENGINE)  # its own engine: one app per engine
    ids = [1000, 2000, 3000]
    app = create_app(served, constraints=AllowOnly(ids, served.engine.args.vocab_size))
    with TestClient(app) as client:

        def top_count(**kw) -> int:
            body = chat(client, max_tokens=30, temperature=0, logprobs=True,
                        response_format={"type": "json_object"}, **kw).json()  # fmt: skip
            tokens = [e["token"] for e in body["choices"][0]["logprobs"]["content"]]
            return max(tokens.count(t) for t in set(tokens))

        assert top_count(frequency_penalty=2.0) < top_count()


def test_ignore_eos_generates_past_end_of_sequence(tiny_export):
    served = ServedModel.load(tiny_export, **ENGINE)
    eos = min(served.engine.eos)  # the only allowed token: greedy picks it at once
    app = create_app(served, constraints=AllowOnly([eos], served.engine.args.vocab_size))
    with TestClient(app) as client:

        def finish(**kw) -> tuple[str, int]:
            body = chat(client, max_tokens=5, response_format={"type": "json_object"}, **kw)
            body = body.json()
            return body["choices"][0]["finish_reason"], body["usage"]["completion_tokens"]

        assert finish() == ("stop", 1)
        assert finish(ignore_eos=True) == ("length", 5)


def test_unknown_fields_are_ignored(client):
    r = chat(client, max_tokens=2, logit_bias={"1": 5}, parallel_tool_calls=False, foo={"x": 1})
    assert r.status_code == 200, r.text


BAD = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": "hi"}, "messages"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**9}, "max_tokens"),
    ({"max_tokens": "12"}, "max_tokens"),
    ({"max_completion_tokens": 5000}, "max_completion_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 100}, "n"),
    ({"n": 0}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"seed": 1.5}, "seed"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"model": "gpt-4o"}, "model"),
    ({"messages": [{"role": "user", "content": "word " * 2100}]}, "messages"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,xx"}}]}]},
     "messages.0.content"),
]  # fmt: skip


def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(client):
    for override, param in BAD:
        r = chat(client, **override)
        assert 400 <= r.status_code < 500, (override, r.text)
        err = r.json()["error"]
        assert err.keys() == {"message", "type", "param", "code"} and err["message"], override
        assert (err["param"] or "").startswith(param.split(".")[0]), (override, err)
    raw = [
        client.post("/v1/chat/completions", content=b"{not json",
                    headers={"content-type": "application/json"}),
        client.post("/v1/chat/completions", json=[1, 2]),
        client.post("/v1/completions", json={"model": MODEL, "prompt": [10**6]}),
        client.post("/v1/completions", json={"model": MODEL, "prompt": ""}),
        client.post("/v1/completions", json={"model": MODEL, "prompt": list(range(3000))}),
        client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "echo": True}),
        client.post("/v1/chat/completions", content=b"x" * (9 << 20),
                    headers={"content-type": "application/json"}),
        client.get("/v1/nothing-here"),
        client.delete("/v1/models"),
    ]  # fmt: skip
    assert [r.status_code for r in raw] == [400, 400, 400, 400, 400, 400, 413, 404, 405]
    for r in raw:
        assert r.json()["error"]["message"]
    assert chat(client, max_tokens=3).status_code == 200


def test_metrics(client):
    chat(client, max_tokens=3)
    text = client.get("/metrics").text
    assert 'nanodistill_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'nanodistill_requests_total{route="/v1/chat/completions",status="400"}' in text
    for name in ("prompt_tokens_total", "completion_tokens_total", "cached_tokens_total",
                 "cache_hit_rate", "running_requests", "queue_depth",
                 "time_to_first_token_seconds_count", "inter_token_latency_seconds_count"):  # fmt: skip
        assert f"nanodistill_{name}" in text
    ttft = next(line for line in text.splitlines() if line.startswith("nanodistill_time_to_first"
                                                                     "_token_seconds_count"))  # fmt: skip
    assert float(ttft.split()[-1]) > 0


# ---- hooks: auth, billing, constraints -------------------------------------------------------


class KeyError401(Exception):
    """Like serve.auth.AuthError: an exception that carries its HTTP status and code."""

    status, code, type = 401, "invalid_api_key", "invalid_request_error"

    def __init__(self, message):
        super().__init__(message)
        self.message = message


@dataclasses.dataclass
class Caller:
    name: str
    cache_salt: str


class FakeAuth:
    def authenticate(self, request):
        if request.headers.get("authorization") != "Bearer k1":
            raise KeyError401("invalid API key")
        return Caller("tenant-1", "salt-1")


class FakeBilling:
    def __init__(self):
        self.records = []

    def check(self, principal, model, prompt_tokens, max_tokens, max_cost_usd):
        from serve.api.errors import APIError

        if max_tokens > 50:
            raise APIError(429, "budget exceeded", code="insufficient_quota",
                           type="insufficient_quota")  # fmt: skip

    def cost(self, usage):
        return {"total_usd": usage["total_tokens"] * 1e-6}

    async def record(self, principal, model, request_id, usage, status):
        self.records.append((principal.name, model, request_id, usage, status))


class ForceText:
    """A constraints hook that forces the tokens of one text, then EOS."""

    def __init__(self, ids: list[int], eos: int, vocab: int):
        self.ids, self.eos, self.vocab = ids, eos, vocab

    def token_mask(self, response_format, model, n):
        import torch

        if response_format["type"] != "json_object":
            raise ValueError("only json_object here")

        def mask(generated: list[int]):
            allowed = torch.zeros(self.vocab, dtype=torch.bool)
            i = len(generated)
            allowed[self.ids[i] if i < len(self.ids) else self.eos] = True
            return allowed

        return mask


TARGET = "héllo 🙂🙃 日本語!"


def test_hooks_auth_billing_constraints(tiny_export, tokenizer):
    served = ServedModel.load(tiny_export, **ENGINE)  # its own engine: one app per engine
    billing = FakeBilling()
    ids = tokenizer(TARGET, add_special_tokens=False)["input_ids"]
    force = ForceText(ids, tokenizer.eos_token_id, served.engine.args.vocab_size)
    usage_router = APIRouter()

    @usage_router.get("/v1/usage")
    def usage_of(caller: Principal):  # an extra endpoint behind the same auth
        return {"records": sum(r[0] == caller.name for r in billing.records)}

    billing.router = usage_router  # a hook's own endpoints are mounted too
    app = create_app(served, auth=FakeAuth(), billing=billing, constraints=force)
    key = {"authorization": "Bearer k1"}
    with TestClient(app) as client:
        assert client.get("/v1/usage").status_code == 401
        r = client.post("/v1/chat/completions", json={"messages": "wrong type"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = client.post("/v1/chat/completions", headers=key,
                        json={"model": MODEL, "messages": HI, "max_tokens": 100})  # fmt: skip
        assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
        body = {"model": MODEL, "messages": HI, "max_tokens": 40, "stream": True, "logprobs": True,
                "response_format": {"type": "json_object"},
                "stream_options": {"include_usage": True}}  # fmt: skip
        with client.stream("POST", "/v1/chat/completions", headers=key, json=body) as r:
            events = sse_events(r.iter_lines())
        chunks = [c for c in events[:-1] if c["choices"]]
        deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks]
        assert "".join(deltas) == TARGET and not any("\ufffd" in d for d in deltas)
        entries = [e for c in chunks if c["choices"][0]["logprobs"]
                   for e in c["choices"][0]["logprobs"]["content"]]  # fmt: skip
        assert bytes(b for e in entries for b in e["bytes"]) == TARGET.encode()
        assert any(e["token"].startswith("bytes:") for e in entries)  # a partial character
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        usage = events[-2]["usage"]
        assert usage["cost"]["total_usd"] > 0
        r = client.post("/v1/chat/completions", headers=key, json={**body, "stream": False,
                        "stream_options": None, "response_format": {"type": "json_schema",
                        "json_schema": {"name": "x", "schema": {"type": "object"}}}})  # fmt: skip
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
        assert client.get("/v1/usage", headers=key).json() == {"records": 1}
    assert [(t, s) for t, _, _, _, s in billing.records] == [("tenant-1", "finished")]
    assert billing.records[0][3]["completion_tokens"] == len(ids) + 1  # + EOS


def test_error_bodies_are_json_everywhere(client):
    r = client.post("/v1/completions", content=json.dumps({"model": MODEL}),
                    headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_required_parameter"
