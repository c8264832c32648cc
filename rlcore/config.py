"""Gin loading with clear errors: files, then command-line bindings, strictly checked.

Layers: base defaults, size/task presets, the experiment file, then `--gin_param`s. Unknown
configurables and parameters are errors (`skip_unknown=False`) reported with the nearest
valid names.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import tokenize
from pathlib import Path
from typing import Iterable

import gin

from rlcore import registry

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A configuration problem; the message names the problem and the fix."""


def _known_names() -> list[str]:
    names = []
    for kind, entries in ((k, registry.registered(k)) for k in registry.KINDS):
        names += [f"{kind}.{n}" for n in entries] + list(entries)
    try:  # gin-configurable roots (runners) registered with gin directly
        from gin import config as _gc

        for selector in list(_gc._REGISTRY._selector_map):  # type: ignore[attr-defined]
            names.append(selector)
            names.append(selector.rsplit(".", 1)[-1])
    except Exception:  # noqa: BLE001 - gin internals differ across versions; names are a hint
        pass
    return sorted(set(names))


def _accepted_params(fn) -> tuple[set[str], bool]:
    """Parameter names of fn (through the MRO when **kwargs is passed on), and whether open."""
    names: set[str] = set()
    targets = [c.__init__ for c in inspect.getmro(fn) if "__init__" in vars(c)] \
        if inspect.isclass(fn) else [fn]
    for target in targets:
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):
            return names, True
        has_var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
        names |= {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not has_var_kw:
            return names - {"self"}, False
    return names - {"self"}, True


def _check_bindings() -> None:
    """Every bound parameter of a registered component must exist in its signature."""
    from gin import config as _gc

    for (scope, selector), params in list(_gc._CONFIG.items()):  # type: ignore[attr-defined]
        configurable = _gc._REGISTRY.get_match(selector)  # type: ignore[attr-defined]
        if configurable is None:
            continue
        fn = configurable.wrapped
        accepted, open_ended = _accepted_params(fn)
        if open_ended:
            continue
        for pname in params:
            if pname not in accepted:
                near = difflib.get_close_matches(pname, sorted(accepted), n=3)
                hint = f" Did you mean {', '.join(near)}?" if near else ""
                raise ConfigError(
                    f"unknown parameter {selector}.{pname}.{hint} Valid parameters: "
                    f"{', '.join(sorted(accepted))}. Fix the binding in your gin file or "
                    "--gin_param.")


def _nearest(name: str, candidates: Iterable[str], n: int = 3) -> str:
    near = difflib.get_close_matches(name, sorted(candidates), n=n, cutoff=0.5)
    return f" Did you mean {', '.join(near)}?" if near else ""


def _explain(err: Exception, where: str) -> ConfigError:
    msg = str(err.msg if isinstance(err, SyntaxError) else err)
    m = re.search(r"No configurable matching (?:reference )?'@?([^']+)'", msg)
    if m:
        name = m.group(1)
        return ConfigError(
            f"unknown configurable '{name}' in {where}.{_nearest(name, _known_names())} "
            "Components are referenced as @<kind>.<Name>; list them with `python -m "
            "runners.online --list_components`, and make sure the gin file imports the module "
            "that registers it.")
    m = re.search(r"(?:Configurable|configurable) '([^']+)' doesn't have a parameter named '([^']+)'",
                  msg)
    if m:
        from gin import config as _gc

        selector, pname = m.groups()
        configurable = _gc._REGISTRY.get_match(selector)  # type: ignore[attr-defined]
        accepted = _accepted_params(configurable.wrapped)[0] if configurable else set()
        return ConfigError(f"unknown parameter {selector}.{pname} in {where}."
                           f"{_nearest(pname, accepted)} Fix the binding.")
    first = msg.strip().splitlines()[0] if msg.strip() else type(err).__name__
    loc = getattr(err, "filename", None), getattr(err, "lineno", None)
    if isinstance(err, SyntaxError) and loc[1]:
        text = (err.text or "").strip()
        token = re.search(r"Failed to parse token '([^']*)'", msg)
        what = (f"'{token.group(1)}' is not a value gin reads (numbers, 'quoted strings', "
                "True/False/None, lists, @references, %MACROS)" if token else first)
        return ConfigError(f"could not parse {loc[0] or where}, line {loc[1]}: `{text}`: "
                           f"{what}. Fix that line.")
    return ConfigError(f"could not parse {where}: {first}. Fix the gin syntax there "
                       "(bindings look like `Name.param = value`).")


def load_gin(files: Iterable[str | os.PathLike] = (), params: Iterable[str] = (), *,
             finalize: bool = True) -> str:
    """Parse gin files, then bindings, with `skip_unknown=False`; return the parsed config.

    Relative paths and `include` lines resolve against the current directory and the
    repository root.
    """
    gin.clear_config()
    if str(REPO_ROOT) not in gin.config._LOCATION_PREFIXES:  # type: ignore[attr-defined]
        gin.add_config_file_search_path(str(REPO_ROOT))
    for f in files:
        path = Path(f)
        if not path.exists() and not (REPO_ROOT / path).exists():
            raise ConfigError(f"gin file not found: {f}. Give a path relative to the current "
                              f"directory or to {REPO_ROOT}.")
        resolved = path if path.exists() else REPO_ROOT / path
        try:
            gin.parse_config_file(str(resolved), skip_unknown=False)
        except (ValueError, SyntaxError, KeyError, ImportError, TypeError, OSError,
                tokenize.TokenError) as e:
            raise _explain(e, f"gin file {f}") from None
    for p in params:
        try:
            gin.parse_config(p, skip_unknown=False)
        except (ValueError, SyntaxError, KeyError, ImportError, TypeError,
                tokenize.TokenError) as e:
            raise _explain(e, f"--gin_param {p!r}") from None
    _check_bindings()
    if finalize:
        gin.finalize()
    return gin.config_str()
