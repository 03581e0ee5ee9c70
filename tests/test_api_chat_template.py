"""serve/chat_template.py renders prompts exactly as transformers' apply_chat_template."""

from __future__ import annotations

import pytest

from serve.chat_template import ChatTemplate, ChatTemplateError

pytest_plugins = ["api_fixtures"]  # the tiny_export fixture

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": 'Ünïcödé 🙂 and <b>html</b> & "quotes"'},
    ],
    [
        {"role": "user", "content": "multi\nline\n\n  indented"},
        {"role": "assistant", "content": ""},
    ],
]

# Exercises what the teacher's template does not: special tokens, namespace, loop controls,
# the tojson filter (no HTML escaping), trim/lstrip of blocks and raise_exception.
RICH_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(system='') %}
{% for m in messages %}
  {% if m['role'] == 'system' %}
    {% set ns.system = m['content'] %}
    {% continue %}
  {% endif %}
  {% if m['role'] not in ['user', 'assistant'] %}
    {{ raise_exception('unsupported role: ' + m['role']) }}
  {% endif %}
<|im_start|>{{ m['role'] }}
{% if ns.system and loop.index0 == 1 %}[{{ ns.system | trim }}] {% endif %}{{ m['content'] | tojson }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def _ids(out) -> list[int]:
    return list(out["input_ids"] if not isinstance(out, list) else out)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_teacher_template_matches_transformers(tokenizer, tiny_export, conversation,
                                               add_generation_prompt):  # fmt: skip
    template = ChatTemplate.from_dir(tiny_export)
    ours = template.render(conversation, add_generation_prompt=add_generation_prompt)
    theirs = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert ours == theirs
    ids = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    assert tokenizer.backend_tokenizer.encode(ours, add_special_tokens=False).ids == _ids(ids)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_rich_template_matches_transformers(tokenizer, conversation):
    ours = ChatTemplate(RICH_TEMPLATE, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"})
    theirs = tokenizer.apply_chat_template(
        conversation, chat_template=RICH_TEMPLATE, add_generation_prompt=True, tokenize=False
    )
    assert ours.render(conversation) == theirs


def test_special_tokens_come_from_the_tokenizer_config(tiny_export):
    template = ChatTemplate.from_dir(tiny_export)
    assert template.special_tokens["eos_token"] == "<|im_end|>"
    assert template.special_tokens["bos_token"] == "<|im_start|>"


def test_template_errors_are_clear(tmp_path):
    template = ChatTemplate(RICH_TEMPLATE, {"bos_token": "", "eos_token": ""})
    with pytest.raises(ChatTemplateError, match="unsupported role: tool"):
        template.render([{"role": "tool", "content": "x"}])
    assert ChatTemplate.from_dir(tmp_path) is None
