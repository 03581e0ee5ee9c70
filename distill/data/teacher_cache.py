"""Offline teacher cache: the teacher's top-k log-probs for every training token, on disk.

Layout of a cache directory:
  meta.json                 k, temperature, seq_len, block count, vocab, sha256 of the blocks,
                            shard list, bytes per token
  shard-00000.safetensors   log_probs (n, S, k) float16, indices (n, S, k) int32

Training reads it through `CachedTrainData`, whose batches are (ids, log_probs, indices), so the
DistillModule needs no teacher in memory. The log-probs are taken at the cache temperature over
the full vocabulary; the mass outside the top-k is recovered as 1 − Σ p in the loss.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from distill.data.resumable import ResumableLoader

log = logging.getLogger(__name__)

META = "meta.json"


def blocks_digest(blocks: Tensor) -> str:
    """sha256 of the token blocks, so a cache is never paired with other data."""
    return hashlib.sha256(blocks.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


@torch.no_grad()
def teacher_topk(
    teacher: nn.Module,
    input_ids: Tensor,
    k: int,
    temperature: float = 1.0,
    vocab: int | None = None,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Top-k log-probs (B, S, k) fp32 and ids (B, S, k) of log_softmax(logits / T).

    Logits are formed from the final hidden states `chunk_size` positions at a time, so the
    full (B, S, V) fp32 tensor never exists.
    """
    states = teacher.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    head = teacher.get_output_embeddings()
    flat = states.flatten(0, 1)  # (B·S, H)
    values, indices = [], []
    for start in range(0, flat.size(0), chunk_size):
        logits = head(flat[start : start + chunk_size]).float()
        logits = logits[:, :vocab] if vocab is not None else logits
        top = F.log_softmax(logits / temperature, dim=-1).topk(k, dim=-1)
        values.append(top.values)
        indices.append(top.indices)
    shape = (*input_ids.shape, k)
    return torch.cat(values).view(shape), torch.cat(indices).view(shape)


def write_cache(
    teacher: nn.Module,
    blocks: Tensor,
    out_dir: str | Path,
    k: int = 64,
    temperature: float = 1.0,
    batch_size: int = 8,
    shard_blocks: int = 256,
    vocab: int | None = None,
) -> dict:
    """Run the teacher over `blocks` (N, S) and write shards + meta.json; returns the meta."""
    width = vocab or output_width(teacher)
    if not 1 <= k <= width:  # distill.validate checks this before the teacher loads, too
        raise ValueError(f"loss.top_k={k}: must be an integer in [1, {width}] (the vocabulary)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = next(teacher.parameters()).device
    teacher.eval()
    shards = []
    for shard_start in tqdm(range(0, len(blocks), shard_blocks), desc="teacher cache"):
        part = blocks[shard_start : shard_start + shard_blocks]
        values, indices = [], []
        for i in range(0, len(part), batch_size):
            v, ix = teacher_topk(
                teacher, part[i : i + batch_size].to(device), k, temperature, vocab
            )
            values.append(v.to(torch.float16).cpu())
            indices.append(ix.to(torch.int32).cpu())
        name = f"shard-{len(shards):05d}.safetensors"
        save_file(
            {
                "log_probs": torch.cat(values).contiguous(),
                "indices": torch.cat(indices).contiguous(),
            },
            out / name,
        )
        shards.append({"file": name, "start": shard_start, "count": len(part)})
    tokens = blocks.numel()
    disk = sum((out / s["file"]).stat().st_size for s in shards)
    meta = {
        "k": k,
        "temperature": temperature,
        "seq_len": blocks.shape[1],
        "num_blocks": len(blocks),
        "vocab_size": vocab or output_width(teacher),
        "blocks_sha256": blocks_digest(blocks),
        "shards": shards,
        "bytes_per_token": disk / tokens,
        "payload_bytes_per_token": k * (2 + 4),  # fp16 value + int32 index per entry
    }
    (out / META).write_text(json.dumps(meta, indent=2))
    log.info("teacher cache: %d tokens, %.1f bytes/token in %s", tokens, disk / tokens, out)
    return meta


def output_width(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def read_meta(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / META
    if not path.exists():
        raise FileNotFoundError(
            f"no teacher cache at {cache_dir} ({META} missing); create it with "
            "`python -m distill cache-teacher` using the same data settings"
        )
    return json.loads(path.read_text())


class CachedTeacherDataset(Dataset):
    """(ids (S,), log_probs (S, k) fp16, indices (S, k) int32) per training block.

    Shards are memory-mapped (safetensors) and sliced per item, so a cache larger than RAM works.
    """

    def __init__(self, blocks: Tensor, cache_dir: str | Path) -> None:
        self.blocks, self.dir = blocks, Path(cache_dir)
        self.meta = read_meta(cache_dir)
        if self.meta["num_blocks"] != len(blocks) or self.meta["seq_len"] != blocks.shape[1]:
            raise ValueError(
                f"teacher cache {cache_dir} holds {self.meta['num_blocks']} blocks of "
                f"{self.meta['seq_len']} tokens, the data has {len(blocks)} of {blocks.shape[1]}; "
                "rebuild it with `python -m distill cache-teacher` and the same data settings"
            )
        if self.meta["blocks_sha256"] != blocks_digest(blocks):
            raise ValueError(
                f"teacher cache {cache_dir} was built from different token blocks "
                "(tokenizer, corpus or split changed); rebuild it with cache-teacher"
            )
        self._handles: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.blocks)

    def _shard(self, index: int) -> tuple[object, int]:
        for shard in self.meta["shards"]:
            if shard["start"] <= index < shard["start"] + shard["count"]:
                if shard["file"] not in self._handles:
                    self._handles[shard["file"]] = safe_open(self.dir / shard["file"], "pt")
                return self._handles[shard["file"]], index - shard["start"]
        raise IndexError(index)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        handle, row = self._shard(index)
        log_probs = handle.get_slice("log_probs")[row : row + 1][0]
        indices = handle.get_slice("indices")[row : row + 1][0]
        return self.blocks[index], log_probs, indices

    def __getstate__(self) -> dict:  # file handles do not pickle (DataLoader workers)
        return {**self.__dict__, "_handles": {}}


class CachedTrainData(L.LightningDataModule):
    """A TextDataModule whose training batches carry the cached teacher top-k."""

    def __init__(self, data, cache_dir: str | Path, temperature: float | None = None) -> None:
        super().__init__()
        self.data, self.cache_dir = data, Path(cache_dir)
        meta = read_meta(cache_dir)
        if temperature is not None and abs(meta["temperature"] - temperature) > 1e-6:
            raise ValueError(
                f"teacher cache {cache_dir} stores log-probs at temperature "
                f"{meta['temperature']}, the loss uses {temperature}; rebuild the cache or set "
                f"loss.temperature={meta['temperature']}"
            )
        self.meta = meta

    @property
    def blocks(self) -> dict[str, Tensor]:
        return self.data.blocks

    @property
    def tokenizer(self):
        return self.data.tokenizer

    def setup(self, stage: str | None = None) -> None:
        self.data.setup(stage)

    def train_dataloader(self) -> ResumableLoader:
        dataset = CachedTeacherDataset(self.data.blocks["train"], self.cache_dir)
        return ResumableLoader(dataset, self.data.batch_size, self.data.seed, self.data.num_workers)

    def val_dataloader(self):
        return self.data.val_dataloader()
