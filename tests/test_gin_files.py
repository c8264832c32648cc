"""Every shipped gin file parses with skip_unknown=False and builds the run (Dopamine style).

Experiment files are layered with gin/test/tiny.gin so building stays cheap; presets are
layered on top of an experiment file. Size presets are checked against SPEC.md's
parameter counts.
"""

from __future__ import annotations

import gin
import pytest

from rlcore.config import REPO_ROOT, ConfigError, load_gin

GIN = REPO_ROOT / "gin"
EXPERIMENTS = sorted(p for p in GIN.glob("*.gin"))
PRESETS = sorted(GIN.glob("presets/*.gin"))
SIZES = {"1m": 1e6, "5m": 5e6, "19m": 19e6, "48m": 48e6, "317m": 317e6}


def _build(files, params=(), tmp_path=None):
    load_gin([str(f) for f in files], params, finalize=False)
    from runners.pipelines import OnlineRunner

    runner = OnlineRunner(str(tmp_path / "run"))
    runner.env.close()
    if runner.eval_env is not None:
        runner.eval_env.close()
    return runner


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_file_builds(path, tmp_path):
    runner = _build([path, GIN / "test" / "tiny.gin"], tmp_path=tmp_path)
    assert runner.agent.model is not None
    assert not (tmp_path / "run").exists()  # building writes nothing


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_on_top_of_an_experiment_builds(path, tmp_path):
    files = [GIN / "tdmpc2_dog.gin", path, GIN / "test" / "tiny.gin"]
    if path.name == "cuda_graphs.gin":  # tiny.gin runs on the CPU: refused, by name
        with pytest.raises(ValueError, match="TDMPC2Agent.cuda_graphs needs a CUDA device"):
            _build(files, tmp_path=tmp_path)
        return
    runner = _build(files, tmp_path=tmp_path)
    assert runner.agent.model is not None


def test_dog_file_is_the_paper_setup(tmp_path):
    load_gin([str(GIN / "tdmpc2_dog.gin")], finalize=False)
    assert gin.query_parameter("%TASK") == "dog-run"
    assert gin.query_parameter("%LATENT_DIM") == 512
    assert gin.query_parameter("MPPIPlanner.num_samples") == 512
    assert gin.query_parameter("MPPIPlanner.iterations") == 6
    assert gin.query_parameter("EpisodeSliceBuffer.batch_size") == 256
    # the published dog-run curves (../shared/reference/tdmpc2/dog-run.csv): 14M env
    # steps, an evaluation every 100k
    assert gin.query_parameter("OnlineRunner.total_env_steps") == 14_000_000
    assert gin.query_parameter("OnlineRunner.eval_every") == 100_000
    # the paper's agent: the elite is sampled in evaluation too, trajectories are cut at
    # P(end) > 0.5, and the termination loss is a plain mean
    assert gin.query_parameter("MPPIPlanner.deterministic_eval") is False
    assert gin.query_parameter("MPPIPlanner.soft_termination") is False
    assert gin.query_parameter("TerminationLoss.rho_weighted") is False


def test_dmc_gpu_file_is_the_paper_setup():
    """gin/tdmpc2_dmc_gpu.gin, the base of gin/grids/paper_gpu.gin: the paper's 5M agent (no
    auxiliary heads), one env, 100k env steps (action repeat 2 included), compiled."""
    load_gin([str(GIN / "tdmpc2_dmc_gpu.gin")], finalize=False)
    assert gin.query_parameter("%LATENT_DIM") == 512 and gin.query_parameter("%NUM_Q") == 5
    assert gin.query_parameter("WorldModel.aux_discounts") == ()  # the paper's agent
    assert gin.query_parameter("EnvpoolVecEnv.num_envs") == 1
    assert gin.query_parameter("EnvpoolVecEnv.action_repeat") == 2
    assert gin.query_parameter("OnlineRunner.total_env_steps") == 100_000
    assert 100_000 % gin.query_parameter("OnlineRunner.eval_every") == 0  # hits the published grid
    assert gin.query_parameter("OnlineRunner.eval_episodes") == 10
    assert gin.query_parameter("TDMPC2Agent.compile") is True


@pytest.mark.parametrize("size", SIZES)
def test_model_size_presets_match_the_paper(size):
    """Parameter counts within 40% of the name (TD-MPC2 Table 7), for a dog-sized task."""
    import functools

    from components.dynamics import MLPDynamics
    from components.encoders import MLPEncoder
    from components.heads import DiscreteRegressionHead, EnsembleQHead, TanhGaussianPolicyHead
    from components.world_model import WorldModel
    from rlcore.types import EnvSpec

    load_gin([str(GIN / "model_size" / f"{size}.gin")], finalize=False)
    q = gin.query_parameter
    hidden = q("%MLP_DIM")
    spec = EnvSpec(obs_shape=(223,), action_dim=38, episode_length=500)
    model = WorldModel(
        spec, latent_dim=q("%LATENT_DIM"),
        encoder=functools.partial(MLPEncoder, hidden_dim=q("%ENC_DIM"),
                                  num_layers=q("%NUM_ENC_LAYERS")),
        dynamics=functools.partial(MLPDynamics, hidden_dim=hidden),
        reward_head=functools.partial(DiscreteRegressionHead, hidden_dim=hidden),
        q_head=functools.partial(EnsembleQHead, hidden_dim=hidden, num_q=q("%NUM_Q")),
        policy_head=functools.partial(TanhGaussianPolicyHead, hidden_dim=hidden))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0.6 * SIZES[size] < n < 1.4 * SIZES[size], n


def test_malformed_file_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'gin/base/tdmpc2.gin'\nMPPIPlanner.horizon = (3\n")
    with pytest.raises(ConfigError, match="bad.gin"):
        load_gin([str(bad)])


def test_unknown_names_get_suggestions():
    with pytest.raises(ConfigError, match="MPPIPlanner"):
        load_gin([str(GIN / "tdmpc2_dog.gin")], ["MPPIPlaner.horizon = 3"])
    with pytest.raises(ConfigError, match="temperature"):
        load_gin([str(GIN / "tdmpc2_dog.gin")], ["MPPIPlanner.temprature = 1.0"])


def test_a_mistyped_component_reference_gets_the_nearest_names():
    """Swapping components is the main use of bindings: a typo names the component meant."""
    with pytest.raises(ConfigError, match=r"unknown configurable 'planners.MPPIPlaner'.*"
                                          r"Did you mean planners.MPPIPlanner"):
        load_gin([str(GIN / "tdmpc2_dog.gin")], ["TDMPC2Agent.planner = @planners.MPPIPlaner"])


def test_a_mistyped_runner_parameter_gets_the_nearest_names():
    with pytest.raises(ConfigError, match=r"OnlineRunner.total_env_step .*Did you mean "
                                          r"total_env_steps"):
        load_gin([str(GIN / "tdmpc2_dog.gin")], ["OnlineRunner.total_env_step = 1"])


def test_a_malformed_line_is_named_by_file_and_line(tmp_path):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'gin/tdmpc2_dog.gin'\n\nOnlineRunner.seed = foo bar\n")
    with pytest.raises(ConfigError) as err:
        load_gin([str(bad)])
    msg = str(err.value)
    assert f"{bad}, line 3: `OnlineRunner.seed = foo bar`" in msg and "'foo'" in msg
    assert "ast." not in msg and "0x" not in msg


def test_gin_bindings_spelling_is_accepted():
    from runners.common import make_parser

    args = make_parser("x").parse_args(["--gin_bindings=A.b = 1", "--gin_param=C.d = 2"])
    assert args.gin_param == ["A.b = 1", "C.d = 2"]


def test_every_file_is_covered():
    covered = set(EXPERIMENTS) | set(PRESETS) | set(GIN.glob("model_size/*.gin"))
    covered |= {GIN / "base" / "tdmpc2.gin", GIN / "env" / "dmc_envpool.gin",
                GIN / "env" / "gymnasium.gin", GIN / "env" / "dmc_pixels.gin",
                GIN / "test" / "tiny.gin"}
    covered |= set(GIN.glob("examples/*.gin"))  # built by tests/runners/test_custom_env.py
    assert {p for p in GIN.rglob("*.gin") if "grids" not in p.parts
            and "ablations" not in p.parts} <= covered, "add new gin files to this test"

