"""Sampling parameters and next-token selection with logprobs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral

import torch

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings (OpenAI semantics); validated on construction."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # same seed, same prompt, same model → same output
    stop: tuple[str, ...] = ()  # matched on the text with special tokens (see TextStream)
    stop_token_ids: tuple[int, ...] = ()  # each must be in the engine's vocabulary
    ignore_eos: bool = False
    n: int = 1
    logprobs: bool = False  # report the chosen token's logprob
    top_logprobs: int = 0  # and this many top alternatives (≤ 20)
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (
                0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
                f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}",
            ),
            (
                all(isinstance(s, str) and s for s in self.stop),
                f"stop must be non-empty strings, got {list(self.stop)!r}",
            ),
            (
                all(isinstance(t, Integral) and t >= 0 for t in self.stop_token_ids),
                f"stop_token_ids must be token ids >= 0, got {list(self.stop_token_ids)!r}",
            ),
            (
                -2 <= self.presence_penalty <= 2,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2 <= self.frequency_penalty <= 2,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass
class Choice:
    """One sampled token with its logprob and the top alternatives (empty unless asked)."""

    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to one row of logits [V] (masked entries → -inf)."""
    x = logits / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return x


def apply_penalties(row: torch.Tensor, generated: Sequence[int], params: SamplingParams) -> None:
    """OpenAI's presence and frequency penalties, in place on one row of logits [V]:
    logits[t] -= presence × (count[t] > 0) + frequency × count[t], counted over `generated`."""
    if not generated or not params.penalized:
        return
    ids, counts = torch.tensor(generated, dtype=torch.long).unique(return_counts=True)
    row[ids] -= params.presence_penalty + params.frequency_penalty * counts.to(row.dtype)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    masks: Sequence[torch.Tensor | None],
    generated: Sequence[Sequence[int]] | None = None,
) -> list[Choice]:
    """Pick one token per row of `logits` [S, V].

    `generated[i]` (the row's tokens generated so far) feeds the presence/frequency
    penalties; without it no penalty applies. `masks[i]` ([V] bool, True = allowed) is a
    request's token constraint, applied before sampling. Reported logprobs are the model's
    own distribution (log_softmax of the raw logits), as OpenAI reports them, independent of
    temperature, penalties and constraints.
    """
    logits = logits.float()
    penalized = [i for i, p in enumerate(params) if p.penalized] if generated is not None else []
    constrained = logits
    if penalized or any(m is not None for m in masks):
        constrained = logits.clone()
        for i in penalized:
            apply_penalties(constrained[i], generated[i], params[i])
        for i, m in enumerate(masks):
            if m is not None:
                constrained[i].masked_fill_(~m, float("-inf"))
    chosen = constrained.argmax(-1).tolist()  # greedy rows, in one call
    for i, p in enumerate(params):
        if not p.greedy:
            probs = filter_logits(constrained[i], p).softmax(-1)
            chosen[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
    want = [i for i, p in enumerate(params) if p.logprobs or p.top_logprobs]
    choices = [Choice(t) for t in chosen]
    if want:
        logp = torch.log_softmax(logits[want], dim=-1)
        k = max(params[i].top_logprobs for i in want)
        top = torch.topk(logp, k) if k else None
        for r, i in enumerate(want):
            choices[i].logprob = float(logp[r, chosen[i]])
            if k:
                n = params[i].top_logprobs
                ids, vals = top.indices[r, :n].tolist(), top.values[r, :n].tolist()
                choices[i].top = list(zip(ids, vals, strict=True))
    return choices
