"""rlcore.math: symlog/two-hot regression, Gaussian log-probs, discount and Polyak helpers."""

from __future__ import annotations

import math

import pytest
import torch

from rlcore import math as rmath

K, VMIN, VMAX = 101, -10.0, 10.0


def test_symexp_inverts_symlog():
    x = torch.tensor([-1e4, -50.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 1.0, 7.0, 1e3])
    torch.testing.assert_close(rmath.symexp(rmath.symlog(x)), x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rmath.symlog(x), torch.sign(x) * torch.log1p(x.abs()))


@pytest.mark.parametrize("num_bins", [21, 101])
def test_two_hot_inv_inverts_two_hot_inside_support(num_bins):
    # Values whose symlog lies inside [-10, 10], including exact bin centres and 0.
    x = torch.cat([torch.linspace(-2000.0, 2000.0, 41), torch.tensor([0.0, 0.3, -0.7, 12.5])])
    th = rmath.two_hot(x, num_bins, VMIN, VMAX)  # [N, K]
    logits = torch.log(th.double() + 1e-12)
    out = rmath.two_hot_inv(logits, num_bins, VMIN, VMAX).squeeze(-1)  # [N]
    assert out.shape == x.shape
    torch.testing.assert_close(rmath.symlog(out), rmath.symlog(x.double()), rtol=0, atol=1e-5)
    torch.testing.assert_close(out, x.double(), rtol=1e-4, atol=1e-5)


def test_two_hot_is_a_distribution_on_neighbouring_bins():
    x = torch.randn(4, 7) * 30
    th = rmath.two_hot(x, K, VMIN, VMAX)
    assert th.shape == (4, 7, K)
    assert (th >= 0).all()
    torch.testing.assert_close(th.sum(-1), torch.ones(4, 7))
    # At most two non-zero bins, and they are neighbours.
    nz = th > 0
    assert (nz.sum(-1) <= 2).all()
    idx = torch.arange(K).expand_as(th)
    span = torch.where(nz, idx, -1).amax(-1) - torch.where(nz, idx, K).amin(-1)
    assert (span <= 1).all()
    # The expectation over bin centres reproduces symlog(x) (linear interpolation).
    centres = rmath.bin_centres(K, VMIN, VMAX)
    torch.testing.assert_close((th * centres).sum(-1), rmath.symlog(x), atol=1e-5, rtol=0)


def test_two_hot_exact_bin_centre_is_one_hot():
    x = rmath.symexp(torch.tensor([0.0, 0.2, -0.4]))  # bin width 0.2 at K=101
    th = rmath.two_hot(x, K, VMIN, VMAX)
    assert torch.allclose(th.max(-1).values, torch.ones(3), atol=1e-5)
    assert th.argmax(-1).tolist() == [50, 51, 48]


def test_two_hot_clips_at_support_edges():
    big = torch.tensor([1e9, -1e9, float("inf"), -float("inf")])
    th = rmath.two_hot(big, K, VMIN, VMAX)
    torch.testing.assert_close(th.sum(-1), torch.ones(4))
    assert th[0, -1] == 1 and th[2, -1] == 1
    assert th[1, 0] == 1 and th[3, 0] == 1
    # Decoding a confident edge bin gives symexp(vmax) / symexp(vmin).
    dec = rmath.two_hot_inv(torch.log(th.double() + 1e-30), K, VMIN, VMAX).squeeze(-1)
    torch.testing.assert_close(rmath.symlog(dec), torch.tensor([10.0, -10, 10, -10]).double())


def test_two_hot_nan_target_gives_nan_not_an_error():
    """No data-dependent check (it would sync the host every update): a NaN target gives a
    NaN encoding and a NaN loss, which the runners' non-finite-loss check reports."""
    th = rmath.two_hot(torch.tensor([0.0, float("nan")]), K, VMIN, VMAX)
    assert torch.isfinite(th[0]).all() and torch.isnan(th[1]).any()
    loss = rmath.soft_ce(torch.zeros(2, K), torch.tensor([[1.0], [float("nan")]]), K, VMIN, VMAX)
    assert torch.isfinite(loss[0]).all() and torch.isnan(loss[1]).all()


def test_soft_ce_non_negative_and_minimal_at_own_two_hot():
    target = torch.tensor([-3.0, 0.0, 0.37, 25.0, 400.0]).unsqueeze(-1)  # [N, 1]
    own = torch.log(rmath.two_hot(target.squeeze(-1), K, VMIN, VMAX) + 1e-9)  # [N, K]
    random_logits = torch.randn(16, *own.shape) * 3
    ce_own = rmath.soft_ce(own, target, K, VMIN, VMAX)  # [N, 1]
    ce_rand = rmath.soft_ce(random_logits, target.expand(16, -1, -1), K, VMIN, VMAX)
    assert ce_own.shape == (5, 1) and ce_rand.shape == (16, 5, 1)
    assert (ce_own >= 0).all() and (ce_rand >= 0).all()
    assert (ce_own <= ce_rand).all()
    # The own two-hot reaches the entropy of the target distribution (minimum of CE).
    th = rmath.two_hot(target.squeeze(-1), K, VMIN, VMAX)
    entropy = -(th * torch.log(th.clamp_min(1e-30))).sum(-1, keepdim=True)
    torch.testing.assert_close(ce_own, entropy, atol=1e-4, rtol=0)
    # A target of shape [...] (no trailing 1) gives the same result.
    torch.testing.assert_close(rmath.soft_ce(own, target.squeeze(-1), K, VMIN, VMAX), ce_own)


def test_soft_ce_gradient_points_to_target():
    target = torch.tensor([[2.0]])
    logits = torch.zeros(1, K, requires_grad=True)
    rmath.soft_ce(logits, target, K, VMIN, VMAX).sum().backward()
    # Gradient is softmax - two_hot: negative only on the target's bins.
    th = rmath.two_hot(target.squeeze(-1), K, VMIN, VMAX)
    torch.testing.assert_close(logits.grad, torch.softmax(logits.detach(), -1) - th)


def test_gaussian_logprob_matches_torch_normal():
    mean = torch.randn(6, 4)
    log_std = torch.randn(6, 4).clamp(-3, 1)
    eps = torch.randn(6, 4)
    sample = mean + eps * log_std.exp()
    ref = torch.distributions.Normal(mean, log_std.exp()).log_prob(sample).sum(-1, keepdim=True)
    out = rmath.gaussian_logprob(eps, log_std)
    assert out.shape == (6, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_squash_log_prob_finite_at_saturation():
    mu = torch.tensor([[0.0, 50.0, -50.0]])
    pi = torch.tensor([[1e4, -1e4, 30.0]])  # tanh(pi) == +-1 exactly in float32
    log_pi = torch.zeros(1, 1)
    m, p, lp = rmath.squash(mu, pi, log_pi)
    assert torch.isfinite(lp).all()
    assert (p.abs() <= 1).all() and (m.abs() <= 1).all()
    # Correction term: -sum log(1 - tanh^2 + 1e-6) is bounded by 3 * log(1e6).
    assert lp.item() <= 3 * math.log(1e6) + 1e-3
    # Away from saturation it matches the exact change of variables.
    pi2 = torch.tensor([[0.3, -0.2, 0.1]])
    _, p2, lp2 = rmath.squash(mu, pi2, log_pi)
    exact = -torch.log(1 - torch.tanh(pi2) ** 2).sum(-1, keepdim=True)
    torch.testing.assert_close(lp2, exact, atol=1e-5, rtol=1e-4)


def test_log_std_squash_range():
    x = torch.linspace(-100, 100, 1001)
    y = rmath.log_std_squash(x)
    assert y.min() >= -10.0 and y.max() <= 2.0
    assert y[0] == pytest.approx(-10.0) and y[-1] == pytest.approx(2.0)
    assert rmath.log_std_squash(torch.zeros(())).item() == pytest.approx(-4.0)
    assert (y[1:] >= y[:-1]).all()  # monotone
    y2 = rmath.log_std_squash(x, low=-5.0, high=1.0)
    assert y2.min() >= -5.0 and y2.max() <= 1.0


def test_episode_discount():
    assert rmath.episode_discount(500) == pytest.approx(0.99)
    assert rmath.episode_discount(1000) == pytest.approx(0.995)
    assert rmath.episode_discount(10) == pytest.approx(0.95)  # clipped low
    assert rmath.episode_discount(100_000) == pytest.approx(0.995)  # clipped high
    assert rmath.episode_discount(250) == pytest.approx(0.98)
    assert rmath.episode_discount(10, low=0.1) == pytest.approx(0.5)
    assert isinstance(rmath.episode_discount(500), float)


def test_polyak_in_place():
    target = [torch.zeros(3), torch.full((2, 2), 4.0)]
    online = [torch.ones(3), torch.zeros(2, 2)]
    ids = [id(t) for t in target]
    rmath.polyak_(target, online, 0.1)
    assert [id(t) for t in target] == ids
    torch.testing.assert_close(target[0], torch.full((3,), 0.1))
    torch.testing.assert_close(target[1], torch.full((2, 2), 3.6))
    rmath.polyak_(target, online, 1.0)
    torch.testing.assert_close(target[0], online[0])
    torch.testing.assert_close(target[1], online[1])
    # Works on parameters that require grad (no autograd error).
    p = torch.nn.Parameter(torch.zeros(2))
    rmath.polyak_([p], [torch.ones(2)], 0.5)
    torch.testing.assert_close(p.detach(), torch.full((2,), 0.5))
