"""The speed paths compute what the plain PyTorch ops compute (README, Benchmarks).

Each fast path is compared with its reference on the same seed: the kernels alone, then
whole planning calls and updates of an agent, within float tolerance.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from components import layers
from rlcore import gemm
from rlcore.types import EnvSpec
from tests.components.test_agent import make_batch

SPEC = EnvSpec(obs_shape=(5,), action_dim=2, episode_length=500, num_envs=3)


def test_mish_matches_torch_everywhere():
    x = torch.cat([torch.linspace(-100, 100, 4001), torch.randn(4000) * 3,
                   torch.tensor([0.0, -0.0, 88.7, 89.0, -104.0, 1e4, -1e4])])
    y = layers.mish(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, F.mish(x), rtol=1e-5, atol=2e-6)
    xr = x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    (ours,) = torch.autograd.grad(layers.mish(xr), xr, g)
    (ref,) = torch.autograd.grad(F.mish(xr), xr, g)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layers.mish(x), F.mish(x), rtol=1e-5, atol=2e-6)


def test_mish_gradient_is_exact_in_double_precision():
    x = torch.cat([torch.randn(32, dtype=torch.float64) * 4,
                   torch.tensor([-30.0, -5.0, 0.0, 19.5, 25.0], dtype=torch.float64)])
    assert torch.autograd.gradcheck(layers.mish, (x.requires_grad_(True),))


@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 512), (512,)])
def test_simnorm_matches_a_grouped_softmax(shape):
    x = (torch.randn(*shape) * 4).requires_grad_(True)
    norm = layers.SimNorm(8)
    ours = norm(x)
    ref = F.softmax(x.view(*shape[:-1], -1, 8), dim=-1).view(shape)
    torch.testing.assert_close(ours, ref)
    g = torch.randn(shape)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0],
                               torch.autograd.grad(ref, x, g)[0])
    with layers.reference_kernels():
        torch.testing.assert_close(norm(x), ref)


@pytest.mark.parametrize("members", [None, [3, 0], [4, 1, 2, 0, 3]])
def test_ensemble_per_member_gemms_match_the_batched_matmul(members):
    """EnsembleMLP on CPU runs one GEMM per member; the batched matmul is the reference:
    outputs and the gradients of the input and every parameter, for all members, a subset
    (unselected members get zero gradient) and all of them in another order."""
    torch.manual_seed(0)
    net = layers.EnsembleMLP(5, 12, [16, 16], 7)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 3, 12, requires_grad=True)
    idx = None if members is None else torch.tensor(members)
    g = torch.randn(5 if members is None else len(members), 2, 3, 7)
    grads = []
    for reference in (False, True):
        net.zero_grad()
        with layers.reference_kernels() if reference else contextlib.nullcontext():
            assert (layers._member_list(idx, 5, x) is None) == reference
            out = net(x, idx)
        (gx,) = torch.autograd.grad(out, x, g, retain_graph=True)
        out.backward(g)
        grads.append((out.detach(), gx, {n: p.grad.clone() for n, p in net.named_parameters()}))
    (out, gx, gp), (ref_out, ref_gx, ref_gp) = grads
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(gx, ref_gx)
    for name in ref_gp:
        torch.testing.assert_close(gp[name], ref_gp[name], msg=name)
    if members is not None and len(members) < 5:
        assert gp["w0"][2].abs().sum() == 0 and gp["b1"][1].abs().sum() == 0


@pytest.mark.parametrize("members", [None, [3, 0], [4, 1, 2, 0, 3]])
@pytest.mark.parametrize("lead", [(6,), (2, 1, 3)])
def test_ensemble_without_gradients_on_onednn_matches_the_batched_matmul(monkeypatch, members,
                                                                         lead):
    """Without autograd (planning, TD targets) and with oneDNN's products, each member runs
    its own layers; the batched matmul of the reference kernels gives the same values."""
    from rlcore import gemm

    if not gemm.onednn_available():
        pytest.skip("this torch has no usable oneDNN linear op")
    monkeypatch.setenv("TDMPC2_ONEDNN", "1")
    torch.manual_seed(0)
    net = layers.EnsembleMLP(5, 12, [16, 16], 7, dropout=0.1).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(*lead, 12)
    idx = None if members is None else torch.tensor(members)
    calls = []
    monkeypatch.setattr(net, "_members_without_grad",
                        lambda *a, f=net._members_without_grad: calls.append(1) or f(*a))
    with torch.no_grad():
        out = net(x, idx)
        assert calls, "the per-member path without gradients was not taken"
        with layers.reference_kernels():
            ref = net(x, idx)
    assert out.shape == ref.shape == (5 if members is None else len(members), *lead, 7)
    torch.testing.assert_close(out, ref)


def test_ensemble_linear_gradient_is_exact_in_double_precision():
    w = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 1, 5, dtype=torch.float64, requires_grad=True)
    for x_members, idx in ((1, (2, 0, 3)), (3, (1, 3, 2)), (4, (0, 1, 2, 3))):
        x = torch.randn(x_members, 3, 6, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x, w, b, idx=idx: layers._EnsembleLinear.apply(x, w, b, idx), (x, w, b))


def test_repeated_members_use_the_batched_matmul():
    x = torch.randn(3, 4)
    assert layers._member_list(torch.tensor([1, 1]), 3, x) is None
    assert layers._member_list(torch.tensor([2, 0]), 3, x) == (2, 0)
    assert layers._member_list(None, 3, x) == (0, 1, 2)


def _randomize_outputs(agent):
    """Zero-initialized output layers make every score equal; give them weights so that
    planning really ranks candidates."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in agent.model.parameters():
            if p.abs().sum() == 0 and p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        agent.model.sync_copies()


def _twins(tiny_agent_factory, **kwargs):
    torch.manual_seed(0)
    a = tiny_agent_factory(SPEC, **kwargs)
    _randomize_outputs(a)
    return a, copy.deepcopy(a)


def _run(agent, steps: int = 3):
    torch.manual_seed(7)
    obs = torch.randn(SPEC.num_envs, 5)
    out = []
    for i in range(steps):
        first = torch.full((SPEC.num_envs,), i == 0)
        out.append(("act", agent.act(obs, first)))
        metrics = agent.update(make_batch(seed=i))
        out += [(k, metrics[k]) for k in metrics.keys() if k.startswith("loss_")]
        obs = obs + 0.1 * torch.randn_like(obs)
    out.append(("eval_act", agent.act(obs, torch.zeros(SPEC.num_envs, dtype=torch.bool),
                                      eval_mode=True)))
    return out


@pytest.mark.parametrize("planner", ["mppi", "cem"])
def test_fast_kernels_give_the_same_actions_and_updates(tiny_agent_factory, planner):
    fast, ref = _twins(tiny_agent_factory, planner=planner,
                       planner_kwargs={"num_samples": 64, "num_elites": 8})
    got = _run(fast)
    with layers.reference_kernels():
        want = _run(ref)
    assert [k for k, _ in got] == [k for k, _ in want]
    for (name, a), (_, b) in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    for (n, p), q in zip(fast.model.named_parameters(), ref.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_fused_optimizer_gives_the_same_updates(tiny_agent_factory):
    torch.manual_seed(0)
    fused = tiny_agent_factory(SPEC, fused_optimizer=True)
    _randomize_outputs(fused)
    loop = tiny_agent_factory(SPEC, fused_optimizer=False)
    loop.load_state_dict(fused.state_dict())
    assert fused.model_optim.defaults["fused"] and not loop.model_optim.defaults["fused"]
    got, want = _run(fused), _run(loop)
    for (name, a), (_, b) in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    for (n, p), q in zip(fused.model.named_parameters(), loop.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("cols", [(4, 6), (0, 4)])
@pytest.mark.parametrize("x_members", [1, 2])
def test_ensemble_linear_computes_the_input_gradient_of_chosen_columns(x_members, cols):
    """grad_cols = (lo, hi): the input gradient of those columns is the full one, the
    other columns get zero (the caller promised nothing upstream needs them); weights'
    gradients unchanged."""
    torch.manual_seed(0)
    lo, hi = cols
    w = torch.randn(3, 6, 5, requires_grad=True)
    b = torch.randn(3, 1, 5, requires_grad=True)
    x = torch.randn(x_members, 4, 6, requires_grad=True)
    g = torch.randn(2, 4, 5)
    full = torch.autograd.grad(layers._EnsembleLinear.apply(x, w, b, (2, 0)), (x, w, b), g)
    part = torch.autograd.grad(layers._EnsembleLinear.apply(x, w, b, (2, 0), cols),
                               (x, w, b), g)
    torch.testing.assert_close(part[0][..., lo:hi], full[0][..., lo:hi])
    rest = torch.cat([part[0][..., :lo], part[0][..., hi:]], -1)
    assert rest.abs().sum() == 0 and full[0].abs().sum() > 0
    torch.testing.assert_close(part[1], full[1])
    torch.testing.assert_close(part[2], full[2])


@pytest.mark.parametrize("per_member", [False, True])
@pytest.mark.parametrize("cols", [(4, 6), (0, 4)])
@pytest.mark.parametrize("shared_input", [True, False])
def test_batched_linear_computes_the_input_gradient_of_chosen_columns(shared_input, cols,
                                                                      per_member):
    """The batched path's grad_cols (CUDA, torch.compile; per member GEMMs on CPU under
    compile): columns in [lo, hi) get the input gradient of plain baddbmm, the others
    zero; weight and bias gradients unchanged; the skipped product is not run (counted
    FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    lo, hi = cols
    w = torch.randn(3, 6, 5, requires_grad=True)
    b = torch.randn(3, 1, 5, requires_grad=True)
    x0 = torch.randn(1 if shared_input else 3, 4, 6, requires_grad=True)
    g = torch.randn(3, 4, 5)

    def grads(fn):
        with FlopCounterMode(display=False) as counter:
            out = torch.autograd.grad(fn(x0.expand(3, -1, -1)), (x0, w, b), g)
        return out, counter.get_total_flops()

    full, full_flops = grads(lambda x: torch.baddbmm(b, x, w))
    part, part_flops = grads(
        lambda x: layers._BatchedLinearGradCols.apply(b, x, w, cols, per_member))
    torch.testing.assert_close(part[0][..., lo:hi], full[0][..., lo:hi])
    rest = torch.cat([part[0][..., :lo], part[0][..., hi:]], -1)
    assert rest.abs().sum() == 0 and full[0].abs().sum() > 0
    torch.testing.assert_close(part[1], full[1])
    torch.testing.assert_close(part[2], full[2])
    # the input gradient of 6 columns vs of hi - lo: 3 members x [4, 5] x [5, 6 - (hi - lo)]
    assert full_flops - part_flops == 2 * 3 * 4 * 5 * (6 - (hi - lo))


@pytest.mark.parametrize("cols", [(4, 6), (0, 4)])
def test_linear_computes_the_input_gradient_of_chosen_columns(cols):
    """`gemm.linear(grad_cols=...)` (reward, dynamics, joint auxiliary heads): columns in
    [lo, hi) get F.linear's input gradient, the others zero, with fewer FLOPs; weight and
    bias gradients unchanged."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    lo, hi = cols
    w = torch.randn(5, 6, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    x = torch.randn(2, 4, 6, requires_grad=True)
    g = torch.randn(2, 4, 5)

    def grads(fn):
        with FlopCounterMode(display=False) as counter:
            out = torch.autograd.grad(fn(), (x, w, b), g)
        return out, counter.get_total_flops()

    full, full_flops = grads(lambda: F.linear(x, w, b))
    part, part_flops = grads(lambda: gemm.linear(x, w, b, grad_cols=cols))
    torch.testing.assert_close(part[0][..., lo:hi], full[0][..., lo:hi])
    rest = torch.cat([part[0][..., :lo], part[0][..., hi:]], -1)
    assert rest.abs().sum() == 0 and full[0].abs().sum() > 0
    torch.testing.assert_close(part[1], full[1])
    torch.testing.assert_close(part[2], full[2])
    assert full_flops - part_flops == 2 * 8 * 5 * (6 - (hi - lo))


def test_grad_columns_names_the_part_that_needs_a_gradient():
    z, a = torch.randn(3, 4), torch.randn(3, 2)
    zg, ag = z.clone().requires_grad_(True), a.clone().requires_grad_(True)
    assert layers.grad_columns(zg, a) == (0, 4)
    assert layers.grad_columns(z, ag) == (4, 6)
    assert layers.grad_columns(zg, ag) is None and layers.grad_columns(z, a) is None
    with torch.no_grad():
        assert layers.grad_columns(zg, a) is None


def test_policy_q_gradient_reaches_the_action_only_on_the_batched_path(tiny_agent_factory):
    """Repeated members run as one batched matmul: the policy loss's Q still gives the
    action the plain computation's gradient, through `_BatchedLinearGradCols`."""
    torch.manual_seed(0)
    agent = tiny_agent_factory(SPEC, num_q=5)
    _randomize_outputs(agent)
    net = agent.model._Qs
    params = {k: v.detach() for k, v in net.named_parameters()}
    z = torch.randn(3, 4, agent.model.latent_dim)
    L = z.shape[-1]
    members = torch.tensor([3, 3])  # repeated: not the per-member GEMMs
    out = []
    for kwargs in ({"input_grad_cols": (L, L + SPEC.action_dim)}, {}):
        a = (torch.rand(3, 4, SPEC.action_dim, generator=torch.Generator().manual_seed(1))
             * 2 - 1).requires_grad_(True)
        x = torch.cat([z, a], -1)
        logits = torch.func.functional_call(net, params, (x, members), kwargs)
        out.append((logits.detach(), torch.autograd.grad(logits.square().sum(), a)[0]))
    torch.testing.assert_close(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1])
    assert out[0][1].abs().sum() > 0


@pytest.mark.parametrize("aux_head", ["JointAuxQHead", "SeparateAuxQHead"])
def test_model_side_heads_give_the_latent_the_plain_gradient(aux_head):
    """Q ensemble (all members), reward, dynamics and auxiliary Q heads on a latent that
    needs a gradient beside an action that is data (the model losses): the action's
    input-gradient product is skipped, and outputs, the latent's gradient and every
    parameter gradient equal the plain computation's."""
    from torch.utils.flop_counter import FlopCounterMode

    from components import heads
    from tests.conftest import TINY_HIDDEN, tiny_world_model_factory

    torch.manual_seed(0)
    model = tiny_world_model_factory(num_q=5)(
        SPEC, aux_discounts=(0.9, 0.95),
        aux_q_head=functools.partial(getattr(heads, aux_head), hidden_dim=TINY_HIDDEN))
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():  # zero-initialized output layers would give zero gradients
        for p in model.parameters():
            if p.abs().sum() == 0 and p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.train()
    z0 = torch.randn(3, 4, model.latent_dim)
    a = torch.rand(3, 4, SPEC.action_dim) * 2 - 1
    results = []
    for reference in (False, True):
        torch.manual_seed(5)  # the same dropout masks
        z = z0.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        with (layers.reference_kernels() if reference else contextlib.nullcontext(),
              FlopCounterMode(display=False) as counter):
            outs = [model.Q(z, a, return_type="all"), model.reward(z, a), model.next(z, a),
                    model.aux_Q(z, a)]
            loss = sum((o * torch.linspace(-1, 1, o.shape[-1])).square().sum() for o in outs)
            loss.backward()
        results.append(([o.detach() for o in outs], z.grad,
                        {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                        counter.get_total_flops()))
    (got, gz, gp, flops), (want, rz, rp, ref_flops) = results
    # the skipped action-gradient products: [N, H] x [H, A] for 5 Q members, the reward,
    # the dynamics and the auxiliary heads (one trunk, or one member per discount)
    first_layers = 5 + 1 + 1 + (2 if aux_head == "SeparateAuxQHead" else 1)
    assert ref_flops - flops == 2 * 12 * TINY_HIDDEN * SPEC.action_dim * first_layers
    tol = {"rtol": 1e-4, "atol": 1e-5}  # fused kernels vs plain ops: float32 rounding
    for o, r in zip(got, want):
        torch.testing.assert_close(o, r, **tol)
    torch.testing.assert_close(gz, rz, **tol)
    assert gz.abs().sum() > 0
    assert gp.keys() == rp.keys() and len(gp) > 0
    for name in rp:
        torch.testing.assert_close(gp[name], rp[name], **tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_policy_q_gradient_reaches_the_action_only(tiny_agent_factory):
    """Q(z, a, detach=True) with a detached latent (the policy loss) skips the latent's
    input gradient; the action's gradient is that of the plain computation."""
    torch.manual_seed(0)
    agent = tiny_agent_factory(SPEC, num_q=5)
    _randomize_outputs(agent)
    model = agent.model
    z = torch.randn(3, 4, model.latent_dim)
    grads = []
    for reference in (False, True):
        torch.manual_seed(5)
        a = (torch.rand(3, 4, SPEC.action_dim) * 2 - 1).requires_grad_(True)
        with layers.reference_kernels() if reference else contextlib.nullcontext():
            q = model.Q(z, a, return_type="avg", detach=True)
        (ga,) = torch.autograd.grad(q.sum(), a)
        grads.append((q.detach(), ga))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    assert grads[0][1].abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("grad_scale", [1e-3, 1e3, float("nan")])
def test_clip_grad_norm_matches_torch(grad_scale):
    """Within bounds (no scaling), beyond them (scaled) and NaN: the same norm and the
    same gradients, bit for bit, as torch.nn.utils.clip_grad_norm_."""
    from components.agent import clip_grad_norm

    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(50, 40)) for _ in range(3)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for p, q in zip(ours, ref):
        p.grad = torch.randn_like(p) * grad_scale
        q.grad = p.grad.clone()
    got, want = clip_grad_norm(ours, 20.0), torch.nn.utils.clip_grad_norm_(ref, 20.0)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True, rtol=0, atol=0)


def test_td_targets_share_one_policy_evaluation():
    """The value and auxiliary-value TD targets both act from z_{t+1} with the target
    policy: the network runs once for both (fewer FLOPs by exactly one evaluation), the
    noise is still drawn per call in the same order, and an update gives bit-identical
    results to evaluating the policy twice."""
    from torch.utils.flop_counter import FlopCounterMode

    from components.agent import TDMPC2Agent
    from components.heads import JointAuxQHead
    from components.losses import AuxValueLoss, PolicyLoss, WorldModelLoss
    from tests.components.test_agent import B, T
    from tests.conftest import TINY_HIDDEN, tiny_planner_factory, tiny_world_model_factory

    torch.manual_seed(0)
    world_model = functools.partial(
        tiny_world_model_factory(num_q=5), aux_discounts=(0.9, 0.95),
        aux_q_head=functools.partial(JointAuxQHead, hidden_dim=TINY_HIDDEN))
    shared = TDMPC2Agent(SPEC, "cpu", world_model=world_model,
                         planner=tiny_planner_factory("mppi"), model_loss=WorldModelLoss,
                         policy_loss=PolicyLoss, extra_losses=[AuxValueLoss])
    _randomize_outputs(shared)
    twice = copy.deepcopy(shared)
    twice.model.share_policy_trunks = lambda on: None  # every pi call runs the network
    batch = make_batch(seed=3)
    results = []
    for agent in (shared, twice):
        torch.manual_seed(11)
        with FlopCounterMode(display=False) as counter:
            metrics = agent.update(batch)
        results.append((metrics, counter.get_total_flops()))
    (got, flops), (want, flops_twice) = results
    assert set(got.keys()) == set(want.keys())
    for key in want.keys():
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    for (n, p), q in zip(shared.model.named_parameters(), twice.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        shared.model._pi.trunk(torch.zeros(T, B, shared.model.latent_dim))
    assert flops_twice - flops == counter.get_total_flops() > 0
    assert shared.model._shared_trunks is None  # nothing kept after the update


def test_shared_policy_trunk_is_reused_only_without_gradients(tiny_world_model):
    torch.manual_seed(0)
    model = tiny_world_model(SPEC)
    z = torch.randn(4, model.latent_dim)
    model.share_policy_trunks(True)
    try:
        with torch.no_grad():
            torch.manual_seed(1)
            a1, _ = model.pi(z, target=True)
            a2, _ = model.pi(z, target=True)  # reused trunk, fresh noise
            a3, _ = model.pi(z.clone(), target=True)  # another tensor: its own evaluation
        assert len(model._shared_trunks) == 2
        a4, _ = model.pi(z, target=True)  # with gradients: never from the store
        assert a4.requires_grad and len(model._shared_trunks) == 2
    finally:
        model.share_policy_trunks(False)
    torch.manual_seed(1)
    with torch.no_grad():
        b1, _ = model.pi(z, target=True)
        b2, _ = model.pi(z, target=True)
    torch.testing.assert_close(a1, b1, rtol=0, atol=0)
    torch.testing.assert_close(a2, b2, rtol=0, atol=0)
    assert not torch.equal(a1, a2)
