"""`python -m distill export checkpoint=<dir> quant=none|int8 output_dir=<dir>`

Writes a servable HF directory: config, safetensors (INT8 in compressed-tensors format),
tokenizer/processor with the chat template, serving.json (see serve/export_format.py).

Other keys: tokenizer=<dir> (when the checkpoint has none), quant.<knob>=… (scheme for
int8 of an fp32 checkpoint, configs/quant/ptq-int8.yaml: embeddings, lm_head, exclude) and
serving.<knob>=… (configs/serve/serving.yaml: model, context_length, pricing.*, limits.*).
"""

from __future__ import annotations

from omegaconf import OmegaConf

from distill.commands.keyvalue import split_key_values
from distill.paths import configs_dir

ARGS = ("checkpoint", "quant", "output_dir", "tokenizer")


def parse_args(argv: list[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """(this command's args, quant.* overrides, serving.* overrides), prefixes stripped."""
    args, overrides = split_key_values(argv, ARGS, ["quant", "serving"])
    quant_overrides = [a.removeprefix("quant.") for a in overrides["quant"]]
    serving_overrides = [a.removeprefix("serving.") for a in overrides["serving"]]
    for required in ("checkpoint", "output_dir"):
        if required not in args:
            raise SystemExit(f"export needs {required}=<dir>")
    return args, quant_overrides, serving_overrides


def main(argv: list[str]) -> int:
    from distill.export import export
    from distill.quant import build_scheme
    from distill.validate import check_export

    args, quant_overrides, serving_overrides = parse_args(argv)
    scheme_cfg = OmegaConf.merge(
        OmegaConf.load(configs_dir() / "quant" / "ptq-int8.yaml"),
        OmegaConf.from_dotlist(quant_overrides),
    )
    serving_cfg = OmegaConf.merge(
        OmegaConf.load(configs_dir() / "serve" / "serving.yaml"),
        OmegaConf.from_dotlist(serving_overrides),
    )
    check_export(args.get("quant", "none"), scheme_cfg, serving_cfg)  # before the model loads
    try:
        out = export(
            args["checkpoint"],
            args["output_dir"],
            quant=args.get("quant", "none"),
            scheme=build_scheme(scheme_cfg),
            serving=OmegaConf.to_container(serving_cfg, resolve=True),
            tokenizer=args.get("tokenizer"),
        )
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"export: {e}") from e
    print(f"exported {out}")
    return 0
