"""Server-sent events for a streaming request, and the non-streaming collection of the same.

Backpressure: each chunk is written only when the previous one was taken by the socket, and
the engine output queue behind it is bounded, so a client that reads slowly pauses only its
own request. Disconnect: Starlette cancels the response on `http.disconnect`; the `finally`
aborts the request (the engine drops it before its next step).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from starlette.responses import StreamingResponse

from serve.api.generate import ChoiceUpdate, Generation
from serve.api.responses import ChunkWriter, chat_response, completion_response

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _event(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


async def sse_events(gen: Generation) -> AsyncIterator[bytes]:
    job, tt = gen.job, gen.state.model.token_text
    writer = ChunkWriter(job, tt)
    try:
        running = gen.usage() if job.continuous_usage else None
        for chunk in writer.first(running):
            yield _event(chunk)
        async for updates in gen.updates():
            running = gen.usage() if job.continuous_usage else None
            for chunk in writer.updates(updates, running):
                yield _event(chunk)
        for chunk in writer.last(gen.usage()):
            yield _event(chunk)
        yield _event("[DONE]")
    finally:
        gen.close()


class SSEResponse(StreamingResponse):
    """Closes the generation when the response ends, however it ends — also when the client
    left before the body started (then the event generator never runs its `finally`)."""

    def __init__(self, gen: Generation, on_close: Callable[[], None]):
        super().__init__(sse_events(gen), media_type="text/event-stream", headers=SSE_HEADERS)
        self.gen, self.on_close = gen, on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.close()
            self.on_close()


async def collect(gen: Generation) -> dict:
    """Run a non-streaming request to the end; the OpenAI response body."""
    job = gen.job
    choices = [ChoiceUpdate(i) for i in range(job.params.n)]
    try:
        async for updates in gen.updates():
            for u in updates:
                c = choices[u.index]
                c.text += u.text
                c.outputs += u.outputs
                c.finish_reason = u.finish_reason or c.finish_reason
    finally:
        gen.close()
    build = chat_response if job.kind == "chat" else completion_response
    return build(job, gen.state.model.token_text, choices, gen.usage())
