"""`create_app(model, auth=, billing=, constraints=)`: the FastAPI app for one served model.

The app's lifespan starts the engine thread and, on shutdown, stops admitting, aborts what
still runs and waits for the clean-up (billing) of every request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, FastAPI

from serve.api.errors import APIError, install_error_handlers
from serve.api.metrics import Metrics
from serve.api.model import ServedModel
from serve.api.routes import router
from serve.api.runner import EngineRunner

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 << 20
QUEUE_SIZE = 16  # outputs buffered per choice before a slow reader pauses its request


@dataclass
class ServerState:
    model: ServedModel
    runner: EngineRunner
    metrics: Metrics
    auth: object | None = None
    billing: object | None = None
    constraints: object | None = None
    queue_size: int = QUEUE_SIZE
    active: int = 0  # generation requests admitted and not yet closed
    draining: bool = False
    tasks: set = field(default_factory=set)  # clean-up tasks in flight

    def release_once(self):
        """A callable that frees this request's admission slot exactly once."""
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.active -= 1

        return release

    async def shutdown(self) -> None:
        """Stop admitting, abort running requests, finish their clean-up, stop the thread."""
        self.draining = True
        done = self.runner.abort_all()
        await asyncio.wait_for(asyncio.wrap_future(done), timeout=30)
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=30)
        await asyncio.to_thread(self.runner.stop)


class _Door:
    """Pure ASGI middleware: refuse oversized bodies, count responses by route and status.
    `uploads`: a larger limit for one path (file uploads)."""

    def __init__(self, app, metrics: Metrics, max_body: int, uploads: dict[str, int] | None = None):
        self.app, self.metrics, self.max_body = app, metrics, max_body
        self.uploads = uploads or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope.get("path", "")
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"0")
        limit = self.uploads.get(route, self.max_body)
        if length.isdigit() and int(length) > limit:
            err = APIError(413, f"request body over {limit} bytes", code="body_too_large")
            self.metrics.requests.labels(route, "413").inc()
            return await err.response()(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counting_send)


def create_app(
    model: ServedModel | str | Path,
    *,
    auth=None,
    billing=None,
    constraints=None,
    batches=None,
    routers: Sequence[APIRouter] = (),
    queue_size: int = QUEUE_SIZE,
    max_body_bytes: int = MAX_BODY_BYTES,
    **engine_kwargs,
) -> FastAPI:
    """The OpenAI-compatible app serving `model` (a loaded ServedModel or an export dir).

    `auth`, `billing`, `constraints`: optional hooks, see serve/api/hooks.py. `routers`: more
    endpoints (e.g. /v1/usage), as is a hook's own `.router`; their handlers find the
    ServerState at `request.app.state.server` and may depend on `serve.api.routes.Principal`
    for the caller. `batches`: a serve.batch.BatchService (/v1/files, /v1/batches), started
    after the engine thread and stopped before it."""
    if not isinstance(model, ServedModel):
        model = ServedModel.load(model, **engine_kwargs)
    metrics = Metrics(model.engine)
    runner = EngineRunner(model.engine)
    runner.on_step = metrics.on_step
    state = ServerState(model, runner, metrics, auth, billing, constraints, queue_size)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        if batches is not None:
            await batches.start(state)
        log.info("serving %s from %s", model.name, model.path)
        try:
            yield
        finally:
            if batches is not None:  # first: lines in flight stay pending, never half-written
                await batches.stop()
            await state.shutdown()
            flush = getattr(billing, "close", None)
            if flush is not None:
                flush()

    app = FastAPI(title="nanodistill", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    install_error_handlers(app)
    app.include_router(router)
    hook_routers = [getattr(h, "router", None) for h in (auth, billing, constraints, batches)]
    for extra in [*routers, *(r for r in hook_routers if r is not None)]:
        app.include_router(extra)
    uploads = {"/v1/files": batches.max_file_bytes + (64 << 10)} if batches is not None else {}
    app.add_middleware(_Door, metrics=metrics, max_body=max_body_bytes, uploads=uploads)
    return app
