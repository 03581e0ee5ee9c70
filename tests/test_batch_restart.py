"""Durability: SIGTERM, then SIGKILL, `python -m distill serve` in the middle of a batch,
restart it on the same data dir, and the batch completes with every custom_id exactly once in
output ∪ error and its usage equal to the sum of its lines. Plus the crash window itself (result written, line not
yet marked; a torn last line) repaired by reconcile."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest
from api_support import MODEL, wait_until

from serve.batch.lines import Line
from serve.batch.results import ResultFile
from serve.batch.store import BatchStore

pytest_plugins = ["api_fixtures"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m distill serve` in a subprocess (the process a SIGKILL really kills)."""

    def __init__(self, export, data_dir):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "distill", "serve", f"model={export}", f"port={self.port}",
               f"data_dir={data_dir}", f"ledger={data_dir}/usage.sqlite", "kv_memory_mb=16",
               "batch_concurrency=4", "log_level=warning"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)  # fmt: skip
        assert wait_until(self.ready, timeout=90, interval=0.1), "server did not become ready"

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited: {self.proc.communicate()[0]}") from None
            return False

    def get(self, path: str):
        return httpx.get(f"{self.url}{path}", timeout=10)


def test_sigterm_then_sigkill_mid_batch_then_restart_completes_each_line_once(
    tiny_export, tmp_path
):
    n = 40
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": MODEL, "prompt": f"Line {i}:", "max_tokens": 40, "temperature": 0}}
        for i in range(n)
    ]  # fmt: skip
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    batch = None

    def done_now(server) -> int:
        return server.get(f"/v1/batches/{batch['id']}").json()["request_counts"]["completed"]

    # A SIGTERM (lines in flight are aborted: they must stay pending, not be written as
    # "abort"), then a SIGKILL, each in the middle of the batch.
    for sig, at_least in ((signal.SIGTERM, 5), (signal.SIGKILL, 14)):
        server = Server(tiny_export, tmp_path)
        try:
            if batch is None:
                up = httpx.post(f"{server.url}/v1/files", files={"file": ("in.jsonl", data)},
                                data={"purpose": "batch"}, timeout=10).json()  # fmt: skip
                batch = httpx.post(f"{server.url}/v1/batches", json={
                    "input_file_id": up["id"], "endpoint": "/v1/completions",
                    "completion_window": "24h",
                }, timeout=10).json()  # fmt: skip
            assert wait_until(
                lambda s=server, k=at_least: done_now(s) >= k, timeout=60, interval=0.01
            )
            server.proc.send_signal(sig)
            server.proc.communicate(timeout=30)
        finally:
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.communicate()
        store = BatchStore(tmp_path)
        done_before = store.batch(batch["id"])["request_counts"]["completed"]
        store.close()
        assert at_least <= done_before < n  # stopped in the middle

    server = Server(tiny_export, tmp_path)
    try:

        def completed() -> bool:
            return server.get(f"/v1/batches/{batch['id']}").json()["status"] == "completed"

        assert wait_until(completed, timeout=90, interval=0.05)
        final = server.get(f"/v1/batches/{batch['id']}").json()
        out = server.get(f"/v1/files/{final['output_file_id']}/content").text.splitlines()
        err = []
        if final["error_file_id"]:
            err = server.get(f"/v1/files/{final['error_file_id']}/content").text.splitlines()
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.communicate(timeout=30)
    records = [json.loads(x) for x in out + err]
    assert all(r["response"]["body"]["choices"][0]["finish_reason"] == "length"
               for r in records if r["response"]["status_code"] == 200)  # fmt: skip
    assert sorted(r["custom_id"] for r in records) == sorted(x["custom_id"] for x in lines)
    assert final["request_counts"] == {"total": n, "completed": len(out), "failed": len(err)}
    usages = [json.loads(x)["response"]["body"]["usage"] for x in out]
    assert final["usage"]["input_tokens"] == sum(u["prompt_tokens"] for u in usages)
    assert final["usage"]["output_tokens"] == sum(u["completion_tokens"] for u in usages)
    assert final["cost"]["total"] == pytest.approx(sum(u["cost"]["total"] for u in usages))


def test_reconcile_marks_written_lines_and_cuts_a_torn_tail(tmp_path):
    store = BatchStore(tmp_path)
    (tmp_path / "files" / "file-in").write_text("")
    batch = store.create_batch("", "file-in", "/v1/completions", "24h", 3600, None)
    store.start_lines(batch["id"], [Line(i, f"c{i}", {"prompt": "x"}) for i in (1, 2, 3)])
    row = store.row(batch["id"])
    out = ResultFile(store.path(row["output_file_id"]))
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "cost": {"total": 1e-6}}
    # c1 was written and fsynced, then the process died before marking it; then died again
    # halfway through writing c2.
    out.append([{"custom_id": "c1", "response": {"body": {"usage": usage}}}])
    with open(out.path, "ab") as f:
        f.write(b'{"custom_id": "c2", "respo')
    records = out.recover()
    assert [r["custom_id"] for r in records] == ["c1"]
    assert out.path.read_bytes().endswith(b"}\n")  # the torn line is gone
    assert store.reconcile(batch["id"], records, []) == 1
    assert [r["custom_id"] for r in store.pending(batch["id"])] == ["c2", "c3"]
    assert store.reconcile(batch["id"], records, []) == 0  # idempotent: never twice
    obj = store.batch(batch["id"])
    assert obj["request_counts"] == {"total": 3, "completed": 1, "failed": 0}
    assert obj["usage"]["input_tokens"] == 3 and obj["cost"]["total"] == pytest.approx(1e-6)
