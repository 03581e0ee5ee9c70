"""`python -m distill serve model=<export dir> host=127.0.0.1 port=8000`

The OpenAI-compatible server (serve/api) on uvicorn. Without `model=`, it serves the newest
`export/` under ./outputs, else the embedded teacher (written once as an export under the
assets home). Imports only `serve` and the web stack — never the training side.

Other keys: keys=<keys file> (API keys; without it the server binds to loopback only),
ledger=<usage ledger path>, data_dir=<files and batches dir, default next to the ledger>,
batch_concurrency=<lines in flight per batch>, kv_memory_mb=<int>, max_seqs=<int>,
max_tokens_per_step=<int>, batch_tokens_per_step=<int> (batch work a step with no interactive
request), background_tokens_per_step=<int> (… with one), log_level=<info|debug|…>. keys/ledger are read by serve.auth / serve.billing through their
`for_server(model, args)` (see load_hooks).
On SIGTERM/SIGINT it stops admitting, aborts running requests and flushes the ledger.
"""

from __future__ import annotations

import importlib
import ipaddress
import json
import logging
import os
import shutil
from pathlib import Path

import uvicorn

from distill.commands.keyvalue import split_key_values
from serve.api import ServedModel, create_app
from serve.api.runner import reserve_cores_for_engine

log = logging.getLogger(__name__)

ARGS = ("model", "host", "port", "keys", "ledger", "data_dir", "batch_concurrency",
        "kv_memory_mb", "max_seqs", "max_tokens_per_step", "batch_tokens_per_step",
        "background_tokens_per_step", "log_level")  # fmt: skip
HOOK_MODULES = {
    "auth": "serve.auth",
    "billing": "serve.billing",
    "constraints": "serve.constraints",
}


def newest_export(root: Path = Path("outputs")) -> Path | None:
    """The most recently written `export/` (with serving.json) under `root`."""
    found = [p.parent for p in root.glob("**/export/serving.json")] if root.is_dir() else []
    return max(found, key=lambda p: (p / "serving.json").stat().st_mtime, default=None)


def teacher_export() -> Path:
    """The embedded teacher as an export dir under the assets home (written once)."""
    from distill.assets import TEACHER_NAME
    from distill.paths import home_dir

    source = home_dir() / "models" / TEACHER_NAME
    if not (source / "config.json").is_file():
        from distill.assets import teacher_dir  # converts the GGUF once (imports transformers)

        source = teacher_dir()
    out = home_dir() / "exports" / TEACHER_NAME
    if (out / "serving.json").is_file():
        return out
    from serve.chat_template import ChatTemplate
    from serve.export_format import ServingSpec

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in source.iterdir():
        try:
            os.link(f, tmp / f.name)  # no second copy of the weights
        except OSError:
            shutil.copy2(f, tmp / f.name)
    config = json.loads((source / "config.json").read_text())
    template = ChatTemplate.from_dir(source)
    ServingSpec(
        model=TEACHER_NAME,
        context_length=int(config["max_position_embeddings"]),
        chat_template=template.source if template else None,
    ).save(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def resolve_model(arg: str | None) -> Path:
    if arg:
        return Path(arg).expanduser()
    return newest_export() or teacher_export()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_hooks(model, args: dict[str, str]) -> dict:
    """auth / billing / constraints from serve.auth, serve.billing, serve.constraints when
    those modules exist: each may define `for_server(model, args) -> hook | None` (model: the
    ServedModel; args: this command's key=values). Hook methods: serve/api/hooks.py."""
    hooks = {}
    for name, module in HOOK_MODULES.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        factory = getattr(mod, "for_server", None)
        hooks[name] = factory(model, args) if factory else None
    if args.get("keys") and hooks.get("auth") is None:
        raise SystemExit("serve: keys= needs serve/auth.py with for_server(model, args)")
    return hooks


def _int(args: dict[str, str], key: str, default: int, low: int = 1, high: int = 1 << 40) -> int:
    value = args.get(key, str(default))
    if not value.isdigit() or not low <= int(value) <= high:
        raise SystemExit(f"serve: {key}={value}: must be an integer in [{low}, {high}]")
    return int(value)


ENGINE_KEYS = ("max_seqs", "max_tokens_per_step", "batch_tokens_per_step",
               "background_tokens_per_step")  # fmt: skip


def load_served_model(args: dict[str, str], command: str) -> ServedModel:
    """The export `model=` names (or the default one) on an engine sized by the engine keys;
    a bad export exits with `<command>: <why>`. Shared by `serve` and `batch`."""
    engine_kwargs = {"kv_memory_bytes": _int(args, "kv_memory_mb", 1024) << 20}
    for key in ENGINE_KEYS:
        if key in args:
            engine_kwargs[key] = _int(args, key, 0)
    path = resolve_model(args.get("model"))
    reserve_cores_for_engine()  # before loading: the engine thread gets the cores
    try:
        return ServedModel.load(path, **engine_kwargs)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{command}: {e}") from e


def main(argv: list[str]) -> int:
    args, _ = split_key_values(argv, ARGS, [])
    host, port = args.get("host", "127.0.0.1"), _int(args, "port", 8000, 0, 65535)
    if not args.get("keys") and not is_loopback(host):
        raise SystemExit(f"serve: refusing to listen on {host} without keys=<keys file>; "
                         "bind to 127.0.0.1 or configure API keys")  # fmt: skip
    model = load_served_model(args, "serve")
    hooks = load_hooks(model, args)
    batches = batch_service(args)
    app = create_app(model, **hooks, batches=batches)

    keys = f"keys from {args['keys']}" if args.get("keys") else "no keys (open, loopback only)"
    print(f"model: {model.name} ({model.path}, {model.spec.quantization})", flush=True)
    print(f"url:   http://{host}:{port}/v1", flush=True)
    print(f"auth:  {keys}", flush=True)
    print(f"data:  {batches.store.dir} (files, batches)", flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level=args.get("log_level", "info"),
                            timeout_graceful_shutdown=30)  # fmt: skip
    DrainingServer(config, app.state.server).run()
    return 0


def batch_service(args: dict[str, str]):
    """/v1/files and /v1/batches, stored under `data_dir=` (default: `batches/` beside the
    usage ledger under the assets home)."""
    from serve.batch import BatchService
    from serve.billing import default_ledger_path

    data_dir = Path(args.get("data_dir") or default_ledger_path().parent / "batches")
    return BatchService(data_dir.expanduser(), concurrency=_int(args, "batch_concurrency", 32))


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT: stop admitting and abort running requests, so open streams
    end (finish_reason "abort") and the graceful shutdown does not wait for them."""

    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig, frame) -> None:
        if not self.state.draining:
            self.state.draining = True
            self.state.runner.abort_all()
        super().handle_exit(sig, frame)
