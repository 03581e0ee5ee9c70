"""INT8 exports (compressed-tensors) load into serve's runtime on the fbgemm int8 kernels."""

from __future__ import annotations

import pytest
import torch

from distill.export import export, load_export
from distill.quant import Int8Scheme
from serve.engine import Engine
from serve.int8 import Int8Embedding, Int8Linear
from serve.llama import AttentionBatch, KVPool, PrefillSpan
from serve.loader import load_model
from serve.sampler import SamplingParams


@pytest.mark.parametrize("embeddings", [True, False])
def test_int8_export_matches_transformers_on_the_same_kernels(
    tmp_path, tiny_teacher_dir, embeddings
):
    out = export(tiny_teacher_dir, tmp_path / "int8", quant="int8", scheme=Int8Scheme(embeddings))
    model = load_model(out)
    assert isinstance(model.layers[0].qkv, Int8Linear) and model.layers[0].qkv.is_fast
    assert isinstance(model.embed, Int8Embedding) == embeddings
    assert isinstance(model.lm_head, Int8Linear) == embeddings  # tied head on the int8 table
    ref = load_export(out)  # transformers + the same int8 modules, unfused
    ids = torch.randint(0, 49152, (24,), generator=torch.Generator().manual_seed(0))
    n = len(ids)
    batch = AttentionBatch(
        torch.arange(n),
        torch.arange(n),
        0,
        None,
        [PrefillSpan(0, n, torch.arange(n))],
        None,
    )
    logits = model(ids, batch, KVPool(model.args, 32))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    assert (logits - expected).abs().max() <= 1e-4
    engine = Engine(model, num_blocks=16)
    (done,) = engine.generate([ids.tolist()], SamplingParams(max_tokens=4, temperature=0))[0]
    assert len(done.token_ids) >= 1
