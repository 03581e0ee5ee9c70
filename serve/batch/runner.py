"""The batch runner: an asyncio task in the server that works through the active batches,
oldest first, feeding their lines to the engine at batch priority.

Per batch: validating (parse the input; bad lines go to the error file) → in_progress (up
to `concurrency` lines at a time; each result is appended and fsynced, then its line is
marked) → finalizing → completed. `cancelling` and an expired window stop the lines that
still run within one engine step; their custom_ids go to the error file (`batch_cancelled`,
`batch_expired`), finished ones stay in the output. A key whose budget runs out gets its
remaining lines failed with `insufficient_quota`.

On start the runner reconciles every active batch with its result files, so a batch that a
killed server left behind resumes where it was, each line written exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque

from serve.api.errors import APIError
from serve.batch.lines import (
    InputError,
    Unfinished,
    error_record,
    line_error,
    output_record,
    parse_input,
    run_line,
)
from serve.batch.results import ResultFile
from serve.batch.store import BatchStore

log = logging.getLogger(__name__)
STOP_CODES = {"cancelling": ("batch_cancelled", "the batch was cancelled"),
              "expired": ("batch_expired", "the batch did not finish within its window")}  # fmt: skip


class BatchRunner:
    def __init__(self, store: BatchStore, state, discount: float, concurrency: int = 32,
                 principal_of=None):  # fmt: skip
        """`principal_of(key_id)`: the principal that owns a batch (after a restart)."""
        self.store, self.state, self.discount = store, state, discount
        self.concurrency = concurrency
        self.principal_of = principal_of or (lambda key_id: key_id or None)
        self.changed = asyncio.Event()  # a batch was created or cancelled
        self.held: dict[str, float] = {}  # key → USD its lines in flight may still spend
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Stop between lines: lines in flight are aborted and stay pending (rerun later)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def files(self, row) -> tuple[ResultFile, ResultFile]:
        return (ResultFile(self.store.path(row["output_file_id"])),
                ResultFile(self.store.path(row["error_file_id"])))  # fmt: skip

    async def _loop(self) -> None:
        for row in self.store.active():  # a restart: repair the crash window first
            out, err = self.files(row)
            if row["status"] != "validating":
                fixed = self.store.reconcile(row["id"], out.recover(), err.recover())
                if fixed:
                    log.info("batch %s: %d results found written but unmarked", row["id"], fixed)
        while True:
            self.changed.clear()
            active = self.store.active()
            if not active:
                await self.changed.wait()
                continue
            try:
                await self._process(active[0]["id"])
            except asyncio.CancelledError:
                raise
            except Exception:  # one broken batch must not stop the others
                log.exception("batch %s failed", active[0]["id"])
                self.store.set_status(active[0]["id"], "failed", [
                    {"code": "server_error", "message": "the batch runner failed", "line": None}
                ])  # fmt: skip

    async def _process(self, batch_id: str) -> None:
        row = self.store.row(batch_id)
        if row["in_progress_at"] is None:  # not validated yet (perhaps cancelled or expired
            if not await self._validate(row):  # meanwhile: its lines get their errors then)
                return
            row = self.store.row(batch_id)
        if row["status"] in ("in_progress", "cancelling"):
            stop = await self._execute(row)
            if stop:
                return self._stop(self.store.row(batch_id), stop, self.store.pending(batch_id))
        self.store.set_status(batch_id, "finalizing")
        self._publish(row)
        self.store.set_status(batch_id, "completed")

    async def _validate(self, row) -> bool:
        path = self.store.path(row["input_file_id"])
        try:
            data = await asyncio.to_thread(path.read_bytes)
            lines = parse_input(data, row["endpoint"])
        except (FileNotFoundError, InputError) as e:
            code = getattr(e, "code", "input_file_missing")
            message = getattr(e, "message", f"input file {row['input_file_id']} is gone")
            self.store.set_status(
                row["id"],
                "failed",
                [{"code": code, "message": message, "param": "input_file_id", "line": None}],
            )
            return False
        _, err = self.files(row)
        err.reset()  # validation restarted after a crash begins again
        bad = [error_record(ln.custom_id, ln.number, ln.error) for ln in lines if ln.error]
        await asyncio.to_thread(err.append, bad)
        self.store.start_lines(row["id"], lines)
        return True

    def _stop_reason(self, batch_id: str) -> str | None:
        row = self.store.row(batch_id)
        if row["status"] == "cancelling":
            return "cancelling"
        return "expired" if time.time() >= row["expires_at"] else None

    async def _execute(self, row) -> str | None:
        """Run the pending lines; returns "cancelling"/"expired" when stopped early."""
        bid, endpoint = row["id"], row["endpoint"]
        out, err = self.files(row)
        principal = self.principal_of(row["key_id"])
        queue = deque(self.store.pending(bid))
        running: dict[asyncio.Task, object] = {}
        # The first line runs alone: lines usually share a system prompt, and the rest then
        # find it in the prefix cache instead of all prefilling it at once.
        limit, quota, stop = 1, False, self._stop_reason(bid)
        waker = asyncio.ensure_future(self.changed.wait())
        try:
            while (queue or running) and not stop:
                while queue and len(running) < limit and not self.state.draining:
                    line = queue.popleft()
                    task = asyncio.ensure_future(
                        run_line(json.loads(line["body"]), endpoint, self.state, principal,
                                 self.discount, self.held))  # fmt: skip
                    running[task] = line
                if not running:
                    await asyncio.sleep(0.1)  # draining: wait to be stopped
                    continue
                timeout = max(0.0, row["expires_at"] - time.time())
                done, _ = await asyncio.wait({*running, waker}, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                finished = done - {waker}
                if waker in done:
                    self.changed.clear()
                    waker = asyncio.ensure_future(self.changed.wait())
                for task in finished:
                    limit = self.concurrency
                    line = running.pop(task)
                    outcome = await self._settle(bid, line, task, out, err)
                    quota |= outcome == "quota"
                    if outcome == "retry":  # aborted by the server: run it again (or, while
                        queue.appendleft(line)  # draining, after the restart)
                if queue or running:  # all done: completed, even if the window just closed
                    stop = self._stop_reason(bid)
                if quota and queue:  # the budget is spent: the rest fail without running
                    failed = [queue.popleft() for _ in range(len(queue))]
                    await self._fail(
                        bid,
                        failed,
                        err,
                        "insufficient_quota",
                        "insufficient quota: the key's budget ran out",
                        429,
                    )
        finally:
            waker.cancel()
            for task in running:
                task.cancel()  # aborts its engine request within one step
            if running:
                await asyncio.wait(running)
        if stop:  # lines that finished while being stopped keep their output
            for task, line in running.items():
                await self._settle(bid, line, task, out, err)
        return stop

    async def _settle(self, bid: str, line, task: asyncio.Task, out, err) -> str | None:
        """Write a finished line's result, then mark it. "retry": it stays pending (the
        server aborted it); "quota": it ran out of budget."""
        if task.cancelled():
            return "retry"
        exc = task.exception()
        if isinstance(exc, Unfinished):
            return "retry"
        if exc is None:
            body = task.result()
            rec = output_record(line["custom_id"], body["id"], body)
            await asyncio.to_thread(out.append, [rec])
            self.store.mark(bid, line["line"], "done", body.get("usage"))
            return None
        if not isinstance(exc, APIError):  # a hook's own 4xx error type (e.g. QuotaError)
            exc = APIError.from_exception(exc) or exc
        if not isinstance(exc, APIError):
            log.error("batch %s line %d failed", bid, line["line"], exc_info=exc)
            exc = line_error("server_error", f"{type(exc).__name__}: {exc}", 500)
        await asyncio.to_thread(err.append, [error_record(line["custom_id"], line["line"], exc)])
        self.store.mark(bid, line["line"], "failed")
        return "quota" if exc.code == "insufficient_quota" else None

    async def _fail(self, bid, lines, err, code, message, status=400) -> None:
        recs = [error_record(ln["custom_id"], ln["line"], line_error(code, message, status))
                for ln in lines]  # fmt: skip
        await asyncio.to_thread(err.append, recs)
        for ln in lines:
            self.store.mark(bid, ln["line"], "failed")

    def _stop(self, row, reason: str, lines) -> None:
        code, message = STOP_CODES[reason]
        err = self.files(row)[1]
        recs = [error_record(ln["custom_id"], ln["line"], line_error(code, message))
                for ln in lines]  # fmt: skip
        err.append(recs)
        for ln in lines:
            self.store.mark(row["id"], ln["line"], "failed")
        self._publish(row)
        self.store.set_status(row["id"], "cancelled" if reason == "cancelling" else "expired")

    def _publish(self, row) -> None:
        out, err = self.files(row)
        if not out.path.exists():
            out.reset()
        self.store.publish_files(row["id"], err.size(), out.size())
