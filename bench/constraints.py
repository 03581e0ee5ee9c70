"""Structured-output cost: schema compile time and token-mask time per token (llguidance on
the packaged SmolLM2 tokenizer), over a seeded sample of the conformance schemas. Prints a
table, writes JSON.

    python bench/constraints.py            # → bench/results/constraints.json

Each sampled schema that compiles is driven along the tokens of its valid instances
(json.dumps, tokenized): per token, "hook" is what the engine's step pays — consume the new
token, compute the mask, turn it into a [vocab] bool tensor — and "llguidance" is the
library's own consume_token + compute_bitmask on a second matcher.

Then decode tokens/s of the engine on the packaged teacher (fp32), greedy, constrained by a
schema that cannot close within the run (a 50-string array) ÷ unconstrained, at each batch
size: 32 tokens per sequence, time(33 tokens) − time(1 token); the median over 7 pairs of
runs of constrained ÷ unconstrained (target ≥ 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from provenance import provenance  # bench/provenance.py (the script's own directory)

from serve.constraints import ConstraintCompiler, ConstraintError
from serve.engine import Engine
from serve.sampler import SamplingParams

TEACHER = Path("~/.cache/nanodistill/models/smollm2-135m-instruct").expanduser()
LONG_SCHEMA = {
    "type": "object",
    "properties": {"facts": {"type": "array", "items": {"type": "string"}, "minItems": 50}},
    "required": ["facts"],
}
NEW_TOKENS = 32
CONFORMANCE = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "jsonschema-conformance.jsonl"
)


def percentiles(xs: list[float], scale: float) -> dict:
    a = np.asarray(xs) * scale
    return {
        "n": int(a.size),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
    }


def run(num_schemas: int, seed: int) -> dict:
    from distill.assets import TEACHER_NAME
    from distill.models.loading import load_tokenizer

    tokenizer = load_tokenizer(TEACHER_NAME)
    t = time.perf_counter()
    compiler = ConstraintCompiler(tokenizer, eos_token_ids=[tokenizer.eos_token_id])
    setup_s = time.perf_counter() - t
    rows = [json.loads(line) for line in CONFORMANCE.read_text().splitlines()]
    rows = random.Random(seed).sample(rows, min(num_schemas, len(rows)))

    compile_s, hook_s, raw_s, refused = [], [], [], []
    for row in rows:
        t = time.perf_counter()
        try:
            constraint = compiler.compile_schema(row["schema"])
        except ConstraintError as e:
            refused.append({"id": row["id"], "error": str(e)[:200]})
            continue
        compile_s.append(time.perf_counter() - t)
        for case in (c for c in row["tests"] if c["valid"]):
            ids = tokenizer.encode(json.dumps(case["data"]), add_special_tokens=False)
            matcher, raw, out = constraint.new_matcher(), constraint.new_matcher()._m, []
            for tok in [*ids, None]:
                t = time.perf_counter()
                matcher(out)
                hook_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                raw.compute_bitmask()
                raw_s.append(time.perf_counter() - t)
                if tok is None:
                    break
                out.append(tok)
                t = time.perf_counter()
                raw.consume_token(tok)
                raw_s[-1] += time.perf_counter() - t
    return {
        "schemas": len(rows),
        "compiled": len(compile_s),
        "refused": refused,
        "compiler_setup_ms": setup_s * 1e3,
        "compile_ms": percentiles(compile_s, 1e3),
        "mask_hook_us": percentiles(hook_s, 1e6),
        "mask_llguidance_us": percentiles(raw_s, 1e6),
    }


def decode_ratio(batch: int, reps: int = 7) -> dict:
    """Engine decode tokens/s with a schema mask on every sequence ÷ without."""
    engine = Engine.from_pretrained(TEACHER, kv_memory_bytes=1 << 30)
    compiler = ConstraintCompiler(
        engine.tokenizer, vocab_size=engine.args.vocab_size, eos_token_ids=engine.eos
    )
    constraint = compiler.compile_schema(LONG_SCHEMA)
    text = "<|im_start|>user\nList 50 facts about Paris as JSON.<|im_end|>\n<|im_start|>assistant\n"
    prompt = engine.tokenizer.encode(text).ids

    def run(n: int, constrained: bool) -> float:
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        salt = f"run-{time.perf_counter()}"  # no prefix reuse between runs
        t = time.perf_counter()
        for _ in range(batch):
            mask = constraint.new_matcher() if constrained else None
            engine.add_request(prompt, params, salt=salt, token_mask=mask)
        while engine.has_work():
            engine.step()
        return time.perf_counter() - t

    # Paired runs, median of the per-pair ratios: other processes on a shared machine slow
    # some runs badly, and a pair's two halves see about the same load.
    run(2, False)
    tps: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(reps):
        for constrained in (False, True):
            decode_s = run(NEW_TOKENS + 1, constrained) - run(1, constrained)
            tps[constrained].append(batch * NEW_TOKENS / decode_s)
    ratios = [c / u for c, u in zip(tps[True], tps[False], strict=True)]
    return {
        "batch": batch,
        "unconstrained_tps": float(np.median(tps[False])),
        "constrained_tps": float(np.median(tps[True])),
        "ratio": float(np.median(ratios)),
        "pair_ratios": ratios,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemas", type=int, default=150, help="schemas sampled (seeded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", default="1,8", help="engine decode batches ('' = skip)")
    ap.add_argument("--out", default="bench/results/constraints.json")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    results = run(args.schemas, args.seed)
    batches = [int(b) for b in args.batches.split(",") if b]
    results["decode"] = [decode_ratio(b) for b in batches]
    print(f"{results['compiled']} of {results['schemas']} sampled schemas compiled")
    print(f"{'metric':<34}{'n':>7}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}")
    for name in ("compile_ms", "mask_hook_us", "mask_llguidance_us"):
        r = results[name]
        print(
            f"{name:<34}{r['n']:>7}{r['p50']:>10.1f}{r['p90']:>10.1f}{r['p99']:>10.1f}{r['max']:>10.1f}"
        )
    for r in results["decode"]:
        print(
            f"decode batch {r['batch']}: {r['constrained_tps']:.1f} tok/s constrained, "
            f"{r['unconstrained_tps']:.1f} unconstrained, ratio {r['ratio']:.3f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results["provenance"] = provenance(("llguidance", "tokenizers", "jsonschema"))
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
