"""Decode speed of several models in one process on the same prompts: time to first token, time
per output token, tokens/s and peak memory. Warm-up runs are excluded; figures are medians."""

from __future__ import annotations

import contextlib
import ctypes
import statistics
import threading
import time

import psutil
import torch
from torch import nn
from transformers.generation.streamers import BaseStreamer


class _TokenClock(BaseStreamer):
    """Timestamps every `put`: generate() puts the prompt once, then each new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc malloc_trim) so that RSS growth during a
    measurement is not hidden by memory an earlier pass freed but the allocator kept."""
    # not glibc (OSError / no symbol): the growth figure is then a lower bound
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _PeakRSS:
    """Samples this process's resident set size in a thread; reports the peak above the start.

    Hand-written: the OS only keeps a process-lifetime peak (ru_maxrss), which cannot separate
    models measured one after another in the same process.
    """

    def __init__(self, interval_s: float = 0.002) -> None:
        self.process, self.interval_s = psutil.Process(), interval_s
        self.start = self.peak = 0

    def __enter__(self) -> _PeakRSS:
        _release_free_heap()
        self.start = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of unique parameters and buffers (tied tensors once)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    for module in model.modules():
        # serve.int8.Int8Linear on fbgemm holds its weight in an opaque packed object:
        # count it as what it is, int8 values plus one fp32 scale per output row.
        if getattr(module, "is_fast", False):
            total += module.out_features * (module.in_features + 4)
    return total


@torch.no_grad()
def time_generation(model: nn.Module, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(seconds to the first new token, mean seconds per later token) of one greedy generate()."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt], device=device)
    clock = _TokenClock()
    start = time.perf_counter()
    model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        streamer=clock,
        pad_token_id=0,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    tokens = clock.times[1:]  # times[0] is the prompt
    ttft = tokens[0] - start
    tpot = (tokens[-1] - tokens[0]) / max(len(tokens) - 1, 1)
    return ttft, tpot


def measure_speed(
    models: dict[str, nn.Module],
    prompts: list[list[int]],
    new_tokens: int = 16,
    warmup: int = 1,
    repeats: int = 3,
) -> dict[str, dict[str, float]]:
    """Per model: ttft_ms, tpot_ms, tokens_per_s (1000 / tpot_ms), weights_mb, peak_mem_mb.

    peak_mem_mb is the model's weights plus the peak memory growth while it generates (RSS on
    CPU, allocator peak on CUDA). Every model runs the same prompts, `warmup` untimed passes first.
    """
    results = {}
    for name, model in models.items():
        device = next(model.parameters()).device
        for _ in range(warmup):
            time_generation(model, prompts[0], new_tokens)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        ttfts, tpots = [], []
        with _PeakRSS() as rss:
            for _ in range(repeats):
                for prompt in prompts:
                    ttft, tpot = time_generation(model, prompt, new_tokens)
                    ttfts.append(ttft)
                    tpots.append(tpot)
        growth = (
            torch.cuda.max_memory_allocated(device) - base
            if device.type == "cuda"
            else rss.peak - rss.start
        )
        weights = weight_bytes(model)
        tpot = statistics.median(tpots)
        results[name] = {
            "ttft_ms": 1000 * statistics.median(ttfts),
            "tpot_ms": 1000 * tpot,
            "tokens_per_s": 1.0 / tpot if tpot > 0 else float("inf"),
            "weights_mb": weights / 2**20,
            "peak_mem_mb": (weights + growth) / 2**20,
            "runs": len(tpots),
        }
    return results


def speed_ratios(speed: dict[str, dict[str, float]], baseline: str = "teacher") -> dict[str, dict]:
    """Each model's figures divided by the baseline's (student/teacher), as `<metric>_vs_teacher`."""
    base = speed[baseline]
    keys = ("ttft_ms", "tpot_ms", "tokens_per_s", "weights_mb", "peak_mem_mb")
    return {
        name: {f"{k}_vs_{baseline}": (m[k] / base[k] if base[k] else None) for k in keys}
        for name, m in speed.items()
        if name != baseline
    }
