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

`--report-only` rereads `mutants/` without running anything. Timeouts count as killed (the
mutant hangs the tests, which notice); "no tests" counts as surviving.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import subprocess
import sys
import time
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
CAUGHT = {"killed", "timeout", "caught by type check", "segfault"}

# Surviving mutants that no test can kill because the program behaves the same: mutant name →
# (text the mutated line must contain, so a renumbered mutant is not silently excused; why).
EQUIVALENT: dict[str, tuple[str, str]] = {}


def run_module(module: str, lock: str | None, children: int) -> tuple[float, int]:
    """`mutmut run` for one module's mutants; returns (seconds, exit code)."""
    cmd = ["mutmut", "run", "--max-children", str(children), f"{module}.*"]
    if lock:
        cmd = ["flock", lock, *cmd]
    start = time.perf_counter()
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, check=False).returncode
    return time.perf_counter() - start, rc


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
    removed = next((line[1:].strip() for line in diff.splitlines() if line.startswith("-  ")), "")
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


def report(seconds: dict[str, float]) -> dict:
    by_name = statuses()
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
        judged = len(names) - equivalent
        modules[module] = {
            "mutants": len(names),
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
    judged_total = total["mutants"] - total["equivalent"]
    total["surviving_not_equivalent"] = missed_total
    total["surviving_pct"] = round(100 * missed_total / max(judged_total, 1), 1)
    total["score_pct"] = round(100 * (total["killed"] + total["timeout"]) / max(judged_total, 1), 1)
    total["seconds"] = round(sum(seconds.values()), 1) if seconds else None
    return {"modules": modules, "total": total, "survivors": survivors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="*", default=list(MODULES), choices=MODULES)
    parser.add_argument("--lock", default=None, help="flock this file around each module's run")
    parser.add_argument("--children", type=int, default=1)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--out", default="bench/results/mutation.json")
    args = parser.parse_args()

    from importlib.metadata import version

    from provenance import provenance  # bench/provenance.py (the script's own directory)
    from rich.console import Console
    from rich.table import Table

    seconds: dict[str, float] = {}
    load = {}
    if not args.report_only:
        for module in args.modules:
            load[module] = os.getloadavg()[0]  # before the lock: how busy the machine was
            seconds[module], rc = run_module(module, args.lock, args.children)
            print(f"{module}: {seconds[module]:.0f}s (mutmut exit {rc})", flush=True)
    result = report(seconds)
    result["load_1min_before_each_module"] = load
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {out} ({shlex.join(sys.argv)})")


if __name__ == "__main__":
    main()
