"""Structured outputs (serve/constraints.py) with llguidance and the real SmolLM2 tokenizer.

The conformance data is JSONSchemaBench's sample in ../shared/data (see its README).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from types import SimpleNamespace

import jsonschema
import pytest
import torch

from serve.constraints import (
    MAX_WHITESPACE,
    ConstraintCompiler,
    ConstraintError,
    compile_response_format,
    for_server,
    parse_response_format,
)
from serve.engine import Engine
from serve.sampler import SamplingParams, sample
from tests.conftest import SHARED_DATA

CONFORMANCE = SHARED_DATA / "jsonschema-conformance.jsonl"
# Instances marked invalid only because of `"format": "regex"`, a format llguidance does not
# know: JSON Schema makes unknown formats annotations, so the compiler drops them.
KNOWN_LAX = {"Github_easy---o66309"}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return ConstraintCompiler(tokenizer, eos_token_ids=[tokenizer.eos_token_id])


@pytest.fixture(scope="module")
def conformance(compiler, tokenizer):
    """Every schema compiled (or refused) and every instance fed to its grammar."""
    rows = [json.loads(line) for line in CONFORMANCE.read_text().splitlines()]
    compiled, refused, outcomes, wrong = {}, Counter(), Counter(), []
    for row in rows:
        try:
            compiled[row["id"]] = compiler.compile_schema(row["schema"])
        except ConstraintError as e:
            assert str(e), row["id"]
            refused[str(e).split(":")[1].strip()[:60]] += 1
            continue
        for case in row["tests"]:
            ids = tokenizer.encode(json.dumps(case["data"]), add_special_tokens=False)
            accepted = compiled[row["id"]].accepts(ids)
            outcomes[(case["valid"], accepted)] += 1
            if accepted != case["valid"]:
                wrong.append((row["id"], case["valid"]))
    return rows, compiled, refused, outcomes, wrong


def test_conformance_schemas_compile_or_are_refused(conformance):
    rows, compiled, refused, outcomes, wrong = conformance
    print(f"\ncompiled {len(compiled)} of {len(rows)} schemas; refused: {dict(refused)}")
    print(
        f"valid accepted {outcomes[(True, True)]}, valid rejected {outcomes[(True, False)]}, "
        f"invalid rejected {outcomes[(False, False)]}, invalid accepted {outcomes[(False, True)]}"
    )
    assert len(compiled) + sum(refused.values()) == len(rows) == 469
    assert len(compiled) >= 440  # measured: 446 (oneOf, not, dependencies are refused)


def test_conformance_valid_accepted_invalid_rejected(conformance):
    _, _, _, outcomes, wrong = conformance
    assert outcomes[(True, False)] == 0, [w for w in wrong if w[1]]
    assert {rid for rid, valid in wrong if not valid} <= KNOWN_LAX
    assert outcomes[(True, True)] >= 540 and outcomes[(False, False)] >= 690


def closing_bias(tokenizer) -> torch.Tensor:
    """A stand-in "model" for random generation: random logits plus a pull towards tokens
    that close strings and containers, so that random outputs finish within a few hundred
    tokens (uniform logits would write strings forever)."""
    bias = torch.zeros(len(tokenizer))
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        if any(c in text for c in '"]},') or (text.strip().isdigit() and len(text) < 3):
            bias[i] = 6.0
    bias[tokenizer.eos_token_id] = 12.0
    return bias


def generate(constraint, bias, seed: int, max_tokens: int = 200) -> tuple[list[int], bool]:
    """Sample under the constraint's mask through the engine's sampler; (tokens, ended)."""
    gen = torch.Generator().manual_seed(seed)
    params, matcher, out = [SamplingParams(temperature=0)], constraint.new_matcher(), []
    for _ in range(max_tokens):
        # greedy on fresh random logits: random, and cheaper than softmax + multinomial
        logits = torch.randn(1, len(bias), generator=gen) * 2 + bias
        (choice,) = sample(logits, params, [None], [matcher(out)])
        if choice.token_id in constraint.eos:
            return out, True
        out.append(choice.token_id)
    return out, False


def validate(schema, text: str) -> None:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls(schema, format_checker=cls.FORMAT_CHECKER).validate(json.loads(text))


def test_generated_outputs_validate(conformance, tokenizer):
    rows, compiled, *_ = conformance
    bias = closing_bias(tokenizer)
    schemas = {r["id"]: r["schema"] for r in rows}
    sample_ids = random.Random(0).sample(sorted(compiled), 30)
    ended = 0
    for k, rid in enumerate(sample_ids):
        tokens, done = generate(compiled[rid], bias, seed=k)
        if done:
            ended += 1
            validate(schemas[rid], tokenizer.decode(tokens))
    print(f"\n{ended} of {len(sample_ids)} random generations ended; all validate")
    assert ended >= 24  # measured: 28 of 30


def test_whitespace_runs_are_capped(compiler, tokenizer):
    constraint = compiler.compile_schema(PERSON)
    space = tokenizer.encode(" ", add_special_tokens=False)
    assert len(space) == 1
    matcher = constraint.new_matcher()
    out = tokenizer.encode('{"name":', add_special_tokens=False)
    for _ in range(MAX_WHITESPACE):
        assert matcher(out)[space[0]]
        out += space
    assert not matcher(out)[space[0]]  # the 17th blank in a row is refused
    assert constraint.accepts(tokenizer.encode('{ "name" : "x",\n  "age": 3 }'))


def test_eos_only_where_the_grammar_accepts(compiler, tokenizer):
    constraint = compiler.compile_schema(PERSON)
    eos = tokenizer.eos_token_id
    matcher = constraint.new_matcher()
    text = '{"name": "Ann", "age": 41}'
    ids = tokenizer.encode(text, add_special_tokens=False)
    for i in range(len(ids)):
        mask = matcher(ids[:i])
        assert mask[ids[i]], tokenizer.decode(ids[: i + 1])
        assert not mask[eos]
    final = matcher(ids)
    assert final[eos] and final.sum() == 1  # the object is closed: only EOS
    assert matcher.consumed == ids  # consumed one token per call, never re-parsed
    assert constraint.validate_output(text) == {"name": "Ann", "age": 41}
    with pytest.raises(ValueError, match="age"):
        constraint.validate_output('{"name": "Ann"}')
    assert not constraint.accepts(tokenizer.encode('{"name": "Ann"}'))  # age is required
    assert not constraint.accepts(tokenizer.encode('{"name": "Ann", "age": 200}'))


def test_forking_mask_matches_independent_matchers(compiler, tokenizer):
    """n choices share one hook; each choice's masks equal those of its own fresh matcher,
    while the choices first agree and then diverge."""
    constraint = compiler.compile_schema(PERSON)
    hook, gen = constraint.token_mask(3), torch.Generator().manual_seed(0)
    outs: list[list[int]] = [[], [], []]
    for step in range(12):
        for out in outs:
            mask = hook(out)
            assert torch.equal(mask, constraint.new_matcher()(out))
            allowed = mask.nonzero().flatten()
            # the same token for everyone for 4 steps, then each choice its own
            pick = 0 if step < 4 else int(torch.randint(len(allowed), (1,), generator=gen))
            out.append(int(allowed[pick]))
    assert outs[0][:4] == outs[1][:4] == outs[2][:4] and len({tuple(o) for o in outs}) == 3
    assert len(hook._nodes) == 3  # one live state per choice, the shared ones dropped


def test_matcher_rolls_back_for_a_rewound_caller(compiler, tokenizer):
    constraint = compiler.compile_schema(PERSON)
    ids = tokenizer.encode('{"name": "Bo", "age": 7}', add_special_tokens=False)
    matcher = constraint.new_matcher()
    matcher(ids)
    assert torch.equal(matcher(ids[:3]), constraint.new_matcher()(ids[:3]))
    assert matcher.consumed == ids[:3]


def test_mask_covers_a_padded_model_vocab(tokenizer):
    compiler = ConstraintCompiler(
        tokenizer, vocab_size=len(tokenizer) + 64, eos_token_ids=[tokenizer.eos_token_id]
    )
    mask = compiler.compile({"type": "json_object"}).new_matcher()([])
    assert mask.shape == (len(tokenizer) + 64,) and mask.dtype == torch.bool
    assert not mask[len(tokenizer) :].any() and mask.any()


@pytest.mark.parametrize(
    ("response_format", "problem"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}, "invalid JSON schema"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, "name must be"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "null"}}}}, "not"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"minLength": "3"}}}, "minLength"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "must be an object"),
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema", "json_schema": "nope"}, "must be an object"),
    ],
)  # fmt: skip
def test_bad_response_formats_name_the_problem(compiler, response_format, problem):
    with pytest.raises(ConstraintError, match=problem) as e:
        compiler.compile(response_format)
    assert (e.value.status, e.value.param) == (400, "response_format")  # for the API's 400


def test_schema_depth_limit(compiler):
    deep: dict = {"type": "string"}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    with pytest.raises(ConstraintError, match="deeper than"):
        parse_response_format({"type": "json_schema", "json_schema": {"name": "d", "schema": deep}})


def test_text_and_json_object(tokenizer):
    assert compile_response_format({"type": "text"}, tokenizer) is None
    assert compile_response_format(None, tokenizer) is None
    obj = compile_response_format(
        {"type": "json_object"}, tokenizer, eos_token_ids=[tokenizer.eos_token_id]
    )
    assert obj.accepts(tokenizer.encode('{"a": [1, {"b": null}]}'))
    assert not obj.accepts(tokenizer.encode("[1, 2]"))


def test_engine_constrained_generation(tiny_teacher_dir, tokenizer, one_thread):
    """The engine's mask hook, n=2 choices sharing one forking mask, a random tiny model."""
    engine = Engine.from_pretrained(tiny_teacher_dir, num_blocks=64, block_size=16)
    served = SimpleNamespace(engine=engine)  # what the API hands its hook: a ServedModel
    hook = for_server(served, {})
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
        "required": ["ok", "color"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "flag", "schema": schema}}
    constraint = hook.compiler(served).compile(response_format)
    prompt = engine.tokenizer.encode("Answer in JSON:").ids
    params = SamplingParams(max_tokens=48, temperature=1.0, seed=3, n=2)
    mask = hook.token_mask(response_format, served, params.n)
    (choices,) = engine.generate([prompt], params, token_mask=mask)
    for c in choices:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(constraint.validate_output(c.text), schema)
