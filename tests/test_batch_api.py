"""/v1/files and /v1/batches through the official openai client on a live server: per-line
validation, bodies equal to the synchronous endpoint's, discount, cancel, expiry, budgets,
key isolation, pagination."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from api_support import ENGINE, MODEL, LiveServer, wait_until

from serve.api import ServedModel, create_app
from serve.auth import KeyStore, key_line
from serve.batch import BatchService
from serve.billing import Billing, PriceList, UsageLedger

pytest_plugins = ["api_fixtures"]

ALICE, BOB, EVE = "sk-alice-0123456789", "sk-bob-0123456789", "sk-eve-0123456789"
SYSTEM = "You are a careful assistant. " * 12  # ~70 tokens shared by every line
BOB_BUDGET = 2e-5  # USD: a few lines of 40 tokens at the default prices, then no more


def chat_line(cid: str, text: str, max_tokens: int = 8, **body) -> dict:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": messages, "max_tokens": max_tokens,
                     "temperature": 0, **body}}  # fmt: skip


def jsonl(items) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items).encode()


@pytest.fixture(scope="module")
def live(tiny_export, one_thread, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch-api")
    keys = tmp / "keys.jsonl"
    keys.write_text("\n".join([key_line("alice", ALICE), key_line("bob", BOB, BOB_BUDGET),
                               key_line("eve", EVE)]))  # fmt: skip
    served = ServedModel.load(tiny_export, **ENGINE)
    billing = Billing(PriceList(served.spec.pricing), UsageLedger(tmp / "usage.sqlite"))
    service = BatchService(tmp / "data", max_file_bytes=256 << 10, concurrency=8)
    app = create_app(served, auth=KeyStore.load(keys), billing=billing, batches=service)
    with LiveServer(app) as server:
        server.state, server.service, server.billing = app.state.server, service, billing
        yield server


def client_for(live, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def alice(live):
    return client_for(live, ALICE)


def run_batch(client, lines, window: str = "24h", wait: bool = True, **kw):
    f = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window=window, **kw)  # fmt: skip
    if wait:
        batch = finished(client, batch.id)
    return batch


def finished(client, batch_id: str, timeout: float = 60):
    final = ("completed", "failed", "cancelled", "expired")
    assert wait_until(lambda: client.batches.retrieve(batch_id).status in final, timeout, 0.05)
    return client.batches.retrieve(batch_id)


def records(client, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def test_files_crud_size_limit_and_other_keys_get_404(live, alice):
    data = jsonl([chat_line("a", "hi")])
    f = alice.files.create(file=("in.jsonl", data), purpose="batch")
    assert f.id.startswith("file-") and "/" not in f.id and f.bytes == len(data)
    assert f.purpose == "batch" and f.filename == "in.jsonl"
    assert alice.files.retrieve(f.id).id == f.id
    assert alice.files.content(f.id).content == data
    assert f.id in [x.id for x in alice.files.list()]
    eve = client_for(live, EVE)
    with pytest.raises(openai.NotFoundError):  # another key's id: 404, never 403
        eve.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        eve.files.content(f.id)
    with pytest.raises(openai.NotFoundError):
        eve.files.delete(f.id)
    assert f.id not in [x.id for x in eve.files.list()]
    with pytest.raises(openai.NotFoundError):
        eve.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                           completion_window="24h")  # fmt: skip
    with pytest.raises(openai.NotFoundError):  # an id that looks like a path is just absent
        alice.files.retrieve("..%2Fbatches.sqlite")
    with pytest.raises(openai.BadRequestError) as err:
        alice.files.create(file=("in.jsonl", data), purpose="fine-tune")
    assert err.value.body["param"] == "purpose"
    with pytest.raises(openai.APIStatusError) as err:
        alice.files.create(file=("big.jsonl", b"x" * (300 << 10)), purpose="batch")
    assert err.value.status_code == 413
    assert alice.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(f.id)


def test_batch_lines_validated_run_and_equal_the_sync_endpoint(live, alice):
    good = [chat_line(f"ok-{i}", f"Question {i}?") for i in range(5)]
    bad_body = chat_line("bad-temp", "x", temperature=5)
    lines = [
        good[0], "{not json", good[1],
        {k: v for k, v in chat_line("", "x").items() if k != "custom_id"},  # missing custom_id
        {**chat_line("ok-1", "again"), "custom_id": "ok-1"},  # duplicate
        {**chat_line("bad-url", "x"), "url": "/v1/embeddings"},
        {**chat_line("bad-method", "x"), "method": "GET"},
        bad_body,
        chat_line("bad-model", "x", model="nope"),
        *good[2:],
    ]  # fmt: skip
    batch = run_batch(alice, lines, metadata={"job": "t1"})
    assert batch.status == "completed" and batch.metadata == {"job": "t1"}
    assert batch.request_counts.total == 12
    assert (batch.request_counts.completed, batch.request_counts.failed) == (5, 7)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at

    out, err = records(alice, batch.output_file_id), records(alice, batch.error_file_id)
    assert sorted(r["custom_id"] for r in out) == [f"ok-{i}" for i in range(5)]
    errors = {r["error"]["line"]: r for r in err}
    assert {n: r["error"]["code"] for n, r in errors.items()} == {
        2: "invalid_json", 4: "missing_custom_id", 5: "duplicate_custom_id", 6: "invalid_url",
        7: "invalid_method", 8: "invalid_request_error", 9: "model_not_found",
    }  # fmt: skip
    assert errors[5]["custom_id"] == "ok-1" and errors[4]["custom_id"] is None

    # An invalid body fails as the synchronous endpoint answers it: same status, same object.
    sync = httpx.post(f"{live.url}/v1/chat/completions", json=bad_body["body"],
                      headers={"Authorization": f"Bearer {ALICE}"})  # fmt: skip
    assert errors[8]["response"] == {"status_code": 400, "request_id": None, "body": sync.json()}
    assert errors[8]["error"]["param"] == "temperature"

    # An output body is the synchronous body: same shape, same greedy text and token counts.
    body = next(r for r in out if r["custom_id"] == "ok-3")["response"]["body"]
    resp = alice.chat.completions.create(**good[3]["body"]).model_dump(exclude_unset=True)
    assert body.keys() == resp.keys() and body["object"] == "chat.completion"
    assert body["choices"] == resp["choices"]
    for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert body["usage"][k] == resp["usage"][k]
    assert body["usage"].keys() == resp["usage"].keys()

    # Batch pricing: half the list price (serving.json's default batch_discount).
    prices = live.billing.prices
    for r in out:
        usage = r["response"]["body"]["usage"]
        assert usage["cost"]["discount"] == 0.5
        assert usage["cost"]["total"] == pytest.approx(prices.cost(usage)["total"] * 0.5)
    assert resp["usage"]["cost"]["total"] == pytest.approx(prices.cost(resp["usage"])["total"])
    # Lines share the system prompt: the ones after the first read it from the prefix cache.
    cached = [r["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"] for r in out]
    assert sum(c > 0 for c in cached) >= 4

    # The batch's usage and cost are the sums over its output lines.
    usages = [r["response"]["body"]["usage"] for r in out]
    u = batch.usage
    assert u.input_tokens == sum(x["prompt_tokens"] for x in usages)
    assert u.output_tokens == sum(x["completion_tokens"] for x in usages)
    assert u.input_tokens_details.cached_tokens == sum(cached)
    assert batch.model_extra["cost"]["total"] == pytest.approx(
        sum(x["cost"]["total"] for x in usages)
    )


@pytest.mark.parametrize(("data", "code"), [(b"", "empty_file"), (b"\x00\xff\xfe" * 10,
                         "invalid_file"), (b"{\n\"a\": 1\n}\n", "invalid_file")])  # fmt: skip
def test_unusable_input_file_fails_the_batch(alice, data, code):
    f = alice.files.create(file=("in.jsonl", data), purpose="batch")
    batch = alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")  # fmt: skip
    batch = finished(alice, batch.id)
    assert batch.status == "failed" and batch.failed_at
    assert [e.code for e in batch.errors.data] == [code]
    with pytest.raises(openai.BadRequestError):
        alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                             completion_window="25h")  # fmt: skip


def test_cancel_stops_remaining_lines_and_keeps_finished_ones(live, alice):
    engine = live.state.model.engine
    lines = [chat_line(f"c{i}", f"Story {i}", max_tokens=400) for i in range(40)]
    batch = run_batch(alice, lines, wait=False)
    assert wait_until(lambda: alice.batches.retrieve(batch.id).request_counts.completed >= 1,
                      60, 0.02)  # fmt: skip
    cancelling = alice.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = finished(alice, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at and batch.cancelling_at
    assert wait_until(lambda: not engine.requests, 5)  # the engine let go of every line
    out, err = records(alice, batch.output_file_id), records(alice, batch.error_file_id)
    ids = [r["custom_id"] for r in out + err]
    assert sorted(ids) == sorted(x["custom_id"] for x in lines)  # each exactly once
    assert len(out) == batch.request_counts.completed >= 1 and len(out) < 40
    assert {r["error"]["code"] for r in err} == {"batch_cancelled"}
    assert all(r["response"]["body"]["choices"][0]["finish_reason"] in ("stop", "length")
               for r in out)  # fmt: skip


def test_cancel_right_after_create_lists_every_line_once(alice):
    lines = [chat_line(f"k{i}", f"Story {i}", max_tokens=300) for i in range(20)]
    batch = run_batch(alice, lines, wait=False)
    alice.batches.cancel(batch.id)  # most likely still validating: no line has run yet
    batch = finished(alice, batch.id)
    assert batch.status == "cancelled"
    out, err = records(alice, batch.output_file_id), records(alice, batch.error_file_id)
    assert sorted(r["custom_id"] for r in out + err) == sorted(x["custom_id"] for x in lines)
    assert {r["error"]["code"] for r in err} == {"batch_cancelled"}


def test_expired_window_fails_unfinished_lines(alice):
    lines = [chat_line(f"e{i}", f"Story {i}", max_tokens=600) for i in range(30)]
    batch = run_batch(alice, lines, window="1s")
    assert batch.status == "expired" and batch.expired_at
    out, err = records(alice, batch.output_file_id), records(alice, batch.error_file_id)
    assert sorted(r["custom_id"] for r in out + err) == sorted(x["custom_id"] for x in lines)
    assert err and {r["error"]["code"] for r in err} == {"batch_expired"}
    assert batch.request_counts.failed == len(err)


def test_budget_runs_out_remaining_lines_insufficient_quota(live):
    bob = client_for(live, BOB)
    lines = [chat_line(f"b{i}", f"Hello {i}", max_tokens=40) for i in range(12)]
    batch = run_batch(bob, lines)
    assert batch.status == "completed"
    out, err = records(bob, batch.output_file_id), records(bob, batch.error_file_id)
    assert sorted(r["custom_id"] for r in out + err) == sorted(x["custom_id"] for x in lines)
    assert out and err and {r["error"]["code"] for r in err} == {"insufficient_quota"}
    assert all(r["response"]["status_code"] == 429 for r in err)
    for r in out:  # never half-written: every output ran to its own end
        assert r["response"]["body"]["choices"][0]["finish_reason"] in ("stop", "length")
        assert r["response"]["body"]["usage"]["completion_tokens"] in range(1, 41)
    assert live.billing.spent_usd("bob") <= BOB_BUDGET


def test_list_batches_paginates_newest_first(live):
    eve = client_for(live, EVE)
    ids = [run_batch(eve, [chat_line("p", "x", max_tokens=1)]).id for _ in range(3)]
    page = eve.batches.list(limit=2)
    assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
    rest = eve.batches.list(limit=2, after=page.data[-1].id)
    assert [b.id for b in rest.data] == [ids[0]] and not rest.has_more
    assert [b.id for b in eve.batches.list(limit=1)] == ids[::-1]  # iterating follows pages
    with pytest.raises(openai.NotFoundError):
        client_for(live, ALICE).batches.retrieve(ids[0])
