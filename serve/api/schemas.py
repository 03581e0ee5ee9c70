"""OpenAI request and response shapes (the subset this server implements), in one module.

Requests are strict: a known field with the wrong type or out of range is a 400 (pydantic's
error → serve/api/errors.py), while unknown fields are ignored as OpenAI does. Limits that
depend on the served model (max_tokens, context) are checked by the routes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.sampler import MAX_TOP_LOGPROBS

MAX_N = 8  # choices per request
MAX_STOP = 4  # stop strings per request, as OpenAI


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension: running usage in every chunk


class JSONSchemaSpec(_Request):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None


class ImageURL(_Request):
    url: str  # a data:image/png|jpeg|webp;base64,… URL
    detail: Literal["auto", "low", "high"] | None = None  # accepted; tiling follows the image


class ContentPart(_Request):
    """A text or image_url part; other part types (input_audio, …) are kept for the route to
    accept or refuse."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text; non-text parts are the caller's business (see routes)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")


class _Sampling(_Request):
    """Fields chat and completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    max_cost_usd: float | None = Field(None, gt=0)  # extension: per-request spending cap
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past end-of-sequence

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return v

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


# ---- responses (plain OpenAI shapes; built as dicts by serve/api/responses.py) -------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost: dict[str, Any] | None = None  # filled by billing when configured

    @classmethod
    def from_engine(cls, usage: dict) -> Usage:
        """From the engine's usage dict (prompt, completion, cached, cache_creation tokens)."""
        prompt = int(usage.get("prompt_tokens", 0))
        completion = int(usage.get("completion_tokens", 0))
        cached = min(int(usage.get("cached_tokens", 0)), prompt)
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
            cache_creation_input_tokens=int(usage.get("cache_creation_tokens", 0)),
            cache_read_input_tokens=cached,
        )

    def to_dict(self) -> dict:
        return self.model_dump(exclude_none=True)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class LogprobContent(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanodistill"
    context_length: int | None = None
