"""Checks of the config groups `train`, `prune` and `cache-teacher` read: teacher, data, loss,
student, optim, trainer."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from distill.validate.problems import Problems, cuda_available, get_knob, is_int, is_number, plain
from distill.validate.shape import ModelShape, model_shape

DEVICES = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
PRECISIONS = (
    "32-true", "32", 32, "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "64", 64,
    "transformer-engine", "auto",
)  # fmt: skip


def check_teacher(cfg, p: Problems) -> ModelShape | None:
    from distill.models.loading import DTYPES

    teacher = cfg.get("teacher")
    if teacher is None:
        p.add("teacher", None, "must be a config group (teacher=smollm2-135m)")
        return None
    p.choice("teacher.dtype", get_knob(teacher, "dtype", "float32"), sorted(DTYPES))
    device = get_knob(teacher, "device", "auto")
    if not isinstance(device, str) or not DEVICES.match(device):
        p.add("teacher.device", device, "must be auto, cpu, mps, cuda or cuda:<index>")
    elif device.startswith("cuda") and not cuda_available():
        p.add("teacher.device", device, "needs CUDA, and none is available (use auto or cpu)")
    eight_bit = get_knob(teacher, "load_in_8bit", False)
    if p.boolean("teacher.load_in_8bit", eight_bit) and eight_bit and not cuda_available():
        p.add("teacher.load_in_8bit", True, "needs CUDA (bitsandbytes), and none is available")
    return model_shape("teacher.name_or_path", get_knob(teacher, "name_or_path"), p)


def check_data(cfg, p: Problems, shape: ModelShape | None) -> None:
    data = cfg.get("data")
    if data is None:
        p.add("data", None, "must be a config group (data=wiki)")
        return
    context = shape.context if shape else None
    p.integer(
        "data.seq_len",
        get_knob(data, "seq_len"),
        2,
        context,
        " (the teacher's context length)" if context else "",
    )
    p.integer("data.batch_size", get_knob(data, "batch_size"), 1)
    fractions = []
    for name in ("validation_fraction", "test_fraction"):
        value = get_knob(data, name, 0.05)
        if p.number(f"data.{name}", value, 0, 1, hi_open=True):
            fractions.append(value)
    if len(fractions) == 2 and sum(fractions) >= 1:
        p.add(
            "data.validation_fraction + data.test_fraction",
            sum(fractions),
            "must be < 1 (the rest is the training split)",
        )
    for name in ("max_train_blocks", "max_eval_blocks"):
        value = get_knob(data, name)
        if value is not None:
            p.integer(f"data.{name}", value, 1, why=" or null (all)")
    p.integer("data.num_workers", get_knob(data, "num_workers", 0), 0)
    source = get_knob(data, "source", "wiki")
    hf_path = get_knob(get_knob(data, "hf"), "path")
    if p.choice("data.source", source, ("wiki", "hf")) and source == "hf" and not hf_path:
        p.add("data.hf.path", None, "must be set for data.source=hf (a datasets path or 'json')")


def check_loss(cfg, p: Problems, shape: ModelShape | None, command: str) -> None:
    from distill.losses import DIVERGENCES

    loss = cfg.get("loss")
    if loss is None:
        p.add("loss", None, "must be a config group (loss=fkl)")
        return
    kind = get_knob(loss, "kind", "forward_kl")
    p.choice("loss.kind", kind, sorted(DIVERGENCES))
    p.number("loss.temperature", get_knob(loss, "temperature", 1.0), 0, lo_open=True)
    vocab = shape.vocab_size if shape else None
    why = " (the teacher's vocabulary)" if vocab else ""
    p.integer("loss.top_k", get_knob(loss, "top_k", 64), 1, vocab, why)
    p.integer("loss.chunk_size", get_knob(loss, "chunk_size", 1024), 1)
    if command == "cache-teacher":
        if not get_knob(loss, "cache"):
            p.add(
                "loss.cache", get_knob(loss, "cache"), "must be a directory (pass loss=topk_cached)"
            )
        return
    weights = {}
    for name in ("kd_weight", "ce_weight", "hidden_weight"):
        if p.number(f"loss.{name}", get_knob(loss, name, 0.0), 0):
            weights[name] = get_knob(loss, name, 0.0)
    if weights.get("kd_weight") == 0 and weights.get("ce_weight") == 0:
        p.add("loss.kd_weight", weights["kd_weight"], "must be > 0 when loss.ce_weight=0 (no loss)")
    if kind == "jsd":
        p.number("loss.beta", get_knob(loss, "beta", 0.5), 0, 1, lo_open=True, hi_open=True)
    if kind in ("skew_forward_kl", "skew_reverse_kl"):
        p.number("loss.alpha", get_knob(loss, "alpha", 0.1), 0, 1, hi_open=True)
    p.choice("loss.hidden_loss", get_knob(loss, "hidden_loss", "mse"), ("mse", "cosine"))
    on_policy = get_knob(loss, "on_policy_fraction", 0.0)
    p.number("loss.on_policy_fraction", on_policy, 0, 1)
    cache = get_knob(loss, "cache")
    if cache:  # offline teacher: no live teacher in the training loop
        if is_number(on_policy) and on_policy > 0:
            p.add(
                "loss.on_policy_fraction",
                on_policy,
                "must be 0 with loss.cache (scoring student samples needs a live teacher)",
            )
        hidden = weights.get("hidden_weight", 0)
        if hidden > 0:
            p.add("loss.hidden_weight", hidden, "must be 0 with loss.cache (needs a live teacher)")
        builds = command == "train" and cfg.get("build_teacher_cache") is True
        p.boolean("build_teacher_cache", cfg.get("build_teacher_cache", False))
        if not (builds and not (Path(str(cache)) / "meta.json").is_file()):
            _check_cache(cache, get_knob(loss, "temperature", 1.0), p)


def _check_cache(cache, temperature, p: Problems) -> None:
    import json

    meta = Path(str(cache)) / "meta.json"
    if not meta.is_file():
        p.add(
            "loss.cache",
            str(cache),
            "no teacher cache there (meta.json missing); build it first with "
            "`python -m distill cache-teacher` and the same data settings, or set "
            "build_teacher_cache=true to build it in the run",
        )
        return
    cached = json.loads(meta.read_text()).get("temperature")
    if is_number(temperature) and cached is not None and abs(cached - temperature) > 1e-6:
        p.add(
            "loss.temperature",
            temperature,
            f"must equal the cache's temperature {cached} ({cache}); rebuild the cache or set it",
        )


def check_student(cfg, p: Problems, teacher: ModelShape | None) -> None:
    from distill.prune.plan import DIM_NAMES
    from distill.prune.search import SearchSpace
    from distill.prune.slicing import config_problem

    student = cfg.get("student")
    if student is None:
        p.add("student", None, "must be a config group (student=depth)")
        return
    init = get_knob(student, "init", "prune")
    if not p.choice("student.init", init, ("prune", "random", "pretrained")):
        return
    if init == "pretrained":
        model_shape("student.name_or_path", get_knob(student, "name_or_path"), p)
        return
    params = get_knob(student, "params")
    budget_ok = params is not None and p.number(
        "student.params", params, 0, 1, lo_open=True, why=" (a fraction of the teacher)"
    )
    limits = teacher.dims if teacher else None
    pinned, dims_ok = {}, True
    for name in DIM_NAMES:
        value = get_knob(student, name)
        if value is None:
            continue
        hi = getattr(limits, name) if limits else None
        why = f" (the teacher's {name}) or null" if hi else " or null"
        if p.integer(f"student.{name}", value, 1, hi, why):
            pinned[name] = value
        else:
            dims_ok = False
    if params is None and dims_ok and not pinned:
        p.add(
            "student.params",
            None,
            f"set a parameter budget in (0, 1] or at least one target dim ({', '.join(DIM_NAMES)})",
        )
    p.integer("student.calibration_blocks", get_knob(student, "calibration_blocks", 32), 1)
    p.integer("student.calibration_batch_size", get_knob(student, "calibration_batch_size", 8), 1)
    p.boolean("student.freeze_embeddings", get_knob(student, "freeze_embeddings", False))
    search = plain(get_knob(student, "search"))
    space = None
    if search is not None and not isinstance(search, Mapping):
        p.add("student.search", search, "must be a mapping of search knobs or null")
    else:
        try:
            space = SearchSpace.from_dict(dict(search or {}))
        except (ValueError, TypeError) as e:
            p.lines.append(str(e))
    if limits is None or not dims_ok or (params is not None and not budget_ok):
        return
    try:  # the pinned dims must be sliceable out of the teacher (GQA groups whole)
        limits.replace(**pinned).check_within(limits)
    except ValueError as e:
        p.lines.append(f"student: {e}")
        return
    if params is None:  # explicit dims: the family's own config must accept the shape
        problem = config_problem(teacher.config, limits.replace(**pinned))
        if problem:
            p.add("student dims", pinned, f"rejected by {teacher.config.model_type}: {problem}")
    elif space is not None:  # a budget: some shape must land in its window (no scores needed)
        _check_budget(teacher.config, params, space, pinned, p)


def _check_budget(config, params: float, space, pinned: dict, p: Problems) -> None:
    """The budget search's feasibility on a meta-device teacher (shapes only, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.prune.search import budget_candidates

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError):  # not a causal LM class (a VLM): the prune stage decides
        return
    try:
        budget_candidates(model, float(params), space, pinned)
    except ValueError as e:
        p.lines.append(str(e))


def check_optim(cfg, p: Problems) -> None:
    from distill.module import OPTIMIZERS

    optim = cfg.get("optim")
    if optim is None:
        p.add("optim", None, "must be set (lr, weight_decay, betas, warmup_steps, …)")
        return
    p.number("optim.lr", get_knob(optim, "lr"), 0, 1, lo_open=True)
    p.number("optim.weight_decay", get_knob(optim, "weight_decay", 0.0), 0)
    betas = plain(get_knob(optim, "betas", [0.9, 0.95]))
    if not (
        isinstance(betas, list | tuple)
        and len(betas) == 2
        and all(is_number(b) and 0 <= b < 1 for b in betas)
    ):
        p.add("optim.betas", betas, "must be two numbers in [0, 1)")
    p.integer("optim.warmup_steps", get_knob(optim, "warmup_steps", 0), 0)
    p.number("optim.min_lr_ratio", get_knob(optim, "min_lr_ratio", 0.1), 0, 1)
    optimizer = get_knob(optim, "optimizer", "adamw")
    if (
        p.choice("optim.optimizer", optimizer, OPTIMIZERS)
        and optimizer == "adamw8bit"
        and not cuda_available()
    ):
        p.add("optim.optimizer", optimizer, "needs CUDA (bitsandbytes), and none is available")


def check_trainer(cfg, p: Problems) -> None:
    trainer = cfg.get("trainer")
    if trainer is None:
        p.add("trainer", None, "must be a config group (trainer=cpu)")
        return
    max_epochs = get_knob(trainer, "max_epochs")
    max_steps = get_knob(trainer, "max_steps", -1)
    if max_epochs is None or not (is_int(max_steps) and max_steps == -1):
        p.integer("trainer.max_steps", max_steps, 1)
    if max_epochs is not None:
        p.integer("trainer.max_epochs", max_epochs, 1, why=" or null")
    accelerator = get_knob(trainer, "accelerator", "auto")
    gpu = accelerator in ("gpu", "cuda")
    if p.choice("trainer.accelerator", accelerator, ACCELERATORS) and gpu and not cuda_available():
        p.add(
            "trainer.accelerator",
            accelerator,
            "needs CUDA, and none is available (trainer=cpu)",
        )
    devices = get_knob(trainer, "devices", "auto")
    count_ok = is_int(devices) and (devices >= 1 or devices == -1)
    if not (devices == "auto" or count_ok or isinstance(plain(devices), list)):
        p.add("trainer.devices", plain(devices), "must be auto, -1 (all), a count ≥ 1 or a list")
    p.choice("trainer.precision", get_knob(trainer, "precision", "32-true"), PRECISIONS)
    interval = get_knob(trainer, "val_check_interval")
    if interval is not None and not (
        (is_int(interval) and interval >= 1) or (is_number(interval) and 0 < interval <= 1)
    ):
        p.add(
            "trainer.val_check_interval",
            interval,
            "must be steps ≥ 1 or an epoch fraction in (0, 1]",
        )
    limit = get_knob(trainer, "limit_val_batches")
    if limit is not None and not (
        (is_int(limit) and limit >= 0) or (is_number(limit) and 0 <= limit <= 1)
    ):
        p.add("trainer.limit_val_batches", limit, "must be batches ≥ 0 or a fraction in [0, 1]")
    for name in ("log_every_n_steps", "accumulate_grad_batches"):
        value = get_knob(trainer, name)
        if value is not None:
            p.integer(f"trainer.{name}", value, 1)
    clip = get_knob(trainer, "gradient_clip_val")
    if clip is not None:
        p.number("trainer.gradient_clip_val", clip, 0, lo_open=True, why=" or null (off)")
