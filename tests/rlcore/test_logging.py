"""Tests for rlcore.logging.MetricLogger (eval.csv, resume, TensorBoard events, config)."""

from __future__ import annotations

import csv
import logging
import math

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlcore.logging import MetricLogger


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _next_second() -> None:
    """Event files are named `...tfevents.<second>.<host>.<pid>.<counter>` and read in name
    order; two in one second of one process sort wrong once the counter passes 9 -> 10
    (separate runs are separate processes and seconds)."""
    import time

    time.sleep(1.0 - time.time() % 1.0 + 0.01)


def _events(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_eval_csv_header_and_rows(tmp_path):
    with MetricLogger(tmp_path, seed=3, progress=False) as logger:
        logger.eval(1000, 12.5, success=1.0, length=torch.tensor(500.0))
        logger.eval(2000, torch.tensor(20.0), success=0.0, length=400, unknown=1.0)
        # Rows are flushed as they are written.
        assert len(_rows(tmp_path / "eval.csv")) == 3
    rows = _rows(tmp_path / "eval.csv")
    assert rows[0] == ["step", "reward", "seed", "length", "success"]
    assert rows[1] == ["1000", "12.5", "3", "500.0", "1.0"]
    assert rows[2] == ["2000", "20.0", "3", "400.0", "0.0"]


def test_eval_csv_resume_drops_later_rows(tmp_path):
    with MetricLogger(tmp_path, seed=1, progress=False, use_tensorboard=False) as logger:
        for step in (100, 200, 300, 400):
            logger.eval(step, float(step))
    # Crash after step 400; the newest checkpoint is at step 250.
    with MetricLogger(
        tmp_path, seed=1, progress=False, use_tensorboard=False, resume_step=250
    ) as logger:
        assert [r[0] for r in _rows(tmp_path / "eval.csv")] == ["step", "100", "200"]
        logger.eval(300, 301.0)
    rows = _rows(tmp_path / "eval.csv")
    assert rows[0] == ["step", "reward", "seed"]
    assert [(r[0], r[1]) for r in rows[1:]] == [
        ("100", "100.0"),
        ("200", "200.0"),
        ("300", "301.0"),
    ]
    assert not list(tmp_path.glob(".eval.csv.tmp*"))


def test_tensorboard_scalars_and_config(tmp_path):
    with MetricLogger(tmp_path, total_steps=100, progress=False) as logger:
        logger.config("OnlineRunner.seed = 1\nHORIZON = 3")
        logger.scalars("loss", {"loss_reward": torch.tensor(0.5), "nan": float("nan")}, step=10)
        logger.scalars("plan", {"stats": {"elite_std": torch.tensor([0.25])}}, step=10)
        logger.episode(42.0, 500, step=20)
        logger.eval(30, 7.0, success=1.0)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    acc = _events(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert {
        "loss/loss_reward",
        "loss/nan",
        "plan/stats/elite_std",
        "train/episode_return",
        "train/episode_length",
        "eval/reward",
        "eval/success",
    } <= tags
    assert acc.Scalars("loss/loss_reward")[0].value == 0.5
    assert math.isnan(acc.Scalars("loss/nan")[0].value)  # non-finite values are still logged
    assert [(e.step, e.value) for e in acc.Scalars("train/episode_return")] == [(20, 42.0)]
    text_tags = [t for t in acc.Tags()["tensors"] if t.startswith("config/operative")]
    assert text_tags
    text = acc.Tensors(text_tags[0])[0].tensor_proto.string_val[0].decode()
    assert "HORIZON = 3" in text and text.startswith("```")


def test_resume_purges_tensorboard(tmp_path):
    with MetricLogger(tmp_path, progress=False) as logger:
        for step in (10, 20, 30):
            logger.scalars("train", {"x": float(step)}, step)
    _next_second()
    with MetricLogger(tmp_path, progress=False, resume_step=20) as logger:
        logger.scalars("train", {"x": -30.0}, 30)
    assert [(e.step, e.value) for e in _events(tmp_path).Scalars("train/x")] == [
        (10, 10.0),
        (20, 20.0),
        (30, -30.0),
    ]


def test_advance_console_line(tmp_path, caplog):
    with MetricLogger(
        tmp_path, total_steps=1000, progress=False, console_every=0.0, use_tensorboard=False
    ) as logger:
        logger.episode(5.0, 10, step=10)
        with caplog.at_level(logging.INFO, logger="rlcore"):
            logger.advance(100)
    messages = [record.getMessage() for record in caplog.records]
    assert any("step 100/1000" in m and "return 5.0" in m for m in messages)


def test_restart_from_zero_purges_the_earlier_attempt(tmp_path):
    """A run restarted from step 0 (no complete checkpoint) hides every earlier point, also
    those of tags the new attempt has not written (yet)."""
    with MetricLogger(tmp_path, progress=False) as logger:
        for step in (10, 20, 30):
            logger.scalars("train", {"x": float(step)}, step)
    _next_second()
    with MetricLogger(tmp_path, progress=False, resume_step=0) as logger:
        logger.scalars("train", {"y": 1.0}, 10)
    tags = _events(tmp_path).Tags()["scalars"]
    assert "train/x" not in tags or not _events(tmp_path).Scalars("train/x")
    assert [(e.step, e.value) for e in _events(tmp_path).Scalars("train/y")] == [(10, 1.0)]


def test_console_line_shows_dash_before_the_first_episode(tmp_path, caplog):
    """After a resume no episode has ended yet: `return -`, not `return nan`."""
    with MetricLogger(tmp_path, total_steps=1000, progress=False, console_every=0.0,
                      use_tensorboard=False, resume_step=500) as logger:
        with caplog.at_level(logging.INFO, logger="rlcore"):
            logger.advance(600)
    messages = [record.getMessage() for record in caplog.records]
    assert any("return - | eval -" in m for m in messages), messages
    assert not any("nan" in m for m in messages)


def test_phase_restarts_the_rate_and_eta(tmp_path, monkeypatch):
    """A new phase (seeding -> training) restarts the bar's rate: the ETA follows the
    current phase, not the fast random-action steps before it."""
    import io

    import rlcore.logging as rlog

    real = rlog.tqdm
    monkeypatch.setattr(rlog, "tqdm", lambda **kw: real(**{**kw, "disable": False,
                                                            "file": io.StringIO()}))
    with MetricLogger(tmp_path, total_steps=1000, progress=True, use_tensorboard=False) as lg:
        lg.phase("seeding")
        lg.advance(400)
        lg.phase("training")
        bar = lg._bar
        assert bar.desc == "training" and bar.initial == 400 and bar.n == 400
        lg.advance(410)
        assert bar.format_dict["n"] - bar.format_dict["initial"] == 10
