"""`python -m runners.compare_official`: the official TD-MPC2 and ours, timed side by side.

The side-by-side run needs a checkout of the official code (nicklashansen/tdmpc2): set
TDMPC2_OFFICIAL_DIR to one, or clone it to /tmp/tdmpc2-official; without one that test
skips. Nothing asserts a speed (timings flake on shared machines).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from runners import compare_official

pytest.importorskip("envpool")


def _official_dir() -> Path | None:
    for path in (os.environ.get("TDMPC2_OFFICIAL_DIR"), "/tmp/tdmpc2-official"):
        if path and (Path(path) / "tdmpc2" / "tdmpc2.py").is_file():
            return Path(path)
    return None


def test_runs_both_sides_on_a_tiny_setting(tmp_path, capsys):
    official = _official_dir()
    if official is None:
        pytest.skip("no checkout of the official TD-MPC2: git clone "
                    "https://github.com/nicklashansen/tdmpc2 /tmp/tdmpc2-official, or set "
                    "TDMPC2_OFFICIAL_DIR to a checkout")
    out = tmp_path / "compare.json"
    rc = compare_official.main([f"--official={official}", "--task=cartpole-swingup",
                                "--model_size=1", "--repeats=2", "--warmup=1", "--threads=1",
                                "--device=cpu", f"--out={out}"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| plan + update ms |" in printed and "GFLOP/s" in printed
    result = json.loads(out.read_text())
    cfg = result["config"]
    assert (cfg["obs_dim"], cfg["action_dim"], cfg["episode_length"]) == (5, 1, 500)
    # the same model on both sides: model size 1 has the same parameter count
    assert cfg["parameters"]["official"] == cfg["parameters"]["ours"]
    assert cfg["planner_iterations"] == {"official": 6, "ours": 6}
    for side in ("official", "ours"):
        r = result[side]
        assert r["plan"]["n"] == r["update"]["n"] == 2
        assert r["plan_update"]["median_ms"] > 0 and r["agent_steps_per_second"] > 0
        assert r["warmup"]["plan_first_s"] > 0 and r["warmup"]["update_first_s"] > 0
    assert result["matmul"]["gflops_per_s"] > 0
    assert set(result["official_over_ours_paired"]) == {"plan", "update", "plan_update"}
    # the official code's tensordict setting is undone afterwards
    from tensordict import TensorDictBase
    assert "to_module" not in TensorDictBase.__dict__


@pytest.mark.parametrize("argv", [[], ["--official=/nonexistent/tdmpc2"], ["--official=."]],
                         ids=["missing", "no-such-path", "not-a-checkout"])
def test_bad_official_path_fails_with_one_clear_message(argv, monkeypatch, capsys):
    monkeypatch.delenv("TDMPC2_OFFICIAL_DIR", raising=False)
    assert compare_official.main([*argv, "--device=cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("error:") == 1 and "\n" not in err
    assert "--official" in err and "git clone https://github.com/nicklashansen/tdmpc2" in err


def test_title_names_each_sides_mode():
    """Ours compiled through --gin_file beside the official eager code: the title says so
    instead of calling both eager."""
    assert compare_official._modes({"compile": False, "ours_compiled": False}) == "eager"
    assert compare_official._modes({"compile": True, "ours_compiled": True}) == "compiled"
    assert (compare_official._modes({"compile": False, "ours_compiled": True})
            == "official eager, ours compiled")
