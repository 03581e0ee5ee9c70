"""`/v1/files` and `/v1/batches` (OpenAI's shapes), and `BatchService`, which `create_app(…,
batches=BatchService(data_dir))` mounts: its router, its runner (started and stopped with the
app) and the upload size limit the app's door applies to /v1/files.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from serve.api.errors import APIError, invalid
from serve.api.routes import Principal
from serve.batch.lines import ENDPOINTS
from serve.batch.runner import BatchRunner
from serve.batch.store import BatchStore, new_id
from serve.billing import key_of

MAX_FILE_BYTES = 200 << 20  # OpenAI's batch input limit
MAX_WINDOW_S = 24 * 3600
_WINDOW = re.compile(r"^(\d+)([smh])$")
_FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")


def window_seconds(window: str) -> int:
    """`completion_window` in seconds: OpenAI's "24h", or any shorter `<n>s|m|h`."""
    m = _WINDOW.match(window)
    seconds = int(m[1]) * {"s": 1, "m": 60, "h": 3600}[m[2]] if m else 0
    if not 0 < seconds <= MAX_WINDOW_S:
        raise invalid(f"completion_window must be '24h' (or a shorter '<n>s|m|h'), got "
                      f"{window!r}", "completion_window")  # fmt: skip
    return seconds


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    input_file_id: str
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: str
    metadata: dict[str, str] | None = Field(None, max_length=16)


def _missing(kind: str, object_id: str, param: str = "id") -> APIError:
    return APIError(404, f"No such {kind}: '{object_id}'", param, f"{kind}_not_found")


class BatchService:
    """Files and batches for one server, stored under `data_dir`."""

    def __init__(self, data_dir: str | Path, max_file_bytes: int = MAX_FILE_BYTES,
                 concurrency: int = 32):  # fmt: skip
        self.store = BatchStore(data_dir)
        self.max_file_bytes, self.concurrency = max_file_bytes, concurrency
        self.runner: BatchRunner | None = None
        self._principals: dict[str, object] = {}  # key → principal, as of its last request

    async def start(self, state) -> None:
        discount = state.model.spec.pricing.batch_discount
        self.runner = BatchRunner(self.store, state, discount, self.concurrency,
                                  self._principal_of(state.auth))  # fmt: skip
        self.runner.start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.stop()
        self.store.close()

    def _principal_of(self, auth):
        def principal_of(key_id: str):
            if key_id in self._principals:
                return self._principals[key_id]
            lookup = getattr(auth, "principal", None)  # serve.auth.KeyStore after a restart
            found = lookup(key_id) if lookup is not None else None
            return found if found is not None else (key_id or None)

        return principal_of

    def _wake(self) -> None:
        if self.runner is not None:
            self.runner.changed.set()

    @property
    def router(self) -> APIRouter:
        router = APIRouter()
        store = self.store

        @router.post("/v1/files")
        async def upload(principal: Principal, file: UploadFile, purpose: str = Form()):
            if purpose != "batch":
                raise invalid(f"purpose must be 'batch', got {purpose!r}", "purpose")
            file_id = new_id("file-")
            tmp = store.files_dir / f".upload-{secrets.token_hex(8)}"
            size = 0
            try:
                with open(tmp, "wb") as f:
                    while chunk := await file.read(1 << 20):
                        size += len(chunk)
                        if size > self.max_file_bytes:
                            raise APIError(413, f"file over {self.max_file_bytes} bytes",
                                           "file", "file_too_large")  # fmt: skip
                        f.write(chunk)
                tmp.rename(store.path(file_id))
            finally:
                tmp.unlink(missing_ok=True)
            name = Path(file.filename or "upload.jsonl").name
            return store.add_file(file_id, key_of(principal), purpose, name, size)

        @router.get("/v1/files")
        async def list_files(principal: Principal, purpose: str | None = None,
                             after: str | None = None, limit: int = Query(10000, ge=1, le=10000),
                             order: Literal["asc", "desc"] = "desc"):  # fmt: skip
            data, more = store.files(key_of(principal), purpose, after, limit, order)
            return _page(data, more)

        def own_file(file_id: str, principal) -> dict:
            found = _FILE_ID.match(file_id) and store.file(file_id, key_of(principal))
            if not found:
                raise _missing("file", file_id)
            return found

        @router.get("/v1/files/{file_id}")
        async def get_file(file_id: str, principal: Principal):
            return own_file(file_id, principal)

        @router.get("/v1/files/{file_id}/content")
        async def file_content(file_id: str, principal: Principal):
            own_file(file_id, principal)
            return FileResponse(store.path(file_id), media_type="application/jsonl")

        @router.delete("/v1/files/{file_id}")
        async def delete_file(file_id: str, principal: Principal):
            own_file(file_id, principal)
            store.delete_file(file_id, key_of(principal))
            return {"id": file_id, "object": "file", "deleted": True}

        @router.post("/v1/batches")
        async def create_batch(body: CreateBatch, request: Request, principal: Principal):
            key = key_of(principal)
            seconds = window_seconds(body.completion_window)
            src = (
                store.file(body.input_file_id, key) if _FILE_ID.match(body.input_file_id) else None
            )
            if src is None:
                raise _missing("file", body.input_file_id, "input_file_id")
            if src["purpose"] != "batch":
                raise invalid(f"file {body.input_file_id} has purpose {src['purpose']!r}, "
                              "not 'batch'", "input_file_id")  # fmt: skip
            if body.endpoint not in ENDPOINTS:  # (the Literal already says so)
                raise invalid(f"unsupported endpoint {body.endpoint}", "endpoint")
            if request.app.state.server.draining:
                raise APIError(503, "the server is shutting down", code="server_shutting_down")
            self._principals[key] = principal
            batch = store.create_batch(key, body.input_file_id, body.endpoint,
                                       body.completion_window, seconds, body.metadata)  # fmt: skip
            self._wake()
            return batch

        @router.get("/v1/batches")
        async def list_batches(principal: Principal, after: str | None = None,
                               limit: int = Query(20, ge=1, le=100)):  # fmt: skip
            data, more = store.batches(key_of(principal), after, limit)
            return _page(data, more)

        @router.get("/v1/batches/{batch_id}")
        async def get_batch(batch_id: str, principal: Principal):
            if (batch := store.batch(batch_id, key_of(principal))) is None:
                raise _missing("batch", batch_id)
            return batch

        @router.post("/v1/batches/{batch_id}/cancel")
        async def cancel_batch(batch_id: str, principal: Principal):
            if (batch := store.cancel(batch_id, key_of(principal))) is None:
                raise _missing("batch", batch_id)
            self._wake()
            return batch

        return router


def _page(data: list[dict], has_more: bool) -> dict:
    first = data[0]["id"] if data else None
    last = data[-1]["id"] if data else None
    return {"object": "list", "data": data, "first_id": first, "last_id": last,
            "has_more": has_more}  # fmt: skip
