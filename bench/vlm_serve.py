"""A trained VLM export served over HTTP: easy-VQA test questions with their images through the
official openai client against `python -m distill serve`, scored like the recipes' eval.

    python bench/vlm_serve.py outputs/nano-vlm/<run>/export [--questions 200]

Each question is one chat request: a PNG `data:` URL and the question as one user turn (the
training prompt), greedy, at most 3 new tokens. Requests run `--concurrency` at a time, so the
engine batches image prompts together. Prints accuracy per question type and the request
latency; writes JSON (with provenance). A check that the door works on a real model, not a
timing target.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import ROOT, provenance  # noqa: E402
from serve_http import Server, free_port, percentile  # noqa: E402

from eval.vqa import accuracy_by_type, easy_vqa_items  # noqa: E402


def ask(client: openai.OpenAI, model: str, image: Path, question: str) -> tuple[str, float]:
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    start = time.perf_counter()
    reply = client.chat.completions.create(
        model=model,
        max_tokens=3,
        temperature=0,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": question},
                ],
            }
        ],
    )
    return reply.choices[0].message.content.strip(), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("exports", nargs="+", type=Path)
    ap.add_argument("--questions", type=int, default=200, help="first N of the eval's sample")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/vlm_serve.json")
    args = ap.parse_args()
    # The eval's fixed seed-0 sample: its first N questions are the ones the recipes scored.
    items = easy_vqa_items(1000, 0)[: args.questions]
    results = {}
    for export in args.exports:
        log = Path("/tmp") / f"vlm-serve-{export.parent.name}.log"
        port = free_port()
        argv = [sys.executable, "-m", "distill", "serve", f"model={export.resolve()}",
                "host=127.0.0.1", f"port={port}"]  # fmt: skip
        with Server(argv, port, log) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
            start = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                jobs = [pool.submit(ask, client, server.model, i.image, i.question) for i in items]
                replies = [job.result() for job in jobs]
            wall = time.perf_counter() - start
        answers = [a for a, _ in replies]
        latencies = [s for _, s in replies]
        scores = accuracy_by_type(answers, items)
        results[str(export)] = {
            "vqa": scores,
            "wall_seconds": wall,
            "latency_p50_s": percentile(latencies, 50),
            "latency_p99_s": percentile(latencies, 99),
            "examples": [
                {"image": str(i.image), "question": i.question, "answer": i.answer, "served": a}
                for i, a in zip(items[:8], answers, strict=False)
            ],
        }
        line = ", ".join(f"{k} {v['accuracy']:.3f} (n={v['questions']})" for k, v in scores.items())
        print(f"{export}: {line}; {wall:.1f} s for {len(items)} requests, "
              f"p50 {results[str(export)]['latency_p50_s']:.2f} s")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"exports": results, "provenance": provenance()}, indent=2))


if __name__ == "__main__":
    main()
