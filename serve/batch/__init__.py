"""Batch inference: `/v1/files` and `/v1/batches` on the server (BatchService), and the line
format shared with `python -m distill batch`."""

from serve.batch.routes import BatchService

__all__ = ["BatchService"]
