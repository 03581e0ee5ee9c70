"""`python -m distill batch input=<jsonl> output=<jsonl> model=<export dir>`

Runs an OpenAI batch input file (`{custom_id, method, url, body}` a line) through the engine
without a server, writing the same output lines `/v1/batches` writes (the body is what the
endpoint returns, cost at the batch discount). Lines that fail go to `errors=` (default
`<output>.errors.jsonl`) with their line numbers. Resumable: rerunning with the same output
skips the lines already in the output or error file (a torn last line is cut off first).

Other keys: model= (defaults as for `serve`), endpoint= (default: the lines' url),
concurrency=<lines in flight, 32>, kv_memory_mb=, max_seqs=, max_tokens_per_step=.
Imports only `serve` and rich — never the training side.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from distill.commands.keyvalue import split_key_values
from distill.commands.serve import _int, load_served_model

ARGS = ("input", "output", "errors", "model", "endpoint", "concurrency", "kv_memory_mb",
        "max_seqs", "max_tokens_per_step")  # fmt: skip


@dataclass
class Totals:
    lines: int = 0  # in the input
    skipped: int = 0  # already done by an earlier run
    done: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0
    elapsed: float = 0.0  # seconds this run spent on its lines

    def add(self, usage: dict) -> None:
        self.done += 1
        self.prompt_tokens += usage["prompt_tokens"]
        self.completion_tokens += usage["completion_tokens"]
        self.cached_tokens += usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        self.cost_usd += usage.get("cost", {}).get("total", 0.0)


def endpoint_of(data: bytes) -> str:
    """The url of the first line that names a batch endpoint (default chat completions)."""
    from serve.batch.lines import ENDPOINTS

    for raw in data.splitlines():
        try:
            url = json.loads(raw).get("url")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            continue
        if url in ENDPOINTS:
            return url
    return "/v1/chat/completions"


def _state(model):
    """What the API's request code needs (ServerState), with an engine thread and prices at
    the batch discount, but no socket, auth or ledger."""
    from serve.api.app import ServerState
    from serve.api.metrics import Metrics
    from serve.api.runner import EngineRunner
    from serve.billing import PriceList

    runner = EngineRunner(model.engine)
    constraints = None
    try:
        from serve.constraints import for_server

        constraints = for_server(model, {})
    except ImportError:
        pass
    return ServerState(model, runner, Metrics(model.engine), billing=PriceList(model.spec.pricing),
                       constraints=constraints)  # fmt: skip


async def run(model, data: bytes, output: Path, errors: Path, endpoint: str,
              concurrency: int, console: Console) -> Totals:  # fmt: skip
    from serve.api.errors import APIError
    from serve.batch.lines import Unfinished, error_record, output_record, parse_input, run_line
    from serve.batch.results import ResultFile

    out, err = ResultFile(output), ResultFile(errors)
    lines = parse_input(data, endpoint)
    written = out.recover() + err.recover()
    done_ids = {r["custom_id"] for r in written if r.get("custom_id") is not None}
    done_numbers = {(r.get("error") or {}).get("line") for r in written}
    totals = Totals(lines=len(lines))
    todo, bad = [], []
    for ln in lines:
        if ln.custom_id in done_ids or (ln.error and ln.number in done_numbers):
            totals.skipped += 1
        elif ln.error:
            bad.append(error_record(ln.custom_id, ln.number, ln.error))
        else:
            todo.append(ln)
    err.append(bad)
    totals.failed += len(bad)
    state = _state(model)
    discount = model.spec.pricing.batch_discount
    state.runner.start()
    columns = (TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]:.1f} tok/s  ${task.fields[cost]:.6f}"),
               TimeElapsedColumn())  # fmt: skip
    start = time.perf_counter()
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("lines", total=len(todo), rate=0.0, cost=0.0)

            async def one(ln) -> None:
                try:
                    body = await run_line(ln.body, endpoint, state, None, discount)
                except APIError as e:
                    await asyncio.to_thread(err.append, [error_record(ln.custom_id, ln.number, e)])
                    totals.failed += 1
                else:
                    rec = output_record(ln.custom_id, body["id"], body)
                    await asyncio.to_thread(out.append, [rec])
                    totals.add(body["usage"])
                elapsed = time.perf_counter() - start
                progress.update(task, advance=1, rate=totals.completion_tokens / elapsed,
                                cost=totals.cost_usd)  # fmt: skip

            if todo:  # the first alone: the others then find a shared system prompt cached
                await one(todo[0])
            gate = asyncio.Semaphore(concurrency)

            async def gated(ln) -> None:
                async with gate:
                    await one(ln)

            results = await asyncio.gather(*(gated(ln) for ln in todo[1:]), return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException) and not isinstance(r, Unfinished):
                    raise r
    finally:
        await asyncio.to_thread(state.runner.stop)
    totals.elapsed = time.perf_counter() - start
    return totals


def summary(totals: Totals, output: Path, errors: Path) -> Table:
    elapsed = totals.elapsed or 1e-9
    table = Table(title="batch summary", show_header=False)
    rows = [
        ("requests", f"{totals.done} done, {totals.failed} failed, {totals.skipped} already "
                     f"done (of {totals.lines})"),
        ("prompt tokens", f"{totals.prompt_tokens:,} ({totals.cached_tokens:,} cached)"),
        ("completion tokens", f"{totals.completion_tokens:,}"),
        ("cost", f"${totals.cost_usd:.6f} (batch price)"),
        ("throughput", f"{totals.completion_tokens / elapsed:.1f} tok/s, "
                       f"{totals.done / elapsed:.2f} requests/s over {elapsed:.1f} s"),
        ("output", str(output)),
        ("errors", str(errors) if errors.exists() and errors.stat().st_size else "none"),
    ]  # fmt: skip
    for k, v in rows:
        table.add_row(k, v)
    return table


def main(argv: list[str]) -> int:
    args, _ = split_key_values(argv, ARGS, [])
    if not args.get("input") or not args.get("output"):
        raise SystemExit("batch: needs input=<jsonl> and output=<jsonl>")
    source, output = Path(args["input"]).expanduser(), Path(args["output"]).expanduser()
    errors = Path(args.get("errors") or output.with_suffix(".errors.jsonl")).expanduser()
    if not source.is_file():
        raise SystemExit(f"batch: input file not found: {source}")
    from serve.batch.lines import InputError

    model = load_served_model(args, "batch")
    data = source.read_bytes()
    endpoint = args.get("endpoint") or endpoint_of(data)
    console = Console()
    console.print(f"model: {model.name} ({model.path}); {endpoint}; input {source}")
    try:
        totals = asyncio.run(run(model, data, output, errors, endpoint,
                                 _int(args, "concurrency", 32), console))  # fmt: skip
    except InputError as e:
        raise SystemExit(f"batch: {e.message}") from e
    console.print(summary(totals, output, errors))
    return 0 if totals.done + totals.skipped + totals.failed == totals.lines else 1
