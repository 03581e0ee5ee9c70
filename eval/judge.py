"""Semantic similarity with the embedded MiniLM judge (all-MiniLM-L6-v2), loaded with plain
transformers: mean pooling over the attention mask, then L2 normalisation — what the
sentence-transformers pipeline for this model does (its modules.json: Transformer → Pooling
(mean) → Normalize)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor


class Judge:
    """Sentence embeddings (N, 384) and pairwise cosine similarity."""

    def __init__(self, path: str | Path | None = None, device: str = "cpu", max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            from distill.assets import locate

            path = locate("judge-embedder")
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).to(device).eval()
        self.device, self.max_length = device, max_length

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 32) -> Tensor:
        """Unit-norm embeddings, (len(texts), hidden)."""
        chunks = []
        for i in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[i : i + batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state  # (B, L, H)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)
            chunks.append(F.normalize(pooled, dim=-1))
        return torch.cat(chunks).cpu()

    def similarity(self, a: list[str], b: list[str]) -> list[float]:
        """cos(embed(a_i), embed(b_i)) for each aligned pair."""
        if len(a) != len(b):
            raise ValueError(f"similarity needs aligned lists, got {len(a)} and {len(b)} texts")
        return (self.embed(a) * self.embed(b)).sum(-1).tolist()
