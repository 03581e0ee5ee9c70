"""Text corpora and their deterministic train / validation / held-out test split."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Document:
    key: str  # stable identity used for splitting (title for Wikipedia)
    text: str


def load_wiki() -> list[Document]:
    """The 10,033 Wikipedia lead paragraphs of the embedded `wiki` asset."""
    from distill.assets import locate

    entries = json.loads(locate("wiki").read_text(encoding="utf-8"))
    docs = [Document(key=title, text=e["extract"].strip()) for title, e in entries.items()]
    return [d for d in docs if d.text]


def load_datasets_source(
    path: str,
    name: str | None,
    split: str,
    text_field: str,
    data_files: str | list[str] | None = None,
) -> list[Document]:
    """Any `datasets` source (hub id when online, or `json`/`text`/`parquet` + `data_files`)."""
    import datasets

    ds = datasets.load_dataset(path, name, split=split, data_files=data_files)
    if text_field not in ds.column_names:
        raise ValueError(f"dataset {path} has no column '{text_field}'; columns: {ds.column_names}")
    return [Document(key=str(i), text=t) for i, t in enumerate(ds[text_field]) if t and t.strip()]


def split_of(key: str, validation_fraction: float, test_fraction: float) -> str:
    """Split from a hash of the key: stable across runs, machines and corpus reorderings."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    if bucket < test_fraction:
        return "test"
    if bucket < test_fraction + validation_fraction:
        return "validation"
    return "train"


def split_corpus(
    docs: list[Document], validation_fraction: float, test_fraction: float
) -> dict[str, list[Document]]:
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for doc in docs:
        out[split_of(doc.key, validation_fraction, test_fraction)].append(doc)
    return out


def write_split_record(splits: dict[str, list[Document]], path: Path) -> None:
    """Record which documents went where (held-out keys in full) so a run can be audited."""
    record = {
        "counts": {s: len(d) for s, d in splits.items()},
        "validation_keys": [d.key for d in splits["validation"]],
        "test_keys": [d.key for d in splits["test"]],
        "train_keys_sha256": hashlib.sha256(
            "\n".join(d.key for d in splits["train"]).encode()
        ).hexdigest(),
    }
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False))
