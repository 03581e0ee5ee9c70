"""Prometheus metrics for `GET /metrics` (one registry per app, so tests can build several).

Latencies are taken on the engine thread when a token is produced: TTFT from the request's
arrival, inter-token latency between consecutive tokens of one choice.
"""

from __future__ import annotations

import threading
import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

disable_created_metrics()  # no `_created` timestamp series next to every counter


class Metrics:
    def __init__(self, engine=None):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("nanodistill_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)  # fmt: skip
        self.prompt_tokens = Counter("nanodistill_prompt_tokens", "Prompt tokens", registry=r)
        self.completion_tokens = Counter(
            "nanodistill_completion_tokens", "Generated tokens", registry=r
        )
        self.cached_tokens = Counter(
            "nanodistill_cached_tokens", "Prompt tokens read from the prefix cache", registry=r
        )
        self.cache_hit_rate = Gauge(
            "nanodistill_cache_hit_rate", "cached_tokens / prompt_tokens since start", registry=r
        )
        self.running = Gauge("nanodistill_running_requests", "Requests being served", registry=r)
        self.queue_depth = Gauge(
            "nanodistill_queue_depth", "Sequences waiting for the engine", registry=r
        )
        self.ttft = Histogram("nanodistill_time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("nanodistill_inter_token_latency_seconds", "Inter-token latency",
                             buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        if engine is not None:
            self.queue_depth.set_function(lambda: len(engine.scheduler.waiting))
        self._lock = threading.Lock()
        self._arrival: dict[str, float] = {}
        self._last: dict[tuple[str, int], float] = {}
        self._prompt = self._cached = 0

    def arrived(self, request_id: str) -> None:
        with self._lock:
            self._arrival[request_id] = time.perf_counter()

    def on_step(self, outputs: list) -> None:
        """Engine thread: latency of each new token."""
        now = time.perf_counter()
        with self._lock:
            for out in outputs:
                key = (out.request_id, out.index)
                last = self._last.get(key)
                if last is not None:
                    self.itl.observe(now - last)
                elif (t0 := self._arrival.pop(out.request_id, None)) is not None:
                    self.ttft.observe(now - t0)  # the request's first token
                self._last[key] = now
                if out.finish_reason is not None:
                    self._last.pop(key, None)

    def finished(self, request_id: str, n: int, usage: dict | None) -> None:
        """Count a request's tokens (once, whether it finished or was aborted)."""
        with self._lock:
            self._arrival.pop(request_id, None)
            for i in range(n):
                self._last.pop((request_id, i), None)
            if not usage:
                return
            self.prompt_tokens.inc(usage["prompt_tokens"])
            self.completion_tokens.inc(usage["completion_tokens"])
            cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
            self.cached_tokens.inc(cached)
            self._prompt += usage["prompt_tokens"]
            self._cached += cached
            self.cache_hit_rate.set(self._cached / self._prompt if self._prompt else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
