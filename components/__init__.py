"""Swappable parts of the TD-MPC2 family, each registered with gin under a kind."""

import importlib
import pkgutil


def import_all() -> None:
    """Import every component module, so that all of them are registered."""
    for info in pkgutil.walk_packages(__path__, prefix=f"{__name__}."):
        importlib.import_module(info.name)
