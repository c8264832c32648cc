"""Shared fixtures: a clean gin config and a seeded RNG per test, and tiny agents."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import gin  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

try:  # submitit configures its logging at import: do it once here, not inside a captured test
    import submitit  # noqa: F401
except ImportError:
    pass

# Tiny sizes shared by the component tests: latent 16 (two SimNorm groups), hidden 32.
TINY_LATENT = 16
TINY_HIDDEN = 32
TINY_BINS = 21


@pytest.fixture(autouse=True)
def _root_log_handlers_to_real_stderr():
    """Libraries imported inside a test (dm_control, submitit) add StreamHandlers bound to
    the stderr of that moment, which under pytest is a capture stream closed later; point
    them at the real stderr after each test so later logs (and logging at interpreter exit)
    never hit a closed file."""
    import logging

    yield
    loggers = [logging.root] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                if isinstance(lg, logging.Logger)]
    for logger in loggers:
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler and handler.stream not in (
                    sys.__stderr__, sys.__stdout__):
                handler.stream = sys.__stderr__  # not setStream: it flushes the old,
                # possibly already closed, capture stream


@pytest.fixture(autouse=True)
def _clean_gin_and_seed():
    """Every test starts from an empty gin config and torch seed 0 (as Dopamine's tests)."""
    gin.clear_config()
    torch.manual_seed(0)
    yield
    gin.clear_config()


def tiny_world_model_factory(*, latent_dim: int = TINY_LATENT, hidden_dim: int = TINY_HIDDEN,
                             num_bins: int = TINY_BINS, num_q: int = 2, q_dropout: float = 0.01):
    """A `WorldModel` class-like callable (spec -> model) with tiny sizes."""
    from components.dynamics import MLPDynamics
    from components.encoders import MLPEncoder
    from components.heads import DiscreteRegressionHead, EnsembleQHead, TanhGaussianPolicyHead
    from components.world_model import WorldModel

    return functools.partial(
        WorldModel,
        encoder=functools.partial(MLPEncoder, hidden_dim=hidden_dim),
        dynamics=functools.partial(MLPDynamics, hidden_dim=hidden_dim),
        reward_head=functools.partial(DiscreteRegressionHead, hidden_dim=hidden_dim),
        q_head=functools.partial(EnsembleQHead, hidden_dim=hidden_dim, num_q=num_q,
                                 dropout=q_dropout),
        policy_head=functools.partial(TanhGaussianPolicyHead, hidden_dim=hidden_dim),
        latent_dim=latent_dim,
        num_bins=num_bins,
    )


def tiny_planner_factory(planner: str = "mppi", *, horizon: int = 3, num_samples: int = 32,
                         num_pi_trajs: int = 4, num_elites: int = 8, iterations: int = 2,
                         **kwargs):
    """A planner class-like callable (model, action_dim, discount) -> planner, tiny sizes."""
    from components.planners.cem import CEMPlanner
    from components.planners.mppi import MPPIPlanner

    cls = {"mppi": MPPIPlanner, "cem": CEMPlanner}[planner]
    return functools.partial(cls, horizon=horizon, num_samples=num_samples,
                             num_pi_trajs=num_pi_trajs, num_elites=num_elites,
                             iterations=iterations, **kwargs)


@pytest.fixture
def tiny_world_model():
    """`tiny_world_model(spec, **sizes)` -> a tiny WorldModel."""

    def build(spec, **kwargs):
        return tiny_world_model_factory(**kwargs)(spec)

    return build


@pytest.fixture
def tiny_agent_factory():
    """`tiny_agent_factory(spec, planner='mppi', num_q=2, **agent_kwargs)` -> TDMPC2Agent."""
    from components.agent import TDMPC2Agent
    from components.losses import PolicyLoss, WorldModelLoss

    def build(spec, *, planner: str = "mppi", num_q: int = 2, planner_kwargs=None,
              **agent_kwargs):
        return TDMPC2Agent(
            spec,
            "cpu",
            world_model=tiny_world_model_factory(num_q=num_q),
            planner=tiny_planner_factory(planner, **(planner_kwargs or {})),
            model_loss=WorldModelLoss,
            policy_loss=PolicyLoss,
            **agent_kwargs,
        )

    return build


@pytest.fixture
def tiny_planner():
    """`tiny_planner(kind, model, action_dim, discount, **sizes)` -> a tiny planner."""

    def build(kind, model, action_dim, discount=0.99, **kwargs):
        return tiny_planner_factory(kind, **kwargs)(model, action_dim, discount)

    return build


# -- the learning test's training runs: started with the session, collected by the test --
_LEARNING_TEST = "test_learning.py::test_tdmpc2_beats_random_on_cartpole_balance"
_learning_module = pytest.StashKey()
_learning_dir = pytest.StashKey()


def pytest_collection_finish(session):
    """When the session will run the learning test, start its training runs now at the
    lowest CPU priority: they take the CPU the other tests leave idle, so the suite does
    not wait ten minutes for them at the end (`tests/test_learning.py`)."""
    if session.config.option.collectonly:
        return
    for item in session.items:
        if item.nodeid.endswith(_LEARNING_TEST):
            import tempfile

            base = Path(tempfile.mkdtemp(prefix="tdmpc2-learning-"))
            session.config.stash[_learning_dir] = base
            session.config.stash[_learning_module] = item.module
            item.module.start_runs(base, niceness=19)
            return


def pytest_sessionfinish(session):
    module = session.config.stash.get(_learning_module, None)
    if module is not None:
        module.stop_runs()
        import shutil

        shutil.rmtree(session.config.stash[_learning_dir], ignore_errors=True)


def signal_after_first_checkpoint(cmd, run_dir, sig, stderr_path, *, cwd, env):
    """Start a runner process, send it `sig` once its first complete checkpoint exists,
    and return (exit code, stderr text, the newest complete checkpoint's directory)."""
    import subprocess
    import time

    ckpt_dir = Path(run_dir) / "checkpoints"

    def complete():
        return sorted(p for p in ckpt_dir.glob("step_*") if (p / "COMPLETE").exists())

    with open(stderr_path, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=f)
        deadline = time.time() + 240
        while time.time() < deadline and not complete():
            time.sleep(0.1)
        os.kill(proc.pid, sig)
        rc = proc.wait(timeout=120)
    stderr = Path(stderr_path).read_text()
    assert "Traceback" not in stderr
    return rc, stderr, complete()[-1]


@contextlib.contextmanager
def stepped_gradients(model):
    """name -> (parameter, gradient or None) for every parameter of `model` that an Adam
    step of the agent (`rlcore.optim.adam_step`) updates, read as the step runs (after
    clipping). A parameter stepped twice fails."""
    from rlcore import optim as roptim

    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    step = roptim.adam_step

    def recording_step(optimizer):
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = names.get(id(p))
                if name is not None:
                    assert name not in seen, f"{name} stepped twice"
                    seen[name] = (p, None if p.grad is None else p.grad.detach().clone())
        step(optimizer)

    roptim.adam_step = recording_step
    try:
        yield seen
    finally:
        roptim.adam_step = step
