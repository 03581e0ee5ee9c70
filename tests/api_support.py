"""Helpers for the API tests: a tiny export with the real tokenizer, a live uvicorn server."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import uvicorn

from serve.export_format import Limits, ServingSpec

MODEL = "tiny"
ENGINE = {"kv_memory_bytes": 16 << 20, "block_size": 16}  # 1,024 blocks of 16 tokens


def make_tiny_export(out: Path, tokenizer, **limits) -> Path:
    """A 4-layer, 64-wide random Llama (real 49,152-token tokenizer) as an export directory."""
    from distill.models.tiny import save_tiny_llama

    save_tiny_llama(out, tokenizer=tokenizer, initializer_range=0.3)
    limits = {"max_output_tokens": 1024, "max_concurrent_requests": 8, **limits}
    ServingSpec(
        model=MODEL,
        context_length=2048,
        chat_template=tokenizer.chat_template,
        limits=Limits(**limits),
    ).save(out)
    return out


def set_limits(export_dir: Path, **limits) -> None:
    spec = json.loads((export_dir / "serving.json").read_text())
    spec["limits"].update(limits)
    (export_dir / "serving.json").write_text(json.dumps(spec))


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 (a free port) in a thread; ready on `__enter__`."""

    def __init__(self, app, timeout: float = 60, send_buffer: int | None = 32 << 10):
        self.app, self.timeout = app, timeout
        self.sock = socket.socket()
        if send_buffer:  # accepted sockets inherit it: a stalled reader fills it in ~15 chunks
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        self.sock.bind(("127.0.0.1", 0))  # the port is ours before uvicorn starts
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:  # readiness: uvicorn sets this once it listens
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.005) -> bool:
    """Poll `predicate` until it holds (True) or the timeout passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def sse_events(lines) -> list:
    """Parse `data: …` lines of an SSE body: JSON objects, and the final "[DONE]"."""
    events = []
    for line in lines:
        if isinstance(line, bytes):
            line = line.decode()
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
