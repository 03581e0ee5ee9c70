"""Files, batches and per-line state in one SQLite database (WAL) under the server's data dir.

    <data_dir>/batches.sqlite   files, batches, lines (this module)
    <data_dir>/files/<file id>  the bytes of each file (uploads, batch outputs and errors)

Ids are random (`file-…`, `batch_…`), never paths. Every row carries the key that owns it;
a lookup with another key finds nothing (the routes answer 404, not 403).

A line is `pending` until its result is in the output or error file (fsynced), then `done`
(output) or `failed` (error file). Its usage is kept so the batch's usage is the sum of its
lines. `reconcile` repairs the one window a crash can leave: a result written but not yet
marked.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, key_id TEXT NOT NULL, purpose TEXT NOT NULL, filename TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, key_id TEXT NOT NULL,
    input_file_id TEXT NOT NULL, endpoint TEXT NOT NULL, completion_window TEXT NOT NULL,
    metadata TEXT, status TEXT NOT NULL, errors TEXT,
    output_file_id TEXT NOT NULL, error_file_id TEXT NOT NULL, files_ready INTEGER DEFAULT 0,
    created_at INTEGER NOT NULL, expires_at REAL NOT NULL, in_progress_at INTEGER,
    finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER, expired_at INTEGER,
    cancelling_at INTEGER, cancelled_at INTEGER
);
CREATE TABLE IF NOT EXISTS lines (
    batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT, body TEXT,
    state TEXT NOT NULL, prompt_tokens INTEGER DEFAULT 0, completion_tokens INTEGER DEFAULT 0,
    cached_tokens INTEGER DEFAULT 0, cost_usd REAL DEFAULT 0,
    PRIMARY KEY (batch_id, line)
);
CREATE INDEX IF NOT EXISTS lines_state ON lines (batch_id, state);
"""


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


class BatchStore:
    """Thread-safe (one connection behind a lock; each call is one short transaction)."""

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        self.files_dir = self.dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.dir / "batches.sqlite", check_same_thread=False,
                                   isolation_level=None)  # fmt: skip
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a killed process loses nothing
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def _q(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _tx(self, statements: list[tuple[str, tuple]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- files -----------------------------------------------------------------------------

    def path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def add_file(self, file_id: str, key_id: str, purpose: str, filename: str, size: int) -> dict:
        self._tx([("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?)",
                   (file_id, key_id, purpose, filename, size, now()))])  # fmt: skip
        return self.file(file_id, key_id)

    def file(self, file_id: str, key_id: str) -> dict | None:
        rows = self._q("SELECT * FROM files WHERE id = ? AND key_id = ?", (file_id, key_id))
        return file_object(rows[0]) if rows else None

    def files(self, key_id: str, purpose: str | None, after: str | None, limit: int,
              order: str) -> tuple[list[dict], bool]:  # fmt: skip
        op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        sql, args = "SELECT * FROM files WHERE key_id = ?", [key_id]
        if purpose:
            sql, args = sql + " AND purpose = ?", [*args, purpose]
        if after:
            sql += f" AND rowid {op} (SELECT rowid FROM files WHERE id = ?)"
            args.append(after)
        rows = self._q(f"{sql} ORDER BY rowid {direction} LIMIT ?", (*args, limit + 1))
        return [file_object(r) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, file_id: str, key_id: str) -> bool:
        if self.file(file_id, key_id) is None:
            return False
        self._tx([("DELETE FROM files WHERE id = ?", (file_id,))])
        self.path(file_id).unlink(missing_ok=True)
        return True

    # ---- batches ---------------------------------------------------------------------------

    def create_batch(self, key_id: str, input_file_id: str, endpoint: str, window: str,
                     window_s: float, metadata: dict | None) -> dict:  # fmt: skip
        bid, created = new_id("batch_"), now()
        self._tx([("INSERT INTO batches (id, key_id, input_file_id, endpoint, completion_window,"
                   " metadata, status, output_file_id, error_file_id, created_at, expires_at)"
                   " VALUES (?, ?, ?, ?, ?, ?, 'validating', ?, ?, ?, ?)",
                   (bid, key_id, input_file_id, endpoint, window, json.dumps(metadata),
                    new_id("file-"), new_id("file-"), created, time.time() + window_s))])  # fmt: skip
        return self.batch(bid)

    def row(self, batch_id: str) -> sqlite3.Row | None:
        rows = self._q("SELECT * FROM batches WHERE id = ?", (batch_id,))
        return rows[0] if rows else None

    def batch(self, batch_id: str, key_id: str | None = None) -> dict | None:
        """The OpenAI batch object (None when absent or another key's)."""
        row = self.row(batch_id)
        if row is None or (key_id is not None and row["key_id"] != key_id):
            return None
        return self._object(row)

    def batches(self, key_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        sql, args = "SELECT * FROM batches WHERE key_id = ?", [key_id]
        if after:
            sql += " AND seq < (SELECT seq FROM batches WHERE id = ?)"
            args.append(after)
        rows = self._q(f"{sql} ORDER BY seq DESC LIMIT ?", (*args, limit + 1))
        return [self._object(r) for r in rows[:limit]], len(rows) > limit

    def active(self) -> list[sqlite3.Row]:
        marks = ",".join("?" * len(ACTIVE))
        return self._q(f"SELECT * FROM batches WHERE status IN ({marks}) ORDER BY seq", ACTIVE)

    def set_status(self, batch_id: str, status: str, errors: list | None = None) -> None:
        stamp = {"in_progress": "in_progress_at", "finalizing": "finalizing_at",
                 "completed": "completed_at", "failed": "failed_at", "expired": "expired_at",
                 "cancelling": "cancelling_at", "cancelled": "cancelled_at"}[status]  # fmt: skip
        sql = f"UPDATE batches SET status = ?, {stamp} = ?"
        args: tuple = (status, now())
        if errors is not None:
            sql, args = (
                sql + ", errors = ?",
                (*args, json.dumps({"object": "list", "data": errors})),
            )
        self._tx([(sql + " WHERE id = ?", (*args, batch_id))])

    def cancel(self, batch_id: str, key_id: str) -> dict | None:
        """validating/in_progress → cancelling (the runner finishes the job)."""
        row = self.row(batch_id)
        if row is None or row["key_id"] != key_id:
            return None
        if row["status"] in ("validating", "in_progress"):
            self.set_status(batch_id, "cancelling")
        return self.batch(batch_id)

    def publish_files(self, batch_id: str, error_bytes: int, output_bytes: int) -> None:
        """Register the result files (the error file only when it has lines)."""
        row = self.row(batch_id)
        stmts = [("INSERT OR IGNORE INTO files VALUES (?, ?, 'batch_output', ?, ?, ?)",
                  (row["output_file_id"], row["key_id"], f"{batch_id}_output.jsonl",
                   output_bytes, now()))]  # fmt: skip
        if error_bytes:
            stmts.append(("INSERT OR IGNORE INTO files VALUES (?, ?, 'batch_output', ?, ?, ?)",
                          (row["error_file_id"], row["key_id"], f"{batch_id}_error.jsonl",
                           error_bytes, now())))  # fmt: skip
        stmts.append(("UPDATE batches SET files_ready = 1 WHERE id = ?", (batch_id,)))
        self._tx(stmts)

    # ---- lines -----------------------------------------------------------------------------

    def start_lines(self, batch_id: str, lines) -> None:
        """validating → in_progress with every line in one transaction (`lines`: Line)."""
        rows = [
            (batch_id, ln.number, ln.custom_id, None if ln.error else json.dumps(ln.body),
             "failed" if ln.error else "pending")
            for ln in lines
        ]  # fmt: skip
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM lines WHERE batch_id = ?", (batch_id,))
            self._db.executemany(
                "INSERT INTO lines (batch_id, line, custom_id, body, state) VALUES (?,?,?,?,?)",
                rows,
            )
            self._db.execute(  # a batch cancelled while validating stays `cancelling`
                "UPDATE batches SET in_progress_at = ?, status = CASE status WHEN 'validating'"
                " THEN 'in_progress' ELSE status END WHERE id = ?",
                (now(), batch_id),
            )
            self._db.execute("COMMIT")

    def pending(self, batch_id: str) -> list[sqlite3.Row]:
        return self._q("SELECT line, custom_id, body FROM lines WHERE batch_id = ? AND "
                       "state = 'pending' ORDER BY line", (batch_id,))  # fmt: skip

    def mark(self, batch_id: str, line: int, state: str, usage: dict | None = None) -> None:
        """A line's result is on disk: `done` (with its usage) or `failed`."""
        u = usage or {}
        cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        cost = (u.get("cost") or {}).get("total", 0.0)
        self._tx([("UPDATE lines SET state = ?, prompt_tokens = ?, completion_tokens = ?,"
                   " cached_tokens = ?, cost_usd = ? WHERE batch_id = ? AND line = ?",
                   (state, u.get("prompt_tokens", 0), u.get("completion_tokens", 0), cached,
                    cost, batch_id, line))])  # fmt: skip

    def reconcile(self, batch_id: str, outputs: list[dict], errors: list[dict]) -> int:
        """Mark the pending lines whose result is already in a file; how many there were."""
        by_cid = {r["custom_id"]: r["line"] for r in self.pending(batch_id)}
        fixed = 0
        for records, state in ((outputs, "done"), (errors, "failed")):
            for rec in records:
                line = by_cid.pop(rec.get("custom_id"), None)
                if line is None:
                    continue
                body = (rec.get("response") or {}).get("body") or {}
                self.mark(batch_id, line, state, body.get("usage") if state == "done" else None)
                fixed += 1
        return fixed

    def _object(self, row: sqlite3.Row) -> dict:
        bid = row["id"]
        counts = {r["state"]: r["n"] for r in self._q(
            "SELECT state, COUNT(*) AS n FROM lines WHERE batch_id = ? GROUP BY state", (bid,))}  # fmt: skip
        (u,) = self._q(
            "SELECT COALESCE(SUM(prompt_tokens), 0) AS p, COALESCE(SUM(completion_tokens), 0)"
            " AS c, COALESCE(SUM(cached_tokens), 0) AS k, COALESCE(SUM(cost_usd), 0.0) AS usd"
            " FROM lines WHERE batch_id = ? AND state = 'done'", (bid,))  # fmt: skip
        ready = bool(row["files_ready"])
        error_file = None
        if ready and self._q("SELECT 1 FROM files WHERE id = ?", (row["error_file_id"],)):
            error_file = row["error_file_id"]
        stamps = ("created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at",
                  "expired_at", "cancelling_at", "cancelled_at")  # fmt: skip
        return {
            "id": bid,
            "object": "batch",
            "endpoint": row["endpoint"],
            "errors": json.loads(row["errors"]) if row["errors"] else None,
            "input_file_id": row["input_file_id"],
            "completion_window": row["completion_window"],
            "status": row["status"],
            "output_file_id": row["output_file_id"] if ready else None,
            "error_file_id": error_file,
            **{k: row[k] for k in stamps},
            "expires_at": int(row["expires_at"]),
            "request_counts": {
                "total": sum(counts.values()),
                "completed": counts.get("done", 0),
                "failed": counts.get("failed", 0),
            },
            "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
            "usage": {
                "input_tokens": u["p"],
                "input_tokens_details": {"cached_tokens": u["k"]},
                "output_tokens": u["c"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u["p"] + u["c"],
            },
            "cost": {"total": round(u["usd"], 12), "currency": "USD"},
        }


def file_object(row: sqlite3.Row) -> dict:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }
