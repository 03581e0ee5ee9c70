"""Which half-size shape keeps the most of the teacher before any training?

Prunes the real teacher to about half its parameters several ways from one calibration pass
(cached in --importance): the budget search's pick (configs/student/minitron-half.yaml rule:
deepest shape the width floors allow), the best-retained shape at shallower depths, the hidden
size kept (MLP and depth pruned), and depth only (full width, layers dropped). Reports held-out (wiki test split) perplexity of each pruned,
untrained student next to the teacher. Prints a table and writes JSON.

    flock /tmp/nanodistill-heavy.lock python bench/prune_shapes.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--calibration-blocks", type=int, default=32)
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--importance", default="outputs/bench/prune_importance.pt")
    parser.add_argument("--out", default="bench/results/prune_shapes.json")
    args = parser.parse_args()

    import torch
    from omegaconf import OmegaConf
    from provenance import provenance  # bench/provenance.py (the script's own directory)
    from rich.console import Console
    from rich.table import Table

    from distill.assets import TEACHER_NAME
    from distill.data.text import TextDataModule
    from distill.models.loading import count_parameters, load_causal_lm, load_tokenizer
    from distill.paths import configs_dir
    from distill.prune.plan import Dims, head_dim_of, make_plan
    from distill.prune.search import SearchSpace, search_shape
    from distill.prune.slicing import parameters_for, slice_model
    from distill.prune.stage import importance_scores
    from eval.perplexity import perplexity

    torch.manual_seed(0)
    tokenizer = load_tokenizer(TEACHER_NAME)
    teacher = load_causal_lm(TEACHER_NAME).eval().requires_grad_(False)
    data = TextDataModule(tokenizer, seq_len=256, max_train_blocks=args.calibration_blocks,
                          max_eval_blocks=args.eval_blocks)  # fmt: skip
    data.setup()
    cfg = OmegaConf.load(configs_dir() / "student" / "minitron-half.yaml")
    cfg.calibration_blocks = args.calibration_blocks
    importance = Path(args.importance)
    stamp = importance.stat().st_mtime_ns if importance.exists() else None
    start = time.perf_counter()
    scores = importance_scores(cfg, teacher, data.blocks["train"], importance)
    scores_s = time.perf_counter() - start
    # importance_scores reuses a cached file made with the same settings (and rewrites it only
    # when it calibrates): loading it is not a calibration pass, so time only a real one.
    calibrated = stamp is None or importance.stat().st_mtime_ns != stamp
    calibration_s = scores_s if calibrated else None

    space = SearchSpace.from_dict(OmegaConf.to_container(cfg.search))
    start = time.perf_counter()
    chosen, candidates = search_shape(teacher, scores, args.target, space)
    search_s = time.perf_counter() - start
    feasible = [c for c in candidates if c.retained == c.retained]
    shapes = {"search pick": chosen.dims}
    for depth in sorted({c.dims.num_hidden_layers for c in feasible}, reverse=True)[3::3]:
        best = max(
            (c for c in feasible if c.dims.num_hidden_layers == depth), key=lambda c: c.retained
        )
        shapes[f"best retained, {depth} layers"] = best.dims
    relaxed = SearchSpace(**{**asdict(space), "min_intermediate_fraction": 0.25})
    kept_width, _ = search_shape(teacher, scores, args.target, relaxed, {"hidden_size": 576})
    shapes["hidden kept (ffn floor 0.25)"] = kept_width.dims
    teacher_dims = Dims.of(teacher.config)
    total = count_parameters(teacher)
    depth_only = max(n for n in range(1, teacher_dims.num_hidden_layers + 1)
                     if parameters_for(teacher, teacher_dims.replace(num_hidden_layers=n)) <= args.target * total)  # fmt: skip
    shapes["depth only"] = teacher_dims.replace(num_hidden_layers=depth_only)

    rows = [{"model": "teacher", **asdict(teacher_dims), "parameters": total, "fraction": 1.0,
             **perplexity(teacher, data.blocks["test"], progress=False)}]  # fmt: skip
    for name, dims in shapes.items():
        plan = make_plan(scores, teacher_dims, dims, head_dim_of(teacher.config))
        student = slice_model(teacher, plan).eval()
        n = count_parameters(student)
        ppl = perplexity(student, data.blocks["test"], progress=False)
        rows.append({"model": name, **asdict(dims), "parameters": n, "fraction": n / total, **ppl})
        del student

    table = Table(title=f"pruned, untrained students at {args.target} of the teacher (wiki test)")
    for col in ("model", "layers", "hidden", "ffn", "heads/kv", "parameters", "fraction", "ppl"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(r["model"], str(r["num_hidden_layers"]), str(r["hidden_size"]),
                      str(r["intermediate_size"]), f"{r['num_attention_heads']}/{r['num_key_value_heads']}",
                      f"{r['parameters']:,}", f"{r['fraction']:.3f}", f"{r['perplexity']:.1f}")  # fmt: skip
    Console(width=140).print(table)
    result = {
        "target": args.target,
        "calibration_blocks": args.calibration_blocks,
        "calibration_seconds": calibration_s,  # null: scores loaded from --importance
        "importance_scores": "computed" if calibrated else f"loaded from {importance}",
        "importance_load_seconds": None if calibrated else scores_s,
        "search_seconds": search_s,
        "candidates_considered": len(candidates),
        "candidates_in_budget": len(feasible),
        "eval_tokens": rows[0]["tokens"],
        "rows": rows,
    }
    result["provenance"] = provenance()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    calibration = (
        f"calibration {calibration_s:.1f} s" if calibrated else f"scores from {importance}"
    )
    print(f"{calibration}, search {search_s:.1f} s → {args.out}")


if __name__ == "__main__":
    main()
