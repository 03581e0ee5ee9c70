"""Importance scores keep the units that matter: hand-constructed neurons, heads and channels."""

from __future__ import annotations

import torch

from distill.prune.importance import calibration_scores
from distill.prune.plan import Dims, make_plan, select_heads, top_units

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def test_top_units_keeps_highest_in_original_order():
    assert top_units(torch.tensor([0.3, 0.9, 0.1, 0.5]), 2) == [1, 3]


def test_dead_and_loud_mlp_neurons(tiny_llama):
    mlp = tiny_llama.model.layers[1].mlp
    dead, loud = [3, 17, 40], [5, 99]
    with torch.no_grad():
        mlp.gate_proj.weight[dead] = 0  # silu(0) * up = 0: no activation at down_proj input
        mlp.up_proj.weight[loud] *= 50
    scores = calibration_scores(tiny_llama, [IDS], progress=False)["neurons"]  # (L, F)
    assert scores.shape == (4, 128)
    assert (scores[1, dead] == 0).all()
    keep = top_units(scores[1], 8)
    assert set(loud) <= set(keep) and not set(dead) & set(keep)


def test_heads_of_a_silenced_kv_group_score_zero_and_are_pruned_whole(tiny_llama):
    # 4 query heads over 2 KV heads (head_dim 16): heads 2, 3 read KV head 1.
    attn = tiny_llama.model.layers[2].self_attn
    with torch.no_grad():
        attn.v_proj.weight[16:32] = 0
    scores = calibration_scores(tiny_llama, [IDS], progress=False)
    assert scores["heads"].shape == (4, 4)
    assert (scores["heads"][2, 2:] == 0).all() and (scores["heads"][2, :2] > 0).all()
    teacher = Dims.of(tiny_llama.config)
    plan = make_plan(
        scores, teacher, teacher.replace(num_attention_heads=2, num_key_value_heads=1), 16
    )
    assert plan.kv_heads[2] == [0] and plan.heads[2] == [0, 1]


def test_select_heads_keeps_query_heads_per_group_consistent():
    # 8 heads over 2 KV groups of 4.
    scores = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.5, 0.5, 0.6, 0.4])
    assert select_heads(scores, 2, 4, 2) == ([1, 3, 5, 6], [0, 1])  # 2 per group, both groups
    assert select_heads(scores, 2, 2, 1) == ([1, 3], [0])  # group 0's best two: 1.2 > 1.1
    assert select_heads(scores, 2, 4, 1) == ([4, 5, 6, 7], [1])  # whole groups: 2.0 > 1.5


def test_channels_from_norm_outputs(tiny_llama):
    norms = [
        m
        for layer in tiny_llama.model.layers
        for m in (layer.input_layernorm, layer.post_attention_layernorm)
    ]
    with torch.no_grad():
        for norm in [*norms, tiny_llama.model.norm]:
            norm.weight[7] = 0  # channel 7 is zero in every norm output
            norm.weight[42] = 20
    scores = calibration_scores(tiny_llama, [IDS], progress=False)["channels"]  # (d,)
    assert scores[7] == 0 and scores.argmax() == 42
    keep = top_units(scores, 32)
    assert 42 in keep and 7 not in keep
