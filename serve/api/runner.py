"""The engine thread: the only thread that touches the engine (and so the model).

Request handlers run on the asyncio loop. They never call the engine directly: `submit`
hands the runner a new request and `abort` names one to stop; the runner applies both
between steps, then steps the batch while anything can advance. Each step's outputs land on
the requests' bounded queues (the engine puts them there) and the runner wakes the handlers
that got one, so the loop never blocks on a queue or on a forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

import torch

log = logging.getLogger(__name__)

# Intra-op threads the engine thread takes; None: whatever it inherits (tests, notebooks).
_engine_threads: int | None = None


def reserve_cores_for_engine() -> None:
    """Leave the calling (main, event-loop) thread one intra-op thread and give the engine
    thread the rest. Call at the start of a server process, before the model loads.

    OpenMP (libgomp) only spin-waits between parallel regions while the process has no more
    OpenMP threads than cores. A second pool, made by the main thread's own parallel work
    (loading and packing the model), made the engine thread's workers sleep between ops:
    decode step 62 → 102 ms at 8 rows on 2 cores (measured). With one thread the main
    thread makes no pool, and request parsing never needs more.
    """
    global _engine_threads
    _engine_threads = torch.get_num_threads()
    torch.set_num_threads(1)


class Stream:
    """The handler's side of one engine request: drain its queue, wait for more."""

    def __init__(self, runner: EngineRunner, request, loop: asyncio.AbstractEventLoop):
        self.runner, self.request, self.loop = runner, request, loop
        self.request_id: str = request.request_id
        self._event = asyncio.Event()
        self.aborted = False  # set by the runner once the engine dropped the request

    def _wake(self) -> None:  # runner thread
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens any more
            self.loop.call_soon_threadsafe(self._event.set)

    def drain(self) -> list:
        """The outputs queued so far (never blocks)."""
        out = []
        while True:
            try:
                out.append(self.request.outputs.get_nowait())
            except queue.Empty:
                break
        if out:
            self.runner.wake()  # room in the queue: a paused request may run again
        return out

    async def next_outputs(self) -> list:
        """Wait until there are outputs (or the request was aborted) and return them."""
        while True:
            self._event.clear()
            out = self.drain()
            if out or self.aborted:
                return out
            await self._event.wait()


class EngineRunner:
    """Owns the engine thread. `start()` it, `stop()` it; handlers use `submit` and `abort`."""

    def __init__(self, engine, idle_timeout: float = 0.5):
        self.engine = engine
        self.idle_timeout = idle_timeout
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, Stream] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.steps = 0
        self.on_step: Callable[[list], None] | None = None  # metrics hook (runner thread)

    # ---- handler side (asyncio loop) ------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; an engine is stepped by one runner at a time."""
        owner = getattr(self.engine, "_api_runner", None)
        if owner is not None and owner is not self and owner.alive:
            raise RuntimeError("this engine is already served by another running app")
        self.engine._api_runner = self
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort everything still running and end the thread."""
        self.abort_all()
        self._stopping = True
        self.wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if getattr(self.engine, "_api_runner", None) is self:
            self.engine._api_runner = None

    def wake(self) -> None:
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def _call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the engine thread between steps; its result or error comes back."""
        fut: Future = Future()

        def command() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the awaiting handler
                fut.set_exception(e)

        self._commands.put(command)
        self.wake()
        return fut

    async def submit(self, prompt: list[int], params, **kwargs) -> Stream:
        """Add a request on the engine thread; raises the engine's ValueError for a bad one."""
        if self._stopping or not self._thread.is_alive():
            raise RuntimeError("the server is shutting down")
        loop = asyncio.get_running_loop()

        def add() -> Stream:
            req = self.engine.add_request(prompt, params, **kwargs)
            stream = Stream(self, req, loop)
            self._streams[req.request_id] = stream
            return stream

        return await asyncio.wrap_future(self._call(add))

    def abort(self, request_id: str) -> Future:
        """Stop a request before the next step (no-op when it already finished); the future
        resolves once the engine has dropped it."""
        return self._call(lambda: self._abort(request_id))

    def abort_all(self) -> Future:
        return self._call(lambda: [self._abort(rid) for rid in list(self._streams)])

    # ---- engine thread --------------------------------------------------------------------

    def _abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        self.engine.abort(request_id)
        if stream is not None:
            stream.aborted = True
            stream._wake()

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _progress(self) -> tuple[int, int]:
        """Changes whenever a step did anything (a token computed, a sequence admitted)."""
        sched = self.engine.scheduler
        return len(sched.waiting), sum(s.num_computed for s in sched.running)

    def _run(self) -> None:
        if _engine_threads is not None:
            torch.set_num_threads(_engine_threads)  # per thread: OpenMP's ICV
        while not self._stopping:
            self._wake.clear()
            self._run_commands()
            if not self.engine.has_work():
                self._wake.wait(self.idle_timeout)
                continue
            before = self._progress()
            try:
                outputs = self.engine.step()
            except Exception:  # a broken step must not kill the thread: fail its requests
                log.exception("engine step failed; aborting running requests")
                for rid in list(self._streams):
                    self._abort(rid)
                continue
            self.steps += 1
            self._deliver(outputs)
            if not outputs and self._progress() == before:
                # Every runnable request is paused by its reader (or waits for memory):
                # sleep until a reader drains, a command arrives, or the timeout.
                self._wake.wait(self.idle_timeout)
        self._run_commands()

    def _deliver(self, outputs: list) -> None:
        woken = set()
        for out in outputs:
            if out.request_id in woken:
                continue
            woken.add(out.request_id)
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream._wake()
            if out.usage is not None:  # the request's last output
                self._streams.pop(out.request_id, None)
        if self.on_step is not None:
            self.on_step(outputs)
