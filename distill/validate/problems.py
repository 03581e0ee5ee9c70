"""One line per bad knob ('<knob>=<value>: <what is allowed>'), raised together as ConfigError."""

from __future__ import annotations

import math


class ConfigError(ValueError):
    """Invalid settings, found before anything heavy ran. `problems`: one line per knob."""

    def __init__(self, command: str, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(
            f"{command}: {len(problems)} invalid setting(s), nothing was run:\n{lines}"
        )


class Problems:
    """Collects one line per bad knob: '<knob>=<value>: <what is allowed>'."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, knob: str, value, allowed: str) -> None:
        self.lines.append(f"{knob}={_show(value)}: {allowed}")

    def integer(
        self, knob: str, value, lo: int | None = None, hi: int | None = None, why=""
    ) -> bool:
        """An int (not a bool) in [lo, hi]; `why` names where a bound comes from."""
        ok = is_int(value) and (lo is None or value >= lo) and (hi is None or value <= hi)
        if not ok:
            self.add(knob, value, f"must be an integer {_range(lo, hi, False, False)}{why}")
        return ok

    def number(
        self, knob: str, value, lo=None, hi=None, lo_open=False, hi_open=False, why=""
    ) -> bool:
        """A finite int or float in the range (open or closed at each end)."""
        ok = is_number(value)
        if ok and lo is not None:
            ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value < hi if hi_open else value <= hi
        if not ok:
            self.add(knob, value, f"must be a number {_range(lo, hi, lo_open, hi_open)}{why}")
        return ok

    def choice(self, knob: str, value, choices) -> bool:
        ok = value in tuple(choices)
        if not ok:
            self.add(knob, value, f"must be one of {list(choices)}")
        return ok

    def boolean(self, knob: str, value) -> bool:
        ok = isinstance(value, bool)
        if not ok:
            self.add(knob, value, "must be true or false")
        return ok

    def raise_if_any(self, command: str) -> None:
        if self.lines:
            raise ConfigError(command, self.lines)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _show(value) -> str:
    return repr(plain(value))


def plain(value):
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _range(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '≥'} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '≤'} {hi}"
    return ""


def get_knob(cfg, key: str, default=None):
    return cfg.get(key, default) if cfg is not None else default


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
