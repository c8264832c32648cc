"""Component registry over gin.

Every swappable part registers under a kind and becomes available in gin files as
`@<kind>.<Name>`. Registration uses `gin.register` (not `gin.configurable`), so a
component built directly in Python takes no hidden global bindings.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import gin

KINDS = (
    "encoders",
    "dynamics",
    "heads",
    "models",
    "planners",
    "replay",
    "losses",
    "optim",
    "resets",
    "agents",
    "envs",
    "accel",
)

_TABLE: dict[str, dict[str, Any]] = {k: {} for k in KINDS}


def register(kind: str, name: str | None = None) -> Callable[[Any], Any]:
    """Record `obj` under `kind` and expose it to gin as `@<kind>.<name>`."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")

    def decorate(obj: Any) -> Any:
        key = name or obj.__name__
        if key in _TABLE[kind]:
            raise ValueError(f"{kind}.{key} registered twice")
        _TABLE[kind][key] = obj
        gin.register(key, module=kind)(obj)
        return obj

    return decorate


def registered(kind: str | None = None) -> dict[str, Any]:
    """The registered objects of one kind (or `{"kind.Name": obj}` for all kinds)."""
    if kind is None:
        return {f"{k}.{n}": o for k in KINDS for n, o in _TABLE[k].items()}
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    return dict(_TABLE[kind])


def parameters(obj: Any) -> dict[str, Any]:
    """Configurable parameters of a registered object and their defaults.

    Parameters without a default map to `inspect.Parameter.empty`.
    """
    target = obj.__init__ if inspect.isclass(obj) else obj
    sig = inspect.signature(target)
    out = {}
    for pname, p in sig.parameters.items():
        if pname == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[pname] = p.default
    return out


def describe(kind: str | None = None) -> str:
    """A human-readable listing of registered components with parameters and defaults."""
    lines = []
    kinds = KINDS if kind is None else (kind,)
    for k in kinds:
        entries = registered(k)
        if not entries:
            continue
        lines.append(f"[{k}]")
        for n, obj in sorted(entries.items()):
            doc = (inspect.getdoc(obj) or "").split("\n", 1)[0]
            lines.append(f"  @{k}.{n}: {doc}")
            for pname, default in parameters(obj).items():
                shown = "<required>" if default is inspect.Parameter.empty else repr(default)
                lines.append(f"      {pname} = {shown}")
    return "\n".join(lines)
