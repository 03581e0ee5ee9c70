"""Shared fixtures: the real SmolLM2 tokenizer and tiny random Llama models built in code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.offline import set_offline_defaults

set_offline_defaults()
torch.set_num_threads(2)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded teacher's real tokenizer (49,152 tokens, SmolLM2 chat template)."""
    from distill.assets import TEACHER_NAME
    from distill.models.loading import load_tokenizer

    return load_tokenizer(TEACHER_NAME)


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A 4-layer, 64-wide random Llama with the real tokenizer, saved as an HF directory."""
    from distill.models.tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-teacher"), tokenizer=tokenizer)


@pytest.fixture
def tiny_llama():
    """An in-memory tiny Llama with a small vocabulary (no tokenizer needed)."""
    from transformers import LlamaForCausalLM

    from distill.models.tiny import tiny_llama_config

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=256)).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread (two threads spin when the cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
