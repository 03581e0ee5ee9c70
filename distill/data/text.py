"""Tokenized, packed causal-LM blocks and the Lightning datamodule that serves them."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from distill.data.corpus import (
    Document,
    load_datasets_source,
    load_wiki,
    split_corpus,
    write_split_record,
)
from distill.data.resumable import ResumableLoader

log = logging.getLogger(__name__)


def pack_documents(
    tokenizer, docs: list[Document], seq_len: int, max_blocks: int | None = None
) -> torch.Tensor:
    """Concatenate documents separated by EOS and cut into (num_blocks, seq_len) token blocks."""
    eos = tokenizer.eos_token_id
    ids = tokenizer([d.text for d in docs], add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for doc_ids in ids:
        stream.extend(doc_ids)
        stream.append(eos)
        if max_blocks is not None and len(stream) >= max_blocks * seq_len:
            break
    n = len(stream) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"corpus too small: {len(stream)} tokens for one block of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def load_documents(source: str, **kwargs) -> list[Document]:
    if source == "wiki":
        return load_wiki()
    return load_datasets_source(**kwargs)


class TextDataModule(L.LightningDataModule):
    """Train / validation / test blocks from one corpus with a deterministic hash split."""

    def __init__(
        self,
        tokenizer,
        source: str = "wiki",
        seq_len: int = 256,
        batch_size: int = 8,
        validation_fraction: float = 0.05,
        test_fraction: float = 0.05,
        max_train_blocks: int | None = None,
        max_eval_blocks: int | None = 64,
        num_workers: int = 0,
        seed: int = 0,
        split_record: str | Path | None = None,
        hf: dict | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.source, self.hf = source, hf or {}
        self.seq_len, self.batch_size = seq_len, batch_size
        self.validation_fraction, self.test_fraction = validation_fraction, test_fraction
        self.max_train_blocks, self.max_eval_blocks = max_train_blocks, max_eval_blocks
        self.num_workers, self.seed = num_workers, seed
        self.split_record = split_record
        self.blocks: dict[str, torch.Tensor] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.blocks:
            return
        splits = split_corpus(
            load_documents(self.source, **self.hf), self.validation_fraction, self.test_fraction
        )
        if self.split_record:
            write_split_record(splits, Path(self.split_record))
        limits = {
            "train": self.max_train_blocks,
            "validation": self.max_eval_blocks,
            "test": self.max_eval_blocks,
        }
        for name, docs in splits.items():
            self.blocks[name] = pack_documents(self.tokenizer, docs, self.seq_len, limits[name])
        log.info(
            "data blocks of %d tokens: %s",
            self.seq_len,
            {k: len(v) for k, v in self.blocks.items()},
        )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)  # same order on resume
        return DataLoader(
            TensorDataset(self.blocks[split]),
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator if shuffle else None,
            num_workers=self.num_workers,
            drop_last=shuffle,
        )

    def train_dataloader(self) -> DataLoader:
        # Resumable: a mid-epoch resume continues on the next unseen batch (see resumable.py).
        return ResumableLoader(
            TensorDataset(self.blocks["train"]), self.batch_size, self.seed, self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
