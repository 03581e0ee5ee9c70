"""`python -m distill batch`: the server's line format without a server, a summary, resume."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from api_support import MODEL

from distill.commands import batch as batch_cmd

pytest_plugins = ["api_fixtures"]

SYSTEM = "Answer briefly and politely. " * 10


def line(cid: str, text: str, **body) -> dict:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0,
                     **body}}  # fmt: skip


def read(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_offline_batch_writes_outputs_errors_summary_and_resumes(
    tiny_export, tmp_path, capsys, one_thread
):
    lines = [line(f"q{i}", f"Question {i}") for i in range(6)]
    lines.insert(3, line("bad", "x", max_tokens=-1))
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n")
    argv = [f"input={src}", f"output={out}", f"model={tiny_export}", "kv_memory_mb=16"]
    assert batch_cmd.main(argv) == 0
    errors = tmp_path / "out.errors.jsonl"
    first, errs = read(out), read(errors)
    assert sorted(r["custom_id"] for r in first) == [f"q{i}" for i in range(6)]
    assert [(r["custom_id"], r["error"]["line"]) for r in errs] == [("bad", 4), (None, 8)]
    assert errs[0]["error"]["param"] == "max_tokens"
    body = first[0]["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["usage"]["cost"]["discount"] == 0.5
    assert sum(r["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
               for r in first) >= 5  # fmt: skip
    shown = capsys.readouterr().out
    assert "6 done, 2 failed, 0 already done (of 8)" in shown
    total = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in first)
    assert f"completion tokens │ {total:,}" in shown or f"completion tokens  {total:,}" in shown

    # A killed run: two lines done, the third torn mid-write. Rerunning finishes the rest,
    # writing no line twice (errors included).
    kept = out.read_text().splitlines(keepends=True)[:2]
    out.write_text("".join(kept) + kept[0][:25])
    assert batch_cmd.main(argv) == 0
    again = read(out)
    assert sorted(r["custom_id"] for r in again) == [f"q{i}" for i in range(6)]
    assert again[:2] == first[:2]  # kept as written
    assert read(errors) == errs
    assert "4 done, 0 failed, 4 already done (of 8)" in capsys.readouterr().out


def test_batch_is_listed_and_bad_arguments_say_why(tmp_path):
    out = subprocess.run([sys.executable, "-m", "distill", "--help"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert "batch" in out and "offline" in out
    with pytest.raises(SystemExit, match="needs input=<jsonl> and output=<jsonl>"):
        batch_cmd.main(["input=x"])
    with pytest.raises(SystemExit, match="input file not found"):
        batch_cmd.main([f"input={tmp_path / 'none.jsonl'}", f"output={tmp_path / 'o.jsonl'}"])


def test_batch_command_imports_no_training_stack():
    code = (
        "import sys, distill.commands.batch; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'eval', 'transformers', "
        "'lightning', 'hydra', 'omegaconf', 'datasets', 'torchao'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
