"""Every ablation fragment trains in a short CPU run; update schedules of any counts run."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from rlcore.config import REPO_ROOT, load_gin

pytest.importorskip("envpool")

GIN = REPO_ROOT / "gin"
FRAGMENTS = sorted(GIN.glob("ablations/*/*.gin"))
SHORT = ["TASK = 'cartpole-balance'", "OnlineRunner.checkpoint_every = 0",
         "OnlineRunner.log_every = 5", "ShrinkPerturb.every = 20", "FullReset.every = 20"]


def run_short(tmp_path, files=(), params=()):
    load_gin([str(GIN / "tdmpc2_dog.gin"), *map(str, files), str(GIN / "test" / "tiny.gin")],
             [*SHORT, *params], finalize=False)
    from runners.pipelines import OnlineRunner

    runner = OnlineRunner(str(tmp_path / "run"))
    losses = []
    orig = runner.agent.update

    def spy(batch, pathway="full"):
        out = orig(batch, pathway)
        losses.append((pathway, {k: float(v) for k, v in out.items() if k.startswith("loss_")},
                       runner.agent_steps))
        return out

    runner.agent.update = spy
    runner.run()
    with open(tmp_path / "run" / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    return runner, losses, rows


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_fragment_trains(fragment, tmp_path):
    runner, losses, rows = run_short(tmp_path, [fragment])
    assert losses, "no update ran"
    assert all(math.isfinite(v) for _, terms, _ in losses for v in terms.values())
    assert rows and math.isfinite(float(rows[-1]["reward"]))
    name = f"{fragment.parent.name}/{fragment.stem}"
    model = runner.agent.model
    if name in ("aux/on", "aux/separate"):
        assert "loss_aux_value" in losses[-1][1]
    if name == "aux/off":
        assert model._aux_Qs is None
    if name.startswith("resets/"):
        assert runner.agent.reset_strategy is not None
    if name == "ema/policy":
        assert model._ema_pi is not None
    if name == "ema/encoder":
        assert model._ema_encoder is not None
    if name == "pathways/actor_critic":
        assert any(p == "actor_critic" for p, _, _ in losses)
    if name == "pathways/policy":
        assert any(p == "policy" for p, _, _ in losses)
    if name == "planner/cem":
        assert type(runner.agent.planner).__name__ == "CEMPlanner"


@pytest.mark.parametrize("full, ac, pi", [(0.5, 0.0, 0.0), (0.0, 1.5, 0.25), (0.0, 0.0, 3.0),
                                          pytest.param(1.0, 1.0, 1.0, marks=pytest.mark.slow),
                                          (0.0, 0.0, 0.0)])
def test_any_update_schedule_runs_without_truncation(tmp_path, full, ac, pi):
    runner, losses, _ = run_short(tmp_path, params=[
        f"OnlineRunner.utd_ratio = {full}", f"OnlineRunner.actor_critic_updates = {ac}",
        f"OnlineRunner.policy_updates = {pi}"])
    pretrain_at = losses[0][2] if losses else runner.agent_steps  # agent step of pretraining
    after = [(p, step) for p, _, step in losses if step > pretrain_at]
    counts = {k: sum(p == k for p, _ in after) for k in ("full", "actor_critic", "policy")}
    assert sum(p == "full" for p, _, step in losses if step == pretrain_at) == runner.seed_steps
    steps_after = runner.agent_steps - pretrain_at  # agent steps (summed over envs) after it
    # fractional counts accumulate: nothing is silently truncated (within one step's worth)
    for name, count in (("full", full), ("actor_critic", ac), ("policy", pi)):
        assert abs(counts[name] - count * steps_after) <= runner.spec.num_envs * max(count, 1), (
            name, counts, steps_after)


@pytest.mark.parametrize("param", ["OnlineRunner.utd_ratio = -1",
                                   "OnlineRunner.policy_updates = -0.5",
                                   "OnlineRunner.validation_batches = -1"])
def test_negative_counts_fail_before_training(tmp_path, param):
    with pytest.raises(ValueError, match=r"must be .*(>= 0|\[0, inf\)).*fix the binding"):
        run_short(tmp_path, params=[param])
    assert not (tmp_path / "run").exists()


def test_validation_is_logged_and_leaves_training_alone(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runner, _, _ = run_short(tmp_path, [GIN / "ablations" / "validation" / "on.gin"],
                             ["OnlineRunner.validation_batches = 2"])
    assert runner.validation["validation_all"].num_episodes == 1
    assert runner.validation["validation_recent"].num_episodes == 1
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for prefix in ("validation_all", "validation_recent"):
        assert f"{prefix}/loss_consistency" in tags and f"{prefix}/loss_value" in tags
    # a second validation pass changes neither parameters nor the running scale
    state = {k: v.clone() for k, v in runner.agent.model.state_dict().items()}
    scale = runner.agent.scale.value.clone()
    runner.validate()
    assert all(torch.equal(v, state[k]) for k, v in runner.agent.model.state_dict().items())
    assert torch.equal(runner.agent.scale.value, scale)


def test_episodic_gymnasium_task_trains(tmp_path):
    """MountainCarContinuous (terminates at the flag) through the gymnasium env path."""
    load_gin([str(GIN / "mountaincar_episodic.gin"), str(GIN / "test" / "tiny.gin")],
             ["GymnasiumVecEnv.max_episode_steps = 100", "OnlineRunner.checkpoint_every = 0",
              "OnlineRunner.log_every = 5"], finalize=False)
    from runners.pipelines import OnlineRunner

    runner = OnlineRunner(str(tmp_path / "run"))
    assert runner.spec.episodic and runner.agent.model.episodic
    seen = []
    orig = runner.agent.update
    runner.agent.update = lambda batch, pathway="full": seen.append(orig(batch, pathway)) or seen[-1]
    runner.run()
    assert seen and all(torch.isfinite(seen[-1][k]) for k in seen[-1].keys()
                        if k.startswith("loss_"))
    assert "loss_termination" in seen[-1].keys()
    with open(tmp_path / "run" / "eval.csv") as f:
        assert list(csv.DictReader(f))
