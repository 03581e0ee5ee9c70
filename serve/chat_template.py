"""Chat prompts rendered from an export's Jinja chat template, the way transformers does it.

Same sandboxed environment as `transformers.utils.chat_template_utils` (trim_blocks,
lstrip_blocks, loopcontrols, a `tojson` that does not escape HTML, `raise_exception`,
`strftime_now`) and the same template variables (`messages`, `tools`, `documents`,
`add_generation_prompt`, the tokenizer's special tokens), so `render(...)` equals
`tokenizer.apply_chat_template(..., tokenize=False)` without importing transformers.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from serve.export_format import SERVING_FILE

# The special tokens transformers passes to every template (its `special_tokens_map`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")  # fmt: skip


class ChatTemplateError(ValueError):
    """The template refused the conversation (e.g. `raise_exception`) or is missing."""


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)  # fmt: skip


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _token_text(value) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A compiled chat template plus the special tokens it may reference."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self.template = compile_template(source)

    def render(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **kwargs,
    ) -> str:
        """The prompt text for `messages` ([{role, content}, …])."""
        try:
            return self.template.render(
                messages=messages,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **kwargs},
            )
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template: {e}") from e

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ChatTemplate | None:
        """The template of an export or HF tokenizer directory, or None when it has none.

        Looked up in serving.json, then chat_template.jinja, then tokenizer_config.json."""
        model_dir = Path(model_dir)
        config = _read_json(model_dir / "tokenizer_config.json")
        source = _read_json(model_dir / SERVING_FILE).get("chat_template")
        if not source and (model_dir / "chat_template.jinja").is_file():
            source = (model_dir / "chat_template.jinja").read_text()
        source = source or config.get("chat_template")
        if isinstance(source, list):  # named templates: [{name, template}, …]
            named = {t.get("name"): t.get("template") for t in source}
            source = named.get("default")
        if not source:
            return None
        specials = {**_read_json(model_dir / "special_tokens_map.json"), **config}
        tokens = {n: _token_text(specials.get(n)) for n in SPECIAL_TOKEN_NAMES}
        return cls(source, {n: t for n, t in tokens.items() if t is not None})


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
