"""What a request costs, and the ledger of what each API key has spent.

Prices come from the export's serving.json (`Pricing`, USD per 1M tokens). A prompt splits
into three parts billed at their own rates:

    uncached = prompt − cached − creation     at input_per_1m
    cached   (read from the prefix cache)     at cache_read_per_1m      (0.1 × input by default)
    creation (newly written to the cache)     at cache_creation_per_1m  (= input by default)
    completion                                at output_per_1m

Batch lines pay every rate less `batch_discount` (serving.json, 0.5 by default): the cost
carries `"discount"` and a total that is already discounted; the breakdown is at list price.

The ledger is one SQLite file (WAL) with one row per finished request: key, model, times,
token counts, cost and status. `spend(key_id)` is what GET /v1/usage returns.

`Billing` is the API's billing hook (serve/api/hooks.py): worst-case check against budgets
and `max_cost_usd`, cost in every usage, a stream stopped at its budget, one ledger row per
request, and GET /v1/usage; `for_server(model, args)` builds it for `python -m distill serve`.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from serve.auth import QuotaError, check_budget
from serve.export_format import SERVING_FILE, Pricing, ServingSpec

PER = 1_000_000
STATUSES = ("finished", "completed", "length", "aborted", "error", "budget")


@dataclass(frozen=True)
class Usage:
    """Token counts of one request (all choices), checked against the engine's invariants."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    cache_creation_tokens: int = 0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"usage.{name} must be a non-negative integer, got {value!r}")
        if self.cached_tokens > self.prompt_tokens:
            raise ValueError(
                f"cached_tokens {self.cached_tokens} > prompt_tokens {self.prompt_tokens}"
            )
        if self.cache_creation_tokens > self.prompt_tokens - self.cached_tokens:
            raise ValueError(
                f"cache_creation_tokens {self.cache_creation_tokens} > prompt_tokens − "
                f"cached_tokens ({self.prompt_tokens} − {self.cached_tokens})"
            )

    @classmethod
    def of(cls, usage: Usage | dict) -> Usage:
        """From a Usage, the engine's usage dict (`cached_tokens`, `cache_creation_tokens`) or
        an OpenAI usage object (`prompt_tokens_details.cached_tokens` / `cache_read_input_tokens`,
        `cache_creation_input_tokens`); other keys are ignored."""
        if isinstance(usage, Usage):
            return usage
        details = usage.get("prompt_tokens_details") or {}
        cached = usage.get("cached_tokens")
        if cached is None:
            cached = usage.get("cache_read_input_tokens", details.get("cached_tokens", 0))
        creation = usage.get("cache_creation_tokens", usage.get("cache_creation_input_tokens", 0))
        return cls(
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
            cached_tokens=cached,
            cache_creation_tokens=creation,
        )

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens - self.cache_creation_tokens


class PriceList:
    """Costs in USD under one `Pricing`."""

    def __init__(self, pricing: Pricing | None = None):
        self.pricing = pricing or Pricing()
        if self.pricing.currency != "USD":
            raise ValueError(f"only USD pricing is supported, got {self.pricing.currency!r}")

    @classmethod
    def from_serving(cls, spec: ServingSpec | dict | str | Path) -> PriceList:
        """From a ServingSpec, its dict, or an export directory / serving.json path."""
        if isinstance(spec, str | Path):
            path = Path(spec)
            path = path / SERVING_FILE if path.is_dir() else path
            spec = ServingSpec.from_dict(json.loads(path.read_text()))
        if isinstance(spec, dict):
            spec = ServingSpec.from_dict(spec)
        return cls(spec.pricing)

    def cost(self, usage: Usage | dict, discount: float = 0.0) -> dict:
        """`{"total": usd, "currency": "USD", "breakdown": {input, cache_read, cache_creation,
        output}}` for a request's usage (a partial usage prices a stream so far); with a
        `discount` (a batch line) the total is reduced by that fraction and says so."""
        u, p = Usage.of(usage), self.pricing
        breakdown = {
            "input": u.uncached_tokens * p.input_per_1m / PER,
            "cache_read": u.cached_tokens * p.cache_read_per_1m / PER,
            "cache_creation": u.cache_creation_tokens * p.cache_creation_per_1m / PER,
            "output": u.completion_tokens * p.output_per_1m / PER,
        }
        breakdown = {k: round(v, 12) for k, v in breakdown.items()}
        cost = {
            "total": round(sum(breakdown.values()) * (1 - discount), 12),
            "currency": "USD",
            "breakdown": breakdown,
        }
        if discount:
            cost["discount"] = discount
        return cost

    def worst_case(
        self, prompt_tokens: int, max_tokens: int, n: int = 1, discount: float = 0.0
    ) -> float:
        """The most a request can cost: its whole prompt uncached (at the dearer of the input
        and cache-creation rates) and all `n` choices running to `max_tokens`."""
        p = self.pricing
        prompt_rate = max(p.input_per_1m, p.cache_creation_per_1m)
        full = (prompt_tokens * prompt_rate + n * max_tokens * p.output_per_1m) / PER
        return round(full * (1 - discount), 12)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY,
    request_id TEXT,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    cache_creation_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    status TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_key_time ON usage (key_id, finished_at);
"""
_SUMS = """
    COUNT(*) AS requests,
    COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens,
    COALESCE(SUM(completion_tokens), 0) AS completion_tokens,
    COALESCE(SUM(cached_tokens), 0) AS cached_tokens,
    COALESCE(SUM(cache_creation_tokens), 0) AS cache_creation_tokens,
    COALESCE(SUM(cost_usd), 0.0) AS cost_usd
"""


class UsageLedger:
    """Per-key usage in SQLite (WAL). Safe to share between threads: one connection behind
    a lock (SQLite serialises writers anyway; requests write one short row each)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across a killed process
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def record(
        self,
        key_id: str,
        model: str,
        usage: Usage | dict,
        cost_usd: float,
        status: str = "completed",
        request_id: str | None = None,
        started_at: float | None = None,
        finished_at: float | None = None,
    ) -> int:
        """Write one finished request; returns its row id."""
        u = Usage.of(usage)
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if cost_usd < 0:
            raise ValueError(f"cost_usd must be >= 0, got {cost_usd}")
        finished_at = time.time() if finished_at is None else finished_at
        started_at = finished_at if started_at is None else started_at
        row = (
            request_id, key_id, model, started_at, finished_at, u.prompt_tokens,
            u.completion_tokens, u.cached_tokens, u.cache_creation_tokens, cost_usd, status,
        )  # fmt: skip
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO usage (request_id, key_id, model, started_at, finished_at,"
                " prompt_tokens, completion_tokens, cached_tokens, cache_creation_tokens,"
                " cost_usd, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            return int(cur.lastrowid)

    def spent_usd(self, key_id: str) -> float:
        """Everything `key_id` has spent (what a budget is checked against)."""
        with self._lock:
            (total,) = self._db.execute(
                "SELECT COALESCE(SUM(cost_usd), 0.0) FROM usage WHERE key_id = ?", (key_id,)
            ).fetchone()
        return float(total)

    def spend(self, key_id: str) -> dict:
        """`key_id`'s usage: totals, by model and by UTC day (GET /v1/usage)."""
        with self._lock:
            total = self._db.execute(
                f"SELECT {_SUMS} FROM usage WHERE key_id = ?", (key_id,)
            ).fetchone()
            by_model = self._db.execute(
                f"SELECT model, {_SUMS} FROM usage WHERE key_id = ? GROUP BY model ORDER BY model",
                (key_id,),
            ).fetchall()
            by_day = self._db.execute(
                f"SELECT date(finished_at, 'unixepoch') AS date, {_SUMS} FROM usage"
                " WHERE key_id = ? GROUP BY date ORDER BY date",
                (key_id,),
            ).fetchall()
        return {
            "object": "usage",
            "key": key_id,
            "currency": "USD",
            "total": dict(total),
            "by_model": [dict(r) for r in by_model],
            "by_day": [dict(r) for r in by_day],
        }

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> UsageLedger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def key_of(principal) -> str:
    """The ledger key of whatever auth returned: its `.name`, a string, or "" (no auth)."""
    if principal is None:
        return ""
    return principal if isinstance(principal, str) else principal.name


def default_ledger_path() -> Path:
    """`$NANODISTILL_HOME/serve/usage.sqlite` (the assets home, as distill.paths finds it)."""
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nanodistill"
    return Path(os.environ.get("NANODISTILL_HOME", home)) / "serve" / "usage.sqlite"


class Billing:
    """The API's billing hook: prices from serving.json, budgets from the principal
    (serve.auth), spend from the ledger (kept in memory too, so a streamed step's budget
    check is a dict lookup)."""

    def __init__(self, prices: PriceList, ledger: UsageLedger):
        self.prices, self.ledger = prices, ledger
        self._spent: dict[str, float] = {}
        self._lock = threading.Lock()

    def spent_usd(self, key_id: str) -> float:
        with self._lock:
            if key_id not in self._spent:
                self._spent[key_id] = self.ledger.spent_usd(key_id)
            return self._spent[key_id]

    def check(
        self, principal, model: str, prompt_tokens: int, max_tokens: int,
        max_cost_usd: float | None = None, discount: float = 0.0,
    ) -> None:  # fmt: skip
        """Before generation (`max_tokens` already × n): QuotaError (429 insufficient_quota)
        when the worst case exceeds `max_cost_usd` or the key's remaining budget."""
        worst = self.prices.worst_case(prompt_tokens, max_tokens, discount=discount)
        if max_cost_usd is not None and worst > max_cost_usd:
            raise QuotaError(
                f"this request may cost up to ${worst:.6f}, above its max_cost_usd "
                f"${max_cost_usd:.6f}; lower max_tokens or raise max_cost_usd",
                max_cost_usd,
            )
        if getattr(principal, "budget_usd", None) is not None:
            check_budget(principal, worst, self)

    def cost(self, usage: Usage | dict, discount: float = 0.0) -> dict:
        return self.prices.cost(usage, discount)

    def over_budget(
        self, principal, usage: Usage | dict, max_cost_usd: float | None = None,
        discount: float = 0.0,
    ) -> bool:  # fmt: skip
        """True once a running request has spent its `max_cost_usd` or the key's budget."""
        spent = self.prices.cost(usage, discount)["total"]
        if max_cost_usd is not None and spent >= max_cost_usd:
            return True
        budget = getattr(principal, "budget_usd", None)
        return budget is not None and spent >= budget - self.spent_usd(key_of(principal))

    def record(
        self, principal, model: str, request_id: str, usage: Usage | dict, status: str,
        discount: float = 0.0,
    ) -> None:  # fmt: skip
        """One ledger row for a request the engine has let go of."""
        key, cost = key_of(principal), self.prices.cost(usage, discount)["total"]
        self.ledger.record(key, model, usage, cost, status=status, request_id=request_id)
        with self._lock:
            if key in self._spent:
                self._spent[key] += cost

    def close(self) -> None:
        self.ledger.close()

    @property
    def router(self):
        """GET /v1/usage: the calling key's spend (totals, by model, by day)."""
        from fastapi import APIRouter, Depends

        from serve.api.routes import principal_of

        router = APIRouter()

        def usage(principal=Depends(principal_of)) -> dict:  # noqa: B008 - FastAPI's idiom
            return self.ledger.spend(key_of(principal))

        router.add_api_route("/v1/usage", usage, methods=["GET"])
        return router


def for_server(model, args: dict[str, str]) -> Billing:
    """The billing hook for `python -m distill serve` (ledger=<path>, default under the
    assets home); prices from the served export's serving.json."""
    path = Path(args["ledger"]).expanduser() if args.get("ledger") else default_ledger_path()
    return Billing(PriceList(model.spec.pricing), UsageLedger(path))
