"""The compiled batch-invariant paged attention kernel (`serve/csrc/paged_attention.cpp`).

Built once per machine with torch's C++ extension loader (g++ and ninja; ~40 s, cached
under torch's extensions directory) when the first engine for a float32 model on CPU is built.
Where it cannot be built, `kernel()` is None and `serve.invariant` keeps its per-row SDPA
path: slower, equally batch-invariant.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "paged_attention.cpp"
# NANODISTILL_PAGED_ATTENTION=0 forces the SDPA path (tests compare the two).
ENV = "NANODISTILL_PAGED_ATTENTION"


def _cpu_tag() -> str:
    """A short hash of this CPU's flags: `-march=native` code must not be reused on another CPU."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    return hashlib.blake2b(flags.encode(), digest_size=4).hexdigest()


@functools.cache
def kernel():
    """The compiled module (with `attend`), or None when disabled or unbuildable here."""
    if os.environ.get(ENV, "1") == "0":
        return None
    from torch.utils import cpp_extension

    log.info("paged attention kernel: loading (compiled on first use on a machine, ~1 min)")
    try:
        module = cpp_extension.load(
            name=f"nanodistill_paged_attention_{_cpu_tag()}",
            sources=[str(SOURCE)],
            # no -ffast-math: it reorders sums per call site and can set flush-to-zero process-wide;
            # -fno-trapping-math only lets the exp loop vectorize (same results)
            extra_cflags=[
                "-O3",
                "-march=native",
                "-fno-trapping-math",
                "-fno-math-errno",
                "-fopenmp",
            ],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, no headers: fall back, loudly
        log.warning("paged attention kernel not built (%s); using per-row SDPA", e)
        return None
    log.info("paged attention: compiled kernel")
    return module


def attend(
    q: torch.Tensor,
    kv: torch.Tensor,
    slot_ids: torch.Tensor,
    row_start: torch.Tensor,
    row_len: torch.Tensor,
) -> torch.Tensor:
    """q [N, H, hd]; kv [slots, 2K, hd]; row n attends over
    `slot_ids[row_start[n] : row_start[n] + row_len[n]]`. Returns [N, H, hd]."""
    return kernel().attend(q, kv, slot_ids, row_start, row_len, q.shape[-1] ** -0.5)
