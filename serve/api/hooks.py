"""Where auth, billing and structured outputs plug into the API (all optional).

`create_app(model, auth=…, billing=…, constraints=…)` takes any objects with these methods
(sync or async); with none of them the server is open, free and unconstrained. A hook says
"no" by raising `serve.api.errors.APIError`, or any exception with `status` (4xx), `message`
and optionally `type`/`code` attributes (e.g. serve.auth's AuthError, QuotaError), or
ValueError (→ 400), PermissionError (→ 401).
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

from starlette.requests import Request

from serve.api.errors import APIError
from serve.scheduler import TokenMask


@runtime_checkable
class Auth(Protocol):
    def authenticate(self, request: Request) -> Any:
        """Who calls: a name (str) or an object with `.name` (the ledger key) and optionally
        `.cache_salt` (else the name salts the prefix cache). Runs before the body is parsed.
        Raise for a missing or wrong key (PermissionError, or anything with status 401)."""


@runtime_checkable
class Billing(Protocol):
    """`principal` is whatever `Auth.authenticate` returned (None without auth)."""

    def check(self, principal: Any, model: str, prompt_tokens: int, max_tokens: int,
              max_cost_usd: float | None) -> None:  # fmt: skip
        """Before generation (`max_tokens` already × n): refuse (status 429,
        `insufficient_quota`) a request whose worst case exceeds the remaining budget or
        `max_cost_usd`."""

    def cost(self, usage: dict) -> dict | None:
        """`usage["cost"]`: USD with its breakdown, from an OpenAI usage dict (sync)."""

    def over_budget(self, principal: Any, usage: dict, max_cost_usd: float | None) -> bool:
        """After each streamed step, with the running usage: True stops the request now
        (its choices finish with "length")."""

    def record(self, principal: Any, model: str, request_id: str, usage: dict,
               status: str) -> None:  # fmt: skip
        """Once per request after the engine let go of it; status "finished" or "aborted"
        (disconnect, budget, shutdown), usage = what was generated. Write the ledger."""

    def close(self) -> None:
        """At shutdown, after every request was recorded: flush the ledger."""

    # Optional on any hook: `router` (a FastAPI APIRouter, e.g. GET /v1/usage), mounted by
    # create_app; its handlers may take `principal: serve.api.routes.Principal`.


@runtime_checkable
class Constraints(Protocol):
    def token_mask(self, response_format: dict, model: Any, n: int) -> TokenMask | None:
        """Compile `response_format` for `model` (a ServedModel: tokenizer, vocab size) before
        any token is generated; an invalid or unsupported schema raises ValueError (→ 400).
        The mask is called with each of the request's `n` choices' generated tokens."""


async def call(hook: Any, method: str, *args, default=None, **kwargs):
    """`hook.method(*args, **kwargs)`, awaited when async; `default` when the hook or the
    method is absent."""
    fn = getattr(hook, method, None) if hook is not None else None
    if fn is None:
        return default
    try:
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
    except APIError:
        raise
    except Exception as e:
        if (error := APIError.from_exception(e)) is not None:
            raise error from e
        raise
    return result
