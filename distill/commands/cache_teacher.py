"""`python -m distill cache-teacher`: the teacher's top-k log-probs for the training blocks, on disk.

Same Hydra recipe and overrides as `train` (defaults to `loss=topk_cached`); the cache lands in
`loss.cache`, and `python -m distill train loss=topk_cached` with the same data settings then
trains from it with no teacher in memory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from distill.data.teacher_cache import write_cache
from distill.models.loading import load_causal_lm, load_tokenizer, resolve_device

log = logging.getLogger(__name__)


def cache(cfg: DictConfig) -> dict:
    """Load teacher and data as `train` does and write the cache; returns its meta."""
    from distill.kd_setup import build_datamodule
    from distill.validate import check_recipe

    check_recipe(cfg, "cache-teacher")  # every knob (top_k vs the vocabulary, …) before loading
    out_dir = Path(cfg.loss.cache)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.teacher.name_or_path)
    device = resolve_device(cfg.teacher.device)
    teacher = load_causal_lm(
        cfg.teacher.name_or_path, cfg.teacher.dtype, device, cfg.teacher.load_in_8bit
    )
    data = build_datamodule(cfg, tokenizer, out_dir)
    return build_cache(cfg, teacher, tokenizer, data.blocks["train"])


def build_cache(cfg: DictConfig, teacher, tokenizer, train_blocks: torch.Tensor) -> dict:
    """Write the teacher's top-k cache of `train_blocks` (N, S) to `loss.cache`; print its size.
    Shared by this command and the train pipeline's `cache` stage."""
    out_dir = Path(cfg.loss.cache)
    meta = write_cache(
        teacher,
        train_blocks,
        out_dir,
        k=cfg.loss.top_k,
        temperature=cfg.loss.temperature,
        batch_size=cfg.eval_batch_size,
        vocab=len(tokenizer),
    )
    tokens = meta["num_blocks"] * meta["seq_len"]
    print(
        f"teacher cache: {out_dir}  {tokens:,} tokens  top-k={meta['k']}  "
        f"{meta['bytes_per_token']:.1f} bytes/token on disk "
        f"({meta['payload_bytes_per_token']} payload; dense fp16 logits would be "
        f"{2 * meta['vocab_size']:,})"
    )
    return meta


def main(argv: list[str]) -> int:
    from distill.hydra_app import run_hydra_app

    overrides = list(argv)
    if not any(a.startswith("loss=") for a in overrides):
        overrides.insert(0, "loss=topk_cached")
    if not any(a.startswith("hydra.run.dir=") for a in overrides):
        overrides.append("hydra.run.dir=${loss.cache}")  # config + log sit with the shards

    return run_hydra_app(lambda cfg, run_dir: cache(cfg), overrides)
