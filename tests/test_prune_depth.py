import torch

from distill.prune.depth import drop_layers, layers_to_keep
from distill.prune.importance import layer_importance


def test_layers_to_keep_drops_lowest_importance():
    importance = torch.tensor([0.5, 0.01, 0.3, 0.02, 0.9])
    assert layers_to_keep(importance, 3) == [0, 2, 4]


def test_identity_layer_has_zero_importance(tiny_llama):
    # Zero a layer's output projections: its residual stream passes through unchanged.
    layer = tiny_llama.model.layers[2]
    torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
    torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    ids = torch.randint(0, 256, (2, 16))
    scores = layer_importance(tiny_llama, [ids], progress=False)
    assert scores.shape == (4,)
    assert scores[2].item() < 1e-6
    assert (scores[[0, 1, 3]] > 1e-4).all()
    assert layers_to_keep(scores, 3) == [0, 1, 3]


def test_drop_layers_yields_valid_smaller_model_with_copied_weights(tiny_llama):
    student = drop_layers(tiny_llama, [0, 3])
    assert student.config.num_hidden_layers == 2
    torch.testing.assert_close(
        student.model.layers[1].mlp.up_proj.weight, tiny_llama.model.layers[3].mlp.up_proj.weight
    )
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    ids = torch.randint(0, 256, (1, 8))
    assert student(input_ids=ids).logits.shape == (1, 8, 256)
    # Dropping a layer that is an identity map leaves the logits unchanged.
    layer = tiny_llama.model.layers[1]
    torch.nn.init.zeros_(layer.self_attn.o_proj.weight)
    torch.nn.init.zeros_(layer.mlp.down_proj.weight)
    pruned = drop_layers(tiny_llama, [0, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, tiny_llama(input_ids=ids).logits)
