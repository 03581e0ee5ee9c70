"""Bridge to lm-evaluation-harness: run its tasks on an in-memory student or teacher through
the harness's own HFLM wrapper, for users who have the task data (offline: local YAML tasks
over local files via `include_path`)."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

log = logging.getLogger(__name__)


def run_harness(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 1,
    num_fewshot: int | None = None,
    seed: int = 0,
    include_defaults: bool = True,
) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from `lm_eval.simple_evaluate` for `tasks`.

    `include_path` is a directory of extra task YAMLs (a task over a local jsonl needs no
    network); include_defaults=False indexes only those (the harness's ~10k bundled task
    YAMLs take most of a run's start-up). Metric names keep the harness's "<metric>,<filter>" form, e.g. "acc,none".
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(
            "the harness bridge needs lm-evaluation-harness: pip install 'nanodistill[harness]'"
        ) from err
    if not tasks:
        raise ValueError("run_harness needs at least one task name")
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    manager = TaskManager(
        include_path=str(include_path) if include_path else None,
        include_defaults=include_defaults,
    )
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}; give their YAML directory as include_path"
        )
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=False,
    )
    return {
        task: {k: v for k, v in metrics.items() if isinstance(v, int | float) and k != "alias"}
        for task, metrics in out["results"].items()
    }
