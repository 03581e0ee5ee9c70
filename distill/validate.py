"""Every knob checked before the first expensive step (model load, calibration, training).

One entry per kind of command: `check_recipe(cfg, command)` for the Hydra commands (`train`,
`prune`, `cache-teacher`; each checks the config groups it uses), `check_eval_settings` and
`check_export` for the key=value ones. A problem names the knob, its value and what is
allowed (`loss.top_k=100000: must be an integer in [1, 49152] (the teacher's vocabulary)`);
all problems are reported together in one `ConfigError`. Checks that depend on the teacher's
shape (vocabulary, context length, dims) read only its config, never its weights.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

COMMANDS = ("train", "prune", "cache-teacher")
DEVICES = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
PRECISIONS = (
    "32-true", "32", 32, "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "64", 64,
    "transformer-engine",
)  # fmt: skip


class ConfigError(ValueError):
    """Invalid settings, found before anything heavy ran. `problems`: one line per knob."""

    def __init__(self, command: str, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(
            f"{command}: {len(problems)} invalid setting(s), nothing was run:\n{lines}"
        )


class Problems:
    """Collects one line per bad knob: '<knob>=<value>: <what is allowed>'."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, knob: str, value, allowed: str) -> None:
        self.lines.append(f"{knob}={_show(value)}: {allowed}")

    def integer(
        self, knob: str, value, lo: int | None = None, hi: int | None = None, why=""
    ) -> bool:
        """An int (not a bool) in [lo, hi]; `why` names where a bound comes from."""
        ok = _is_int(value) and (lo is None or value >= lo) and (hi is None or value <= hi)
        if not ok:
            self.add(knob, value, f"must be an integer {_range(lo, hi, False, False)}{why}")
        return ok

    def number(
        self, knob: str, value, lo=None, hi=None, lo_open=False, hi_open=False, why=""
    ) -> bool:
        """A finite int or float in the range (open or closed at each end)."""
        ok = _is_number(value)
        if ok and lo is not None:
            ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value < hi if hi_open else value <= hi
        if not ok:
            self.add(knob, value, f"must be a number {_range(lo, hi, lo_open, hi_open)}{why}")
        return ok

    def choice(self, knob: str, value, choices) -> bool:
        ok = value in tuple(choices)
        if not ok:
            self.add(knob, value, f"must be one of {list(choices)}")
        return ok

    def boolean(self, knob: str, value) -> bool:
        ok = isinstance(value, bool)
        if not ok:
            self.add(knob, value, "must be true or false")
        return ok

    def raise_if_any(self, command: str) -> None:
        if self.lines:
            raise ConfigError(command, self.lines)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _show(value) -> str:
    return repr(_plain(value))


def _plain(value):
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _range(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '≥'} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '≤'} {hi}"
    return ""


# --- the teacher's shape, from its config only --------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the checks need from a model's config (its text decoder's, for a VLM)."""

    config: object  # the transformers config
    vocab_size: int
    context: int | None  # max_position_embeddings
    dims: object | None  # distill.prune.plan.Dims of the decoder, when it has Llama-style dims


def model_shape(knob: str, name_or_path, p: Problems) -> ModelShape | None:
    """Read the config of a model reference (embedded name, HF dir or id, .gguf); None + a
    problem when it cannot be read. Loads no weights."""
    from distill.assets import TEACHER_NAME, MissingAssetError, locate
    from distill.models.loading import resolve_model_path
    from distill.paths import home_dir

    if not isinstance(name_or_path, str) or not name_or_path:
        p.add(knob, name_or_path, "must be a model name, a Hugging Face directory or a .gguf file")
        return None
    gguf = None
    if name_or_path == TEACHER_NAME:
        path = home_dir() / "models" / TEACHER_NAME
        if not (path / "config.json").exists():  # not converted yet: read the GGUF's header
            try:
                located = locate("teacher-lm")
            except MissingAssetError as e:
                p.add(knob, name_or_path, str(e))
                return None
            path, gguf = located.parent, located.name
    else:
        local = Path(name_or_path).expanduser()
        looks_local = (
            local.is_absolute()
            or name_or_path.startswith((".", "~"))
            or local.suffix == ".gguf"
            or name_or_path.count("/") > 1  # a hub id is <name> or <org>/<name>
        )
        if looks_local and not local.exists():
            p.add(knob, name_or_path, "no such directory or file")
            return None
        try:
            path, gguf = resolve_model_path(name_or_path)
        except FileNotFoundError as e:
            p.add(knob, name_or_path, str(e))
            return None
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(path), **({"gguf_file": gguf} if gguf else {}))
    except Exception as e:  # noqa: BLE001 — any reason the config is unreadable is the answer
        p.add(knob, name_or_path, f"cannot read its model config ({type(e).__name__}: {e})")
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    dims = None
    try:
        from distill.prune.plan import Dims

        dims = Dims.of(text)
    except (AttributeError, TypeError):
        pass
    vocab = getattr(text, "vocab_size", None)
    context = getattr(text, "max_position_embeddings", None)
    return ModelShape(config, vocab, context, dims)


# --- config groups ---------------------------------------------------------------------------


def _get(cfg, key: str, default=None):
    return cfg.get(key, default) if cfg is not None else default


def check_teacher(cfg, p: Problems) -> ModelShape | None:
    from distill.models.loading import DTYPES

    teacher = cfg.get("teacher")
    if teacher is None:
        p.add("teacher", None, "must be a config group (teacher=smollm2-135m)")
        return None
    p.choice("teacher.dtype", _get(teacher, "dtype", "float32"), sorted(DTYPES))
    device = _get(teacher, "device", "auto")
    if not isinstance(device, str) or not DEVICES.match(device):
        p.add("teacher.device", device, "must be auto, cpu, mps, cuda or cuda:<index>")
    elif device.startswith("cuda") and not _cuda():
        p.add("teacher.device", device, "needs CUDA, and none is available (use auto or cpu)")
    eight_bit = _get(teacher, "load_in_8bit", False)
    if p.boolean("teacher.load_in_8bit", eight_bit) and eight_bit and not _cuda():
        p.add("teacher.load_in_8bit", True, "needs CUDA (bitsandbytes), and none is available")
    return model_shape("teacher.name_or_path", _get(teacher, "name_or_path"), p)


def check_data(cfg, p: Problems, shape: ModelShape | None) -> None:
    data = cfg.get("data")
    if data is None:
        p.add("data", None, "must be a config group (data=wiki)")
        return
    context = shape.context if shape else None
    p.integer(
        "data.seq_len",
        _get(data, "seq_len"),
        2,
        context,
        " (the teacher's context length)" if context else "",
    )
    p.integer("data.batch_size", _get(data, "batch_size"), 1)
    fractions = []
    for name in ("validation_fraction", "test_fraction"):
        value = _get(data, name, 0.05)
        if p.number(f"data.{name}", value, 0, 1, hi_open=True):
            fractions.append(value)
    if len(fractions) == 2 and sum(fractions) >= 1:
        p.add(
            "data.validation_fraction + data.test_fraction",
            sum(fractions),
            "must be < 1 (the rest is the training split)",
        )
    for name in ("max_train_blocks", "max_eval_blocks"):
        value = _get(data, name)
        if value is not None:
            p.integer(f"data.{name}", value, 1, why=" or null (all)")
    p.integer("data.num_workers", _get(data, "num_workers", 0), 0)
    source = _get(data, "source", "wiki")
    hf_path = _get(_get(data, "hf"), "path")
    if p.choice("data.source", source, ("wiki", "hf")) and source == "hf" and not hf_path:
        p.add("data.hf.path", None, "must be set for data.source=hf (a datasets path or 'json')")


def check_loss(cfg, p: Problems, shape: ModelShape | None, command: str) -> None:
    from distill.losses import DIVERGENCES

    loss = cfg.get("loss")
    if loss is None:
        p.add("loss", None, "must be a config group (loss=fkl)")
        return
    kind = _get(loss, "kind", "forward_kl")
    p.choice("loss.kind", kind, sorted(DIVERGENCES))
    p.number("loss.temperature", _get(loss, "temperature", 1.0), 0, lo_open=True)
    vocab = shape.vocab_size if shape else None
    why = " (the teacher's vocabulary)" if vocab else ""
    p.integer("loss.top_k", _get(loss, "top_k", 64), 1, vocab, why)
    p.integer("loss.chunk_size", _get(loss, "chunk_size", 1024), 1)
    if command == "cache-teacher":
        if not _get(loss, "cache"):
            p.add("loss.cache", _get(loss, "cache"), "must be a directory (pass loss=topk_cached)")
        return
    weights = {}
    for name in ("kd_weight", "ce_weight", "hidden_weight"):
        if p.number(f"loss.{name}", _get(loss, name, 0.0), 0):
            weights[name] = _get(loss, name, 0.0)
    if weights.get("kd_weight") == 0 and weights.get("ce_weight") == 0:
        p.add("loss.kd_weight", weights["kd_weight"], "must be > 0 when loss.ce_weight=0 (no loss)")
    if kind == "jsd":
        p.number("loss.beta", _get(loss, "beta", 0.5), 0, 1, lo_open=True, hi_open=True)
    if kind in ("skew_forward_kl", "skew_reverse_kl"):
        p.number("loss.alpha", _get(loss, "alpha", 0.1), 0, 1, hi_open=True)
    p.choice("loss.hidden_loss", _get(loss, "hidden_loss", "mse"), ("mse", "cosine"))
    on_policy = _get(loss, "on_policy_fraction", 0.0)
    p.number("loss.on_policy_fraction", on_policy, 0, 1)
    cache = _get(loss, "cache")
    if cache:  # offline teacher: no live teacher in the training loop
        if _is_number(on_policy) and on_policy > 0:
            p.add(
                "loss.on_policy_fraction",
                on_policy,
                "must be 0 with loss.cache (scoring student samples needs a live teacher)",
            )
        hidden = weights.get("hidden_weight", 0)
        if hidden > 0:
            p.add("loss.hidden_weight", hidden, "must be 0 with loss.cache (needs a live teacher)")
        _check_cache(cache, _get(loss, "temperature", 1.0), p)


def _check_cache(cache, temperature, p: Problems) -> None:
    import json

    meta = Path(str(cache)) / "meta.json"
    if not meta.is_file():
        p.add(
            "loss.cache",
            str(cache),
            "no teacher cache there (meta.json missing); build it first with "
            "`python -m distill cache-teacher` and the same data settings",
        )
        return
    cached = json.loads(meta.read_text()).get("temperature")
    if _is_number(temperature) and cached is not None and abs(cached - temperature) > 1e-6:
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
    init = _get(student, "init", "prune")
    if not p.choice("student.init", init, ("prune", "random", "pretrained")):
        return
    if init == "pretrained":
        model_shape("student.name_or_path", _get(student, "name_or_path"), p)
        return
    params = _get(student, "params")
    budget_ok = params is not None and p.number(
        "student.params", params, 0, 1, lo_open=True, why=" (a fraction of the teacher)"
    )
    limits = teacher.dims if teacher else None
    pinned, dims_ok = {}, True
    for name in DIM_NAMES:
        value = _get(student, name)
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
    p.integer("student.calibration_blocks", _get(student, "calibration_blocks", 32), 1)
    p.integer("student.calibration_batch_size", _get(student, "calibration_batch_size", 8), 1)
    p.boolean("student.freeze_embeddings", _get(student, "freeze_embeddings", False))
    search = _plain(_get(student, "search"))
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
    p.number("optim.lr", _get(optim, "lr"), 0, 1, lo_open=True)
    p.number("optim.weight_decay", _get(optim, "weight_decay", 0.0), 0)
    betas = _plain(_get(optim, "betas", [0.9, 0.95]))
    if not (
        isinstance(betas, list | tuple)
        and len(betas) == 2
        and all(_is_number(b) and 0 <= b < 1 for b in betas)
    ):
        p.add("optim.betas", betas, "must be two numbers in [0, 1)")
    p.integer("optim.warmup_steps", _get(optim, "warmup_steps", 0), 0)
    p.number("optim.min_lr_ratio", _get(optim, "min_lr_ratio", 0.1), 0, 1)
    optimizer = _get(optim, "optimizer", "adamw")
    if (
        p.choice("optim.optimizer", optimizer, OPTIMIZERS)
        and optimizer == "adamw8bit"
        and not _cuda()
    ):
        p.add("optim.optimizer", optimizer, "needs CUDA (bitsandbytes), and none is available")


def check_trainer(cfg, p: Problems) -> None:
    trainer = cfg.get("trainer")
    if trainer is None:
        p.add("trainer", None, "must be a config group (trainer=cpu)")
        return
    max_epochs = _get(trainer, "max_epochs")
    max_steps = _get(trainer, "max_steps", -1)
    if max_epochs is None or not (_is_int(max_steps) and max_steps == -1):
        p.integer("trainer.max_steps", max_steps, 1)
    if max_epochs is not None:
        p.integer("trainer.max_epochs", max_epochs, 1, why=" or null")
    accelerator = _get(trainer, "accelerator", "auto")
    gpu = accelerator in ("gpu", "cuda")
    if p.choice("trainer.accelerator", accelerator, ACCELERATORS) and gpu and not _cuda():
        p.add(
            "trainer.accelerator",
            accelerator,
            "needs CUDA, and none is available (trainer=cpu)",
        )
    devices = _get(trainer, "devices", "auto")
    count_ok = _is_int(devices) and (devices >= 1 or devices == -1)
    if not (devices == "auto" or count_ok or isinstance(_plain(devices), list)):
        p.add("trainer.devices", _plain(devices), "must be auto, -1 (all), a count ≥ 1 or a list")
    p.choice("trainer.precision", _get(trainer, "precision", "32-true"), PRECISIONS)
    interval = _get(trainer, "val_check_interval")
    if interval is not None and not (
        (_is_int(interval) and interval >= 1) or (_is_number(interval) and 0 < interval <= 1)
    ):
        p.add(
            "trainer.val_check_interval",
            interval,
            "must be steps ≥ 1 or an epoch fraction in (0, 1]",
        )
    limit = _get(trainer, "limit_val_batches")
    if limit is not None and not (
        (_is_int(limit) and limit >= 0) or (_is_number(limit) and 0 <= limit <= 1)
    ):
        p.add("trainer.limit_val_batches", limit, "must be batches ≥ 0 or a fraction in [0, 1]")
    for name in ("log_every_n_steps", "accumulate_grad_batches"):
        value = _get(trainer, name)
        if value is not None:
            p.integer(f"trainer.{name}", value, 1)
    clip = _get(trainer, "gradient_clip_val")
    if clip is not None:
        p.number("trainer.gradient_clip_val", clip, 0, lo_open=True, why=" or null (off)")


def check_quant(cfg, p: Problems) -> None:
    quant = cfg.get("quant")
    if quant is None:
        return
    method = _get(quant, "method", "none")
    if not p.choice("quant.method", method, ("none", "ptq", "qat")) or method == "none":
        return
    check_int8_scheme(quant, p)
    if method == "qat":
        p.integer("quant.steps", _get(quant, "steps"), 1)
        p.number("quant.lr", _get(quant, "lr"), 0, 1, lo_open=True)
        p.integer("quant.warmup_steps", _get(quant, "warmup_steps", 0), 0)


def check_int8_scheme(quant, p: Problems, prefix: str = "quant") -> None:
    p.boolean(f"{prefix}.embeddings", _get(quant, "embeddings", True))
    p.boolean(f"{prefix}.lm_head", _get(quant, "lm_head", True))
    exclude = _plain(_get(quant, "exclude")) or []
    if not isinstance(exclude, list):
        p.add(f"{prefix}.exclude", exclude, "must be a list of regexes on module names")
        return
    for pattern in exclude:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            p.add(f"{prefix}.exclude", pattern, f"must be a regex ({e})")


def check_serving(serving, p: Problems, prefix: str = "serve") -> None:
    """serving.json knobs (configs/serve/serving.yaml: context_length, pricing.*, limits.*)."""
    from serve.export_format import Limits, Pricing

    serving = _plain(serving) or {}
    context = serving.get("context_length")
    if context is not None:
        p.integer(f"{prefix}.context_length", context, 1, why=" or null (the model's)")
    model = serving.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        p.add(f"{prefix}.model", model, "must be a non-empty name or null (the export's name)")
    for group, cls in (("pricing", Pricing), ("limits", Limits)):
        values = serving.get(group) or {}
        known = {f.name: f for f in fields(cls)}
        for key, value in values.items():
            knob = f"{prefix}.{group}.{key}"
            if key not in known:
                p.add(knob, value, f"unknown; known: {sorted(known)}")
            elif key == "currency":
                if not isinstance(value, str) or not value:
                    p.add(knob, value, "must be a currency code such as USD")
            elif group == "limits":
                p.integer(knob, value, 1)
            elif not (value is None and known[key].default is None):
                p.number(knob, value, 0, why=" (per 1M tokens)")


def check_eval_settings(settings, p: Problems, context: int | None = None) -> None:
    """Generation and size knobs of eval.suite.EvalSettings the dataclass does not check."""
    why = " (the teacher's context length)" if context else ""
    p.integer("eval.seq_len", settings.seq_len, 2, context, why)
    p.integer("eval.batch_size", settings.batch_size, 1)
    p.number("eval.temperature", settings.temperature, 0, lo_open=True)
    p.number("eval.top_p", settings.top_p, 0, 1, lo_open=True)
    if context and _is_int(settings.prompt_tokens) and _is_int(settings.new_tokens):
        total = settings.prompt_tokens + settings.new_tokens
        if total > context:
            p.add("eval.prompt_tokens + eval.new_tokens", total, f"must be ≤ {context}{why}")
    p.integer("eval.speed_new_tokens", settings.speed_new_tokens, 1)
    p.integer("eval.speed_warmup", settings.speed_warmup, 0)
    p.integer("eval.repetition_n", settings.repetition_n, 1)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --- one entry per command ---------------------------------------------------------------------


def check_recipe(cfg, command: str) -> ModelShape | None:
    """Raise ConfigError listing every bad knob `command` would use; returns the teacher's shape.

    Reads only configs (the teacher's config.json, a teacher cache's meta.json): run it first.
    """
    if command not in COMMANDS:
        raise ValueError(f"check_recipe: unknown command {command!r}; one of {COMMANDS}")
    p = Problems()
    p.integer("seed", cfg.get("seed", 0), 0)
    shape = check_teacher(cfg, p)
    check_data(cfg, p, shape)
    if command == "cache-teacher":
        p.integer("eval_batch_size", cfg.get("eval_batch_size"), 1)
        check_loss(cfg, p, shape, command)
    else:
        check_student(cfg, p, shape)
    if command == "train":
        p.integer("eval_batch_size", cfg.get("eval_batch_size"), 1)
        p.integer("checkpoint_every_n_steps", cfg.get("checkpoint_every_n_steps", 10), 1)
        for flag in ("force", "export"):
            p.boolean(flag, cfg.get(flag, False))
        check_loss(cfg, p, shape, command)
        check_optim(cfg, p)
        check_trainer(cfg, p)
        check_quant(cfg, p)
        if cfg.get("eval") is not None:
            _check_eval_group(cfg.eval, p, shape.context if shape else None)
        if cfg.get("serve") is not None:
            check_serving(cfg.serve, p)
    p.raise_if_any(command)
    return shape


def _check_eval_group(eval_cfg, p: Problems, context: int | None):
    """The EvalSettings built from an `eval` config (None, with a problem, when it refuses)."""
    from hydra.utils import instantiate

    try:
        settings = instantiate(eval_cfg, _convert_="all")
    except Exception as e:  # noqa: BLE001 — EvalSettings' own checks, or a bad type
        p.lines.append(f"eval: {getattr(e, '__cause__', None) or e}")
        return None
    check_eval_settings(settings, p, context)
    return settings


def check_eval_command(eval_cfg, teacher: str, device: str):
    """`python -m distill eval`: the suite's knobs (configs/eval) against the teacher's shape,
    before loading; returns the EvalSettings."""
    p = Problems()
    if not isinstance(device, str) or not DEVICES.match(device):
        p.add("device", device, "must be auto, cpu, mps, cuda or cuda:<index>")
    elif device.startswith("cuda") and not _cuda():
        p.add("device", device, "needs CUDA, and none is available (use auto or cpu)")
    shape = model_shape("teacher", teacher, p)
    settings = _check_eval_group(eval_cfg, p, shape.context if shape else None)
    p.raise_if_any("eval")
    return settings


def check_export(quant: str, scheme, serving) -> None:
    """`python -m distill export`: quant choice, int8 scheme and serving.json knobs."""
    from distill.export import QUANT_CHOICES

    p = Problems()
    p.choice("quant", quant, QUANT_CHOICES)
    check_int8_scheme(scheme, p)
    check_serving(serving, p, prefix="serving")
    p.raise_if_any("export")
