"""`key=value` arguments for the commands that are not Hydra apps (eval, export)."""

from __future__ import annotations

from collections.abc import Sequence


def split_key_values(
    argv: Sequence[str], keys: Sequence[str], prefixes: Sequence[str]
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(this command's `key=value`s, the `<prefix>.knob=value` overrides grouped by prefix).

    Anything else is a SystemExit naming the argument and what is accepted.
    """
    accepted = ", ".join([*keys, *(f"{p}.<knob>" for p in prefixes)])
    args: dict[str, str] = {}
    overrides: dict[str, list[str]] = {p: [] for p in prefixes}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value, got '{arg}' (accepted: {accepted})")
        prefix = key.split(".", 1)[0]
        if key in keys:
            args[key] = value
        elif "." in key and prefix in overrides:
            overrides[prefix].append(arg)
        else:
            raise SystemExit(f"unknown argument '{key}'; use one of {accepted}")
    return args, overrides
