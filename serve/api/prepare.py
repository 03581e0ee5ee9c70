"""A validated API request → what the engine runs: prompt token ids and SamplingParams.

Everything that depends on the served model is checked here, before the engine sees the
request: model name, chat template, prompt length against the context, max_tokens against
serving.json's limits, response_format against the constraints hook.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

from serve.api.errors import APIError, invalid
from serve.api.hooks import call
from serve.api.model import ServedModel
from serve.api.schemas import ChatCompletionRequest, CompletionRequest
from serve.api.vision import chat_images, image_params
from serve.chat_template import ChatTemplateError
from serve.sampler import SamplingParams

PENALTIES = ("presence_penalty", "frequency_penalty")


@dataclass
class Prepared:
    kind: Literal["chat", "completion"]
    id: str
    created: int
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    max_cost_usd: float | None = None
    token_mask: Any = None
    principal: Any = None  # what auth returned: a name, or an object with .name/.cache_salt
    images: tuple = ()  # ImageSpans: each image's placeholder tokens and pixel hash
    pixel_values: Any = None  # [views, 3, T, T] for the vision tower

    @property
    def tenant(self) -> str:
        """The ledger key: the principal's name ("" when the server has no auth)."""
        p = self.principal
        return "" if p is None else str(getattr(p, "name", p))

    @property
    def salt(self) -> str:
        """The prefix-cache salt: tenants never share cached blocks."""
        return str(getattr(self.principal, "cache_salt", self.tenant))

    @property
    def logprobs(self) -> bool:
        return self.params.logprobs


def _check_model(name: str, model: ServedModel) -> None:
    if name != model.name:
        raise APIError(404, f"The model '{name}' does not exist; this server serves "
                       f"'{model.name}' (GET /v1/models)", "model", "model_not_found")  # fmt: skip


def _chat_prompt(req: ChatCompletionRequest, model: ServedModel) -> list[int]:
    if model.chat_template is None:
        raise invalid(f"model '{model.name}' has no chat template; use /v1/completions", "messages")
    messages = []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list):
            other = sorted({p.type for p in m.content if p.type not in ("text", "image_url")})
            if other:
                raise invalid(f"messages[{i}]: content parts of type {other} are not supported "
                              "by this model; send text", f"messages.{i}.content")  # fmt: skip
        messages.append({"role": m.role, "content": m.text(),
                         **({"name": m.name} if m.name else {})})  # fmt: skip
    try:
        text = model.chat_template.render(messages, add_generation_prompt=True)
    except ChatTemplateError as e:
        raise invalid(str(e), "messages") from e
    return model.encode(text, add_special_tokens=False)


def _completion_prompt(req: CompletionRequest, model: ServedModel) -> list[int]:
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise invalid("send one prompt per request (batched prompts are not supported)",
                          "prompt")  # fmt: skip
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = model.encode(prompt, add_special_tokens=True) if prompt else []
    else:
        ids = list(prompt)
        vocab = model.engine.args.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise invalid(f"prompt token ids must be in [0, {vocab})", "prompt")
    return ids


def _sampling(req, prompt_len: int, model: ServedModel, top_logprobs: int, logprobs: bool):
    limits, ctx = model.spec.limits, model.context_length
    if prompt_len == 0:
        raise invalid("the prompt is empty", "prompt")
    if prompt_len >= ctx:
        raise invalid(f"the prompt has {prompt_len} tokens; this model's context length is {ctx}",
                      "messages" if hasattr(req, "messages") else "prompt",
                      "context_length_exceeded")  # fmt: skip
    param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
    max_tokens = req.requested_max_tokens()
    if max_tokens is None:
        max_tokens = min(limits.max_output_tokens, ctx - prompt_len)
    elif max_tokens > limits.max_output_tokens:
        raise invalid(f"{param} is {max_tokens}; this server allows at most "
                      f"{limits.max_output_tokens}", param)  # fmt: skip
    elif prompt_len + max_tokens > ctx:
        raise invalid(f"prompt ({prompt_len} tokens) + {param} ({max_tokens}) exceeds the "
                      f"context length {ctx}", param, "context_length_exceeded")  # fmt: skip
    extra = {name: getattr(req, name) for name in PENALTIES}
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature,
                              top_p=req.top_p, seed=req.seed, stop=req.stop_list(), n=req.n,
                              logprobs=logprobs, top_logprobs=top_logprobs,
                              ignore_eos=req.ignore_eos, **extra)  # fmt: skip
    except ValueError as e:
        raise invalid(str(e)) from e


async def _token_mask(req, model: ServedModel, constraints):
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if constraints is None:
        raise invalid(f"response_format type '{fmt.type}' is not supported by this server",
                      "response_format", "unsupported_response_format")  # fmt: skip
    if fmt.type == "json_schema" and (fmt.json_schema is None or fmt.json_schema.schema_ is None):
        raise invalid("response_format json_schema needs json_schema.schema",
                      "response_format.json_schema")  # fmt: skip
    try:
        spec = fmt.model_dump(by_alias=True, exclude_none=True)
        return await call(constraints, "token_mask", spec, model, req.n)
    except ValueError as e:
        raise invalid(str(e), "response_format", "invalid_response_format") from e


async def prepare(req, model: ServedModel, constraints=None) -> Prepared:
    """Check `req` (a ChatCompletionRequest or CompletionRequest) against the served model."""
    _check_model(req.model, model)
    images = None
    if isinstance(req, ChatCompletionRequest):
        kind, prefix = "chat", "chatcmpl"
        if req.top_logprobs and not req.logprobs:
            raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
        prompt = _chat_prompt(req, model)  # also refuses part types other than text/image
        if image_params(req):  # decoding and tiling are CPU work: off the event loop
            images = await asyncio.to_thread(chat_images, req, model)
            prompt = images.prompt_ids
        logprobs, top = req.logprobs, req.top_logprobs or 0
    else:
        assert isinstance(req, CompletionRequest)
        kind, prefix = "completion", "cmpl"
        if req.echo:
            raise invalid("echo is not supported by this server", "echo")
        prompt = _completion_prompt(req, model)
        logprobs, top = req.logprobs is not None, req.logprobs or 0
    params = _sampling(req, len(prompt), model, top, logprobs)
    opts = req.stream_options
    if opts is not None and not req.stream:
        raise invalid("stream_options needs stream: true", "stream_options")
    return Prepared(
        kind=kind,
        id=f"{prefix}-{secrets.token_hex(12)}",
        created=int(time.time()),
        model=model.name,
        prompt_ids=prompt,
        params=params,
        stream=req.stream,
        include_usage=bool(opts and opts.include_usage),
        continuous_usage=bool(opts and opts.continuous_usage_stats),
        max_cost_usd=req.max_cost_usd,
        token_mask=await _token_mask(req, model, constraints),
        images=tuple(images.spans) if images else (),
        pixel_values=images.pixel_values if images else None,
    )
