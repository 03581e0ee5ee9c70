"""Every failure → an OpenAI error object `{"error": {message, type, param, code}}` with a 4xx.

Handlers raise `APIError` (or a plain ValueError, which is the engine's way of saying the
request is invalid). Anything unexpected is still answered in the same shape — logged with
its traceback, never a bare 500 page.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_overloaded",
}


class APIError(Exception):
    """An error to show the client as an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers

    @classmethod
    def from_exception(cls, exc: Exception) -> APIError | None:
        """An exception that carries a 4xx `status` (and `message`, `type`, `code`, `param`)."""
        status = getattr(exc, "status", None)
        if not isinstance(status, int) or not 400 <= status < 500:
            return None
        return cls(status, getattr(exc, "message", None) or str(exc), getattr(exc, "param", None),
                   getattr(exc, "code", None), getattr(exc, "type", None))  # fmt: skip

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _is_union_tag(part) -> bool:
    """pydantic's name for a union member in an error location, e.g. 'str' or 'list[Part]'."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def validation_error(exc: RequestValidationError | ValidationError) -> APIError:
    """The first pydantic error, with its field path as `param` (a request body, or a batch
    line's body validated by the same model)."""
    errors = exc.errors()
    if not errors:
        return invalid("invalid request")
    # A union field (content: str | list[part]) reports one error per member: the member that
    # matched deepest says what is wrong; the members' tags ('str', 'list[…]') are not params.
    err = max(errors, key=lambda e: len(e.get("loc", ())))
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and not _is_union_tag(p)]
    param = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        return invalid(f"request body is not valid JSON: {err.get('msg')}", code="invalid_json")
    if err.get("type") == "missing":
        return invalid(f"missing required parameter '{param}'", param, "missing_required_parameter")
    got = err.get("input")
    try:
        got_text = json.dumps(got)[:80]
    except (TypeError, ValueError):
        got_text = repr(got)[:80]
    where = f"'{param}'" if param else "request body"
    return invalid(f"invalid value for {where}: {err.get('msg')} (got {got_text})", param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def request_validation_error(_: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        status = exc.status_code if 400 <= exc.status_code < 500 else 400
        message = str(exc.detail) if exc.detail else "bad request"
        return APIError(status, message, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(ValueError)
    async def value_error(_: Request, exc: ValueError):
        return invalid(str(exc)).response()

    @app.exception_handler(PermissionError)
    async def permission_error(_: Request, exc: PermissionError):
        return APIError(401, str(exc) or "invalid API key", code="invalid_api_key").response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception):
        if (error := APIError.from_exception(exc)) is not None:  # a hook's own error type
            return error.response()
        log.exception("unhandled error in request", exc_info=exc)
        return APIError(400, f"request failed: {type(exc).__name__}: {exc}",
                        code="request_failed").response()  # fmt: skip
