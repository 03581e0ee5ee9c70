"""Progress a user can read in a log file: one line every few training steps when stdout is
not a terminal (the progress bars are for terminals)."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping

import lightning as L


def format_seconds(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    minutes, s = divmod(seconds, 60)
    return f"{minutes}m{s:02d}s" if minutes else f"{s}s"


def batch_tokens(batch) -> int:
    """Token positions in a batch: text KD batches are tuples (ids first), VQA batches dicts."""
    ids = batch["input_ids"] if isinstance(batch, Mapping) else batch[0]
    return ids.numel()


class ProgressLines(L.Callback):
    """Prints `<stage> step i/N  loss x  tokens/s y  ETA z` every `every` optimizer steps."""

    def __init__(self, stage: str, every: int, stream=None) -> None:
        self.stage, self.every, self.stream = stage, max(int(every), 1), stream
        self._start: float | None = None
        self._first_step = 0
        self._tokens = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._start, self._first_step, self._tokens = time.perf_counter(), trainer.global_step, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += batch_tokens(batch)
        step = trainer.global_step
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if step % self.every and step != total:
            return
        elapsed = time.perf_counter() - (self._start or time.perf_counter())
        done = max(step - self._first_step, 1)
        loss = trainer.callback_metrics.get("train/loss")
        parts = [f"{self.stage} step {step}" + (f"/{total}" if total else "")]
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        parts.append(f"{self._tokens / max(elapsed, 1e-9):,.0f} tokens/s")
        if total:
            parts.append(f"ETA {format_seconds(elapsed / done * (total - step))}")
        print("  ".join(parts), file=self.stream or sys.stdout, flush=True)


def progress_callbacks(stage: str, max_steps, stream=None) -> list[L.Callback]:
    """[ProgressLines] when stdout is not a terminal (about 10 lines per stage), else []."""
    out = stream or sys.stdout
    if out.isatty():
        return []
    steps = max_steps if isinstance(max_steps, int) and max_steps > 0 else 100
    return [ProgressLines(stage, max(steps // 10, 1), stream)]
