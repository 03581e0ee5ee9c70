"""Result files: append-only JSONL where every line is written whole and fsynced before the
batch store marks its input line done, so a crash can lose at most a line that was never
marked (it runs again) and never leaves one written twice.

After a crash the file may end in half a line (the process died inside `write`): `recover`
cuts it off and returns the complete records, which the store reconciles with its lines.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path


class ResultFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()

    def recover(self) -> list[dict]:
        """The complete records; a torn last line (no newline, or not JSON) is truncated."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        records, good = [], 0
        for raw in data.splitlines(keepends=True):
            if not raw.endswith(b"\n"):
                break
            try:
                records.append(json.loads(raw))
            except json.JSONDecodeError:
                break  # only the last line can be torn: nothing after it was ever written
            good += len(raw)
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        return records

    def append(self, records: Iterable[dict]) -> None:
        """Write `records` at the end, then fsync: when this returns they survive a crash."""
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if not text:
            return
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                f.write(text.encode())
                f.flush()
                os.fsync(f.fileno())

    def reset(self) -> None:
        """Start empty (a batch whose validation is redone)."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "wb") as f:
                os.fsync(f.fileno())

    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def custom_ids(self) -> set[str]:
        """The custom_ids already written (used by the offline CLI to resume)."""
        return {r["custom_id"] for r in self.recover() if r.get("custom_id") is not None}
