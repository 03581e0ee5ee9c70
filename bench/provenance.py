"""What produced a bench/results JSON: the command, the code, the machine and the libraries.

Every bench script writes `provenance()` into its JSON under the key "provenance", so a
number can be traced to the commit and the hardware it came from (an int8 decode figure means
little without knowing whether the CPU has VNNI). Results files are written only by their
scripts; one without this block predates it (docs/results.md lists those).
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "transformers", "torchao")
# lscpu flag names behind each summary entry (any one present counts)
CPU_FEATURES = {
    "avx2": ("avx2",),
    "avx512": ("avx512f",),
    "vnni": ("avx512_vnni", "avx_vnni"),
    "bf16": ("avx512_bf16", "amx_bf16"),
}


def _git(*args: str) -> str:
    result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return result.stdout.rstrip()


def cpu_info() -> dict:
    """lscpu's model name, the vector/int8/bf16 features present, and the logical core count."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:  # no util-linux: /proc/cpuinfo has the same fields, lower case
        text = Path("/proc/cpuinfo").read_text()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "features": {name: any(f in flags for f in names) for name, names in CPU_FEATURES.items()},
        "flags": sorted(f for names in CPU_FEATURES.values() for f in names if f in flags),
        "logical_cores": os.cpu_count(),
    }


def gpu_info() -> list[dict]:
    """Each visible CUDA device's name and memory; empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [
        {
            "name": torch.cuda.get_device_name(i),
            "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
        }
        for i in range(torch.cuda.device_count())
    ]


def provenance(libraries: Sequence[str] = ()) -> dict:
    """The block every results JSON carries; `libraries` adds versions beyond torch,
    transformers and torchao. Call it when the results are written (threads as run)."""
    import torch

    versions = {}
    for name in (*LIBRARIES, *libraries):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    dirty = _git("status", "--porcelain", "--untracked-files=no").splitlines()
    return {
        "command": shlex.join(["python", *sys.argv]),
        "commit": _git("rev-parse", "HEAD") or None,
        "uncommitted_changes": [line[3:] for line in dirty],  # tracked files edited at run time
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": cpu_info(),
        "gpu": gpu_info(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": versions,
    }
