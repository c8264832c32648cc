"""Seeding and RNG-state capture.

`seed_everything` seeds every global generator a run touches; `make_generator` builds the
explicit `torch.Generator`s that components receive. `rng_state` / `set_rng_state` capture
and restore the global generators so that a run resumed from a checkpoint continues with
the same random numbers. The captured state holds only tensors and python builtins, so a
checkpoint containing it loads with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

__all__ = ["seed_everything", "make_generator", "rng_state", "set_rng_state"]

_log = logging.getLogger("rlcore")


def seed_everything(seed: int) -> None:
    """Seed python `random`, numpy's global generator, torch CPU and every CUDA device."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy accepts only 32-bit seeds
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A `torch.Generator` on `device` seeded with `seed` (for components that sample)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def rng_state() -> dict[str, Any]:
    """Capture python, numpy, torch CPU and (if available) all CUDA global RNG states.

    numpy's key array is stored as an int64 tensor and python's state as lists, so the
    result contains only types that `torch.load(weights_only=True)` accepts.
    """
    version, internal, gauss_next = random.getstate()
    bit_generator, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(bit_generator),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),  # [624] uint32 values
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators captured by `rng_state`.

    CUDA states are restored for as many devices as both the checkpoint and this machine
    have; a mismatch (for example resuming a GPU run on CPU) is logged, not raised.
    """
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))

    npy = state["numpy"]
    key = npy["key"]
    key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    np.random.set_state(
        (
            npy["bit_generator"],
            key.astype(np.uint32),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        )
    )

    torch.set_rng_state(state["torch"].cpu())

    saved_cuda = state.get("cuda")
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if saved_cuda is None:
        return
    if len(saved_cuda) != available:
        _log.warning(
            "checkpoint holds CUDA RNG states for %d device(s) but %d are available; "
            "restoring the first %d",
            len(saved_cuda),
            available,
            min(len(saved_cuda), available),
        )
    for device_index, cuda_state in enumerate(saved_cuda[:available]):
        torch.cuda.set_rng_state(cuda_state.cpu(), device_index)
