"""components.encoders.ConvEncoder and random_shift: shapes, SimNorm, augmentation, gradients."""

from __future__ import annotations

import functools

import gin
import pytest
import torch

from components.encoders import ConvEncoder, random_shift
from rlcore import registry
from rlcore.types import EnvSpec

SPEC = EnvSpec(obs_shape=(9, 64, 64), action_dim=2, episode_length=50, obs_type="pixels")
L = 16


def _obs(*lead):
    return torch.randint(0, 256, (*lead, *SPEC.obs_shape), dtype=torch.uint8)


@pytest.mark.parametrize("lead", [(4,), (3, 2)], ids=["[B]", "[T,B]"])
def test_shapes_and_simnorm(lead):
    enc = ConvEncoder(SPEC, L)
    for mode in (True, False):
        z = enc.train(mode)(_obs(*lead))
        assert z.shape == (*lead, L) and z.dtype == torch.float32
        groups = z.view(*lead, L // 8, 8)
        assert torch.allclose(groups.sum(-1), torch.ones(*lead, L // 8), atol=1e-5)
        assert (groups >= 0).all()


def test_single_observation_and_float_input():
    enc = ConvEncoder(SPEC, L).eval()
    obs = _obs(2)
    assert enc(obs[0]).shape == (L,)
    assert torch.allclose(enc(obs), enc(obs.float()))  # float input: the same 0..255 scale


def test_random_shift_only_in_training():
    enc = ConvEncoder(SPEC, L, random_shift_pad=4)
    obs = _obs(8)
    enc.eval()
    assert torch.equal(enc(obs), enc(obs))
    enc.train()
    assert not torch.allclose(enc(obs), enc(obs))
    # Without shifts, training and evaluation compute the same function.
    plain = ConvEncoder(SPEC, L, random_shift_pad=0)
    assert torch.equal(plain.train()(obs), plain.eval()(obs))


def test_random_shift_is_a_crop_of_the_padded_image():
    x = torch.rand(6, 3, 12, 12)
    pad = 2
    out = random_shift(x, pad)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (pad,) * 4, mode="replicate")
    offsets = set()
    for n in range(6):
        hits = [(i, j) for i in range(2 * pad + 1) for j in range(2 * pad + 1)
                if torch.equal(out[n], padded[n, :, i:i + 12, j:j + 12])]
        assert hits, n
        offsets.add(hits[0])
    assert len(offsets) > 1  # independent shifts per image


def test_gradients_reach_every_parameter():
    enc = ConvEncoder(SPEC, L).train()
    z = enc(_obs(2, 3))
    (z * torch.randn_like(z)).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_reset_parameters_redraws_the_init():
    enc = ConvEncoder(SPEC, L)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    with torch.no_grad():
        enc.out.bias.fill_(1.0)
    enc.reset_parameters()
    after = enc.state_dict()
    assert torch.equal(after["out.bias"], torch.zeros(L))
    assert not torch.equal(after["convs.0.weight"], before["convs.0.weight"])
    assert not torch.equal(after["out.weight"], before["out.weight"])
    assert after["out.weight"].std() < 0.03  # TD-MPC2's truncated normal, std 0.02


def test_config_errors():
    with pytest.raises(ValueError, match="MLPEncoder"):
        ConvEncoder(EnvSpec(obs_shape=(5,), action_dim=1, episode_length=10), L)
    with pytest.raises(ValueError, match="39"):
        ConvEncoder(EnvSpec(obs_shape=(9, 32, 32), action_dim=1, episode_length=10), L)
    with pytest.raises(ValueError, match="multiple"):
        ConvEncoder(SPEC, 12)
    with pytest.raises(ValueError, match="expected observations"):
        ConvEncoder(SPEC, L)(torch.zeros(2, 9, 32, 32, dtype=torch.uint8))


def test_registered_and_built_by_the_world_model():
    from components.dynamics import MLPDynamics
    from components.heads import DiscreteRegressionHead, EnsembleQHead, TanhGaussianPolicyHead
    from components.world_model import WorldModel

    assert registry.registered("encoders")["ConvEncoder"] is ConvEncoder
    gin.parse_config("WorldModel.encoder = @encoders.ConvEncoder")  # resolvable by gin
    model = WorldModel(
        SPEC, latent_dim=L, num_bins=21,
        encoder=functools.partial(ConvEncoder, num_channels=8),  # called as encoder(spec, L)
        dynamics=functools.partial(MLPDynamics, hidden_dim=32),
        reward_head=functools.partial(DiscreteRegressionHead, hidden_dim=32),
        q_head=functools.partial(EnsembleQHead, hidden_dim=32, num_q=2),
        policy_head=functools.partial(TanhGaussianPolicyHead, hidden_dim=32))
    z = model.encode(_obs(4, 3))  # [T+1, B, *obs] -> [T+1, B, L]
    assert z.shape == (4, 3, L)
