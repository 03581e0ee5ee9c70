"""OpenAI response bodies: chat.completion(.chunk) and text_completion, with logprobs."""

from __future__ import annotations

from serve.api.generate import ChoiceUpdate
from serve.api.model import TokenText
from serve.api.prepare import Prepared


def _entry(tt: TokenText, token_id: int, logprob: float) -> dict:
    return {"token": tt.text(token_id), "logprob": logprob, "bytes": list(tt.bytes(token_id))}


def chat_logprobs(tt: TokenText, outputs: list) -> dict:
    """`{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`."""
    content = []
    for o in outputs:
        entry = _entry(tt, o.token_id, o.logprob)
        entry["top_logprobs"] = [_entry(tt, t, lp) for t, lp in o.top_logprobs]
        content.append(entry)
    return {"content": content}


def completion_logprobs(tt: TokenText, outputs: list, offset: int) -> dict:
    """The legacy shape: parallel lists, top alternatives as {token: logprob}."""
    tokens, offsets = [], []
    for o in outputs:
        tokens.append(tt.text(o.token_id))
        offsets.append(offset)
        offset += len(o.text)
    return {
        "tokens": tokens,
        "token_logprobs": [o.logprob for o in outputs],
        "top_logprobs": [{tt.text(t): lp for t, lp in o.top_logprobs} for o in outputs],
        "text_offset": offsets,
    }


def _head(job: Prepared, obj: str) -> dict:
    return {"id": job.id, "object": obj, "created": job.created, "model": job.model}


def chat_response(job: Prepared, tt: TokenText, choices: list[ChoiceUpdate], usage: dict) -> dict:
    return {
        **_head(job, "chat.completion"),
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": chat_logprobs(tt, c.outputs) if job.logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": usage,
    }


def completion_response(
    job: Prepared, tt: TokenText, choices: list[ChoiceUpdate], usage: dict
) -> dict:
    return {
        **_head(job, "text_completion"),
        "choices": [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": completion_logprobs(tt, c.outputs, 0) if job.logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": usage,
    }


class ChunkWriter:
    """Streaming chunks of one request: the same id throughout, the role first (chat), one
    chunk per changed choice, then the usage chunk (choices: [])."""

    def __init__(self, job: Prepared, tt: TokenText):
        self.job, self.tt = job, tt
        self.chat = job.kind == "chat"
        self.offsets = [0] * job.params.n  # completions: text_offset per choice

    def _chunk(self, choices: list[dict], usage: dict | None) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        chunk = {**_head(self.job, obj), "choices": choices}
        if self.job.include_usage or self.job.continuous_usage:
            chunk["usage"] = usage if self.job.continuous_usage else None
        return chunk

    def first(self, usage: dict | None) -> list[dict]:
        if not self.chat:
            return []
        role = {"role": "assistant", "content": ""}
        return [
            self._chunk(
                [{"index": i, "delta": role, "logprobs": None, "finish_reason": None}], usage
            )
            for i in range(self.job.params.n)
        ]

    def updates(self, updates: list[ChoiceUpdate], usage: dict | None) -> list[dict]:
        chunks = []
        for u in updates:
            if not u.text and not u.finish_reason and not (self.job.logprobs and u.outputs):
                continue  # nothing to say yet (e.g. half a UTF-8 character held back)
            if self.chat:
                choice = {
                    "index": u.index,
                    "delta": {"content": u.text} if u.text or not u.finish_reason else {},
                    "logprobs": chat_logprobs(self.tt, u.outputs) if self.job.logprobs else None,
                    "finish_reason": u.finish_reason,
                }
            else:
                lp = None
                if self.job.logprobs:
                    lp = completion_logprobs(self.tt, u.outputs, self.offsets[u.index])
                self.offsets[u.index] += len(u.text)
                choice = {"index": u.index, "text": u.text, "logprobs": lp,
                          "finish_reason": u.finish_reason}  # fmt: skip
            chunks.append(self._chunk([choice], usage))
        return chunks

    def last(self, usage: dict) -> list[dict]:
        if not self.job.include_usage:
            return []
        chunk = self._chunk([], usage)
        chunk["usage"] = usage
        return [chunk]
