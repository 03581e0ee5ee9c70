"""The serving engine: add requests, step the batch, stream outputs, abort.

`Engine.step()` runs one forward pass over everything the scheduler picked and puts one
`StepOutput` per advanced choice on its request's queue. It is safe to call `add_request`
and `abort` from other threads while one thread steps (one lock; an abort waits at most one
step and frees the request's blocks before it returns).
"""

from __future__ import annotations

import itertools
import queue
import secrets
import threading
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path

import torch

from serve import paged_attention
from serve.detokenizer import TextStream
from serve.idefics3 import Idefics3Vision
from serve.kv_cache import BlockPool
from serve.llama import AttentionBatch, KVPool, LlamaModel, PrefillSpan
from serve.loader import load_model, load_vision
from serve.prefix_cache import ImageSpan, image_digest
from serve.sampler import SamplingParams, sample
from serve.scheduler import Request, Scheduler, Sequence, Status, TokenMask, Work


@dataclass
class StepOutput:
    """One new token of one choice (plus the usage when the whole request is done)."""

    request_id: str
    index: int
    token_id: int | None  # None on an aborted choice's final output
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" when this choice ended
    usage: dict | None = None  # on the request's last output


@dataclass
class Completion:
    """A finished choice, collected by `Engine.generate`."""

    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]]]
    usage: dict | None


class Engine:
    def __init__(
        self,
        model: LlamaModel,
        tokenizer=None,
        num_blocks: int | None = None,
        kv_memory_bytes: int = 1 << 30,
        block_size: int = 16,
        max_tokens_per_step: int = 512,
        max_seqs: int = 64,
        eos_token_ids: Seq[int] | None = None,
        vision: Idefics3Vision | None = None,
        background_tokens_per_step: int = 8,
        batch_tokens_per_step: int = 64,
    ):
        self.model, self.tokenizer, self.args = model, tokenizer, model.args
        self.vision = vision
        a = self.args
        kv_dtype = model.norm.dtype  # K and V are kept in the model's float dtype
        bytes_per_token = 2 * a.num_layers * a.num_kv_heads * a.head_dim * kv_dtype.itemsize
        num_blocks = num_blocks or max(1, kv_memory_bytes // (bytes_per_token * block_size))
        self.kv = KVPool(a, num_blocks * block_size, dtype=kv_dtype)
        if kv_dtype == torch.float32 and self.kv.kv.device.type == "cpu":
            paged_attention.kernel()  # built (once per machine) now, not on the first request
        self.pool = BlockPool(num_blocks, block_size)
        self.scheduler = Scheduler(
            self.pool, max_tokens_per_step, max_seqs, background_tokens_per_step,
            batch_tokens_per_step,
        )  # fmt: skip
        self.eos = set(a.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._lock = threading.RLock()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kwargs) -> Engine:
        """Model and tokenizer (`tokenizer.json`, via the `tokenizers` library) from a directory."""
        model = load_model(model_dir)
        tok_file = Path(model_dir) / "tokenizer.json"
        tokenizer = None
        if tok_file.is_file():
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(tok_file))
        return cls(model, tokenizer, vision=load_vision(model_dir), **kwargs)

    # ---- requests -------------------------------------------------------------------------

    def add_request(
        self,
        prompt: Seq[int],
        params: SamplingParams,
        request_id: str | None = None,
        salt: str = "",
        images: Seq[ImageSpan] = (),
        token_mask: TokenMask | None = None,
        queue_size: int = 0,
        pixel_values: torch.Tensor | None = None,
        priority: int = 0,
    ) -> Request:
        """Queue a request; read its outputs from `request.outputs` (bounded by `queue_size`,
        0 = unbounded; a full queue pauses only this request). Raises ValueError for a
        request that is invalid or could never fit. `priority`: 0 = interactive, higher runs
        in the room the more urgent requests leave (see serve/scheduler.py).

        `pixel_values` [tiles, 3, S, S] (a VLM) fill the prompt's image placeholder tokens in
        order; unless `images` says otherwise, the block keys cover the tiles' bytes."""
        prompt = [int(t) for t in prompt]
        ctx = self.args.max_position_embeddings
        if not prompt:
            raise ValueError("prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.args.vocab_size:
            raise ValueError(f"prompt has token ids outside [0, {self.args.vocab_size})")
        if len(prompt) >= ctx:
            raise ValueError(f"prompt has {len(prompt)} tokens; the context length is {ctx}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none")
        if any(t >= self.args.vocab_size for t in params.stop_token_ids):
            raise ValueError(
                f"stop_token_ids {list(params.stop_token_ids)} reach outside the vocabulary "
                f"[0, {self.args.vocab_size}): such a token is never generated"
            )
        if queue_size and queue_size < params.n:
            raise ValueError(
                f"queue_size {queue_size} cannot hold one output of each of n={params.n}"
            )
        max_len = min(len(prompt) + params.max_tokens, ctx)
        self.scheduler.check_fits(len(prompt), max_len)
        image_positions = image_embeds = None
        if pixel_values is not None:
            image_positions, image_embeds = self._encode_images(prompt, pixel_values)
            if not images:
                digest = image_digest(pixel_values.detach().float().contiguous().numpy().tobytes())
                images = [ImageSpan(int(image_positions[0]), int(image_positions[-1]) + 1, digest)]
        with self._lock:
            rid = request_id or f"req-{next(self._ids)}"
            if rid in self.requests:
                raise ValueError(f"request id '{rid}' is already running")
            # Room for one extra output per choice beyond `queue_size`: an abort's final outputs
            # must never block or be dropped, whatever the consumer has left unread.
            outputs = queue.Queue(queue_size + params.n if queue_size else 0)
            req = Request(
                rid, prompt, params, salt, tuple(images), token_mask, outputs, queue_size=queue_size
            )
            req.image_positions, req.image_embeds = image_positions, image_embeds
            req.priority = priority
            base_seed = params.seed if params.seed is not None else secrets.randbits(62)
            for i in range(params.n):
                gen = None
                if not params.greedy:
                    gen = torch.Generator().manual_seed(base_seed + i)
                text = TextStream(self.tokenizer, params.stop) if self.tokenizer else None
                seq = Sequence(req, i, list(prompt), max_len, gen, text)
                req.seqs.append(seq)
                self.scheduler.waiting.append(seq)
            self.requests[rid] = req
            return req

    def _encode_images(self, prompt: list[int], pixel_values: torch.Tensor):
        """Image placeholder positions [P] and their embeddings [P, d] from the vision tower."""
        if self.vision is None:
            raise ValueError("this model has no vision encoder; send text only")
        va = self.vision.args
        positions = torch.tensor(prompt).eq(va.image_token_id).nonzero().flatten()
        tiles = pixel_values.reshape(-1, *pixel_values.shape[-3:])
        if len(positions) != len(tiles) * va.tokens_per_image:
            raise ValueError(
                f"prompt has {len(positions)} image tokens but {len(tiles)} image tiles need "
                f"{len(tiles) * va.tokens_per_image} ({va.tokens_per_image} each)"
            )
        return positions, self.vision(tiles).flatten(0, 1)

    def abort(self, request_id: str) -> bool:
        """Stop a request now, whatever its state (queued, prefilling, decoding), and free its
        KV blocks. Every unfinished choice gets a final output with finish reason "abort" (the
        last one carries the usage, billing what was generated), so a waiting consumer always
        wakes. False if the request is not running."""
        with self._lock:
            req = self.requests.pop(request_id, None)
            if req is None:
                return False
            live = [s for s in req.seqs if s.status is not Status.FINISHED]
            for seq in live:
                self.scheduler.finish(seq, "abort")
            for i, seq in enumerate(live):
                out = StepOutput(req.request_id, seq.index, None, "", finish_reason="abort")
                if seq.text is not None:
                    out.text = seq.text.flush()
                if i == len(live) - 1:
                    out.usage = self.usage(req)
                req.outputs.put_nowait(out)
            return True

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    # ---- stepping -------------------------------------------------------------------------

    def _batch(self, work: list[Work]) -> tuple[torch.Tensor, AttentionBatch, torch.Tensor | None]:
        """Flat tokens [N], their attention layout (decodes first, then prefill chunks), and
        input embeddings [N, d] when a chunk covers image placeholders (else None)."""
        bs = self.pool.block_size
        work.sort(key=lambda w: w.count > 1)
        tokens, positions, spans, logit_rows = [], [], [], []
        decodes = [w for w in work if w.count == 1]
        for w in work:
            start_row = len(tokens)
            tokens += w.seq.tokens[w.start : w.start + w.count]
            positions += range(w.start, w.start + w.count)
            if w.samples:
                logit_rows.append(len(tokens) - 1)
            if w.count > 1:
                ctx = w.start + w.count
                spans.append(PrefillSpan(start_row, w.count, self._slots(w.seq.blocks, ctx)))
        pos = torch.tensor(positions)
        blocks_of_token = torch.tensor(
            [w.seq.blocks[p // bs] for w in work for p in range(w.start, w.start + w.count)]
        )
        slots = blocks_of_token * bs + pos % bs
        decode_slots = None
        if decodes:
            lens = [w.start + 1 for w in decodes]
            width = max(len(w.seq.blocks) for w in decodes)
            table = torch.tensor(
                [w.seq.blocks + [0] * (width - len(w.seq.blocks)) for w in decodes]
            )
            decode_slots = (table[:, :, None] * bs + torch.arange(bs)).flatten(1)[:, : max(lens)]
        batch = AttentionBatch(
            positions=pos,
            slots=slots,
            num_decode=len(decodes),
            decode_slots=decode_slots,
            prefills=spans,
            logit_rows=torch.tensor(logit_rows, dtype=torch.long),
        )
        tokens = torch.tensor(tokens)
        embeds = None
        if any(w.seq.request.image_embeds is not None for w in work):
            with torch.inference_mode():
                embeds = self.model.embed(tokens)  # [N, d]
                row = 0
                for w in work:
                    req = w.seq.request
                    if req.image_embeds is not None:
                        pos = req.image_positions
                        sel = (pos >= w.start) & (pos < w.start + w.count)
                        embeds[row + pos[sel] - w.start] = req.image_embeds[sel]
                    row += w.count
        return tokens, batch, embeds

    def _slots(self, blocks: list[int], length: int) -> torch.Tensor:
        bs = self.pool.block_size
        return (torch.tensor(blocks)[:, None] * bs + torch.arange(bs)).flatten()[:length]

    def step(self) -> list[StepOutput]:
        """Run one batched forward pass; returns (and enqueues) the new outputs."""
        with self._lock:
            work = self.scheduler.schedule()
            if not work:
                return []
            tokens, batch, embeds = self._batch(work)
            logits = self.model(tokens, batch, self.kv, input_embeds=embeds)
            self.scheduler.commit(work)
            sampling = [w.seq for w in work if w.samples]
            if not sampling:  # only partial prefill chunks ran
                return []
            masks = [
                s.request.token_mask(s.generated) if s.request.token_mask else None
                for s in sampling
            ]
            choices = sample(
                logits,
                [s.request.params for s in sampling],
                [s.generator for s in sampling],
                masks,
                generated=[s.generated for s in sampling],  # presence/frequency penalties
            )
            return [self._advance(s, c) for s, c in zip(sampling, choices, strict=True)]

    def _advance(self, seq: Sequence, choice) -> StepOutput:
        req, params = seq.request, seq.request.params
        tok = choice.token_id
        seq.tokens.append(tok)
        text, reason = "", None
        if seq.text is not None:
            text, hit = seq.text.add(tok)
            reason = "stop" if hit else None
        if reason is None and (
            tok in params.stop_token_ids or (tok in self.eos and not params.ignore_eos)
        ):
            reason = "stop"
        if reason is None and len(seq.tokens) >= seq.max_len:
            reason = "length"
        if reason is not None:
            if seq.text is not None:
                text += seq.text.flush()
            self.scheduler.finish(seq, reason)
        out = StepOutput(req.request_id, seq.index, tok, text, choice.logprob, choice.top, reason)
        if all(s.status is Status.FINISHED for s in req.seqs):
            out.usage = self.usage(req)
            self.requests.pop(req.request_id, None)
        req.outputs.put_nowait(out)
        return out

    def usage(self, req: Request) -> dict:
        """Token counts of a request, the one place every usage passes through (and is billed
        from). Invariants, checked here:

        * prompt_tokens is the prompt's length, counted once per request whatever n is;
        * cached_tokens (prompt tokens read from the prefix cache) ≤ prompt_tokens, and
          uncached + cached = prompt_tokens;
        * cache_creation_tokens (prompt tokens this request newly cached) ≤ uncached;
        * completion_tokens sums the generated tokens of all n choices.
        """
        prompt = len(req.prompt)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": sum(len(s.generated) for s in req.seqs),
            "cached_tokens": req.cached_tokens,
            "cache_creation_tokens": len(req.created_blocks) * self.pool.block_size,
        }
        uncached = prompt - usage["cached_tokens"]
        if not (0 <= uncached <= prompt and 0 <= usage["cache_creation_tokens"] <= uncached):
            raise RuntimeError(f"usage invariants broken for {req.request_id}: {usage}")
        return usage

    # ---- convenience ----------------------------------------------------------------------

    def generate(
        self, prompts: Seq[Seq[int]], params: SamplingParams, **kwargs
    ) -> list[list[Completion]]:
        """Run `prompts` together to completion; per prompt, its `params.n` completions."""
        reqs = [self.add_request(p, params, **kwargs) for p in prompts]
        while self.has_work():
            self.step()
        return [self.collect(r) for r in reqs]

    @staticmethod
    def collect(req: Request) -> list[Completion]:
        """Drain a finished request's queue into one `Completion` per choice."""
        per: list[list[StepOutput]] = [[] for _ in req.seqs]
        usage = None
        while True:
            try:
                out = req.outputs.get_nowait()
            except queue.Empty:
                break
            per[out.index].append(out)
            usage = out.usage or usage
        return [
            Completion(
                token_ids=[o.token_id for o in outs if o.token_id is not None],
                text="".join(o.text for o in outs),
                finish_reason=outs[-1].finish_reason if outs else None,
                logprobs=[o.logprob for o in outs if o.token_id is not None],
                top_logprobs=[o.top_logprobs for o in outs if o.token_id is not None],
                usage=usage,
            )
            for outs in per
        ]
