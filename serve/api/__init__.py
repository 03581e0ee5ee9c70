"""The OpenAI-compatible HTTP API over the engine (FastAPI; see serve/api/app.py)."""

from serve.api.app import create_app
from serve.api.model import ServedModel

__all__ = ["ServedModel", "create_app"]
