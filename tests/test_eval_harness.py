"""The lm-evaluation-harness bridge, offline: a YAML task over a local jsonl written here."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from eval.probe import sequence_logprobs

ITEMS = [
    ("The sky on a clear day is", ["blue", "green", "loud"], 0),
    ("Two plus two is", ["four", "nine", "red"], 0),
    ("Fire feels", ["hot", "cold", "square"], 0),
    ("Snow is usually", ["white", "black", "angry"], 0),
    ("The capital of France is", ["Paris", "Rome", "water"], 0),
    ("A week has seven", ["days", "apples", "rivers"], 0),
    ("Cats often chase", ["mice", "clouds", "taxes"], 0),
    ("The sun rises in the", ["east", "west", "soup"], 0),
]

TASK_YAML = """task: nd_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def task_dir(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(
        "\n".join(json.dumps({"question": q, "choices": c, "label": y}) for q, c, y in ITEMS)
    )
    (tmp_path / "nd_local_mc.yaml").write_text(TASK_YAML.format(data=data))
    return tmp_path


def direct_accuracy(model, tokenizer) -> float:
    """argmax over choices of log p(" " + choice | question), the harness's multiple choice."""
    hits = 0
    for question, choices, label in ITEMS:
        context = tokenizer(question, add_special_tokens=False)["input_ids"]
        scores = []
        for choice in choices:
            whole = tokenizer(f"{question} {choice}", add_special_tokens=False)["input_ids"]
            scores.append(
                sequence_logprobs(model, [whole])[0] - sequence_logprobs(model, [context])[0]
            )
        hits += int(max(range(len(choices)), key=scores.__getitem__) == label)
    return hits / len(ITEMS)


def test_harness_task_matches_direct_scoring(task_dir, tokenizer, tiny_teacher_dir):
    from eval.harness import run_harness  # lm-eval comes with the dev extra

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    results = run_harness(
        model, tokenizer, ["nd_local_mc"], include_path=task_dir, include_defaults=False
    )
    assert results["nd_local_mc"]["acc,none"] == pytest.approx(direct_accuracy(model, tokenizer))
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        run_harness(
            model, tokenizer, ["no_such_task"], include_path=task_dir, include_defaults=False
        )
