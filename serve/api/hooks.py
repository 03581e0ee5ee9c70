"""Where auth, billing and structured outputs plug into the API (all optional).

`create_app(model, auth=…, billing=…, constraints=…)` takes any objects with these methods
(sync or async); with none of them the server is open, free and unconstrained. A hook says
"no" by raising `serve.api.errors.APIError` (status, message, code) — or ValueError (→ 400),
PermissionError (→ 401).
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol, runtime_checkable

from starlette.requests import Request

from serve.scheduler import TokenMask


@runtime_checkable
class Auth(Protocol):
    def authenticate(self, request: Request) -> str:
        """The caller's tenant id (API key id): the prefix-cache salt and the ledger key.
        Raise PermissionError / APIError(401) for a missing or wrong key."""


@runtime_checkable
class Billing(Protocol):
    def check(self, tenant: str, model: str, prompt_tokens: int, max_tokens: int,
              max_cost_usd: float | None) -> None:  # fmt: skip
        """Before generation: refuse (APIError 429 `insufficient_quota`) a request whose worst
        case exceeds the tenant's remaining budget or `max_cost_usd`."""

    def cost(self, usage: dict) -> dict | None:
        """`usage["cost"]`: USD with its breakdown, from an OpenAI usage dict."""

    def over_budget(self, tenant: str, usage: dict, max_cost_usd: float | None) -> bool:
        """While streaming (running usage): True stops the request now (finish 'length')."""

    def record(self, tenant: str, model: str, request_id: str, usage: dict,
               status: str) -> None:  # fmt: skip
        """After the request (finished, stopped or aborted by a disconnect): write the ledger."""


@runtime_checkable
class Constraints(Protocol):
    def token_mask(self, response_format: dict, model: Any) -> TokenMask | None:
        """Compile `response_format` for `model` (a ServedModel: tokenizer, vocab size) before
        any token is generated; an invalid or unsupported schema raises ValueError (→ 400)."""


async def call(hook: Any, method: str, *args, default=None, **kwargs):
    """`hook.method(*args, **kwargs)`, awaited when async; `default` when the hook or the
    method is absent."""
    fn = getattr(hook, method, None) if hook is not None else None
    if fn is None:
        return default
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result
