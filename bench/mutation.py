"""Mutation testing of the core modules: do the tests fail when the code is wrong?

mutmut (pinned in the dev extra, configured under [tool.mutmut] in pyproject.toml) writes
small bugs — an operator flipped, a constant off by one, an argument dropped — into a copy of
the code under `mutants/`, and runs, for each, only the tests that reach the mutated
function (fastest first, stopping at the first failure). A mutant the tests let pass
"survived". This script runs one module at a time (each under the heavy-work lock, one
worker, so the other users of the 2 cores queue only one module's minutes behind it), then
prints a table and writes the counts, every surviving mutant and the named equivalent ones
to JSON with provenance.

Run it in a clean checkout, not a working tree others are editing (the copy under
`mutants/` would mix in their unfinished changes):

    git worktree add --detach /tmp/mut HEAD && cd /tmp/mut
    python bench/mutation.py --lock /tmp/nanodistill-heavy.lock --out /work/main/bench/results/mutation.json

"seconds" is the time mutmut ran (lock waits are recorded apart); the "stats" run is the
one-off copy of the tree plus one pass of the whole test selection that maps tests to functions.

`--report-only` rereads `mutants/` without running anything. Timeouts count as killed (the
mutant hangs the tests, which notice); "no tests" counts as surviving.
"""

from __future__ import annotations

import argparse
import ast
import fcntl
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODULES = (
    "serve.prefix_cache",
    "serve.sampler",
    "distill.losses",
    "distill.quant",
    "serve.scheduler",
    "serve.engine",
)
# The fast tests that guard each module. mutmut's stats map every function to the tests that
# reach it (through the engine, that is nearly all of them); the map is narrowed to these files
# before each module runs, so a surviving mutant costs seconds, not the whole selection.
MODULE_TESTS = {
    "serve.prefix_cache": ("test_serve_prefix_cache.py", "test_serve_scheduler.py"),
    "serve.sampler": ("test_serve_sampler.py",),
    "distill.losses": ("test_losses.py",),
    "distill.quant": ("test_quant.py", "test_quant_scheme.py", "test_int8_rounding.py"),
    "serve.scheduler": (
        "test_serve_scheduler.py", "test_batch_priority.py", "test_serve_abort.py",
        "test_serve_engine.py",
    ),
    "serve.engine": (
        "test_serve_engine.py", "test_serve_abort.py", "test_serve_stop.py", "test_serve_vlm.py",
    ),
}  # fmt: skip
# A handful of mutants whose run makes mutmut write its mutants/ tree and test stats.
BOOTSTRAP = "serve.prefix_cache.x_image_digest__mutmut_*"
CAUGHT = {"killed", "timeout", "caught by type check", "segfault"}

# Surviving mutants that no test can kill because the program behaves the same: mutant name →
# (text the mutated line must contain, so a renumbered mutant is not silently excused; why).
_OPAQUE_KEY = (
    "block keys are opaque and only compared with each other: a digest of another length is "
    "another collision-free hash, and every key (and image digest) is made by the same code"
)
_DOMAIN_TAG = (
    "a constant domain-separation prefix: any other constant keeps keys of different kinds "
    "apart in the same way"
)
_INF = 'float() reads "inf" in any case: float("-INF") == float("-inf")'
_INT64 = "torch.tensor of Python ints is int64 (torch.long) without being told"
_ROWS = (
    "the tensors here are always 2-D rows ([S, V] logits, (N, V) and (N, k) log-probs), so "
    "dim 1 is dim -1"
)
_PROBE = (
    "the call on zeros only makes the divergence check β/α; any shapes that broadcast give "
    "the same accept-or-raise"
)
_SOFTMAX_DIM = (
    "F.log_softmax without a dim picks dim 1 for 2-D input (with a warning): the rows here are "
    "(N, V)"
)
_TORCHAO_SYM = (
    "torchao's IntxFakeQuantizeConfig takes is_symmetric=None as symmetric (the bit-exact "
    "test against serve.int8's symmetric grid passes on it)"
)
_ZIP = "ids and vals are the same slice of one topk result: zip never meets unequal lengths"
EQUIVALENT: dict[str, tuple[str, str]] = {
    "serve.prefix_cache.x_image_digest__mutmut_4": ("blake2b(data, )", _OPAQUE_KEY),
    "serve.prefix_cache.x_image_digest__mutmut_5": ("digest_size=17", _OPAQUE_KEY),
    "serve.prefix_cache.x_root_key__mutmut_4": ("salt.encode(), )", _OPAQUE_KEY),
    "serve.prefix_cache.x_root_key__mutmut_6": ('b"XXroot', _DOMAIN_TAG),
    "serve.prefix_cache.x_root_key__mutmut_7": ('b"ROOT', _DOMAIN_TAG),
    "serve.prefix_cache.x_root_key__mutmut_8": ("digest_size=17", _OPAQUE_KEY),
    "serve.prefix_cache.x_block_key__mutmut_5": ("blake2b(parent, )", _OPAQUE_KEY),
    "serve.prefix_cache.x_block_key__mutmut_6": ("digest_size=17", _OPAQUE_KEY),
    "serve.prefix_cache.x_block_key__mutmut_9": (
        "dtype=None",
        "numpy's default integer for a list of Python ints is int64 on Linux x86-64 (the "
        "supported platform), the dtype the line names",
    ),
    "serve.prefix_cache.x_block_key__mutmut_11": (
        "np.asarray(token_ids, )",
        "numpy's default integer for a list of Python ints is int64 on Linux x86-64 (the "
        "supported platform), the dtype the line names",
    ),
    "serve.prefix_cache.x_block_key__mutmut_14": ('b"XXimg', _DOMAIN_TAG),
    "serve.prefix_cache.x_block_key__mutmut_15": ('b"IMG', _DOMAIN_TAG),
    "serve.sampler.x_filter_logits__mutmut_4": (
        "params.top_k <= x.shape[-1]",
        "with top_k = V the k-th largest logit is the smallest, so `x < kth` masks nothing: "
        "the same as skipping top-k",
    ),
    "serve.sampler.x_filter_logits__mutmut_22": ('float("-INF")', _INF),
    "serve.sampler.x_filter_logits__mutmut_56": ('float("-INF")', _INF),
    "serve.sampler.x_sample__mutmut_27": ('float("-INF")', _INF),
    "distill.quant.x__fake_quant_configs__mutmut_4": ("is_symmetric=None", _TORCHAO_SYM),
    "distill.quant.x__fake_quant_configs__mutmut_7": ('"per_channel", )', _TORCHAO_SYM),
    "distill.quant.x_compressed_tensors_config__mutmut_22": (
        "acts = QuantizationArgs(type=",
        "compressed-tensors' QuantizationArgs defaults num_bits to 8: the same config",
    ),
    "distill.quant.x_prepare_qat__mutmut_34": (
        'step="PREPARE"',
        "torchao's QATConfig reads the step name case-insensitively",
    ),
    "distill.quant.x_compressed_tensors_config__mutmut_7": (
        "QuantizationArgs(num_bits=8, symmetric=True",
        "compressed-tensors' QuantizationArgs defaults type to int: the same config",
    ),
    "distill.quant.x_build_scheme__mutmut_9": (
        'get("embeddings", None)',
        "bool(None) is False, the default the line names",
    ),
    "distill.quant.x_finish_qat__mutmut_9": (
        'step="CONVERT"',
        "torchao's QATConfig reads the step name case-insensitively",
    ),
    "distill.quant.x_compressed_tensors_config__mutmut_29": (
        'type="INT"',
        'compressed-tensors\' QuantizationArgs lower-cases the type: it equals type="int"',
    ),
    "distill.quant.x_save_int8__mutmut_5": (
        "quantization_format=None",
        "the model carries its compressed-tensors config (attached by to_int8), which already "
        "names the int-quantized format that from_pretrained_model then reads",
    ),
    "distill.quant.x_save_int8__mutmut_7": (
        "from_pretrained_model(model, )",
        "the model carries its compressed-tensors config (attached by to_int8), which already "
        "names the int-quantized format that from_pretrained_model then reads",
    ),
    "distill.losses.xǁKDLossǁ__init____mutmut_52": ("torch.zeros(2), torch.zeros(1, 2)", _PROBE),
    "distill.losses.xǁKDLossǁ__init____mutmut_58": ("torch.zeros(1, 2), torch.zeros(2)", _PROBE),
    "distill.losses.xǁKDLossǁdivergence__mutmut_4": ("dim=None", _SOFTMAX_DIM),
    "distill.losses.xǁKDLossǁdivergence__mutmut_6": ("t, )", _SOFTMAX_DIM),
    "distill.losses.xǁKDLossǁdivergence__mutmut_17": ("dim=None", _SOFTMAX_DIM),
    "distill.losses.xǁKDLossǁdivergence__mutmut_19": ("t, )", _SOFTMAX_DIM),
    "distill.losses.xǁKDLossǁforward__mutmut_22": (
        "- ref.sum() * 0.0",
        "ref.sum() * 0.0 is zero: subtracting it instead of adding gives the same value and "
        "keeps the same graph",
    ),
    "distill.losses.xǁKDLossǁforward__mutmut_49": (
        "n >= self.chunk_size",
        "with n = chunk_size there is one chunk: recomputing its logits in backward or keeping "
        "them gives the same values and gradients; only the memory differs",
    ),
    "distill.losses.x_total_variation__mutmut_5": ("abs().sum(+1)", _ROWS),
    "distill.losses.x_topk_buckets__mutmut_21": (
        "unsqueeze(+1)",
        "s_rest is (N,) before the unsqueeze, so dim 1 is dim -1",
    ),
    "distill.losses.x_topk_buckets__mutmut_29": ("t_top.exp().sum(+1)", _ROWS),
    "distill.losses.xǁKDLossǁ__init____mutmut_53": ("torch.zeros(1, ), torch.zeros(1, 2)", _PROBE),
    "distill.losses.x_topk_buckets__mutmut_7": ("gather(+1", _ROWS),
    "distill.losses.x_topk_buckets__mutmut_16": ("sum(+1)", _ROWS),
    "distill.losses.x_topk_buckets__mutmut_34": (
        "unsqueeze(+1)",
        "t_rest is (N,) before the unsqueeze, so dim 1 is dim -1",
    ),
    "distill.losses.x_topk_buckets__mutmut_40": ("[s_top, s_rest], +1)", _ROWS),
    "distill.losses.x_topk_buckets__mutmut_46": ("[t_top, t_rest], +1)", _ROWS),
    "serve.sampler.x_sample__mutmut_30": ("argmax(+1)", _ROWS),
    "serve.sampler.x_sample__mutmut_61": ("dim=+1", _ROWS),
    "serve.sampler.x_sample__mutmut_67": (
        "if (k) or True",
        "with k = 0 the topk(logp, 0) result is made but never read: its only use is under `if k:`",
    ),
    "serve.sampler.x_sample__mutmut_81": ("strict=None", _ZIP),
    "serve.sampler.x_sample__mutmut_84": ("zip(ids, vals, )", _ZIP),
    "serve.sampler.x_sample__mutmut_85": ("strict=False", _ZIP),
    "serve.sampler.x_apply_penalties__mutmut_1": (
        "not generated and not params.penalized",
        "the early return only saves work: with no generated tokens the index set is empty, "
        "and an unpenalised request subtracts 0 + 0 × count",
    ),
    "serve.sampler.x_apply_penalties__mutmut_7": ("dtype=None", _INT64),
    "serve.sampler.x_apply_penalties__mutmut_9": ("torch.tensor(generated, )", _INT64),
    "serve.sampler.x_apply_penalties__mutmut_15": (
        "counts.to(None)",
        "Tensor.to(None) returns the int64 counts unchanged, and frequency × count promotes to "
        "the row's float dtype: the same values",
    ),
    "serve.engine.xǁEngineǁ_batch__mutmut_53": (
        'decode_slots = ""',
        "the placeholder is replaced whenever a row decodes, and attention reads decode_slots "
        "only when num_decode > 0",
    ),
    "serve.engine.xǁEngineǁstep__mutmut_41": (
        "zip(sampling, choices, )",
        "choices come from sampling one row per entry of `sampling`: equal lengths always",
    ),
    "serve.engine.xǁEngineǁadd_request__mutmut_73": (
        "if (queue_size) and False else 0",
        "an unbounded queue instead of one of queue_size + n: the bound is never reached. A "
        "request is stepped only while its unread outputs plus one per live choice fit in "
        "queue_size (Request.paused), so at most queue_size are ever unread before an abort adds "
        "its one final output per live choice (≤ n)",
    ),
}


def narrow_stats() -> None:
    """Keep, for each mutated function, only the tests of its module's MODULE_TESTS files."""
    path = ROOT / "mutants" / "mutmut-stats.json"
    stats = json.loads(path.read_text())
    tests = stats["tests_by_mangled_function_name"]
    for function, names in tests.items():
        keep = MODULE_TESTS.get(module_of(function), ())
        tests[function] = [t for t in names if t.split("::")[0].removeprefix("tests/") in keep]
    path.write_text(json.dumps(stats))


@contextmanager
def holding(lock: str | None) -> Iterator[None]:
    """Hold an exclusive flock on `lock` (if given) for the duration."""
    if lock is None:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def mutmut(patterns: list[str], lock: str | None, children: int) -> dict:
    """`mutmut run` for the mutants matching `patterns` under the lock: seconds waited for the
    lock, seconds run, the load average when it started, mutmut's exit code."""
    cmd = ["mutmut", "run", "--max-children", str(children), *patterns]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    asked = time.perf_counter()
    with holding(lock):
        start = time.perf_counter()
        load = os.getloadavg()[0]
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, check=False)
        end = time.perf_counter()
    return {
        "lock_wait_seconds": round(start - asked, 1),
        "seconds": round(end - start, 1),
        "load_1min_at_start": load,
        "exit_code": done.returncode,
    }


def statuses() -> dict[str, str]:
    """Every mutant's status, from mutmut's per-file .meta records under mutants/."""
    from mutmut.stats import status_by_exit_code

    out = {}
    for meta in sorted((ROOT / "mutants").rglob("*.py.meta")):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            out[name] = status_by_exit_code[code]
    return out


def module_of(name: str) -> str:
    return name.split(".x", 1)[0]


def locate(name: str, diff: str) -> tuple[str, int | None]:
    """File and line of a mutant: the first removed line of its diff, searched for in the
    original function's span."""
    module = module_of(name)
    path = Path(*module.split(".")).with_suffix(".py")
    func = re.sub(r"__mutmut_\d+$", "", name[len(module) + 2 :]).strip("_")
    parts = [p for p in func.split("ǁ") if p]
    removed = next(
        (line[1:].strip() for line in diff.splitlines() if line[:1] == "-" and line[:3] != "---"),
        "",
    )
    source = (ROOT / path).read_text()
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == parts[-1]:
            for i in range(node.lineno, (node.end_lineno or node.lineno) + 1):
                if removed and lines[i - 1].strip() == removed:
                    return str(path), i
    return str(path), None


def survivor_record(name: str, status: str) -> dict:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    diff = get_diff_for_mutant(name)
    path, line = locate(name, diff)
    changed = [d for d in diff.splitlines() if d[:1] in "+-" and d[:3] not in ("+++", "---")]
    record = {"name": name, "status": status, "file": path, "line": line, "change": changed}
    note = EQUIVALENT.get(name)
    if note is not None:
        expected, reason = note
        if any(expected in c for c in changed if c.startswith("+")):
            record["equivalent"] = reason
        else:
            record["equivalent_note_stale"] = reason
    return record


def report(
    seconds: dict[str, float],
    carried: dict[str, str] | None = None,
    recorded: dict[str, str] | None = None,
) -> dict:
    """Counts per module and every surviving mutant. `carried`: statuses from an earlier run
    on the same code for mutants not rerun now (see --rerun-survivors); `recorded`: a
    finished run's statuses to report instead of mutants/ (see --statuses-from)."""
    by_name = dict(recorded) if recorded else statuses()
    for name, status in (carried or {}).items():
        if by_name.get(name) == "not checked":
            by_name[name] = status
    modules = {}
    survivors = []
    for module in MODULES:
        names = {n: s for n, s in by_name.items() if module_of(n) == module}
        counts: dict[str, int] = {}
        for s in names.values():
            counts[s] = counts.get(s, 0) + 1
        missed = [survivor_record(n, s) for n, s in names.items() if s in ("survived", "no tests")]
        equivalent = sum("equivalent" in r for r in missed)
        caught = sum(c for s, c in counts.items() if s in CAUGHT)
        unchecked = counts.get("not checked", 0)  # not run (a --sample run, or cut short)
        judged = len(names) - equivalent - unchecked
        modules[module] = {
            "mutants": len(names),
            "not_checked": unchecked,
            "killed": counts.get("killed", 0),
            "timeout": counts.get("timeout", 0),
            "survived": counts.get("survived", 0),
            "no_tests": counts.get("no tests", 0),
            "other": {
                s: c for s, c in counts.items() if s not in CAUGHT | {"survived", "no tests"}
            },
            "equivalent": equivalent,
            "surviving_not_equivalent": len(missed) - equivalent,
            "surviving_pct": round(100 * (len(missed) - equivalent) / max(judged, 1), 1),
            "score_pct": round(100 * caught / max(judged, 1), 1),
            "seconds": round(seconds[module], 1) if module in seconds else None,
        }
        survivors += missed
    total = {
        key: sum(m[key] for m in modules.values())
        for key in ("mutants", "killed", "timeout", "survived", "no_tests", "equivalent")
    }
    missed_total = total["survived"] + total["no_tests"] - total["equivalent"]
    total["not_checked"] = sum(m["not_checked"] for m in modules.values())
    judged_total = total["mutants"] - total["equivalent"] - total["not_checked"]
    total["surviving_not_equivalent"] = missed_total
    total["surviving_pct"] = round(100 * missed_total / max(judged_total, 1), 1)
    total["score_pct"] = round(100 * (total["killed"] + total["timeout"]) / max(judged_total, 1), 1)
    total["seconds"] = round(sum(seconds.values()), 1) if seconds else None
    return {"modules": modules, "total": total, "survivors": survivors, "statuses": by_name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="*", default=list(MODULES), choices=MODULES)
    parser.add_argument("--lock", default=None, help="flock this file around each module's run")
    parser.add_argument("--children", type=int, default=1)
    parser.add_argument(
        "--one-lock", action="store_true", help="hold the lock across all --modules at once"
    )
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--statuses-from",
        metavar="JSON",
        help="with --report-only: report the statuses recorded in this result (e.g. to rewrite "
        "it after naming equivalents, once mutants/ holds a later run)",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=1,
        metavar="K",
        help="run every K-th mutant of each function (numbers 1, K+1, …), e.g. for a quick check",
    )
    parser.add_argument(
        "--rerun-survivors",
        metavar="JSON",
        help="run only the mutants that survived in this earlier result (same code, tests "
        "only added since); every other mutant keeps its status from it",
    )
    parser.add_argument("--out", default="bench/results/mutation.json")
    args = parser.parse_args()

    from importlib.metadata import version

    from provenance import provenance  # bench/provenance.py (the script's own directory)
    from rich.console import Console
    from rich.table import Table

    out = Path(args.out)
    earlier = json.loads(Path(args.rerun_survivors).read_text()) if args.rerun_survivors else None
    runs: dict[str, dict] = {}
    if not args.report_only:
        outer, inner = (args.lock, None) if args.one_lock else (None, args.lock)
        with holding(outer):
            # A changed test selection makes mutmut reset every result and map the tests again:
            # let that happen on a few cheap mutants, then narrow the map.
            if earlier or not (ROOT / "mutants" / "mutmut-stats.json").exists():
                runs["stats"] = mutmut([BOOTSTRAP], inner, args.children)
                print(f"mutants and test stats: {runs['stats']}", flush=True)
            for module in args.modules:
                narrow_stats()
                names = [f"{module}.*"]
                if args.sample > 1:
                    names = [
                        n for n in statuses()
                        if module_of(n) == module and int(n.rsplit("_", 1)[1]) % args.sample == 1
                    ]  # fmt: skip
                if earlier:
                    names = [
                        r["name"] for r in earlier["survivors"] if module_of(r["name"]) == module
                    ]
                if names:
                    runs[module] = mutmut(names, inner, args.children)
                    print(f"{module}: {runs[module]}", flush=True)
    carried = None
    if earlier:
        survivors = {r["name"] for r in earlier["survivors"]}
        carried = {n: st for n, st in earlier["statuses"].items() if n not in survivors}
    # Runs of modules not rerun now are kept from an earlier invocation writing the same file.
    if out.exists():
        runs = json.loads(out.read_text()).get("runs", {}) | runs
    recorded = (
        json.loads(Path(args.statuses_from).read_text())["statuses"] if args.statuses_from else None
    )
    result = report({name: run["seconds"] for name, run in runs.items()}, carried, recorded)
    if earlier:
        result["rerun_survivors_of"] = args.rerun_survivors
    result["runs"] = runs
    result["mutmut"] = version("mutmut")
    result["config"] = "pyproject.toml [tool.mutmut]"
    result["provenance"] = provenance(libraries=("mutmut",))

    table = Table(title="mutation testing (surviving % excludes named equivalent mutants)")
    for col in ("module", "mutants", "killed", "timeout", "survived", "no tests", "equiv.",
                "surviving %", "seconds"):  # fmt: skip
        table.add_column(col, justify="left" if col == "module" else "right")
    for name, m in [*result["modules"].items(), ("total", result["total"])]:
        table.add_row(
            name, *(str(m[k]) for k in ("mutants", "killed", "timeout", "survived", "no_tests",
                                        "equivalent", "surviving_pct", "seconds")),
        )  # fmt: skip
    Console().print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out} ({shlex.join(sys.argv)})")


if __name__ == "__main__":
    main()
