"""Serving runtime and OpenAI-compatible API (leaf package: never imports distill or eval)."""
