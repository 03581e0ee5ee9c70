"""`python -m distill <command>`: the one CLI. Each command's module is imported only when it runs,
so `serve` never loads the training stack."""

from __future__ import annotations

import importlib
import logging
import sys

# command -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "assets": ("distill.commands.assets", "main", "install | list the embedded default assets"),
    "train": ("distill.train", "main", "prune → distill → (qat) → eval → export, Hydra-configured"),
    "cache-teacher": (
        "distill.commands.cache_teacher",
        "main",
        "top-k teacher log-probs for the training set (offline KD)",
    ),
    "prune": ("distill.commands.prune", "main", "carve the student from the teacher (no training)"),
    "eval": ("distill.commands.eval", "main", "student vs teacher: coherence, VQA, speed → report"),
    "export": (
        "distill.commands.export",
        "main",
        "HF dir + serving.json (quant=none|int8: compressed-tensors INT8)",
    ),
    "serve": ("distill.commands.serve", "main", "OpenAI-compatible server for an export dir"),
    "batch": ("distill.commands.batch", "main", "run an OpenAI batch file offline (resumable)"),
}


def usage() -> str:
    lines = ["usage: python -m distill <command> [args…]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Hydra commands take key=value overrides, e.g. trainer.max_steps=20 logger=csv."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from distill.quiet import quiet_third_party

    quiet_third_party()
    module, func, _ = COMMANDS[name]
    sys.argv = [f"distill {name}", *rest]  # Hydra reads sys.argv
    try:
        result = getattr(importlib.import_module(module), func)(rest)
    except ValueError as e:
        from distill.validate import ConfigError  # lazily: `serve` never imports it

        if not isinstance(e, ConfigError):
            raise
        print(f"error: {e}", file=sys.stderr)  # bad knobs, found before anything heavy ran
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
