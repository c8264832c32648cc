"""MPPI and CEM planners (parametrized, in the style of TorchRL's planner tests)."""

from __future__ import annotations

import pytest
import torch

from components.planners.cem import CEMPlanner
from components.planners.mppi import MPPIPlanner
from rlcore.types import EnvSpec, Planner

D, A, E, H = 5, 2, 3, 3
SPEC = EnvSpec(obs_shape=(D,), action_dim=A, episode_length=100)
PLANNERS = pytest.mark.parametrize("kind", ["mppi", "cem"])
TARGETS = torch.tensor([[0.5, -0.3], [-0.6, 0.2], [0.1, 0.8]])  # a* per env [E, A]


class ToyModel:
    """A duck-typed latent model whose reward is an analytic quadratic.

    The latent carries the env's optimal action in its first A units and never changes;
    reward(z, a) = -||a - z[..., :A]||^2 is returned as a scalar that `decode` passes
    through; Q is zero; the policy prior is uniform random.
    """

    episodic = False

    def __init__(self, action_dim: int = A):
        self.action_dim = action_dim
        self.calls = {"pi": 0, "Q": 0}

    def next(self, z, a):
        return z

    def reward(self, z, a):
        return -((a - z[..., : self.action_dim]) ** 2).sum(-1, keepdim=True)  # [..., 1]

    def decode(self, x):
        return x

    def pi(self, z, **kwargs):
        self.calls["pi"] += 1
        return torch.rand(*z.shape[:-1], self.action_dim) * 2 - 1, {}

    def Q(self, z, a, return_type="avg", **kwargs):
        self.calls["Q"] += 1
        assert return_type == "avg"  # planner scores use the mean of two heads
        return torch.zeros(*z.shape[:-1], 1)


def toy_latent(targets: torch.Tensor = TARGETS, latent_dim: int = 8) -> torch.Tensor:
    z = torch.zeros(targets.shape[0], latent_dim)
    z[:, : targets.shape[1]] = targets
    return z


def make(kind, model, action_dim=A, discount=0.99, **kwargs):
    cls = {"mppi": MPPIPlanner, "cem": CEMPlanner}[kind]
    sizes = dict(horizon=H, num_samples=32, num_pi_trajs=4, num_elites=8, iterations=2)
    sizes.update(kwargs)
    return cls(model, action_dim, discount, **sizes)


@pytest.fixture
def model(tiny_world_model):
    m = tiny_world_model(SPEC, num_q=2)
    with torch.no_grad():  # non-trivial reward and Q so scores differ between candidates
        m._reward.net[-1].weight.normal_()
        m._Qs.net.w2.normal_()
    return m.eval()


def _z(model, E=E):
    return model.encode(torch.randn(E, D))


# ---------------------------------------------------------------------------------------
@PLANNERS
@pytest.mark.parametrize("eval_mode", [False, True])
def test_action_shape_and_bounds(kind, model, eval_mode):
    planner = make(kind, model)
    assert isinstance(planner, Planner)
    z = _z(model)
    for is_first in (torch.ones(E, dtype=torch.bool), torch.zeros(E, dtype=torch.bool)):
        a = planner.plan(z, is_first, eval_mode=eval_mode)
        assert a.shape == (E, A)
        assert a.dtype == torch.float32
        assert (a >= -1).all() and (a <= 1).all()
        assert torch.isfinite(a).all()
    stats = planner.last_stats
    assert {"chosen_value", "elite_mean", "elite_std", "final_std"} <= set(stats)
    assert planner.min_std <= stats["final_std"] <= planner.max_std


@PLANNERS
def test_single_env_and_no_policy_candidates(kind, model):
    planner = make(kind, model, num_pi_trajs=0)
    a = planner.plan(_z(model, 1), torch.ones(1, dtype=torch.bool))
    assert a.shape == (1, A)


@PLANNERS
def test_input_unchanged(kind, model):
    planner = make(kind, model)
    z = _z(model)
    z_copy = z.clone()
    is_first = torch.tensor([True, False, True])
    planner.plan(z, is_first)
    planner.plan(z, is_first, eval_mode=True)
    torch.testing.assert_close(z, z_copy, rtol=0, atol=0)
    assert is_first.tolist() == [True, False, True]


@PLANNERS
@pytest.mark.parametrize("eval_mode", [False, True])
def test_same_seed_same_output(kind, model, eval_mode):
    z = _z(model)
    is_first = torch.ones(E, dtype=torch.bool)
    outs = []
    for _ in range(2):
        planner = make(kind, model)
        torch.manual_seed(123)
        first = planner.plan(z, is_first, eval_mode=eval_mode)
        second = planner.plan(z, ~is_first, eval_mode=eval_mode)
        outs.append(torch.cat([first, second]))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.manual_seed(7)
    other = make(kind, model).plan(z, is_first)
    assert not torch.equal(other, outs[0][:E])  # the RNG does matter in training mode


@PLANNERS
def test_warm_start_shift_and_reset(kind, model):
    planner = make(kind, model)
    z = _z(model)
    planner.plan(z, torch.ones(E, dtype=torch.bool))
    prev = planner._prev_mean["train"]
    assert prev.shape == (E, H, A)
    assert prev.abs().sum() > 0
    is_first = torch.tensor([False, True, False])
    mean = planner._shift(prev, is_first)
    assert mean.shape == (E, H, A)
    keep = ~is_first
    torch.testing.assert_close(mean[keep, :-1], prev[keep, 1:])  # shifted by one step
    assert (mean[keep, -1] == 0).all()  # zero tail
    assert (mean[is_first] == 0).all()  # cleared where an episode starts
    # Nothing stored yet for a stream, or a different number of envs: a zero mean.
    assert (planner.warm_start(z, eval_mode=True) == 0).all()
    assert (planner.warm_start(z[:2], eval_mode=False) == 0).all()


@PLANNERS
def test_warm_start_is_used_by_plan(kind):
    """Envs with is_first plan exactly like a fresh planner; the others use the warm start."""
    toy = ToyModel()
    z = toy_latent()
    warm = make(kind, toy, num_samples=64, num_elites=8)
    warm.plan(z, torch.ones(E, dtype=torch.bool), eval_mode=True)
    is_first = torch.tensor([True, False, True])
    fresh = make(kind, toy, num_samples=64, num_elites=8)
    torch.manual_seed(5)
    a_warm = warm.plan(z, is_first, eval_mode=True)
    torch.manual_seed(5)
    a_fresh = fresh.plan(z, torch.ones(E, dtype=torch.bool), eval_mode=True)
    torch.testing.assert_close(a_warm[is_first], a_fresh[is_first], rtol=0, atol=0)
    assert not torch.equal(a_warm[~is_first], a_fresh[~is_first])


@PLANNERS
def test_train_and_eval_streams_are_separate(kind, model):
    planner = make(kind, model)
    z = _z(model)
    ones = torch.ones(E, dtype=torch.bool)
    planner.plan(z, ones)
    assert set(planner._prev_mean) == {"train"}
    train_mean = planner._prev_mean["train"].clone()
    planner.plan(z, ones, eval_mode=True)
    assert set(planner._prev_mean) == {"train", "eval"}
    torch.testing.assert_close(planner._prev_mean["train"], train_mean, rtol=0, atol=0)
    # A state_dict round trip restores both streams, as copies.
    state = planner.state_dict()
    other = make(kind, model)
    other.load_state_dict(state)
    for k in ("train", "eval"):
        torch.testing.assert_close(other._prev_mean[k], planner._prev_mean[k], rtol=0, atol=0)
    planner._prev_mean["train"].add_(1.0)
    assert not torch.equal(other._prev_mean["train"], planner._prev_mean["train"])


@PLANNERS
def test_finds_optimum_of_toy_quadratic(kind):
    toy = ToyModel()
    planner = make(kind, toy, num_samples=256, num_pi_trajs=8, num_elites=32, iterations=6)
    z = toy_latent()
    is_first = torch.ones(E, dtype=torch.bool)
    for _ in range(4):
        a = planner.plan(z, is_first, eval_mode=True)
        is_first = torch.zeros(E, dtype=torch.bool)
    assert toy.calls["pi"] > 0 and toy.calls["Q"] > 0
    assert (a - TARGETS).abs().max() < 0.1, (a, TARGETS)
    # Training-mode actions are noisy, but still centred near the optimum.
    a_train = torch.stack([planner.plan(z, is_first) for _ in range(20)]).mean(0)
    assert (a_train - TARGETS).abs().max() < 0.25, (a_train, TARGETS)


@PLANNERS
def test_optimum_at_the_action_bound(kind):
    """An optimum outside [-1, 1] is approached from inside and the action is clipped."""
    toy = ToyModel()
    targets = torch.tensor([[3.0, -3.0]])
    planner = make(kind, toy, num_samples=128, num_elites=16, iterations=4)
    a = planner.plan(toy_latent(targets), torch.ones(1, dtype=torch.bool), eval_mode=True)
    assert (a.abs() <= 1).all()
    assert a[0, 0] > 0.8 and a[0, 1] < -0.8


class _CaptureElites:
    """Wraps a planner's `_refit` to keep the last iteration's elites."""

    def __init__(self, planner):
        self.refit = planner._refit
        planner._refit = self

    def __call__(self, elite_scores, elite_actions, mean):
        self.scores, self.actions = elite_scores.clone(), elite_actions.clone()
        return self.refit(elite_scores, elite_actions, mean)


@PLANNERS
def test_action_selection(kind):
    """By default evaluation samples an elite (the paper's rule) and takes its first
    action; `deterministic_eval=True` takes the best elite's; training samples an elite and
    adds Gaussian noise with the final std."""
    toy = ToyModel()
    z = toy_latent()
    ones = torch.ones(E, dtype=torch.bool)
    planner = make(kind, toy, num_samples=64, num_elites=8, iterations=1,
                   deterministic_eval=True)
    cap = _CaptureElites(planner)
    a = planner.plan(z, ones, eval_mode=True)
    best = cap.scores.argmax(dim=1)  # [E]
    torch.testing.assert_close(a, cap.actions[0, torch.arange(E), best], rtol=0, atol=0)
    torch.testing.assert_close(planner.last_stats["chosen_value"], cap.scores.max(1).values.mean())

    a = planner.plan(z, ones)  # training: noisy, so not exactly any elite's first action
    first = cap.actions[0]  # [E, K, A]
    dist = (first - a.unsqueeze(1)).abs().amax(-1).amin(-1)  # [E]
    assert (dist > 0).all()

    sampling = make(kind, toy, num_samples=64, num_elites=8, iterations=1)
    assert sampling.deterministic_eval is False
    cap = _CaptureElites(sampling)
    picks = set()
    for _ in range(10):
        a = sampling.plan(z, ones, eval_mode=True)
        first = cap.actions[0]  # [E, K, A]
        match = (first == a.unsqueeze(1)).all(-1)  # [E, K]
        assert match.any(1).all()  # exactly one of the elites' first actions
        picks.add(tuple(match.float().argmax(1).tolist()))
    assert len(picks) > 1


@PLANNERS
def test_invalid_sizes_raise(kind, model):
    with pytest.raises(ValueError):
        make(kind, model, num_samples=16, num_elites=17)
    with pytest.raises(ValueError):
        make(kind, model, num_elites=0)
    with pytest.raises(ValueError):
        make(kind, model, num_samples=16, num_pi_trajs=16)


@PLANNERS
def test_iterations_for_large_action_spaces(kind, model):
    assert make(kind, model, action_dim=19, iterations=6).iterations == 6
    assert make(kind, model, action_dim=20, iterations=6).iterations == 8


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5])
def test_cem_momentum_out_of_range_raises(momentum, model):
    with pytest.raises(ValueError, match="momentum"):
        make("cem", model, momentum=momentum)


def _elites(E_=2, K_=4):
    acts = torch.randn(H, E_, K_, A)
    scores = torch.randn(E_, K_)
    return scores, acts


def test_cem_refit_plain_mean_and_std(model):
    scores, acts = _elites()
    mean0 = torch.zeros(2, H, A)
    mean, std, w = make("cem", model)._refit(scores, acts, mean0)
    torch.testing.assert_close(mean, acts.mean(2).transpose(0, 1))
    torch.testing.assert_close(std, acts.std(2, unbiased=False).transpose(0, 1))
    torch.testing.assert_close(w, torch.full((2, 4), 0.25))
    # Momentum on the mean.
    prev = torch.ones(2, H, A)
    mean_m, std_m, _ = make("cem", model, momentum=0.25)._refit(scores, acts, prev)
    torch.testing.assert_close(mean_m, 0.25 * prev + 0.75 * mean)
    torch.testing.assert_close(std_m, std)


def test_mppi_refit_weighted_mean_and_std(model):
    scores, acts = _elites()
    planner = make("mppi", model, temperature=0.5)
    mean, std, w = planner._refit(scores, acts, torch.zeros(2, H, A))
    ref_w = torch.softmax(0.5 * scores, dim=1)  # exp(T (s - max)) normalized
    torch.testing.assert_close(w, ref_w)
    wk = ref_w.view(1, 2, 4, 1)
    ref_mean = (wk * acts).sum(2)  # [H, E, A]
    ref_std = (wk * (acts - ref_mean.unsqueeze(2)) ** 2).sum(2).sqrt()
    torch.testing.assert_close(mean, ref_mean.transpose(0, 1))
    torch.testing.assert_close(std, ref_std.transpose(0, 1))
    # Equal scores reduce MPPI to CEM's plain mean.
    mean_eq, _, _ = planner._refit(torch.zeros(2, 4), acts, torch.zeros(2, H, A))
    torch.testing.assert_close(mean_eq, acts.mean(2).transpose(0, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_warm_start_loaded_on_the_cpu_moves_to_the_gpu(model):
    """Checkpoints load on the CPU: a GPU planner keeps their warm-start means."""
    planner = make("mppi", model.to("cuda"))
    mean = torch.randn(E, H, A)
    planner.load_state_dict({"prev_mean": {"train": mean}})
    z = _z(model).to("cuda")
    torch.testing.assert_close(planner.warm_start(z, eval_mode=False).cpu(), mean)
