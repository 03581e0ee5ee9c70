"""Batch input lines: parse and validate them, run one through the engine, shape the records.

A line is `{custom_id, method, url, body}`. Its body goes through exactly what the
synchronous endpoint does — the same pydantic request model, `prepare`, the billing check,
a `Generation` and `collect` — so an output line's `response.body` is the body
`POST /v1/chat/completions` would have returned (usage and cost included, the cost with the
batch discount). Used by the server's batch runner and by `python -m distill batch`.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from serve.api.errors import APIError, invalid, validation_error
from serve.api.generate import Generation
from serve.api.hooks import call
from serve.api.prepare import prepare
from serve.api.schemas import ChatCompletionRequest, CompletionRequest
from serve.api.streaming import collect
from serve.auth import check_budget
from serve.billing import key_of

ENDPOINTS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}
BATCH_PRIORITY = 1  # below interactive requests (0): see serve/scheduler.py


class InputError(Exception):
    """The input file as a whole is unusable (empty, not JSONL): the batch fails."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class Unfinished(Exception):
    """The engine aborted the line (server stopping): it stays pending and runs again."""


@dataclass
class Line:
    number: int  # 1-based line number in the input file
    custom_id: str | None
    body: dict | None
    error: APIError | None = None  # set: the line goes to the error file and never runs


def _check_line(item: Any, endpoint: str, seen: set[str]) -> tuple[str | None, APIError | None]:
    if not isinstance(item, dict):
        return None, invalid("each line must be a JSON object", code="invalid_line")
    cid = item.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return None, invalid("custom_id is missing (a non-empty string)", "custom_id",
                             "missing_custom_id")  # fmt: skip
    if cid in seen:
        return cid, invalid(f"custom_id {cid!r} is used by an earlier line", "custom_id",
                            "duplicate_custom_id")  # fmt: skip
    seen.add(cid)
    if item.get("method") != "POST":
        return cid, invalid(f"method must be POST, got {item.get('method')!r}", "method",
                            "invalid_method")  # fmt: skip
    if item.get("url") != endpoint:
        return cid, invalid(f"url must be this batch's endpoint {endpoint}, got "
                            f"{item.get('url')!r}", "url", "invalid_url")  # fmt: skip
    body = item.get("body")
    if not isinstance(body, dict):
        return cid, invalid("body must be a JSON object", "body", "invalid_body")
    try:
        validate_body(body, endpoint)
    except APIError as e:
        return cid, e
    return cid, None


def validate_body(body: dict, endpoint: str):
    """The synchronous endpoint's request model for `body` (its 400 as APIError)."""
    try:
        req = ENDPOINTS[endpoint].model_validate(body)
    except ValidationError as e:
        raise validation_error(e) from e
    if req.stream:
        raise invalid("stream is not supported in a batch", "stream")
    return req


def parse_input(data: bytes, endpoint: str) -> list[Line]:
    """Every non-blank line, valid or with its error. InputError when nothing in the file is
    a JSON line (empty, binary, one JSON document over several lines, …)."""
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise InputError("invalid_file", f"the input file is not UTF-8 text: {e}") from e
    lines, seen, parsed = [], set(), 0
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
            parsed += 1
        except json.JSONDecodeError as e:
            err = invalid(f"line is not valid JSON: {e}", code="invalid_json")
            lines.append(Line(number, None, None, err))
            continue
        cid, err = _check_line(item, endpoint, seen)
        lines.append(Line(number, cid, item.get("body") if err is None else None, err))
    if not lines:
        raise InputError("empty_file", "the input file has no lines")
    if parsed == 0:
        raise InputError("invalid_file", "the input file is not JSONL: no line is JSON")
    return lines


def _id() -> str:
    return f"batch_req_{secrets.token_hex(12)}"


def output_record(custom_id: str, request_id: str, body: dict) -> dict:
    """An output-file line (OpenAI's shape)."""
    response = {"status_code": 200, "request_id": request_id, "body": body}
    return {"id": _id(), "custom_id": custom_id, "response": response, "error": None}


def error_record(custom_id: str | None, line: int, err: APIError) -> dict:
    """An error-file line: the error object the synchronous endpoint would have answered
    (as `response.body`, with its status) plus `error` with the input line number."""
    response = {"status_code": err.status, "request_id": None, "body": err.body()}
    error = {"code": err.code or err.type, "message": err.message, "param": err.param,
             "line": line}  # fmt: skip
    return {"id": _id(), "custom_id": custom_id, "response": response, "error": error}


def line_error(code: str, message: str, status: int = 400) -> APIError:
    return APIError(status, message, code=code)


class LineBilling:
    """The billing hook one batch line runs with: every price less `discount`, and the
    line's worst case held against its key's budget while it runs (`held`: key → USD,
    shared by the lines in flight), so lines running together never overspend. Remembers
    whether the budget stopped the line (then it fails whole instead of being cut short)."""

    def __init__(self, base, discount: float, held: dict[str, float] | None = None):
        self.base, self.discount = base, discount
        self.held = {} if held is None else held
        self.stopped = False
        self._key, self._amount = "", 0.0
        if base is not None and hasattr(base, "cost"):
            self.cost = lambda usage: base.cost(usage, discount=discount)

    async def check(self, principal, model, prompt_tokens, max_tokens, max_cost_usd) -> None:
        await call(self.base, "check", principal, model, prompt_tokens, max_tokens, max_cost_usd,
                   discount=self.discount)  # fmt: skip
        prices = getattr(self.base, "prices", None)
        if prices is None or getattr(principal, "budget_usd", None) is None:
            return
        worst = prices.worst_case(prompt_tokens, max_tokens, discount=self.discount)
        key = key_of(principal)
        spent = self.base.spent_usd(key) + self.held.get(key, 0.0)
        check_budget(principal, worst, _Spent(spent))
        self._hold(key, worst)

    def _hold(self, key: str, amount: float) -> None:
        self.held[key] = self.held.get(key, 0.0) - self._amount + amount
        self._key, self._amount = key, amount

    def settle(self, usage: dict | None = None) -> None:
        """Hold what the line did cost (until it is recorded), or nothing (it never ran)."""
        cost = ((usage or {}).get("cost") or {}).get("total", 0.0)
        if self._key:
            self._hold(self._key, cost)

    async def over_budget(self, principal, usage, max_cost_usd) -> bool:
        over = await call(self.base, "over_budget", principal, usage, max_cost_usd,
                          discount=self.discount, default=False)  # fmt: skip
        self.stopped = self.stopped or bool(over)
        return bool(over)

    async def record(self, principal, model, request_id, usage, status) -> None:
        await call(self.base, "record", principal, model, request_id, usage, status,
                   discount=self.discount)  # fmt: skip
        self.settle()  # now in the ledger's spend: hold nothing more


class _Spent:
    def __init__(self, usd: float):
        self.usd = usd

    def spent_usd(self, key_id: str) -> float:
        return self.usd


def _quota() -> APIError:
    return APIError(429, "insufficient quota: the key's budget ran out during this batch",
                    code="insufficient_quota", type="insufficient_quota")  # fmt: skip


async def run_line(body: dict, endpoint: str, state, principal, discount: float,
                   held: dict[str, float] | None = None) -> dict:  # fmt: skip
    """Run one line's body as its endpoint would; the response body. Raises APIError for a
    line that fails (its error record) and Unfinished when the server aborted it. `held`:
    budget held by the batch's lines in flight (see LineBilling)."""
    req = validate_body(body, endpoint)
    job = await prepare(req, state.model, state.constraints)
    job.principal = principal
    billing = LineBilling(state.billing, discount, held)
    await billing.check(principal, job.model, len(job.prompt_ids),
                        job.params.max_tokens * job.params.n, job.max_cost_usd)  # fmt: skip
    gen = Generation(job, state, billing=billing, priority=BATCH_PRIORITY)
    try:
        await gen.start()
    except BaseException as e:
        billing.settle()
        if isinstance(e, ValueError):  # the engine's word on an invalid request: a 400
            raise invalid(str(e)) from e
        if isinstance(e, RuntimeError):  # the engine thread is stopping: run it later
            raise Unfinished(job.id) from e
        raise
    try:
        result = await collect(gen)
    finally:
        billing.settle(gen.usage())  # hold the real cost until the ledger has it
    if billing.stopped:
        raise _quota()
    if any(f == "abort" for f in gen.finish):
        raise Unfinished(job.id)
    return result
