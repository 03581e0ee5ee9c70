"""Compact Llama-family decoder (Llama, SmolLM2/3, Qwen2, Mistral) that runs over a paged KV cache.

One forward call takes a flat, unpadded list of tokens from many sequences — decode tokens
(one per sequence) first, then prefill chunks — so the linear layers always run on exactly
the tokens that need computing. Only attention looks at sequences: each token attends over
exactly the keys it sees (`serve.invariant.attend_rows`), so its numerics never depend on its
neighbours in the step, its prompt's chunking or a cached prefix; fp32 linears go through
`serve.invariant` for the same reason. Layers with a sliding window (Mistral, Qwen2 / SmolLM3
with `use_sliding_window`) see only the keys still inside it; NoPE layers (SmolLM3) skip RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from serve import invariant
from serve.model_args import ModelArgs


@dataclass
class PrefillSpan:
    """One sequence's prefill chunk inside the flat token list."""

    token_start: int  # index of the chunk's first token in the flat list
    num_tokens: int  # T
    context_slots: torch.Tensor  # [L] KV slots of positions 0..L-1, L = start_pos + T


@dataclass
class AttentionBatch:
    """Where one forward step's tokens sit in the KV pool and what they attend to."""

    positions: torch.Tensor  # [N] position of each token in its sequence
    slots: torch.Tensor  # [N] KV slot each token's key/value is written to
    num_decode: int  # B: the first B tokens are single decode tokens of B sequences
    decode_slots: torch.Tensor | None  # [B, L] slots of positions 0..L-1, padded with slot 0
    prefills: list[PrefillSpan]
    logit_rows: torch.Tensor | None  # [S] tokens whose logits are wanted; None = all
    # per attention window: each row's key range for the compiled kernel (serve.invariant)
    row_ranges: dict = field(default_factory=dict, repr=False, compare=False)


def rope_table(args: ModelArgs) -> torch.Tensor:
    """e^{iθ} of every position's RoPE angles, complex [max_position_embeddings, head_dim/2]."""
    positions = torch.arange(args.max_position_embeddings, dtype=torch.float32)
    freqs = torch.outer(positions, args.inv_freq())
    return torch.complex(freqs.cos(), freqs.sin())


def interleave_rope_rows(head_dim: int, num_heads: int) -> torch.Tensor:
    """Row order that turns HF's rotate-half q/k layout (pairs i, i + hd/2) into adjacent pairs.

    The loader permutes q and k projection rows with it, so RoPE becomes one complex multiply
    on (even, odd) pairs. q·k is unchanged because q and k are permuted alike; values are not.
    """
    half = torch.arange(head_dim // 2)
    per_head = torch.stack((half, half + head_dim // 2), dim=1).flatten()  # [hd]
    return (torch.arange(num_heads)[:, None] * head_dim + per_head).flatten()


class KVPool:
    """Preallocated keys and values of all layers, `[layers, slots, 2 * kv_heads, head_dim]`.

    Keys and values of a token sit side by side (heads 0..K-1 keys, K..2K-1 values), so one
    write and one gather per layer move both; shapes never change.
    """

    def __init__(self, args: ModelArgs, num_slots: int, dtype: torch.dtype = torch.float32):
        # Zeros, not empty: padded decode rows read slot 0 under a mask, and 0 * NaN would leak.
        self.kv = torch.zeros(
            args.num_layers, num_slots, 2 * args.num_kv_heads, args.head_dim, dtype=dtype
        )

    @property
    def bytes_per_slot(self) -> int:
        return self.kv[:, 0].numel() * self.kv.element_size()


class Block(nn.Module):
    """One decoder layer with fused q/k/v and gate/up projections (fewer, larger GEMVs)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        d, hd = args.hidden_size, args.head_dim
        self.q_size, self.kv_size = args.num_heads * hd, args.num_kv_heads * hd
        self.attn_norm = nn.Parameter(torch.ones(d))
        self.mlp_norm = nn.Parameter(torch.ones(d))
        self.qkv = nn.Linear(d, self.q_size + 2 * self.kv_size, bias=args.qkv_bias)
        self.o = nn.Linear(self.q_size, d, bias=args.o_bias)
        self.gate_up = nn.Linear(d, 2 * args.intermediate_size, bias=args.mlp_bias)
        self.down = nn.Linear(args.intermediate_size, d, bias=args.mlp_bias)


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_layers))
        self.norm = nn.Parameter(torch.ones(args.hidden_size))
        self.lm_head = (
            None
            if args.tie_word_embeddings
            else nn.Linear(args.hidden_size, args.vocab_size, False)
        )
        self.register_buffer("rope", rope_table(args), persistent=False)

    def pack_linears(self) -> None:
        """Swap fp32 CPU linears for oneDNN-prepacked ones (`serve.invariant.PackedLinear`,
        ~2× faster decode GEMMs, same batch invariance) where this CPU allows; a tied fp32 head
        gets a packed copy of the embedding table. INT8 and other dtypes are left as they are."""
        for name, module in list(self.named_modules()):
            if type(module) is nn.Linear and invariant.packable(module.weight):
                parent, _, child = name.rpartition(".")
                packed = invariant.PackedLinear(module.weight, module.bias)
                setattr(self.get_submodule(parent) if parent else self, child, packed)
        if (
            self.lm_head is None
            and isinstance(self.embed, nn.Embedding)
            and invariant.packable(self.embed.weight)
        ):
            self.lm_head = invariant.PackedLinear(self.embed.weight)

    @staticmethod
    def _rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """RoPE on adjacent pairs (see `interleave_rope_rows`); x [N, heads, hd], rot [N, 1, hd/2]."""
        pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))  # [N, heads, hd/2]
        return torch.view_as_real(pairs * rot).flatten(-2)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        batch: AttentionBatch,
        kv: KVPool,
        input_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [N] → logits [S, vocab] for `batch.logit_rows` (all N when None).

        `input_embeds` [N, d] replaces the token embeddings (a VLM splices image features in).
        Writes each token's key/value into `kv` at `batch.slots`.
        """
        a = self.args
        n = tokens.shape[0]
        h = self.embed(tokens) if input_embeds is None else input_embeds  # [N, d]
        rot = self.rope[batch.positions].unsqueeze(1)  # [N, 1, hd/2] complex
        eps = a.rms_norm_eps
        for i, layer in enumerate(self.layers):
            x = F.rms_norm(h, (a.hidden_size,), layer.attn_norm, eps)
            qkv = invariant.apply(layer.qkv, x).view(
                n, a.num_heads + 2 * a.num_kv_heads, a.head_dim
            )
            qk = qkv[:, : a.num_heads + a.num_kv_heads]
            if a.rope_layers[i]:
                qk = self._rope(qk, rot)  # one call for q and k
            q = qk[:, : a.num_heads]
            kv.kv[i].index_copy_(
                0, batch.slots, torch.cat((qk[:, a.num_heads :], qkv[:, -a.num_kv_heads :]), 1)
            )
            attn = invariant.attend_rows(q, kv.kv[i], batch, a.layer_windows[i])  # [N, H * hd]
            h = h + invariant.apply(layer.o, attn)
            x = F.rms_norm(h, (a.hidden_size,), layer.mlp_norm, eps)
            gate, up = invariant.apply(layer.gate_up, x).chunk(2, dim=-1)
            h = h + invariant.apply(layer.down, F.silu(gate) * up)
        if batch.logit_rows is not None:
            h = h[batch.logit_rows]
        h = F.rms_norm(h, (a.hidden_size,), self.norm, eps)
        if self.lm_head is not None:  # untied, packed, or an int8 head over the int8 table
            return invariant.apply(self.lm_head, h)  # [S, vocab]
        return invariant.linear(h, self.embed.weight)
