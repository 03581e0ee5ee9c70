"""One API request running on the engine: per-choice updates, usage, and clean-up.

`Generation.updates()` yields, each time the engine produced something, the changed choices
(their new text, the outputs behind it for logprobs, a finish_reason on a choice's last
update). Whatever ends the request — all choices finished, the client disconnected, a budget
ran out, the server is stopping — `close()` aborts what is still running (freeing its KV
blocks before the next step) and, once the engine has let go, bills and counts it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from serve.api.hooks import call
from serve.api.prepare import Prepared
from serve.api.schemas import Usage


@dataclass
class ChoiceUpdate:
    index: int
    text: str = ""
    outputs: list = field(default_factory=list)  # StepOutputs, for logprobs
    finish_reason: str | None = None


class Generation:
    def __init__(self, job: Prepared, state, billing=None, priority: int = 0):
        """`billing`: the hook to price and record this request (default the server's; a
        batch line passes one that applies the batch discount). `priority`: the scheduler's
        (0 interactive, batch lines higher)."""
        self.job, self.state = job, state
        self.billing = state.billing if billing is None else billing
        self.priority = priority
        self.stream = None
        self.finish: list[str | None] = [None] * job.params.n
        self.completion_tokens = 0
        self.engine_usage: dict | None = None
        self.closed = False

    @property
    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    async def start(self) -> None:
        """Queue the request on the engine (the engine's ValueError → 400 upstream)."""
        job, state = self.job, self.state
        state.metrics.arrived(job.id)
        self.stream = await state.runner.submit(
            job.prompt_ids,
            job.params,
            request_id=job.id,
            salt=job.salt,
            token_mask=job.token_mask,
            queue_size=state.queue_size * job.params.n,
            images=job.images,
            pixel_values=job.pixel_values,
            priority=self.priority,
        )
        state.metrics.running.inc()

    async def updates(self) -> AsyncIterator[list[ChoiceUpdate]]:
        while not self.done:
            outputs = await self.stream.next_outputs()
            changed: dict[int, ChoiceUpdate] = {}
            for out in outputs:
                if self.finish[out.index] is not None:
                    continue
                up = changed.setdefault(out.index, ChoiceUpdate(out.index))
                up.text += out.text
                if out.token_id is not None:  # None: an abort's final output (no new token)
                    self.completion_tokens += 1
                    if not self._is_stop_token(out):  # OpenAI lists no EOS in logprobs
                        up.outputs.append(out)
                up.finish_reason = out.finish_reason
                self.finish[out.index] = out.finish_reason
                self.engine_usage = out.usage or self.engine_usage
            if self.stream.aborted and not self.stream.request.outputs.qsize():
                for i, f in enumerate(self.finish):  # aborted by the server (shutdown)
                    if f is None:
                        changed.setdefault(i, ChoiceUpdate(i)).finish_reason = "abort"
                        self.finish[i] = "abort"
            if not self.done and await self._over_budget():
                self.state.runner.abort(self.job.id)
                for i, f in enumerate(self.finish):
                    if f is None:
                        changed.setdefault(i, ChoiceUpdate(i)).finish_reason = "length"
                        self.finish[i] = "length"
            if changed:
                yield [changed[i] for i in sorted(changed)]

    def _is_stop_token(self, out) -> bool:
        engine, params = self.state.model.engine, self.job.params
        return out.finish_reason == "stop" and (
            out.token_id in engine.eos or out.token_id in params.stop_token_ids
        )

    async def _over_budget(self) -> bool:
        billing = self.billing
        if billing is None or not hasattr(billing, "over_budget"):
            return False
        return bool(await call(billing, "over_budget", self.job.principal, self.usage(),
                               self.job.max_cost_usd))  # fmt: skip

    def usage(self, final: bool = False) -> dict:
        """OpenAI usage: the engine's when the request finished, else counted so far (`final`:
        the engine has dropped the request, so its sequences can be read)."""
        req = self.stream.request if self.stream else None
        raw = self.engine_usage
        if raw is None and final and req is not None:
            raw = self.state.model.engine.usage(req)
        raw = raw or {
            "prompt_tokens": len(self.job.prompt_ids),
            "completion_tokens": self.completion_tokens,
            "cached_tokens": getattr(req, "cached_tokens", 0),
        }
        usage = Usage.from_engine(raw).to_dict()
        billing = self.billing
        if billing is not None and hasattr(billing, "cost"):
            cost = billing.cost(usage)
            if cost is not None:
                usage["cost"] = cost
        return usage

    def close(self) -> None:
        """Stop the request if it still runs; bill and count it once the engine let go."""
        if self.closed or self.stream is None:
            return
        self.closed = True
        state, loop = self.state, asyncio.get_running_loop()
        status = "finished" if self.done and self.engine_usage else "aborted"

        def finalize() -> None:
            task = loop.create_task(self._finalize(status))
            state.tasks.add(task)
            task.add_done_callback(state.tasks.discard)

        if status == "finished":
            finalize()
        else:
            done = state.runner.abort(self.job.id)
            done.add_done_callback(lambda _: loop.call_soon_threadsafe(finalize))

    async def _finalize(self, status: str) -> None:
        for out in self.stream.drain():  # outputs the client never read (a disconnect)
            self.engine_usage = out.usage or self.engine_usage
        usage = self.usage(final=True)
        state = self.state
        state.metrics.running.dec()
        state.metrics.finished(self.job.id, self.job.params.n, usage)
        await call(self.billing, "record", self.job.principal, self.job.model, self.job.id, usage,
                   status)  # fmt: skip
