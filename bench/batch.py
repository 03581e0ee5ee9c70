"""Batch API benchmark: N chat requests sharing a long system prompt, sent one at a time vs
as one /v1/batches job, on a live server; interactive streams while the batch runs; cost with
the prefix cache vs without. Prints a table, writes JSON.

    flock /tmp/nanodistill-heavy.lock python bench/batch.py

* throughput ratio = (one-at-a-time wall time) ÷ (batch wall time, create → completed) for the
  same N requests (target ≥ 4×). Each phase starts on a fresh engine (cold prefix cache).
* interactive: streaming chat requests (TTFT, decode tokens/s) on the idle server, then the
  same while the batch runs (target: within 1.5× of idle).
* cost ratio = what the batch's lines cost ÷ what the same token counts would cost with no
  prefix cache (every prompt token at the input rate); both at the batch discount.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.provenance import provenance  # noqa: E402
from serve.api import ServedModel, create_app  # noqa: E402
from serve.batch import BatchService  # noqa: E402
from serve.billing import Billing, PriceList, UsageLedger  # noqa: E402

OUT = Path(__file__).parent / "results" / "batch.json"
PROBE = "Count slowly from one to one hundred, one number per line."


class Live:
    """uvicorn on 127.0.0.1 (free port) in a thread, serving a fresh engine."""

    def __init__(self, model_dir: Path, data_dir: Path, concurrency: int, **engine):
        served = ServedModel.load(model_dir, **engine)
        self.prices = PriceList(served.spec.pricing)
        billing = Billing(self.prices, UsageLedger(data_dir / "usage.sqlite"))
        self.service = BatchService(data_dir, concurrency=concurrency)
        self.app = create_app(served, billing=billing, batches=self.service)
        self.model, self.served = served.name, served
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    def __enter__(self) -> Live:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


def system_prompt(served: ServedModel, tokens: int) -> str:
    """A system prompt of exactly `tokens` tokens (cut from repeated varied prose)."""
    prose = " ".join(f"Rule {i}: answer the user's question about topic {i * 7 % 97} "
                     "clearly, cite nothing, and keep a friendly tone." for i in range(200))  # fmt: skip
    ids = served.encode(prose, add_special_tokens=False)[:tokens]
    return served.tokenizer.decode(ids)


def requests(model: str, system: str, n: int, max_tokens: int) -> list[dict]:
    return [
        {"model": model, "max_tokens": max_tokens, "temperature": 0,
         "messages": [{"role": "system", "content": system},
                      {"role": "user", "content": f"Question {i}: what is {i} times {i + 3}?"}]}
        for i in range(n)
    ]  # fmt: skip


def probe(url: str, model: str, max_tokens: int) -> dict:
    """One streaming chat request: TTFT and decode tokens/s after the first token."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": PROBE}]}  # fmt: skip
    t0 = time.perf_counter()
    first = last = None
    usage = None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                last = time.perf_counter()
            usage = chunk.get("usage") or usage
    tokens = usage["completion_tokens"]
    decode_s = (last - first) if first and last and last > first else float("nan")
    return {"ttft_s": first - t0, "tokens": tokens,
            "decode_tok_s": (tokens - 1) / decode_s if tokens > 1 else float("nan")}  # fmt: skip


def probes(url: str, model: str, count: int, max_tokens: int) -> dict:
    runs = [probe(url, model, max_tokens) for _ in range(count)]
    return {
        "runs": runs,
        "ttft_p50_s": statistics.median(r["ttft_s"] for r in runs),
        "decode_tok_s_p50": statistics.median(r["decode_tok_s"] for r in runs),
    }


def one_at_a_time(live: Live, bodies: list[dict]) -> dict:
    t0 = time.perf_counter()
    usages = []
    with httpx.Client(timeout=600) as c:
        for b in bodies:
            r = c.post(f"{live.url}/v1/chat/completions", json=b)
            r.raise_for_status()
            usages.append(r.json()["usage"])
    return {"wall_s": time.perf_counter() - t0, "usages": usages}


def as_batch(live: Live, bodies: list[dict], probe_count: int, probe_tokens: int) -> dict:
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": b}
             for i, b in enumerate(bodies)]  # fmt: skip
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    with httpx.Client(base_url=live.url, timeout=600) as c:
        f = c.post("/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"})
        t0 = time.perf_counter()
        batch = c.post("/v1/batches", json={"input_file_id": f.json()["id"], "completion_window":
                       "24h", "endpoint": "/v1/chat/completions"}).json()  # fmt: skip
        during = None
        while True:
            b = c.get(f"/v1/batches/{batch['id']}").json()
            if b["status"] in ("completed", "failed", "cancelled", "expired"):
                break
            if during is None and b["request_counts"]["completed"] >= 1:
                during = probes(live.url, live.model, probe_count, probe_tokens)
                during["batch_lines_done_after"] = c.get(f"/v1/batches/{batch['id']}").json()[
                    "request_counts"
                ]["completed"]
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        out = c.get(f"/v1/files/{b['output_file_id']}/content").text.splitlines()
    usages = [json.loads(x)["response"]["body"]["usage"] for x in out]
    return {"wall_s": wall, "batch": b, "usages": usages, "interactive_during": during}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="export dir (default: the embedded teacher's export)")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--system-tokens", type=int, default=500)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=48, help="batch lines in flight")
    ap.add_argument("--max-seqs", type=int, default=64)
    ap.add_argument("--batch-tokens-per-step", type=int, default=64)
    ap.add_argument("--background-tokens-per-step", type=int, default=8)
    ap.add_argument("--probes", type=int, default=3)
    ap.add_argument("--probe-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.model:
        model_dir = Path(args.model)
    else:
        from distill.commands.serve import teacher_export

        model_dir = teacher_export()

    results: dict = {"config": {k: str(v) if isinstance(v, Path) else v
                                for k, v in vars(args).items()}, "model_dir": str(model_dir)}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        engine = {"max_seqs": args.max_seqs, "batch_tokens_per_step": args.batch_tokens_per_step,
                  "background_tokens_per_step": args.background_tokens_per_step}  # fmt: skip
        phase = lambda name: Live(model_dir, Path(tmp) / name, args.concurrency, **engine)  # noqa: E731
        with phase("idle") as live:
            system = system_prompt(live.served, args.system_tokens)
            bodies = requests(live.model, system, args.requests, args.max_tokens)
            probes(live.url, live.model, 1, 4)  # warm-up (first call pays one-time costs)
            idle = probes(live.url, live.model, args.probes, args.probe_tokens)
        with phase("sequential") as live:
            seq = one_at_a_time(live, bodies)
        with phase("batch") as live:
            bat = as_batch(live, bodies, args.probes, args.probe_tokens)
            prices, discount = live.prices, live.served.spec.pricing.batch_discount

    cost = sum(prices.cost(u, discount)["total"] for u in bat["usages"])
    uncached = [{**u, "prompt_tokens_details": {"cached_tokens": 0}, "cache_read_input_tokens": 0,
                 "cache_creation_input_tokens": 0} for u in bat["usages"]]  # fmt: skip
    cost_nocache = sum(prices.cost(u, discount)["total"] for u in uncached)
    completion = sum(u["completion_tokens"] for u in bat["usages"])
    during = bat["interactive_during"] or {}
    summary = {
        "requests": args.requests,
        "batch_completed": bat["batch"]["request_counts"]["completed"],
        "sequential_wall_s": round(seq["wall_s"], 2),
        "batch_wall_s": round(bat["wall_s"], 2),
        "throughput_ratio": round(seq["wall_s"] / bat["wall_s"], 2),
        "batch_output_tok_s": round(completion / bat["wall_s"], 1),
        "sequential_output_tok_s": round(
            sum(u["completion_tokens"] for u in seq["usages"]) / seq["wall_s"], 1),
        "prompt_tokens": sum(u["prompt_tokens"] for u in bat["usages"]),
        "cached_tokens": sum(u["prompt_tokens_details"]["cached_tokens"] for u in bat["usages"]),
        "batch_cost_usd": round(cost, 9),
        "batch_cost_without_cache_usd": round(cost_nocache, 9),
        "cost_ratio_cache_vs_none": round(cost / cost_nocache, 3),
        "batch_discount": discount,
        "interactive_idle": {k: v for k, v in idle.items() if k != "runs"},
        "interactive_during_batch": {k: v for k, v in during.items() if k != "runs"},
    }  # fmt: skip
    if during:
        summary["ttft_ratio_during_vs_idle"] = round(during["ttft_p50_s"] / idle["ttft_p50_s"], 2)
        summary["decode_ratio_idle_vs_during"] = round(
            idle["decode_tok_s_p50"] / during["decode_tok_s_p50"], 2)  # fmt: skip
    results.update(summary=summary, idle_runs=idle["runs"], during_runs=during.get("runs"),
                   provenance=provenance())  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    rows = [
        ("requests (shared system prompt tokens)", f"{args.requests} ({args.system_tokens})"),
        ("one at a time: wall s / output tok/s", f"{summary['sequential_wall_s']} / "
         f"{summary['sequential_output_tok_s']}"),
        ("batch: wall s / output tok/s", f"{summary['batch_wall_s']} / "
         f"{summary['batch_output_tok_s']}"),
        ("batch throughput ÷ one at a time (≥ 4)", summary["throughput_ratio"]),
        ("cached / prompt tokens", f"{summary['cached_tokens']} / {summary['prompt_tokens']}"),
        ("cost with cache ÷ without", summary["cost_ratio_cache_vs_none"]),
        ("interactive TTFT p50 idle → during s", f"{idle['ttft_p50_s']:.3f} → "
         f"{during.get('ttft_p50_s', float('nan')):.3f} (≤ 1.5×: "
         f"{summary.get('ttft_ratio_during_vs_idle')})"),
        ("interactive decode tok/s idle → during", f"{idle['decode_tok_s_p50']:.1f} → "
         f"{during.get('decode_tok_s_p50', float('nan')):.1f} (≤ 1.5×: "
         f"{summary.get('decode_ratio_idle_vs_during')})"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
