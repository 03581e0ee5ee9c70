"""Tiny random Llama models built from configs in code, for tests and smoke runs."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama_config(
    vocab_size: int = 49152,
    hidden_size: int = 64,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = True,
    **extra,
):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        **extra,
    )


def save_tiny_llama(out_dir: str | Path, tokenizer=None, seed: int = 0, **config_kwargs) -> Path:
    """Save a random tiny Llama (and `tokenizer`, whose vocab size it adopts) to `out_dir`."""
    from transformers import LlamaForCausalLM

    if tokenizer is not None:
        config_kwargs.setdefault("vocab_size", len(tokenizer))
        config_kwargs.setdefault("bos_token_id", tokenizer.bos_token_id)
        config_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_kwargs))
    out = Path(out_dir)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
