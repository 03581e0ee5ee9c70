"""Checks of the stages after distillation: int8 scheme (quant), serving.json, eval suite."""

from __future__ import annotations

import re
from dataclasses import fields

from distill.validate.problems import Problems, get_knob, is_int, plain


def check_quant(cfg, p: Problems) -> None:
    quant = cfg.get("quant")
    if quant is None:
        return
    method = get_knob(quant, "method", "none")
    if not p.choice("quant.method", method, ("none", "ptq", "qat")) or method == "none":
        return
    check_int8_scheme(quant, p)
    if method == "qat":
        p.integer("quant.steps", get_knob(quant, "steps"), 1)
        p.number("quant.lr", get_knob(quant, "lr"), 0, 1, lo_open=True)
        p.integer("quant.warmup_steps", get_knob(quant, "warmup_steps", 0), 0)


def check_int8_scheme(quant, p: Problems, prefix: str = "quant") -> None:
    p.boolean(f"{prefix}.embeddings", get_knob(quant, "embeddings", False))
    p.boolean(f"{prefix}.lm_head", get_knob(quant, "lm_head", True))
    exclude = plain(get_knob(quant, "exclude")) or []
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

    serving = plain(serving) or {}
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
    if context and is_int(settings.prompt_tokens) and is_int(settings.new_tokens):
        total = settings.prompt_tokens + settings.new_tokens
        if total > context:
            p.add("eval.prompt_tokens + eval.new_tokens", total, f"must be ≤ {context}{why}")
    p.integer("eval.speed_new_tokens", settings.speed_new_tokens, 1)
    p.integer("eval.speed_warmup", settings.speed_warmup, 0)
    p.integer("eval.repetition_n", settings.repetition_n, 1)
