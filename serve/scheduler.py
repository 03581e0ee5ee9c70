"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step has a token budget. Running decodes go first (one token each), then prompts
already being prefilled continue in chunks, then waiting sequences are admitted in arrival
order while budget and memory last — so a long prompt is spread over several steps and never
stalls the decodes. Memory: a sequence is admitted only when the blocks it could ever need
(prompt + max_tokens, less the cached prefix it reuses) are available beyond what running
sequences have reserved, so nothing is preempted mid-generation; a request that could never
fit is rejected when it is added.

Priority: every request has one (0 = interactive, higher = less urgent, e.g. batch lines).
Work and admission go in priority order (then arrival). Background work (priority > 0) shares
an allowance of tokens a step: `background_tokens_per_step` while any interactive request
exists, so a large batch slows an interactive stream little, else `batch_tokens_per_step`, so
steps stay short and an interactive request that arrives waits at most one short step.
"""

from __future__ import annotations

import math
import queue
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from serve.detokenizer import TextStream
from serve.kv_cache import BlockPool
from serve.prefix_cache import ImageSpan, block_keys
from serve.sampler import SamplingParams

# (generated token ids so far) → [vocab] bool mask of allowed next tokens, or None for no limit.
TokenMask = Callable[[list[int]], "torch.Tensor | None"]


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """A client request: one prompt, `params.n` sequences, one bounded output queue."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    salt: str = ""
    images: tuple[ImageSpan, ...] = ()
    token_mask: TokenMask | None = None
    outputs: queue.Queue = field(default_factory=queue.Queue)
    seqs: list[Sequence] = field(default_factory=list)
    image_positions: torch.Tensor | None = None  # [P] prompt positions of image placeholders
    image_embeds: torch.Tensor | None = None  # [P, d] the embeddings that replace them
    queue_size: int = 0  # outputs the consumer may leave unread before the request pauses
    priority: int = 0  # 0 = interactive; higher values run only in the room left over
    # Billing counts, once per request whatever n is (see `Engine.usage` for the invariants):
    cached_tokens: int = 0  # prompt tokens the first choice reused from the prefix cache
    created_blocks: set[int] = field(default_factory=set)  # prompt-only blocks newly cached

    @property
    def paused(self) -> bool:
        """True while the consumer has not made room for one more output per live choice."""
        live = sum(s.status is not Status.FINISHED for s in self.seqs)
        return self.queue_size > 0 and self.outputs.qsize() + live > self.queue_size


@dataclass
class Sequence:
    """One generated choice: its tokens, its KV blocks and its sampling state."""

    request: Request
    index: int
    tokens: list[int]
    max_len: int  # prompt + max_tokens
    generator: torch.Generator | None
    text: TextStream | None
    status: Status = Status.WAITING
    blocks: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # keys of the leading full blocks
    num_computed: int = 0  # tokens whose KV is in the cache
    finish_reason: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


@dataclass
class Work:
    """One sequence's share of a step: compute tokens[start : start + count]."""

    seq: Sequence
    start: int
    count: int

    @property
    def samples(self) -> bool:
        """Whether this chunk ends at the last known token, so its logits pick the next one."""
        return self.start + self.count == len(self.seq.tokens)


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        max_tokens_per_step: int = 512,
        max_seqs: int = 64,
        background_tokens_per_step: int = 8,
        batch_tokens_per_step: int = 64,
    ):
        self.pool = pool
        self.block_size = pool.block_size
        self.max_tokens_per_step = max_tokens_per_step
        self.max_seqs = max_seqs
        # On a CPU a step's time grows with its tokens: these cap what background work adds
        # to an interactive stream's inter-token latency (while one runs) and to an arriving
        # request's time to first token (the step it waits for).
        self.background_tokens_per_step = background_tokens_per_step
        self.batch_tokens_per_step = batch_tokens_per_step
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def check_fits(self, prompt_len: int, max_len: int) -> None:
        """Raise a clear error for a sequence that could never fit in the KV cache."""
        need = self.blocks_for(max_len)
        if need > self.pool.num_blocks:
            raise ValueError(
                f"request needs {need} KV blocks ({prompt_len} prompt + "
                f"{max_len - prompt_len} max_tokens tokens) but the cache holds only "
                f"{self.pool.num_blocks} blocks of {self.block_size} tokens"
            )

    def _outstanding(self) -> int:
        return sum(max(0, self.blocks_for(s.max_len) - len(s.blocks)) for s in self.running)

    def _admit(self, seq: Sequence) -> bool:
        """Reuse the longest cached prefix and reserve memory, or return False to wait."""
        req = seq.request
        # Keep at least one prompt token to compute: its logits choose the first output token.
        usable = (seq.prompt_len - 1) // self.block_size
        keys = block_keys(
            req.prompt[: usable * self.block_size], self.block_size, req.salt, req.images
        )
        hits = self.pool.lookup(keys)
        unused_hits = sum(self.pool.refs[b] == 0 for b in hits)
        need = self.blocks_for(seq.max_len) - len(hits)
        if need > self.pool.num_available() - unused_hits - self._outstanding():
            return False
        self.pool.acquire(hits)
        seq.blocks, seq.keys = list(hits), keys[: len(hits)]
        seq.num_computed = len(hits) * self.block_size
        if seq.index == 0:  # later choices share the first one's prompt: billed once
            req.cached_tokens = seq.num_computed
        seq.status = Status.RUNNING
        self.running.append(seq)
        return True

    @staticmethod
    def _deferred(seq: Sequence) -> bool:
        """Choices 2..n wait until choice 1 has prefilled (and cached) the shared prompt."""
        first = seq.request.seqs[0]
        return (
            seq is not first
            and first.status is not Status.FINISHED
            and first.num_computed < first.prompt_len
        )

    def schedule(self) -> list[Work]:
        """This step's work, decodes first; empty when nothing can run."""
        budget = self.max_tokens_per_step
        interactive = any(s.request.priority == 0 for s in (*self.running, *self.waiting))
        background = self.background_tokens_per_step if interactive else self.batch_tokens_per_step

        def take(seq: Sequence) -> int:
            nonlocal budget, background
            count = min(len(seq.tokens) - seq.num_computed, budget)
            if seq.request.priority > 0:
                count = min(count, background)
                background -= count
            budget -= count
            return count

        work: list[Work] = []
        decodes = [s for s in self.running if len(s.tokens) - s.num_computed == 1]
        prefills = [s for s in self.running if len(s.tokens) - s.num_computed > 1]
        # Stable sort: by priority, then decodes before prefills, then arrival order.
        for seq in sorted(decodes + prefills, key=lambda s: s.request.priority):
            if budget == 0:
                break
            if seq.request.paused:
                continue
            if count := take(seq):
                work.append(Work(seq, seq.num_computed, count))
        waiting = sorted(self.waiting, key=lambda s: s.request.priority)
        while budget > 0 and len(self.running) < self.max_seqs:
            seq = next((s for s in waiting if not self._deferred(s)), None)
            if seq is None or (seq.request.priority > 0 and background == 0):
                break
            if not self._admit(seq):
                break  # first come, first served: later requests wait behind it
            self.waiting.remove(seq)
            waiting.remove(seq)
            work.append(Work(seq, seq.num_computed, take(seq)))
        for w in work:  # blocks for the tokens computed this step
            while len(w.seq.blocks) * self.block_size < w.start + w.count:
                w.seq.blocks.append(self.pool.allocate())
        return work

    def commit(self, work: list[Work]) -> None:
        """After the forward pass: advance each sequence and publish its newly full blocks."""
        for w in work:
            seq, req = w.seq, w.seq.request
            seq.num_computed = w.start + w.count
            first = len(seq.keys)
            full = seq.num_computed // self.block_size
            if full <= first:
                continue
            parent = seq.keys[-1] if seq.keys else None
            new = block_keys(
                seq.tokens[: full * self.block_size], self.block_size, req.salt, req.images,
                parent=parent, first_block=first,
            )  # fmt: skip
            prompt_blocks = seq.prompt_len // self.block_size
            for b, key in enumerate(new, start=first):
                # Only blocks made wholly of prompt tokens count as the prompt's cache creation:
                # a block holding generated tokens is keyed by them, and each choice writes
                # its own.
                if self.pool.register(seq.blocks[b], key) and b < prompt_blocks:
                    req.created_blocks.add(b)
            seq.keys.extend(new)

    def finish(self, seq: Sequence, reason: str | None) -> None:
        """End a sequence and return its blocks to the pool at once."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks = []
        seq.status, seq.finish_reason = Status.FINISHED, reason
