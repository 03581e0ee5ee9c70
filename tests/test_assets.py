import json

import pytest

from distill import assets
from distill.data.corpus import load_wiki, split_corpus, split_of


def test_missing_asset_error_names_install_command(monkeypatch):
    monkeypatch.setitem(
        assets.ASSETS,
        "ghost",
        assets.Asset("ghost", "ghost-pkg==1.0", "no_such_module_xyz", "x", "nothing"),
    )
    with pytest.raises(assets.MissingAssetError, match="python -m distill assets install"):
        assets.locate("ghost")


def test_installed_assets_are_located_from_files():
    assert assets.locate("teacher-lm").suffix == ".gguf"
    assert (assets.locate("easy-vqa") / "answers.txt").exists()
    assert (assets.locate("judge-embedder") / "model.safetensors").exists()
    wiki = json.loads(assets.locate("wiki").read_text())
    assert len(wiki) == 10033


def test_wiki_split_is_deterministic_and_disjoint():
    docs = load_wiki()
    a, b = split_corpus(docs, 0.05, 0.05), split_corpus(list(reversed(docs)), 0.05, 0.05)
    for name in a:
        assert {d.key for d in a[name]} == {d.key for d in b[name]}
    train, test = {d.key for d in a["train"]}, {d.key for d in a["test"]}
    assert not train & test
    assert 300 < len(test) < 700 and len(train) > 8500
    assert split_of("Albert Einstein", 0.05, 0.05) == split_of("Albert Einstein", 0.05, 0.05)


def test_converted_teacher_has_tokenizer_and_chat_template(tokenizer):
    assert len(tokenizer) == 49152
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user" in text
