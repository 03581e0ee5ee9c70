"""Pruning an Idefics3 vision-language model, part by part, through the family adapters.

- vision tower: the `idefics3_vision` adapter (layers, heads + residual channels, MLP neurons),
  importance from the tower's own forward on calibration images;
- language model: the `llama` adapter on a view that *is* the VLM's body and head, importance
  from the LM's forward on the VLM's inputs (image features merged into the prompt), shape
  explicit or searched to a parameter budget as for text models;
- connector: its output rows follow the LM's kept channels, its input columns the tower's kept
  channels in each of the scale_factor² pixel-shuffle blocks.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import Tensor, nn

from distill.data.vqa import trim_padding
from distill.models.loading import count_parameters
from distill.prune.importance import calibration_scores
from distill.prune.plan import DIM_NAMES, Dims, PrunePlan, head_dim_of, make_plan
from distill.prune.search import SearchSpace, search_shape
from distill.prune.slicing import slice_model

log = logging.getLogger(__name__)


def language_model_view(vlm: nn.Module) -> nn.Module:
    """A causal LM of the text config's class whose body and head are the VLM's own modules."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(copy.deepcopy(vlm.config.text_config))
    lm.model, lm.lm_head = vlm.model.text_model, vlm.lm_head
    return lm


@torch.no_grad()
def lm_inputs(vlm: nn.Module, batches: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """What the LM sees inside the VLM: prompt embeddings with image features merged in."""
    out = []
    for b in batches:
        b = trim_padding(b)
        embeds = vlm.model.get_input_embeddings()(b["input_ids"])
        features = vlm.model.get_image_features(b["pixel_values"]).pooler_output
        merged = vlm.model.inputs_merger(b["input_ids"], embeds, torch.cat(features))
        out.append({"inputs_embeds": merged, "attention_mask": b["attention_mask"]})
    return out


def vision_dims(config, targets: dict) -> Dims:
    """The tower's student shape; hidden_size must stay heads × the teacher's head_dim."""
    targets = {k: v for k, v in targets.items() if v is not None}  # None = the teacher's
    dims = Dims.of(config).replace(**{k: v for k, v in targets.items() if k in DIM_NAMES})
    head_dim = head_dim_of(config)
    heads = dims.num_attention_heads
    if targets.get("hidden_size") and not targets.get("num_attention_heads"):
        heads = dims.hidden_size // head_dim  # width given: drop whole heads to match
    dims = dims.replace(num_attention_heads=heads, num_key_value_heads=heads)
    if dims.hidden_size != heads * head_dim:
        raise ValueError(
            f"student.vision: hidden_size={dims.hidden_size} must be num_attention_heads × "
            f"{head_dim} (the tower's head_dim; its attention width is its residual width)"
        )
    dims.check_within(Dims.of(config))
    return dims


def connector_columns(plan: PrunePlan, width: int, scale_factor: int) -> list[int]:
    """Connector input columns kept: the tower's kept channels in each pixel-shuffle block."""
    return [k * width + c for k in range(scale_factor**2) for c in plan.channels]


def assemble(teacher: nn.Module, vision: nn.Module, lm: nn.Module, connector: Tensor):
    """An Idefics3 of the teacher's class from a sliced tower, LM and connector weight."""
    config = copy.deepcopy(teacher.config)
    config.text_config = copy.deepcopy(lm.config)
    config.vision_config = copy.deepcopy(vision.config)
    student = type(teacher)(config)
    student.model.vision_model.load_state_dict(vision.state_dict())
    student.model.text_model.load_state_dict(lm.model.state_dict())
    student.model.connector.modality_projection.proj.weight.data.copy_(connector)
    if config.tie_word_embeddings:
        student.tie_weights()
    else:
        student.lm_head.load_state_dict(lm.lm_head.state_dict())
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.to(next(teacher.parameters()).dtype)


def prune_vlm(
    teacher: nn.Module,
    batches: list[dict[str, Tensor]],
    vision_targets: dict,
    lm_targets: dict,
    params: float | None = None,
    search: dict | None = None,
) -> tuple[nn.Module, dict]:
    """(student VLM, record). `params`: whole-model budget as a fraction of the teacher; the LM
    gets what the pruned tower and connector leave (searched, `lm_targets` pinned)."""
    teacher.eval()
    tower = teacher.model.vision_model
    v_scores = calibration_scores(
        tower, [{"pixel_values": b["pixel_values"][:, 0]} for b in batches]
    )
    v_dims = vision_dims(tower.config, vision_targets)
    v_plan = make_plan(v_scores, Dims.of(tower.config), v_dims, head_dim_of(tower.config))
    vision = slice_model(tower, v_plan)

    lm_view = language_model_view(teacher)
    l_scores = calibration_scores(lm_view, lm_inputs(teacher, batches))
    pinned = {k: int(v) for k, v in lm_targets.items() if k in DIM_NAMES and v}
    if params is None:
        l_dims = Dims.of(lm_view.config).replace(**pinned)
    else:
        s = teacher.config.scale_factor
        connector_max = v_dims.hidden_size * s * s * lm_view.config.hidden_size  # LM width kept
        spare = params * count_parameters(teacher) - count_parameters(vision) - connector_max
        fraction = spare / count_parameters(lm_view)
        l_dims = search_shape(lm_view, l_scores, fraction, SearchSpace.from_dict(search or {}),
                              pinned)[0].dims  # fmt: skip
    l_plan = make_plan(l_scores, Dims.of(lm_view.config), l_dims, head_dim_of(lm_view.config))
    lm = slice_model(lm_view, l_plan)

    proj = teacher.model.connector.modality_projection.proj.weight  # [d_lm, s² · d_vision]
    cols = connector_columns(v_plan, tower.config.hidden_size, teacher.config.scale_factor)
    connector = proj.detach()[l_plan.channels][:, cols]
    student = assemble(teacher, vision, lm, connector)
    record = {
        "vision": {"dims": v_dims.__dict__, "kept_layers": v_plan.layers},
        "lm": {"dims": l_dims.__dict__, "kept_layers": l_plan.layers},
        "lm_channels": l_plan.channels,
        "vision_channels": v_plan.channels,
        "teacher_parameters": count_parameters(teacher),
        "student_parameters": count_parameters(student),
    }
    record["fraction"] = record["student_parameters"] / record["teacher_parameters"]
    log.info("prune vlm: %s", {k: v for k, v in record.items() if "channels" not in k})
    return student, record
