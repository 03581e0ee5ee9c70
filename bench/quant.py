"""INT8 benchmark on a real distilled student: fp32 vs PTQ vs QAT.

Needs a training run made with `quant=qat-int8` (student/, student-ptq/, student-qat/), e.g.

    flock /tmp/nanodistill-heavy.lock python -m distill train quant=qat-int8 logger=csv '~eval'
    flock /tmp/nanodistill-heavy.lock python bench/quant.py --run-dir outputs/nano-text/<stamp>

Exports fp32 / PTQ / QAT with `distill.export`, then reports held-out perplexity (wiki test
split, the same hash split training used), weight bytes on disk, resident memory and greedy
decode tokens/s at batch 1 — fp32 and int8 (serve.int8 fbgemm kernels) measured in this run,
each in a fresh subprocess. Prints a table and writes JSON.

Noise floor: a W8A8 model is hypersensitive — scaling every RMSNorm weight by
(1 + 1e-6·N(0, 1)) moves an int8 model's next-token distribution about as much as PTQ vs fp32
does — so every perplexity is also measured under `--perturbations` such perturbations (seeds
1..k) and reported as mean ± std with min/max, and the QAT recovery of the PTQ loss is given
per perturbation seed. A difference inside that spread is noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    """Resident set size of this process (after returning freed heap to the OS)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def decode_child(export_dir: str, int8_kernels: bool, prompt_tokens: int, new_tokens: int) -> dict:
    """Runs in a fresh process: load, measure RSS, time greedy decode at batch 1."""
    import torch
    from transformers import DynamicCache

    from distill.export import load_export

    torch.set_num_threads(2)
    base = rss_mb()
    model = load_export(export_dir, int8_kernels=int8_kernels)
    resident = rss_mb()
    prompt = torch.randint(0, 49152, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def decode() -> float:
        cache = DynamicCache(config=model.config)
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        next_id = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=next_id, past_key_values=out.past_key_values, use_cache=True)
            next_id = out.logits[:, -1:].argmax(-1)
        return new_tokens / (time.perf_counter() - start)

    decode()  # warm-up
    rates = [decode() for _ in range(3)]
    return {
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_all": rates,
        "rss_mb": resident,
        "rss_model_mb": resident - base,
    }


def run_child(export_dir: Path, int8_kernels: bool, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(export_dir),
        "--int8-kernels" if int8_kernels else "--fp32-kernels",
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--new-tokens",
        str(args.new_tokens),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def perturb_norms(model, seed: int, scale: float) -> None:
    """Scale every RMSNorm weight by (1 + scale · N(0, 1)), in place (seeded)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.mul_(1 + scale * torch.randn(param.shape, generator=g))


def perplexity_spread(load, blocks, seeds: list[int], scale: float) -> dict:
    """Perplexity of a fresh `load()` as is, and under each seed's norm perturbation."""
    from eval.perplexity import perplexity

    values = {}
    for seed in [0, *seeds]:
        model = load()
        if seed:
            perturb_norms(model, seed, scale)
        values[seed] = perplexity(model, blocks, batch_size=8, progress=False)["perplexity"]
        del model
    perturbed = [values[s] for s in seeds]
    return {
        "perplexity": values[0],
        "perturbed": perturbed,
        "mean": statistics.mean(perturbed),
        "std": statistics.stdev(perturbed) if len(perturbed) > 1 else 0.0,
        "min": min(perturbed),
        "max": max(perturbed),
    }


def heldout_blocks(tokenizer, max_blocks: int, seq_len: int):
    from distill.data.corpus import load_wiki, split_corpus
    from distill.data.text import pack_documents

    docs = split_corpus(load_wiki(), 0.05, 0.05)["test"]
    return pack_documents(tokenizer, docs, seq_len=seq_len, max_blocks=max_blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quant.json")
    parser.add_argument("--export-root", type=Path, default=None)
    parser.add_argument("--eval-blocks", type=int, default=64)
    parser.add_argument("--perturbations", type=int, default=3, help="RMSNorm noise seeds (≥ 3)")
    parser.add_argument("--perturbation-scale", type=float, default=1e-6)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--int8-kernels", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fp32-kernels", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        out = decode_child(args.child, args.int8_kernels, args.prompt_tokens, args.new_tokens)
        print(json.dumps(out))
        return
    if args.run_dir is None:
        parser.error("--run-dir is required")
    if args.perturbations < 3:
        parser.error(f"--perturbations must be >= 3 for a spread, got {args.perturbations}")

    import torch
    from provenance import provenance  # bench/provenance.py (the script's own directory)
    from rich.console import Console
    from rich.table import Table

    from distill.export import export, load_export
    from distill.models.loading import load_tokenizer
    from distill.offline import set_offline_defaults
    from serve.export_format import read_export

    set_offline_defaults()
    torch.set_num_threads(2)
    run_dir = args.run_dir
    for sub in ("student", "student-ptq", "student-qat"):
        if not (run_dir / sub / "config.json").exists():
            raise SystemExit(f"{run_dir / sub} missing: train with quant=qat-int8 first")
    export_root = args.export_root or run_dir / "bench-exports"
    exports = {
        "fp32": export(run_dir / "student", export_root / "fp32", quant="none"),
        "ptq-int8": export(run_dir / "student-ptq", export_root / "ptq-int8", quant="int8"),
        "qat-int8": export(run_dir / "student-qat", export_root / "qat-int8", quant="int8"),
    }
    tokenizer = load_tokenizer(str(run_dir / "student"))
    blocks = heldout_blocks(tokenizer, args.eval_blocks, args.seq_len)

    seeds = list(range(1, args.perturbations + 1))
    rows: dict[str, dict] = {}
    for name, path in exports.items():
        # transformers' reference numerics
        spread = perplexity_spread(
            lambda path=path: load_export(path, int8_kernels=False),
            blocks,
            seeds,
            args.perturbation_scale,
        )
        rows[name] = {**spread, "bytes": read_export(path).weight_bytes()}
    fast = perplexity_spread(  # what the CPU runtime executes
        lambda: load_export(exports["qat-int8"]), blocks, seeds, args.perturbation_scale
    )
    rows["qat-int8 (fbgemm kernels)"] = {**fast, "bytes": rows["qat-int8"]["bytes"]}

    speed = {"fp32": [], "int8": []}
    for _ in range(2):  # interleaved, so drift on a shared machine hits both
        speed["fp32"].append(run_child(exports["fp32"], False, args))
        speed["int8"].append(run_child(exports["qat-int8"], True, args))
    fp32_tps = statistics.median(s["tokens_per_s"] for s in speed["fp32"])
    int8_tps = statistics.median(s["tokens_per_s"] for s in speed["int8"])

    fp32_ppl, ptq_ppl, qat_ppl = (rows[k]["perplexity"] for k in ("fp32", "ptq-int8", "qat-int8"))

    def recovery(fp32: float, ptq: float, qat: float) -> float | None:
        return (ptq - qat) / (ptq - fp32) if ptq > fp32 else None

    per_seed = [
        recovery(*(rows[k]["perturbed"][i] for k in ("fp32", "ptq-int8", "qat-int8")))
        for i in range(len(seeds))
    ]
    summary = {
        "run_dir": str(run_dir),
        "eval_tokens": int(blocks[:, 1:].numel()),
        "perturbation": {"seeds": seeds, "scale": args.perturbation_scale},
        "models": rows,
        "qat_recovery": recovery(fp32_ppl, ptq_ppl, qat_ppl),
        "qat_recovery_per_perturbation": per_seed,
        "int8_bytes_fraction": rows["qat-int8"]["bytes"] / rows["fp32"]["bytes"],
        "decode": {
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "fp32_tokens_per_s": fp32_tps,
            "int8_tokens_per_s": int8_tps,
            "speedup": int8_tps / fp32_tps,
            "fp32_rss_mb": statistics.median(s["rss_mb"] for s in speed["fp32"]),
            "int8_rss_mb": statistics.median(s["rss_mb"] for s in speed["int8"]),
            "runs": speed,
        },
        "targets": {
            "qat_recovers_two_thirds": None,
            "bytes_at_most_30pct": None,
            "decode_at_least_2x": None,
        },
    }
    t = summary["targets"]
    rec = summary["qat_recovery"]
    t["qat_recovers_two_thirds"] = None if rec is None else rec >= 2 / 3
    t["bytes_at_most_30pct"] = summary["int8_bytes_fraction"] <= 0.30
    t["decode_at_least_2x"] = summary["decode"]["speedup"] >= 2.0

    table = Table(title=f"INT8: fp32 vs PTQ vs QAT ({summary['eval_tokens']} held-out tokens)")
    for col in ("model", "perplexity", "perturbed mean ± std", "[min, max]", "weights MB",
                "vs fp32 bytes"):  # fmt: skip
        table.add_column(col, justify="right")
    for name, row in rows.items():
        table.add_row(
            name,
            f"{row['perplexity']:.3f}",
            f"{row['mean']:.3f} ± {row['std']:.3f}",
            f"[{row['min']:.3f}, {row['max']:.3f}]",
            f"{row['bytes'] / 1e6:.1f}",
            f"{row['bytes'] / rows['fp32']['bytes']:.1%}",
        )
    console = Console()
    console.print(table)
    d = summary["decode"]
    console.print(
        f"decode batch 1: fp32 {fp32_tps:.1f} tok/s ({d['fp32_rss_mb']:.0f} MB RSS) | "
        f"int8 {int8_tps:.1f} tok/s ({d['int8_rss_mb']:.0f} MB RSS) | {d['speedup']:.2f}x"
    )
    console.print(f"QAT recovery of the PTQ loss: {rec if rec is None else f'{rec:.0%}'}")
    console.print(
        "per perturbation seed: " + ", ".join("n/a" if r is None else f"{r:.0%}" for r in per_seed)
    )
    console.print(f"targets: {t}")
    summary["provenance"] = provenance()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
