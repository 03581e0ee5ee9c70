"""Where a serve-engine decode step goes: attention (`invariant.attend_rows`) vs everything else.

    flock /tmp/nanodistill-heavy.lock python bench/decode_profile.py

N requests share one 1,000-token prefix (the serve_http "shared" workload: cache hits) plus 16
distinct tokens each, on the packaged fp32 teacher. After every prompt is prefilled, `--steps`
greedy decode steps are timed, and the time inside `attend_rows` is summed. Prints a table and
writes JSON with provenance. Profiles, not targets: the targets live in bench/serve_http.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import ROOT, provenance  # noqa: E402

from distill.assets import teacher_dir  # noqa: E402
from serve import invariant  # noqa: E402
from serve.engine import Engine  # noqa: E402
from serve.sampler import SamplingParams  # noqa: E402


def profile(engine: Engine, rows: int, steps: int, prefix_len: int) -> dict:
    g = torch.Generator().manual_seed(rows)
    prefix = torch.randint(100, 40000, (prefix_len,), generator=g).tolist()
    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
    reqs = [
        engine.add_request(prefix + torch.randint(100, 40000, (16,), generator=g).tolist(), params)
        for _ in range(rows)
    ]
    while any(s.num_computed < s.prompt_len for r in reqs for s in r.seqs):
        engine.step()
    attend = [0.0]
    original = invariant.attend_rows

    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = original(*args, **kwargs)
        attend[0] += time.perf_counter() - t
        return out

    invariant.attend_rows = timed
    step_s, attend_s = [], []
    try:
        for _ in range(steps):
            attend[0] = 0.0
            t = time.perf_counter()
            engine.step()
            step_s.append(time.perf_counter() - t)
            attend_s.append(attend[0])
    finally:
        invariant.attend_rows = original
    while engine.has_work():
        engine.step()
    return {
        "rows": rows,
        "context": prefix_len + 16,
        "step_ms_median": 1000 * statistics.median(step_s),
        "attention_ms_median": 1000 * statistics.median(attend_s),
        "step_ms": [1000 * s for s in step_s],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[8, 32])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--prefix", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/decode_profile.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    engine = Engine.from_pretrained(teacher_dir())
    cells = [profile(engine, n, args.steps, args.prefix) for n in args.rows]
    for c in cells:
        print(
            f"N={c['rows']:>3} context {c['context']}: decode step {c['step_ms_median']:.0f} ms, "
            f"attention {c['attention_ms_median']:.0f} ms "
            f"({c['attention_ms_median'] / c['step_ms_median']:.0%})"
        )
    args.out.write_text(json.dumps({"cells": cells, "provenance": provenance()}, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
