"""Type and range checks for constructor arguments, with messages that name the binding.

Components call these first thing in `__init__`, where gin reports which configurable was
being built; the message names `Owner.param`, the value given and what is accepted.
"""

from __future__ import annotations

import math
import numbers


def integer(owner: str, name: str, value, *, at_least: int | None = None) -> int:
    """`value` as an int; bools, floats and strings are refused."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or (at_least is not None and value < at_least):
        bound = f" >= {at_least}" if at_least is not None else ""
        raise ValueError(f"{owner}.{name} must be an integer{bound}, got {value!r}; fix the "
                         f"binding {owner}.{name}")
    return int(value)


def number(owner: str, name: str, value, *, low: float | None = None,
           high: float | None = None, low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a finite float within [low, high] (open ends where asked)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        where = f" in {lo or '(-inf'}, {hi or 'inf)'}" if lo or hi else ""
        raise ValueError(f"{owner}.{name} must be a finite number{where}, got {value!r}; fix "
                         f"the binding {owner}.{name}")
    return float(value)
