"""Fixtures of the API tests; test modules load them with `pytest_plugins = ["api_fixtures"]`."""

from __future__ import annotations

from pathlib import Path

import pytest
from api_support import make_tiny_export


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama with the real tokenizer, as an export directory (built once)."""
    return make_tiny_export(tmp_path_factory.mktemp("tiny-export"), tokenizer)
