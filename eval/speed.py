"""Decode speed of several models in one process on the same prompts: time to first token, time
per output token, tokens/s and peak memory. Warm-up runs are excluded; figures are medians.

`measure_engine_speed` times exported model directories on the serving runtime (serve/: its
own model code, paged KV cache, int8 fbgemm kernels), which is what `distill serve` runs;
`measure_speed` times in-memory transformers models (`generate()`) when no directory exists.
Both repeat a round of runs until two rounds agree within 5% (at most `max_rounds`) and flag
the figures as noisy when they never do or when other processes loaded the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
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


def engine_generation_times(engine, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(seconds to the first new token, mean seconds per later token) of one greedy request on
    a serve.engine.Engine, cold (a fresh cache salt: no prefix reuse)."""
    from serve.sampler import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    req = engine.add_request(prompt, params, salt=f"speed-{time.perf_counter_ns()}")
    times: list[float] = []
    while engine.has_work():
        outputs = engine.step()
        now = time.perf_counter()
        times += [now for o in outputs if o.request_id == req.request_id and o.token_id is not None]
    engine.collect(req)
    return times[0] - start, (times[-1] - times[0]) / max(len(times) - 1, 1)


def _other_load() -> float | None:
    """1-minute load average minus this process's compute threads (None where unknown)."""
    try:
        return os.getloadavg()[0] - torch.get_num_threads()
    except OSError:
        return None


def _timed_rounds(run_once, prompts, warmup: int, repeats: int, max_rounds: int):
    """Rounds of `repeats` × prompts until two consecutive rounds' median per-token times agree
    within 5%; returns (ttfts, tpots, rounds, stable, load averages seen)."""
    for _ in range(warmup):
        run_once(prompts[0])
    ttfts, tpots, medians, loads = [], [], [], []
    stable = False
    for _ in range(max(max_rounds, 1)):
        round_tpots = []
        loads.append(_other_load())
        for _ in range(repeats):
            for prompt in prompts:
                ttft, tpot = run_once(prompt)
                ttfts.append(ttft)
                round_tpots.append(tpot)
        tpots += round_tpots
        medians.append(statistics.median(round_tpots))
        if len(medians) >= 2 and abs(medians[-1] / medians[-2] - 1) <= 0.05:
            stable = True
            break
    loads.append(_other_load())
    return ttfts, tpots, len(medians), stable, [x for x in loads if x is not None]


def _speed_record(ttfts, tpots, rounds, stable, loads, weights: int, growth: int) -> dict:
    from eval.intervals import bootstrap

    tpot = statistics.median(tpots)
    low, high = bootstrap(len(tpots), lambda idx: 1.0 / statistics.median(tpots[i] for i in idx))
    busy = max(loads, default=0.0) > 0.75  # more than ~¾ of a core used by other processes
    return {
        "ttft_ms": 1000 * statistics.median(ttfts),
        "tpot_ms": 1000 * tpot,
        "tokens_per_s": 1.0 / tpot if tpot > 0 else float("inf"),
        "tokens_per_s_low": low,
        "tokens_per_s_high": high,
        "weights_mb": weights / 2**20,
        "peak_mem_mb": (weights + growth) / 2**20,
        "runs": len(tpots),
        "rounds": rounds,
        "stable": stable,
        "other_load": max(loads, default=None),
        "noisy": busy or not stable,
    }


def measure_speed(
    models: dict[str, nn.Module],
    prompts: list[list[int]],
    new_tokens: int = 16,
    warmup: int = 1,
    repeats: int = 3,
    max_rounds: int = 1,
) -> dict[str, dict[str, float]]:
    """Per model (transformers `generate()`): ttft_ms, tpot_ms, tokens_per_s (1000 / tpot_ms)
    with its 95% interval over runs, weights_mb, peak_mem_mb, runs and the noise flags.

    peak_mem_mb is the model's weights plus the peak memory growth while it generates (RSS on
    CPU, allocator peak on CUDA). Every model runs the same prompts, `warmup` untimed passes first.
    """
    from tqdm.auto import tqdm

    results = {}
    for name, model in tqdm(models.items(), desc="eval: speed"):
        device = next(model.parameters()).device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        with _PeakRSS() as rss:
            timed = _timed_rounds(
                lambda p, m=model: time_generation(m, p, new_tokens),
                prompts,
                warmup,
                repeats,
                max_rounds,
            )
        growth = (
            torch.cuda.max_memory_allocated(device) - base
            if device.type == "cuda"
            else rss.peak - rss.start
        )
        results[name] = _speed_record(*timed, weight_bytes(model), growth) | {
            "runtime": "transformers generate()"
        }
    return results


def measure_engine_speed(
    model_dirs: dict[str, str],
    prompts: list[list[int]],
    new_tokens: int = 16,
    warmup: int = 1,
    repeats: int = 3,
    max_rounds: int = 3,
) -> dict[str, dict[str, float]]:
    """Per model directory, on the serving runtime at batch 1: the figures of `measure_speed`.

    Each model is loaded by serve.loader (int8 checkpoints on serve.int8's fbgemm kernels),
    timed, and released before the next one loads.
    """
    from tqdm.auto import tqdm

    from serve.engine import Engine
    from serve.loader import load_model

    results = {}
    for name, path in tqdm(model_dirs.items(), desc="eval: speed (serve engine)"):
        _release_free_heap()
        engine = Engine(load_model(path), num_blocks=64)
        with _PeakRSS() as rss:
            timed = _timed_rounds(
                lambda p, e=engine: engine_generation_times(e, p, new_tokens),
                prompts,
                warmup,
                repeats,
                max_rounds,
            )
        results[name] = _speed_record(*timed, weight_bytes(engine.model), rss.peak - rss.start) | {
            "runtime": "serve engine",
            "path": str(path),
        }
        del engine
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
