"""`TDMPC2Agent.compile` and `TDMPC2Agent.cuda_graphs` change speed only.

An agent with the switch on and its eager twin (same weights, same seed) give the same
actions, losses and parameters within float tolerance. The CUDA tests run when a GPU is
present and are skipped (never failing) without one.
"""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch

from rlcore.types import EnvSpec
from tests.components.test_layers import _randomize_outputs, _run

SPEC = EnvSpec(obs_shape=(5,), action_dim=2, episode_length=500, num_envs=3)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _agent(device, num_q=2, **kwargs):
    from components.agent import TDMPC2Agent
    from components.losses import PolicyLoss, WorldModelLoss
    from tests.conftest import tiny_planner_factory, tiny_world_model_factory

    return TDMPC2Agent(SPEC, device, world_model=tiny_world_model_factory(num_q=num_q),
                       planner=tiny_planner_factory("mppi", num_samples=64, num_elites=8),
                       model_loss=WorldModelLoss, policy_loss=PolicyLoss, **kwargs)


def _compare(device, **switches):
    torch.manual_seed(0)
    eager = _agent(device)
    _randomize_outputs(eager)
    fast = _agent(device, **switches)
    fast.load_state_dict(eager.state_dict())
    assert list(fast.state_dict()["model"]) == list(eager.state_dict()["model"])
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    got = _run(fast)
    # The switch must compile something: a no-op `compile` would pass every comparison.
    assert counters["stats"]["unique_graphs"] > graphs_before, "torch.compile traced no graph"
    want = _run(eager)
    assert [k for k, _ in got] == [k for k, _ in want]
    for (name, a), (_, b) in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
    for (n, p), q in zip(fast.model.named_parameters(), eager.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


@contextlib.contextmanager
def _record_mutated_inputs():
    """Yields a list that collects (input name, has a static address) for each input that
    a graph inductor compiles in the block mutates. CUDA graphs skip a graph that mutates
    an input without a static address ("skipping cudagraphs due to mutated inputs"); the
    list is built on CPU, where the same graphs are traced."""
    import torch._functorch.config
    import torch._inductor.config
    from torch._inductor import output_code

    init = output_code.CompiledFxGraph.__init__
    signature = inspect.signature(init)
    seen: list[tuple[str, bool]] = []

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs).arguments
        static = set(bound["static_input_idxs"])
        inputs = [n.name for n in bound["gm"].graph.nodes if n.op == "placeholder"]
        seen.extend((inputs[i], i in static) for i in sorted(self.mutated_input_idxs))

    output_code.CompiledFxGraph.__init__ = recording
    try:  # graphs loaded from inductor's caches are not built again: caches off
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            yield seen
    finally:
        output_code.CompiledFxGraph.__init__ = init


COMPILE = {"compile": True, "compile_options": {"fallback_random": True}}  # the preset


@pytest.mark.slow
def test_compiled_agent_matches_eager_on_cpu():
    """Every input the graphs mutate (the running scale) has a static address, so CUDA
    graphs can capture every graph."""
    import torch._dynamo

    torch._dynamo.reset()
    with _record_mutated_inputs() as mutated:
        _compare("cpu", **COMPILE)
    # the running scale (the policy graph)
    assert len(mutated) >= 1, f"expected graphs that mutate inputs, saw {mutated}"
    assert all(static for _, static in mutated), (
        f"compiled graphs mutate inputs without a static address (CUDA graphs would skip "
        f"them): {[name for name, static in mutated if not static]}")


@pytest.mark.slow
def test_compiled_agent_with_cpp_wrappers_matches_eager_on_cpu():
    """`compile_cpp_wrapper`: the graphs' wrappers in C++ give the eager results."""
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config
    from torch._inductor import output_code

    torch._dynamo.reset()
    built = []
    init = output_code.CompiledFxGraph.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(torch._inductor.config.cpp_wrapper)

    output_code.CompiledFxGraph.__init__ = recording
    try:  # graphs loaded from inductor's caches are not built again: caches off
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            _compare("cpu", **COMPILE, compile_cpp_wrapper=True)
    finally:
        output_code.CompiledFxGraph.__init__ = init
    assert built and all(built), f"graphs built without the C++ wrapper: {built}"


def test_cpp_wrappers_need_compile_and_a_cpu():
    with pytest.raises(ValueError, match="compile = True"):
        _agent("cpu", compile_cpp_wrapper=True)
    with pytest.raises(ValueError, match="for CPU agents"):
        _agent("meta", compile=True, compile_cpp_wrapper=True)


@pytest.mark.slow
def test_compiled_cem_agent_matches_eager_on_every_pathway():
    """CEM, five Q members (a random pair per value), each update pathway, acting and
    evaluating: the compiled search and loss graphs give the eager results."""
    from components.agent import TDMPC2Agent
    from components.losses import PolicyLoss, WorldModelLoss
    from tests.components.test_agent import make_batch
    from tests.conftest import tiny_planner_factory, tiny_world_model_factory

    def agent(**kwargs):
        return TDMPC2Agent(SPEC, "cpu", world_model=tiny_world_model_factory(num_q=5),
                           planner=tiny_planner_factory("cem", num_samples=64, num_elites=8),
                           model_loss=WorldModelLoss, policy_loss=PolicyLoss, **kwargs)

    def run(ag):
        torch.manual_seed(1)
        obs, out = torch.randn(SPEC.num_envs, 5), []
        for i, pathway in enumerate(["full", "actor_critic", "policy", "full"]):
            out.append(ag.act(obs, torch.full((SPEC.num_envs,), i == 0)))
            metrics = ag.update(make_batch(seed=i), pathway=pathway)
            out += [metrics[k] for k in sorted(metrics.keys()) if k.startswith("loss_")]
        out.append(ag.act(obs, torch.zeros(SPEC.num_envs, dtype=torch.bool), eval_mode=True))
        return out

    torch.manual_seed(0)
    eager = agent()
    _randomize_outputs(eager)
    fast = agent(**COMPILE)
    fast.load_state_dict(eager.state_dict())
    got, want = run(fast), run(eager)
    assert len(got) == len(want) == 19
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@needs_cuda
def test_compiled_agent_matches_eager_on_cuda():
    _compare("cuda", **COMPILE)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_match_eager_on_cuda():
    _compare("cuda", **COMPILE, cuda_graphs=True)


def test_cuda_graphs_need_cuda_and_compile():
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        _agent("cpu", compile=True, cuda_graphs=True)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="compile = True"):
            _agent("cuda", cuda_graphs=True)


@pytest.mark.slow
def test_compiled_agent_compiles_each_graph_once():
    """After the first acting call and update, later ones reuse their graphs: a guard that
    fails on the second call (gradients the first update left) would compile everything
    again, minutes for a 5M model."""
    import torch._dynamo

    from tests.components.test_agent import make_batch

    torch._dynamo.reset()
    agent = _agent("cpu", **COMPILE)
    obs = torch.randn(SPEC.num_envs, 5)
    agent.act(obs, torch.ones(SPEC.num_envs, dtype=torch.bool))
    agent.update(make_batch(seed=0))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(1, 3):
            agent.act(obs, torch.zeros(SPEC.num_envs, dtype=torch.bool))
            agent.update(make_batch(seed=i))


def test_compiled_cpu_agent_also_updates_eagerly():
    """The benchmark counts FLOPs with compiled code forced eager; the compiled agent's
    Adam state (capturable, for the traced graph) must then step as eager CPU Adam."""
    from tests.components.test_agent import make_batch

    agent = _agent("cpu", **COMPILE)
    before = [p.detach().clone() for p in agent.model.parameters()]
    with torch.compiler.set_stance("force_eager"):
        agent.update(make_batch(seed=0))
    assert any(not torch.equal(a, p) for a, p in zip(before, agent.model.parameters()))


@pytest.mark.parametrize("pathway", ["full", "actor_critic", "policy"])
def test_acting_and_updates_trace_as_one_graph_each(pathway):
    """A whole acting call (encoder, every planning iteration, the action) and a whole
    update (losses, backward, clipping, both Adam steps, target copies, running scale)
    each trace as one graph: a graph break would split them and run the rest eagerly, and
    a host-device sync (`.item()`, branching on a tensor) would be one. Five Q members, so
    the member draw is traced too."""
    import functools

    import torch._dynamo

    from components.agent import TDMPC2Agent
    from tests.components.test_agent import make_batch

    compiled = _agent("cpu", num_q=5, **COMPILE)  # its optimizers and dynamo settings
    obs, is_first = torch.randn(SPEC.num_envs, 5), torch.tensor([True, False, True])

    def one_graph(method, *args):  # traces the method itself, not its compiled wrapper
        found = torch._dynamo.explain(functools.partial(method, compiled))(*args)
        assert (found.graph_count, found.graph_break_count) == (1, 0), found.break_reasons

    with torch.no_grad():
        for eval_mode in (False, True):
            one_graph(TDMPC2Agent._act, obs, is_first,
                      compiled.planner.warm_start(obs, eval_mode), eval_mode)
        one_graph(TDMPC2Agent._act, obs, None, None, False)  # the policy prior alone
    batch = compiled._unpack(make_batch(seed=0))
    compiled.model.train()
    before = [p.detach().clone() for p in compiled.model.parameters()]
    one_graph(TDMPC2Agent._update, *batch, pathway)
    moved = sum(not torch.equal(p, q) for p, q in zip(compiled.model.parameters(), before))
    assert moved > 0, "the traced update changed no parameter"
