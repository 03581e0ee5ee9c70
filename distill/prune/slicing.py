"""Slice a teacher into a smaller model of its own class from a PrunePlan (or count its size)."""

from __future__ import annotations

import copy

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import Tensor, nn

from distill.prune.adapters import DecoderAdapter, adapter_for
from distill.prune.plan import DIM_NAMES, Dims, PrunePlan, head_dim_of


def _resized_config(config, dims: Dims, layers: list[int] | None = None):
    """`config` with `dims`; per-layer lists keep the entries of `layers` (default: the first)."""
    layers = list(range(dims.num_hidden_layers)) if layers is None else layers
    new = copy.deepcopy(config)
    for name in DIM_NAMES:
        setattr(new, name, getattr(dims, name))
    # head_dim stays the teacher's (RoPE, q/k widths); set it explicitly since the config's
    # default hidden_size // num_attention_heads no longer holds once either is pruned.
    new.head_dim = head_dim_of(config)
    for per_layer in adapter_for(config).per_layer_config:
        values = getattr(new, per_layer, None)
        if isinstance(values, list) and len(values) == config.num_hidden_layers:
            setattr(new, per_layer, [values[i] for i in layers])
    return new


def config_problem(config, dims: Dims) -> str | None:
    """Why the family's own config validation rejects `dims` (None when it accepts them).

    E.g. LlamaConfig requires hidden_size % num_attention_heads == 0 even with head_dim set.
    """
    validate = getattr(_resized_config(config, dims), "validate", None)
    try:
        if validate is not None:
            validate()
    except (ValueError, StrictDataclassError) as error:
        return str(error).strip().splitlines()[-1].strip()
    return None


def student_config(config, plan: PrunePlan):
    """The teacher's config with the student's dims; head_dim pinned, per-layer lists sliced."""
    problem = config_problem(config, plan.dims)
    if problem:
        raise ValueError(f"student dims {plan.dims} are invalid for {config.model_type}: {problem}")
    return _resized_config(config, plan.dims, plan.layers)


def _head_rows(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + j for h in heads for j in range(head_dim)]


def _slice(tensor: Tensor, roles, index: dict[str, list[int]]) -> Tensor:
    for axis, role in enumerate(roles):
        if role is not None:
            tensor = tensor.index_select(axis, torch.tensor(index[role], device=tensor.device))
    return tensor


def _layer_of(name: str, adapter: DecoderAdapter) -> tuple[int, str] | None:
    if not name.startswith(adapter.layer_prefix):
        return None
    index, rest = name[len(adapter.layer_prefix) :].split(".", 1)
    return int(index), rest


def sliced_state_dict(model: nn.Module, plan: PrunePlan) -> dict[str, Tensor]:
    """The student's state dict: kept layers renumbered, every role axis indexed by the plan."""
    adapter = adapter_for(model)
    new_index = {old: new for new, old in enumerate(plan.layers)}
    state = {}
    for name, tensor in model.state_dict().items():
        roles = adapter.roles(name)
        index = {"hidden": plan.channels}
        layer = _layer_of(name, adapter)
        if layer is not None:
            old, rest = layer
            if old not in new_index:
                continue
            i = new_index[old]
            name = f"{adapter.layer_prefix}{i}.{rest}"
            index |= {
                "ffn": plan.neurons[i],
                "q": _head_rows(plan.heads[i], plan.head_dim),
                "kv": _head_rows(plan.kv_heads[i], plan.head_dim),
            }
        state[name] = _slice(tensor, roles, index) if roles else tensor
    return state


def slice_model(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """A new model of the teacher's class with the plan's dims and the teacher's kept weights."""
    config = student_config(model.config, plan)
    student = type(model)(config)  # fresh modules: attention layer_idx renumbered, RoPE rebuilt
    state = sliced_state_dict(model, plan)
    expected = student.state_dict()
    for name, tensor in state.items():
        if name in expected and expected[name].shape != tensor.shape:
            raise RuntimeError(
                f"{name}: sliced to {tuple(tensor.shape)} but the student expects "
                f"{tuple(expected[name].shape)}; the family adapter lacks a role for this weight"
            )
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"slicing left missing={missing} unexpected={unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    if getattr(model, "generation_config", None) is not None:  # a vision tower has none
        student.generation_config = copy.deepcopy(model.generation_config)
    param = next(model.parameters())
    return student.to(device=param.device, dtype=param.dtype)


def parameters_for(model: nn.Module, dims: Dims) -> int:
    """Exact parameter count of the student `dims` would give, without building it.

    Each teacher parameter (tied ones once) with its role axes resized; layer-0 weights × layers.
    """
    adapter = adapter_for(model)
    head_dim = head_dim_of(model.config)
    size = {
        None: None,
        "hidden": dims.hidden_size,
        "ffn": dims.intermediate_size,
        "q": dims.num_attention_heads * head_dim,
        "kv": dims.num_key_value_heads * head_dim,
    }
    total = 0
    for name, param in model.named_parameters():
        layer = _layer_of(name, adapter)
        if layer is not None and layer[0] != 0:
            continue
        roles = adapter.roles(name) or (None,) * param.dim()
        numel = 1
        for n, role in zip(param.shape, roles, strict=True):
            numel *= n if role is None else size[role]
        total += numel * (dims.num_hidden_layers if layer is not None else 1)
    return total
