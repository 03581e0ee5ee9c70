"""serve's compact Llama vs transformers on the same saved checkpoint (loaded by the server's loader)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from distill.models.tiny import save_tiny_llama
from serve.engine import Engine
from serve.llama import AttentionBatch, KVPool, PrefillSpan
from serve.loader import load_model
from serve.model_args import ModelArgs
from serve.sampler import SamplingParams

VOCAB = 320
VARIANTS = {
    "tied-default-rope": {},
    "untied-llama3-rope": {
        "tie_word_embeddings": False,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "linear-rope-mha-bias": {
        "num_key_value_heads": 4,
        "attention_bias": True,
        "rope_parameters": {"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0},
    },
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    save_tiny_llama(out, vocab_size=VOCAB, initializer_range=0.1, **VARIANTS[request.param])
    ref = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return out, ref


def prefill_batch(lengths: list[int], starts: list[int] | None = None) -> AttentionBatch:
    """Several sequences prefilled together, each in its own contiguous slot range."""
    starts = starts or [0] * len(lengths)
    spans, positions, slots, row, base = [], [], [], 0, 0
    for n, s in zip(lengths, starts, strict=True):
        ctx = torch.arange(base, base + s + n)
        spans.append(PrefillSpan(row, n, ctx))
        positions.append(torch.arange(s, s + n))
        slots.append(ctx[s:])
        row, base = row + n, base + s + n
    return AttentionBatch(torch.cat(positions), torch.cat(slots), 0, None, spans, None)


def test_single_prompt_logits_match_transformers(checkpoint):
    path, ref = checkpoint
    model = load_model(path)
    ids = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(0))
    logits = model(ids, prefill_batch([37]), KVPool(model.args, 64))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    assert (logits - expected).abs().max() <= 1e-4


def test_ragged_batch_and_chunked_prefill_match_transformers(checkpoint):
    path, ref = checkpoint
    model = load_model(path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g) for n in (3, 29, 17)]
    kv = KVPool(model.args, 128)
    logits = model(torch.cat(prompts), prefill_batch([3, 29, 17]), kv)
    rows = torch.cumsum(torch.tensor([0, 3, 29]), 0)
    for p, start in zip(prompts, rows.tolist(), strict=True):
        with torch.no_grad():
            expected = ref(p[None]).logits[0]
        assert (logits[start : start + len(p)] - expected).abs().max() <= 1e-4
    # The second prompt's last 9 tokens as a chunk on top of its first 20 (already in the pool
    # at slots 3..22): same logits as the full forward pass.
    p = prompts[1]
    chunk = AttentionBatch(
        torch.arange(20, 29),
        torch.arange(23, 32),
        0,
        None,
        [PrefillSpan(0, 9, torch.arange(3, 32))],
        None,
    )
    with torch.no_grad():
        expected = ref(p[None]).logits[0, 20:]
    assert (model(p[20:], chunk, kv) - expected).abs().max() <= 1e-4


def test_engine_decode_logprobs_match_transformers(checkpoint):
    """Batched ragged decode through the engine: every chosen logprob and top-5 equals HF's."""
    path, ref = checkpoint
    engine = Engine.from_pretrained(path, num_blocks=32, block_size=8)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (4, 19, 11)]
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=True, top_logprobs=5)
    for prompt, (done,) in zip(prompts, engine.generate(prompts, params), strict=True):
        full = torch.tensor([prompt + done.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(ref(full).logits[0, len(prompt) - 1 : -1], dim=-1)
        assert done.token_ids == logp.argmax(-1).tolist()
        chosen = logp[torch.arange(12), torch.tensor(done.token_ids)]
        assert (chosen - torch.tensor(done.logprobs)).abs().max() <= 1e-4
        for row, top in zip(logp, done.top_logprobs, strict=True):
            ids = [t for t, _ in top]
            assert ids == row.topk(5).indices.tolist()
            assert (row[ids] - torch.tensor([v for _, v in top])).abs().max() <= 1e-4


def test_args_come_from_config_json(tmp_path):
    save_tiny_llama(tmp_path, vocab_size=VOCAB, num_hidden_layers=3)
    args = ModelArgs.from_dir(tmp_path)
    assert (args.num_layers, args.num_kv_heads, args.head_dim, args.vocab_size) == (3, 2, 16, VOCAB)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "gpt2"
    with pytest.raises(ValueError, match="not a Llama-family"):
        ModelArgs.from_config(config)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "missing")


def test_serve_is_a_leaf_package():
    """Importing the engine pulls in neither distill/eval nor transformers/lightning/hydra."""
    import subprocess
    import sys

    code = (
        "import sys, serve.engine; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'distill', 'eval', 'transformers', 'lightning', 'hydra'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
