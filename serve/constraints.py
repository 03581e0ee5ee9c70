"""Structured outputs: OpenAI `response_format` → a token mask for the engine (llguidance).

    compiler = ConstraintCompiler(tokenizer, vocab_size=args.vocab_size, eos_token_ids=eos)
    constraint = compiler.compile(request.response_format)  # None for {"type": "text"}
    engine.add_request(prompt, params, token_mask=constraint.token_mask(params.n))

`StructuredOutputs` is the API's constraints hook (serve/api/hooks.py), built by
`for_server(model, args)` for `python -m distill serve`.

The schema is checked and compiled before any token is generated; an invalid or unsupported
one raises `ConstraintError` (a ValueError whose message names the problem → HTTP 400).
Each sequence gets its own llguidance matcher that consumes one token per step, so the cost
of a mask does not grow with the output. EOS is allowed only where the grammar accepts, and
whitespace between JSON tokens is capped at `max_whitespace` characters so a model cannot
spend max_tokens on blanks.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import llguidance as llg
import numpy as np
import torch

log = logging.getLogger(__name__)

MAX_SCHEMA_BYTES = 128 * 1024
MAX_SCHEMA_DEPTH = 32  # nesting of JSON containers in the schema document itself
MAX_WHITESPACE = 16  # characters of whitespace allowed between two JSON tokens
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_UNKNOWN_FORMAT = re.compile(r"Unknown format: (.+)$")
MAX_UNKNOWN_FORMATS = 8
_DATA_KEYWORDS = ("enum", "const", "default", "examples", "example")


class ConstraintError(ValueError):
    """A response_format that is malformed, not a valid JSON Schema, or not supported
    (fields read by the API's error mapping: → 400 naming response_format)."""

    status, type, param = 400, "invalid_request_error", "response_format"
    code = "invalid_response_format"


def _backend(tokenizer) -> str:
    """The `tokenizers` JSON of a `tokenizers.Tokenizer` or a fast HF tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        raise TypeError(f"need a `tokenizers` tokenizer or a fast HF tokenizer, got {tokenizer!r}")
    return backend.to_str()


def _depth(node, limit: int) -> int:
    """Nesting depth of a JSON document (stops counting past `limit`)."""
    stack, deepest = [(node, 1)], 0
    while stack:
        x, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        children = x.values() if isinstance(x, dict) else x if isinstance(x, list) else ()
        stack.extend((c, d + 1) for c in children if isinstance(c, dict | list))
    return deepest


def _drop_format(node, fmt: str):
    """A copy of a schema without `"format": fmt` keywords (instance data left alone)."""
    if isinstance(node, list):
        return [_drop_format(x, fmt) for x in node]
    if not isinstance(node, dict):
        return node
    return {
        k: v if k in _DATA_KEYWORDS else _drop_format(v, fmt)
        for k, v in node.items()
        if not (k == "format" and v == fmt)
    }


def check_schema(schema) -> None:
    """Raise ConstraintError unless `schema` is a JSON Schema document within our limits."""
    import jsonschema

    if not isinstance(schema, dict | bool):
        raise ConstraintError(f"json_schema.schema must be an object, got {type(schema).__name__}")
    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError) as e:
        raise ConstraintError(f"json_schema.schema is not JSON: {e}") from e
    if size > MAX_SCHEMA_BYTES:
        raise ConstraintError(f"schema is {size} bytes; the limit is {MAX_SCHEMA_BYTES}")
    if _depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise ConstraintError(f"schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ConstraintError(f"invalid JSON schema at {where}: {e.message}") from e


def parse_response_format(response_format: dict | None) -> dict | None:
    """The JSON Schema a response_format asks for; None for plain text."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ConstraintError("response_format must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise ConstraintError(
            f"response_format.type must be text, json_object or json_schema, got {kind!r}"
        )
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise ConstraintError("response_format.json_schema must be an object")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConstraintError(
            "response_format.json_schema.name must be 1-64 of a-z, A-Z, 0-9, _ or -"
        )
    schema = spec.get("schema", {})  # OpenAI: no schema = any JSON value
    check_schema(schema)
    return schema


@dataclass
class Constraint:
    """A compiled grammar; `new_matcher()` per generated sequence."""

    schema: dict | bool  # as the request gave it
    grammar: str
    vocab_size: int  # the model's (mask length); may exceed the tokenizer's
    eos: tuple[int, ...]
    _template: llg.LLMatcher

    def new_matcher(self) -> Matcher:
        return Matcher(self._template.deep_copy(), self.vocab_size, self.eos)

    def token_mask(self, n: int = 1):
        """The engine's TokenMask for a request with `n` choices (one matcher per choice)."""
        return self.new_matcher() if n == 1 else ForkingMask(self, n)

    def validate_output(self, text: str) -> object:
        """Parse a finished output and validate it against the request's schema with
        `jsonschema` (ValueError when it does not); returns the parsed value."""
        import jsonschema

        value = json.loads(text)
        cls = jsonschema.validators.validator_for(
            self.schema, default=jsonschema.Draft202012Validator
        )
        error = jsonschema.exceptions.best_match(cls(self.schema).iter_errors(value))
        if error is not None:
            raise ValueError(f"output does not match the schema: {error.message}")
        return value

    def accepts(self, token_ids: Sequence[int]) -> bool:
        """Whether `token_ids` is a complete output of this grammar (EOS allowed after it)."""
        m = self._template.deep_copy()
        return m.consume_tokens(list(token_ids)) and m.is_accepting()


class Matcher:
    """One sequence's grammar state. Call it with the tokens generated so far (the engine's
    TokenMask hook): it consumes only the tokens it has not seen, then returns the mask of
    allowed next tokens, a [vocab_size] bool tensor."""

    def __init__(self, matcher: llg.LLMatcher, vocab_size: int, eos: Sequence[int]):
        self._m = matcher
        self.vocab_size = vocab_size
        self.eos = list(eos)
        self.consumed: list[int] = []

    def __call__(self, generated: Sequence[int]) -> torch.Tensor:
        n = len(self.consumed)
        if len(generated) < n or (n and generated[n - 1] != self.consumed[-1]):
            # Not an extension of what we consumed (a caller rewound): roll back to the
            # common prefix. The engine never does this; it only ever appends.
            common = 0
            for a, b in zip(self.consumed, generated, strict=False):
                if a != b:
                    break
                common += 1
            self._m.rollback(n - common)
            del self.consumed[common:]
            n = common
        self.consume(generated[n:])
        return self.mask()

    def consume(self, tokens: Iterable[int]) -> None:
        tokens = list(tokens)
        if tokens and not self._m.is_error() and not self._m.consume_tokens(tokens):
            log.warning("constraint rejected a generated token: %s", self._m.get_error())
        self.consumed += tokens

    def mask(self) -> torch.Tensor:
        """[vocab_size] bool, True = allowed next token. After an error only EOS is allowed,
        so a sequence that somehow left the grammar ends instead of sampling from nothing."""
        # The LLTokenizer was built with n_vocab >= vocab_size, so the bitmask covers it all.
        packed = np.frombuffer(self._m.compute_bitmask(), np.uint8)
        bits = np.unpackbits(packed, count=self.vocab_size, bitorder="little")
        out = torch.from_numpy(bits).view(torch.bool)
        if self._m.is_error():
            out[:] = False
            out[self.eos] = True
        return out

    @property
    def accepting(self) -> bool:
        """The output so far is complete (EOS allowed now)."""
        return self._m.is_accepting()

    @property
    def error(self) -> str:
        return self._m.get_error()


@dataclass
class _Node:
    matcher: Matcher
    occupants: int
    mask: torch.Tensor | None = None


class ForkingMask:
    """TokenMask for a request whose `n` choices share one hook: choices with the same
    output share a matcher, which forks (deep copy) when they diverge. Relies on the engine's
    contract: the hook is called once per step per choice, each time with one more token."""

    def __init__(self, constraint: Constraint, n: int):
        self._nodes: dict[tuple[int, ...], _Node] = {(): _Node(constraint.new_matcher(), n)}

    def __call__(self, generated: Sequence[int]) -> torch.Tensor:
        key = tuple(generated)
        node = self._nodes.get(key)
        parent = self._nodes.get(key[:-1]) if key else None
        if node is None:
            if parent is None:
                raise KeyError(f"no grammar state for a sequence of {len(key)} tokens")
            matcher = parent.matcher
            if parent.occupants > 1:
                matcher = Matcher(matcher._m.deep_copy(), matcher.vocab_size, matcher.eos)
                matcher.consumed = list(parent.matcher.consumed)
            matcher.consume(key[-1:])
            node = self._nodes[key] = _Node(matcher, 0)
        if parent is not None:  # this choice moved from its parent state to `node`
            parent.occupants -= 1
            if parent.occupants == 0:
                del self._nodes[key[:-1]]
            node.occupants += 1
        if node.mask is None:
            node.mask = node.matcher.mask()
        return node.mask


class ConstraintCompiler:
    """Compiles response_formats for one tokenizer and model vocabulary (build it once:
    wrapping the tokenizer takes about half a second)."""

    def __init__(
        self,
        tokenizer,
        vocab_size: int | None = None,
        eos_token_ids: Iterable[int] | None = None,
        max_whitespace: int = MAX_WHITESPACE,
        limits: llg.LLParserLimits | None = None,
    ):
        eos = sorted(eos_token_ids) if eos_token_ids is not None else None
        if eos is None:
            eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None or eos == []:
            raise ValueError("eos_token_ids are needed to tell where an output may end")
        self.eos = tuple(eos) if isinstance(eos, list) else (eos,)
        self.tokenizer = llg.LLTokenizer(_backend(tokenizer), eos_token=eos)
        self.vocab_size = vocab_size or self.tokenizer.vocab_size
        if self.vocab_size > self.tokenizer.vocab_size:  # padded embedding table
            self.tokenizer = llg.LLTokenizer(
                _backend(tokenizer), n_vocab=self.vocab_size, eos_token=eos
            )
        self.options = {
            "whitespace_flexible": True,
            "whitespace_pattern": rf"[\x20\x0A\x0D\x09]{{0,{max_whitespace}}}",
            # json.dumps writes "\u00e9"; a valid output must not be refused for it
            "json_allow_general_unicode_escapes": True,
        }
        self.limits = limits or llg.LLParserLimits(verbose_errors=False)

    def compile_schema(self, schema: dict | bool) -> Constraint:
        """Compile a checked JSON Schema; ConstraintError when llguidance cannot."""
        original = schema
        for _ in range(MAX_UNKNOWN_FORMATS + 1):
            try:
                grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=self.options)
            except ValueError as e:
                raise ConstraintError(f"invalid JSON schema: {e}") from e
            is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(
                grammar, self.tokenizer, limits=self.limits
            )
            unknown = _UNKNOWN_FORMAT.match(messages[0]) if is_error else None
            if unknown is None:
                break
            # JSON Schema treats an unknown format as an annotation: validators ignore it.
            schema = _drop_format(schema, unknown.group(1))
        if is_error:
            raise ConstraintError(f"unsupported JSON schema: {messages[0]}")
        template = llg.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self.limits)
        if template.is_error():
            raise ConstraintError(f"unsupported JSON schema: {template.get_error()}")
        return Constraint(original, grammar, self.vocab_size, self.eos, template)

    def compile(self, response_format: dict | None) -> Constraint | None:
        """The constraint for an OpenAI response_format (None for text / absent)."""
        schema = parse_response_format(response_format)
        return None if schema is None else self.compile_schema(schema)


_compilers: dict[tuple, tuple[object, ConstraintCompiler]] = {}


def compile_response_format(
    response_format: dict | None,
    tokenizer,
    vocab_size: int | None = None,
    eos_token_ids: Iterable[int] | None = None,
) -> Constraint | None:
    """`ConstraintCompiler(...).compile(response_format)` with the compiler cached per
    tokenizer object."""
    key = (id(tokenizer), vocab_size, tuple(sorted(eos_token_ids or ())))
    hit = _compilers.get(key)
    if hit is None or hit[0] is not tokenizer:
        hit = _compilers[key] = (
            tokenizer,
            ConstraintCompiler(tokenizer, vocab_size, eos_token_ids),
        )
    return hit[1].compile(response_format)


class StructuredOutputs:
    """The API's constraints hook: one compiler per served model, built on first use."""

    def __init__(self):
        self._compilers: dict[int, tuple[object, ConstraintCompiler]] = {}

    def compiler(self, model) -> ConstraintCompiler:
        """`model`: a ServedModel (engine with tokenizer, vocab size and EOS ids)."""
        hit = self._compilers.get(id(model))
        if hit is None or hit[0] is not model:
            engine = model.engine
            compiler = ConstraintCompiler(
                engine.tokenizer, vocab_size=engine.args.vocab_size, eos_token_ids=engine.eos
            )
            hit = self._compilers[id(model)] = (model, compiler)
        return hit[1]

    def token_mask(self, response_format: dict | None, model, n: int = 1):
        """The request's TokenMask (None for text); ConstraintError before any generation."""
        constraint = self.compiler(model).compile(response_format)
        return None if constraint is None else constraint.token_mask(n)


def for_server(model, args: dict[str, str]) -> StructuredOutputs:
    return StructuredOutputs()
