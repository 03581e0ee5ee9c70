"""Pricing from serving.json and the SQLite usage ledger (serve/billing.py)."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime

import pytest

from serve.billing import PriceList, Usage, UsageLedger
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
