"""Pricing from serving.json and the SQLite usage ledger (serve/billing.py)."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serve.api.errors import install_error_handlers
from serve.auth import KeyStore, Principal, QuotaError, key_line
from serve.billing import Billing, PriceList, Usage, UsageLedger, for_server
from serve.export_format import Pricing, ServingSpec

# USD per 1M tokens: round numbers so expected costs are exact by hand.
PRICES = Pricing(input_per_1m=2.0, output_per_1m=8.0)


def test_cost_breakdown_reads_cache_at_a_tenth():
    usage = {
        "prompt_tokens": 1000, "completion_tokens": 500,
        "cached_tokens": 600, "cache_creation_tokens": 300,
    }  # fmt: skip
    cost = PriceList(PRICES).cost(usage)
    assert cost["breakdown"] == {
        "input": pytest.approx(100 * 2.0 / 1e6),
        "cache_read": pytest.approx(600 * 0.2 / 1e6),  # 10% of the input rate
        "cache_creation": pytest.approx(300 * 2.0 / 1e6),  # input rate by default
        "output": pytest.approx(500 * 8.0 / 1e6),
    }
    assert cost["total"] == pytest.approx(sum(cost["breakdown"].values()))
    assert cost["total"] == pytest.approx(0.00492)
    assert cost["currency"] == "USD"


def test_serving_json_overrides_cache_rates(tmp_path):
    spec = ServingSpec(
        model="m",
        context_length=2048,
        pricing=Pricing(input_per_1m=1.0, cache_read_per_1m=0.5, cache_creation_per_1m=1.25),
    )
    spec.save(tmp_path)
    prices = PriceList.from_serving(tmp_path)  # the export dir
    cost = prices.cost(Usage(1000, 0, cached_tokens=400, cache_creation_tokens=600))
    assert cost["breakdown"]["cache_read"] == pytest.approx(400 * 0.5 / 1e6)
    assert cost["breakdown"]["cache_creation"] == pytest.approx(600 * 1.25 / 1e6)
    assert PriceList.from_serving(spec.to_dict()).pricing == spec.pricing
    # the worst case bills the whole prompt at the dearer of input and creation
    assert prices.worst_case(1000, 100) == pytest.approx((1000 * 1.25 + 100 * 0.2) / 1e6)


def test_worst_case_is_an_upper_bound():
    prices = PriceList(PRICES)
    assert prices.worst_case(1000, 256) == pytest.approx((1000 * 2.0 + 256 * 8.0) / 1e6)
    assert prices.worst_case(1000, 256, n=3) == pytest.approx((1000 * 2.0 + 3 * 256 * 8.0) / 1e6)
    for cached in (0, 500, 1000):
        real = prices.cost(Usage(1000, 256, cached_tokens=cached))["total"]
        assert real <= prices.worst_case(1000, 256)


@pytest.mark.parametrize(
    ("usage", "problem"),
    [
        ({"prompt_tokens": 10, "completion_tokens": 1, "cached_tokens": 11}, "cached_tokens 11 >"),
        (
            {"prompt_tokens": 10, "completion_tokens": 1, "cached_tokens": 6, "cache_creation_tokens": 5},
            "cache_creation_tokens 5 >",
        ),
        ({"prompt_tokens": -1, "completion_tokens": 1}, "non-negative"),
        ({"prompt_tokens": 1.5, "completion_tokens": 1}, "non-negative integer"),
    ],
)  # fmt: skip
def test_usage_invariants(usage, problem):
    with pytest.raises(ValueError, match=problem):
        Usage.of(usage)


def test_non_usd_pricing_is_refused():
    with pytest.raises(ValueError, match="USD"):
        PriceList(Pricing(currency="EUR"))


def day(s: str) -> float:
    return datetime.fromisoformat(s).replace(tzinfo=UTC).timestamp()


def test_ledger_spend_totals_by_model_and_day(tmp_path):
    path = tmp_path / "usage.sqlite"
    with UsageLedger(path) as ledger:
        ledger.record(
            "alice", "nano", Usage(100, 10, 50, 20), 0.001, finished_at=day("2026-11-29T23:59:00")
        )
        ledger.record(
            "alice",
            "nano",
            Usage(200, 20),
            0.002,
            status="length",
            finished_at=day("2026-11-30T00:01:00"),
        )
        ledger.record(
            "alice",
            "teacher",
            Usage(300, 30),
            0.004,
            status="aborted",
            finished_at=day("2026-11-30T12:00:00"),
        )
        ledger.record("bob", "nano", Usage(999, 99), 0.5)
        alice = ledger.spend("alice")
    assert alice["total"] == {
        "requests": 3, "prompt_tokens": 600, "completion_tokens": 60,
        "cached_tokens": 50, "cache_creation_tokens": 20, "cost_usd": pytest.approx(0.007),
    }  # fmt: skip
    assert [(m["model"], m["requests"]) for m in alice["by_model"]] == [("nano", 2), ("teacher", 1)]
    assert [(d["date"], d["requests"]) for d in alice["by_day"]] == [
        ("2026-11-29", 1),
        ("2026-11-30", 2),
    ]
    assert alice["by_day"][1]["cost_usd"] == pytest.approx(0.006)
    # a reopened ledger has the rows (and the file is in WAL mode)
    with UsageLedger(path) as again:
        assert again.spent_usd("bob") == pytest.approx(0.5)
        assert again.spent_usd("nobody") == 0.0
        assert again.spend("nobody")["total"]["requests"] == 0
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_ledger_rejects_bad_rows(tmp_path):
    with UsageLedger(tmp_path / "u.sqlite") as ledger:
        with pytest.raises(ValueError, match="status"):
            ledger.record("k", "m", Usage(1, 1), 0.0, status="weird")
        with pytest.raises(ValueError, match="cost_usd"):
            ledger.record("k", "m", Usage(1, 1), -1.0)
        with pytest.raises(ValueError, match="cached_tokens"):
            ledger.record(
                "k", "m", {"prompt_tokens": 1, "completion_tokens": 0, "cached_tokens": 2}, 0.0
            )
        assert ledger.spend("k")["total"]["requests"] == 0


def test_ledger_is_thread_safe(tmp_path):
    ledger = UsageLedger(tmp_path / "u.sqlite")
    errors = []

    def write(key: str) -> None:
        try:
            for _ in range(100):
                ledger.record(key, "m", Usage(10, 1), 1e-6)
                ledger.spent_usd(key)
        except Exception as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(f"k{i % 2}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert ledger.spend("k0")["total"]["requests"] == 400
    assert ledger.spent_usd("k1") == pytest.approx(400e-6)
    ledger.close()


OPENAI_USAGE = {  # what the API hands the hook: 100 prompt (50 cached), 200 completion
    "prompt_tokens": 100, "completion_tokens": 200, "total_tokens": 300,
    "prompt_tokens_details": {"cached_tokens": 50},
    "cache_creation_input_tokens": 0, "cache_read_input_tokens": 50,
}  # fmt: skip


def test_openai_usage_shape_is_priced_with_its_cache_reads():
    cost = PriceList(Pricing(input_per_1m=10.0, output_per_1m=40.0)).cost(OPENAI_USAGE)
    assert cost["breakdown"]["cache_read"] == pytest.approx(50 * 1.0 / 1e6)
    assert cost["total"] == pytest.approx((50 * 10 + 50 * 1 + 200 * 40) / 1e6)


def test_billing_hook_budgets_caps_and_ledger(tmp_path):
    spec = ServingSpec("nano", 2048, pricing=Pricing(input_per_1m=10.0, output_per_1m=40.0))
    billing = for_server(SimpleNamespace(spec=spec), {"ledger": str(tmp_path / "u.sqlite")})
    alice = Principal("alice", budget_usd=0.01, cache_salt="s")
    billing.check(alice, "nano", 100, 200)  # worst case $0.009 of $0.01
    with pytest.raises(QuotaError, match="max_cost_usd"):
        billing.check(alice, "nano", 100, 200, max_cost_usd=0.005)
    billing.record(alice, "nano", "req-1", OPENAI_USAGE, "finished")  # $0.00855
    with pytest.raises(QuotaError) as e:
        billing.check(alice, "nano", 100, 200)
    assert e.value.status == 429 and e.value.remaining_usd == pytest.approx(0.00145)
    # a running stream: over once its cost reaches what is left
    assert billing.over_budget(alice, {"prompt_tokens": 100, "completion_tokens": 40})
    assert not billing.over_budget(alice, {"prompt_tokens": 10, "completion_tokens": 1})
    assert billing.over_budget(None, {"prompt_tokens": 10, "completion_tokens": 1}, 1e-4)
    # no auth: no budget, ledger key ""
    billing.check(None, "nano", 10**6, 10**6)
    billing.record(None, "nano", "req-2", OPENAI_USAGE, "aborted")
    assert billing.ledger.spend("")["total"]["requests"] == 1
    assert billing.ledger.spend("alice")["total"]["cost_usd"] == pytest.approx(0.00855)
    billing.close()


def test_usage_route_shows_only_the_callers_spend(tmp_path):
    keys = tmp_path / "keys.jsonl"
    keys.write_text(key_line("alice", "sk-a") + "\n" + key_line("bob", "sk-b") + "\n")
    billing = Billing(PriceList(), UsageLedger(tmp_path / "u.sqlite"))
    billing.record(Principal("alice"), "nano", "r1", Usage(10, 5), "finished")
    billing.record(Principal("bob"), "nano", "r2", Usage(20, 5), "finished")
    app = FastAPI()
    install_error_handlers(app)
    app.state.server = SimpleNamespace(auth=KeyStore.load(keys))  # what principal_of reads
    app.include_router(billing.router)
    client = TestClient(app)
    body = client.get("/v1/usage", headers={"Authorization": "Bearer sk-a"}).json()
    assert body["key"] == "alice" and body["total"]["prompt_tokens"] == 10
    refused = client.get("/v1/usage")
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    billing.close()
