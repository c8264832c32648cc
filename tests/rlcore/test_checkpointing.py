"""Tests for rlcore.checkpointing and rlcore.seeding (atomic save, resume, RNG restore)."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from rlcore.checkpointing import SENTINEL, STATE_FILE, CheckpointError, Checkpointer
from rlcore.seeding import make_generator, rng_state, seed_everything, set_rng_state


def _state(step: int) -> dict:
    seed_everything(step)
    model = torch.nn.Linear(3, 2)
    optim = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optim.step()
    return {
        "model": model.state_dict(),
        "optim": optim.state_dict(),
        "replay": {"obs": torch.randn(50, 3), "episode": torch.arange(50), "size": 50},
        "counters": {"env_step": step, "updates": step // 2, "name": "run", "ratio": 0.5},
        "history": [1, 2.5, (3, "x")],
        "rng": rng_state(),
    }


def _assert_equal(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal(x, y)
    else:
        assert a == b


def test_round_trip(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt")
    state = _state(100)
    path = ckpt.save(100, state)
    assert path.name == "step_000000000100"
    assert (path / STATE_FILE).is_file() and (path / SENTINEL).is_file()
    sentinel = json.loads((path / SENTINEL).read_text())
    assert sentinel["step"] == 100 and sentinel["size"] == (path / STATE_FILE).stat().st_size
    assert ckpt.latest() == path and ckpt.steps() == [100]
    _assert_equal(state, ckpt.load())
    _assert_equal(state, ckpt.load(path))
    # No temporary folders are left behind.
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [path.name]


def test_keep_last_k(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (10, 20, 30, 1000):
        ckpt.save(step, {"step": step})
    assert ckpt.steps() == [30, 1000]
    assert ckpt.load()["step"] == 1000
    assert ckpt.load(ckpt.path_for(30))["step"] == 30


def test_partial_checkpoints_ignored(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3)
    good = ckpt.save(5, {"step": 5})
    # A step folder without sentinel (interrupted) and a temp folder of a dead save.
    partial = ckpt.path_for(9)
    partial.mkdir()
    torch.save({"step": 9}, partial / STATE_FILE)
    stale = tmp_path / ".tmp_step_000000000012_999999999"
    stale.mkdir()
    (stale / STATE_FILE).write_bytes(b"junk")

    assert ckpt.latest() == good and ckpt.steps() == [5]
    assert ckpt.load()["step"] == 5
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.load(partial)
    ckpt.save(6, {"step": 6})
    assert not stale.exists()  # stale temp folders are cleaned by the next save


def test_empty_directory(tmp_path):
    ckpt = Checkpointer(tmp_path)
    assert ckpt.latest() is None and ckpt.steps() == []
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ckpt.load()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_state_raises(tmp_path, damage):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, {"x": torch.ones(1000)})
    path = ckpt.save(2, {"x": torch.zeros(1000)})
    state_file = path / STATE_FILE
    data = state_file.read_bytes()
    if damage == "truncate":
        state_file.write_bytes(data[: len(data) // 2])
    else:
        middle = len(data) // 2
        state_file.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    with pytest.raises(CheckpointError) as info:
        ckpt.load()
    message = str(info.value)
    assert str(path) in message and "corrupt" in message
    assert "delete it" in message and "--run_dir" in message
    # The fix the message names works: delete it and resume from the previous one.
    shutil.rmtree(path)
    assert torch.equal(ckpt.load()["x"], torch.ones(1000))


def test_save_same_step_twice(tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(7, {"v": torch.tensor(1)})
    path = ckpt.save(7, {"v": torch.tensor(2)})
    assert ckpt.steps() == [7]
    assert ckpt.load()["v"].item() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_numpy_rejected_at_save(tmp_path):
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match=r"state\['a'\]\[0\] is a numpy object"):
        ckpt.save(1, {"a": [np.zeros(3)]})
    assert ckpt.latest() is None
    assert list(tmp_path.iterdir()) == []


def test_rng_state_restore(tmp_path):
    seed_everything(123)
    random.random(), np.random.rand(), torch.rand(1), np.random.randn()  # advance, gauss cache

    def draw():
        return (
            [random.random() for _ in range(3)] + [random.gauss(0, 1)],
            np.random.rand(3).tolist() + [np.random.randn()],
            torch.rand(3).tolist() + torch.randn(2).tolist(),
        )

    state = rng_state()
    expected = draw()
    assert draw() != expected  # the generators really moved on
    set_rng_state(state)
    assert draw() == expected

    # Through a checkpoint (weights_only load), too.
    Checkpointer(tmp_path).save(0, {"rng": state})
    draw()
    set_rng_state(Checkpointer(tmp_path).load()["rng"])
    assert draw() == expected


def test_make_generator_reproducible():
    a = torch.rand(4, generator=make_generator(3))
    b = torch.rand(4, generator=make_generator(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, torch.rand(4, generator=make_generator(4)))
