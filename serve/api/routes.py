"""The endpoints. Thin: parse (pydantic), prepare, run on the engine, shape the answer."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from serve.api.errors import APIError
from serve.api.generate import Generation
from serve.api.hooks import call
from serve.api.metrics import CONTENT_TYPE_LATEST
from serve.api.prepare import prepare
from serve.api.schemas import ChatCompletionRequest, CompletionRequest, ModelCard
from serve.api.streaming import SSEResponse, collect

router = APIRouter()


def server(request: Request):
    return request.app.state.server


async def principal_of(request: Request):
    """Who calls (auth's answer; None without auth). Runs before the body is validated, so a
    missing key is a 401 whatever the body."""
    state = server(request)
    if state.auth is None:
        return None
    return await call(state.auth, "authenticate", request)


Principal = Annotated[Any, Depends(principal_of)]


@router.get("/health")
async def health(request: Request):
    state = server(request)
    ok = state.runner.alive and not state.draining
    body = {"status": "ok" if ok else "unavailable", "model": state.model.name,
            "running": state.active}  # fmt: skip
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request):
    return Response(server(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request, _: Principal):
    m = server(request).model
    card = ModelCard(id=m.name, created=m.created, context_length=m.context_length)
    return {"object": "list", "data": [card.model_dump()]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request, _: Principal):
    m = server(request).model
    if model_id != m.name:
        raise APIError(404, f"The model '{model_id}' does not exist", "model", "model_not_found")
    return ModelCard(id=m.name, created=m.created, context_length=m.context_length).model_dump()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, principal: Principal):
    return await _generate(body, request, principal)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, principal: Principal):
    return await _generate(body, request, principal)


async def _generate(body, request: Request, principal):
    state = server(request)
    if state.draining:
        raise APIError(503, "the server is shutting down", code="server_shutting_down")
    limit = state.model.spec.limits.max_concurrent_requests
    if state.active >= limit:
        raise APIError(429, f"too many requests in flight (limit {limit}); retry shortly",
                       code="too_many_requests", headers={"Retry-After": "1"})  # fmt: skip
    job = await prepare(body, state.model, state.constraints)
    job.principal = principal
    await call(state.billing, "check", principal, job.model, len(job.prompt_ids),
               job.params.max_tokens * job.params.n, job.max_cost_usd)  # fmt: skip
    gen = Generation(job, state)
    state.active += 1
    try:
        await gen.start()
    except BaseException:
        state.active -= 1
        raise
    release = state.release_once()
    if job.stream:
        return SSEResponse(gen, on_close=release)
    try:
        return await _until_disconnect(collect(gen), request)
    finally:
        gen.close()
        release()


async def _until_disconnect(work, request: Request):
    """Await `work`; if the client goes away first, cancel it (which aborts the request)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        raise APIError(400, "client disconnected", code="client_disconnected")
    return task.result()
