"""`python -m distill serve`: model resolution, start-up checks, SIGTERM drains open streams."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import httpx
import pytest
from api_support import MODEL, wait_until

from distill.commands import serve as serve_cmd
from serve.export_format import read_export

pytest_plugins = ["api_fixtures"]


def test_serve_command_imports_no_training_stack():
    code = (
        "import sys, distill.commands.serve; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'eval', 'transformers', "
        "'lightning', 'hydra', 'omegaconf', 'datasets', 'torchao'})); "
        "print(sorted(m for m in sys.modules if m.startswith('distill')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy, ours = out.stdout.strip().splitlines()
    assert heavy == "[]"
    assert ours == str(["distill", "distill.commands", "distill.commands.keyvalue",
                        "distill.commands.serve", "distill.offline"])  # fmt: skip


def test_newest_export_then_embedded_teacher(tmp_path, tiny_export, monkeypatch):
    outputs = tmp_path / "outputs"
    for i, run in enumerate(["nano/2026-01-01", "nano/2026-02-01"]):
        shutil.copytree(tiny_export, outputs / run / "export")
        os.utime(outputs / run / "export" / "serving.json", (1e9 + i, 1e9 + i))
    assert serve_cmd.newest_export(outputs) == outputs / "nano/2026-02-01/export"
    assert serve_cmd.newest_export(tmp_path / "none") is None

    # No export anywhere: the embedded teacher, written once as an export under the home.
    home = tmp_path / "home"
    teacher = home / "models" / "smollm2-135m-instruct"
    shutil.copytree(tiny_export, teacher, ignore=shutil.ignore_patterns("serving.json"))
    monkeypatch.setenv("NANODISTILL_HOME", str(home))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no ./outputs here
    path = serve_cmd.resolve_model(None)
    export = read_export(path)
    assert path == home / "exports" / "smollm2-135m-instruct"
    assert export.serving.model == "smollm2-135m-instruct" and export.serving.context_length == 2048
    assert export.serving.chat_template and (path / "model.safetensors").is_file()
    assert serve_cmd.resolve_model(None) == path
    assert serve_cmd.resolve_model(str(tiny_export)) == tiny_export


def test_refuses_open_non_loopback_host(tiny_export):
    assert serve_cmd.is_loopback("127.0.0.1") and serve_cmd.is_loopback("::1")
    assert not serve_cmd.is_loopback("0.0.0.0")
    with pytest.raises(SystemExit, match="without keys"):
        serve_cmd.main([f"model={tiny_export}", "host=0.0.0.0"])
    with pytest.raises(SystemExit, match="unknown argument"):
        serve_cmd.main(["modle=x"])
    with pytest.raises(SystemExit, match=r"port=http: must be an integer in \[0, 65535\]"):
        serve_cmd.main(["port=http"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_then_sigterm_aborts_open_streams(tiny_export):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "distill", "serve", f"model={tiny_export}", f"port={port}",
           "kv_memory_mb=16"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)  # fmt: skip

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited: {proc.communicate()[0]}") from None
            return False

    try:
        assert wait_until(ready, timeout=90, interval=0.1), "server did not become ready"
        body = {"model": MODEL, "prompt": "Once", "max_tokens": 1000, "stream": True,
                "logprobs": 20}  # fmt: skip
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(ln for ln in lines if ln).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = [ln for ln in lines if ln.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2][len("data: ") :])
        assert last["choices"][0]["finish_reason"] == "abort"
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it caught
    assert f"model: {MODEL}" in out and f"url:   {url}/v1" in out and "no keys" in out
    assert "Application shutdown complete" in out


def test_served_engine_thread_gets_the_cores_and_the_loop_thread_one(tiny_export):
    """`serve` / `batch` load through load_served_model, which leaves the main (event loop)
    thread one intra-op thread and gives the engine thread the rest: a second OpenMP pool on the
    main thread makes the engine's workers sleep between ops (decode ~1.6× slower, measured)."""
    code = f"""
import torch
torch.set_num_threads(2)
from distill.commands.serve import load_served_model
from serve.api.runner import EngineRunner
model = load_served_model({{"model": {str(tiny_export)!r}}}, "serve")
runner = EngineRunner(model.engine)
runner.start()
print(torch.get_num_threads(), runner._call(torch.get_num_threads).result(timeout=30))
runner.stop()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "2"]
