"""Parity with the official TD-MPC2: one update and two plans, number for number.

The golden fixture (`../shared/parity/`, next to the repository; or `$TDMPC2_PARITY_DIR`)
holds what the official implementation (nicklashansen/tdmpc2 @ e9f5932, CPU, eager)
computed on a small model with fixed weights, and every random draw it made. Its README
documents the layout, the draws and the tolerances; this test follows it:

* builds our agent with the fixture's config and loads the official weights into our
  layout (`_to_ours`), running scale = `update/scale_before`;
* replays the recorded draws by patching `torch.randn`, `torch.randn_like`,
  `torch.randperm`, `torch.multinomial` (returns the recorded elite `pick`) and
  `torch.nn.functional.dropout` (applies the recorded mask), one queue per kind; our Q ensemble
  draws its two members first and runs only them, so it gets mask rows perm[0], perm[1];
  each section must use up its queues and leave the global RNG untouched;
* compares, section by section (`_estimate_value`, plan with t0, warm-started plan,
  `_update`): losses, TD-target mean/std, the target-Q min and TD targets, Q logits and
  the policy loss's Q average (forward hooks on the `_Qs` / `_target_Qs` modules, where
  those modules are called), policy entropy / scale / std statistics, total and
  per-tensor gradient norms and the small-gradient elements (read at each optimizer
  step), every parameter after the step and the target Q after the soft update,
  candidate values and elite sets of every planning iteration (read at `topk`), the MPPI
  weights of the final elite draw, the warm-start mean, the planner's stats and the action.

Not compared (not reachable through the agent's public surface): the latents and
policy outputs per element (`zs`, `next_z`, `pi_*` tensors; only their means via the
update's stats), the reward logits, each iteration's mean / std / candidate actions (they
determine the candidate values, which are compared), Adam's moments. The fixture does
not exercise gradient clipping, episodic tasks or eval-mode planning.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tensordict import TensorDict

from components.agent import TDMPC2Agent
from components.dynamics import MLPDynamics
from components.encoders import MLPEncoder
from components.heads import DiscreteRegressionHead, EnsembleQHead, TanhGaussianPolicyHead
from components.losses import PolicyLoss, WorldModelLoss
from components.planners.mppi import MPPIPlanner
from components.world_model import WorldModel
from rlcore.types import ACTION, OBS, REWARD, TERMINATED, EnvSpec
from tests.conftest import stepped_gradients


def _parity_dir() -> Path:
    env = os.environ.get("TDMPC2_PARITY_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "parity"


PARITY_DIR = _parity_dir()
CASES = ("a", "b")
ATOL = RTOL = 1e-5
SMALL_GRAD_ATOL = 1e-6  # README: compare the small-gradient elements' gradients instead


@functools.lru_cache(maxsize=2)
def _load(case: str) -> dict:
    path = PARITY_DIR / f"tdmpc2_golden_{case}.pt"
    if not path.is_file():
        pytest.skip(f"official TD-MPC2 golden fixture not found at {path} (expected "
                    "../shared/parity next to the repository, or set TDMPC2_PARITY_DIR)")
    return torch.load(path, weights_only=True)


# -- parameter layout -------------------------------------------------------------------
_MLPS = {"_encoder.state.": "_encoder.net.", "_dynamics.": "_dynamics.net.",
         "_reward.": "_reward.net.", "_pi.": "_pi.net."}
_ENSEMBLES = {"_Qs.params.": "_Qs.net.", "_target_Qs_params.": "_target_Qs.net."}
_SKIPPED = ("_detach_Qs_params.", "log_std_min", "log_std_dif")


def _our_name(name: str, last_layer: int) -> str | None:
    """Our state-dict name of an official one (None: not a tensor of ours)."""
    if name.startswith(_SKIPPED):
        return None
    for off, ours in _MLPS.items():
        if name.startswith(off):
            layer, rest = name[len(off):].split(".", 1)
            if rest.startswith("ln."):  # NormedLinear = (Linear, LayerNorm, act)
                return f"{ours}{layer}.1.{rest[3:]}"
            last = off == "_reward." or off == "_pi."
            if last and int(layer) == last_layer:  # a plain Linear output layer
                return f"{ours}{layer}.{rest}"
            return f"{ours}{layer}.0.{rest}"
    for off, ours in _ENSEMBLES.items():
        if name.startswith(off):
            layer, rest = name[len(off):].split(".", 1)
            return ours + {"weight": "w", "bias": "b", "ln.weight": "ln_w",
                           "ln.bias": "ln_b"}[rest] + layer
    raise KeyError(f"unmapped official parameter {name}")


def _to_ours(name: str, value: torch.Tensor) -> torch.Tensor:
    """Official tensor -> our layout: ensemble weights [M, out, in] -> [M, in, out];
    ensemble biases and LayerNorm [M, out] -> [M, 1, out]."""
    if name.startswith(tuple(_ENSEMBLES)):
        if name.endswith(".weight") and not name.endswith("ln.weight"):
            return value.transpose(1, 2).contiguous()
        return value.unsqueeze(1).contiguous()
    return value.clone()


def _to_official(name: str, value: torch.Tensor) -> torch.Tensor:
    """Our tensor (for the official `name`) -> the official layout."""
    if name.startswith(tuple(_ENSEMBLES)):
        if name.endswith(".weight") and not name.endswith("ln.weight"):
            return value.transpose(1, 2)
        return value.squeeze(1)
    return value


def _mapping(official_sd: dict) -> dict[str, str]:
    return {k: n for k in official_sd
            if (n := _our_name(k, last_layer=2)) is not None}


# -- the agent --------------------------------------------------------------------------
def _make_agent(data: dict) -> TDMPC2Agent:
    cfg, meta = data["config"], data["meta"]
    spec = EnvSpec(obs_shape=(meta["obs_dim"],), action_dim=meta["action_dim"],
                   episode_length=meta["episode_length"])
    mlp_dim, enc_dim = cfg["mlp_dim"], cfg["enc_dim"]
    world_model = functools.partial(
        WorldModel,
        encoder=functools.partial(MLPEncoder, hidden_dim=enc_dim,
                                  num_layers=cfg["num_enc_layers"],
                                  simnorm_dim=cfg["simnorm_dim"]),
        dynamics=functools.partial(MLPDynamics, hidden_dim=mlp_dim,
                                   simnorm_dim=cfg["simnorm_dim"]),
        reward_head=functools.partial(DiscreteRegressionHead, hidden_dim=mlp_dim),
        q_head=functools.partial(EnsembleQHead, hidden_dim=mlp_dim, num_q=cfg["num_q"],
                                 dropout=cfg["dropout"]),
        policy_head=functools.partial(TanhGaussianPolicyHead, hidden_dim=mlp_dim,
                                      log_std_min=float(cfg["log_std_min"]),
                                      log_std_max=float(cfg["log_std_max"])),
        latent_dim=cfg["latent_dim"], num_bins=cfg["num_bins"],
        vmin=float(cfg["vmin"]), vmax=float(cfg["vmax"]))
    planner = functools.partial(
        MPPIPlanner, horizon=cfg["horizon"], num_samples=cfg["num_samples"],
        num_pi_trajs=cfg["num_pi_trajs"], num_elites=cfg["num_elites"],
        iterations=cfg["iterations"], min_std=float(cfg["min_std"]),
        max_std=float(cfg["max_std"]), temperature=float(cfg["temperature"]))
    agent = TDMPC2Agent(
        spec, "cpu", world_model=world_model, planner=planner,
        model_loss=functools.partial(
            WorldModelLoss, consistency_coef=float(cfg["consistency_coef"]),
            reward_coef=float(cfg["reward_coef"]), value_coef=float(cfg["value_coef"]),
            rho=float(cfg["rho"])),
        policy_loss=functools.partial(PolicyLoss, entropy_coef=float(cfg["entropy_coef"]),
                                      rho=float(cfg["rho"])),
        discount=float(meta["discount"]), lr=float(cfg["lr"]),
        enc_lr_scale=float(cfg["enc_lr_scale"]), grad_clip_norm=float(cfg["grad_clip_norm"]),
        tau=float(cfg["tau"]))
    # the official weights, in our layout
    ours = agent.model.state_dict()
    mapping = _mapping(data["state_dict"])
    for off, name in mapping.items():
        value = _to_ours(off, data["state_dict"][off])
        assert ours[name].shape == value.shape, (off, name, ours[name].shape, value.shape)
        ours[name] = value
    unmapped = [k for k, v in ours.items() if k not in mapping.values() and v.numel()]
    assert not unmapped, f"our parameters without an official counterpart: {unmapped}"
    agent.model.load_state_dict(ours)
    # the running scale (1 before the first update, as ours starts)
    state = agent.state_dict()
    state["scale"] = {"value": data["update"]["scale_before"].reshape(()).clone()}
    agent.load_state_dict(state)
    return agent


# -- replaying the recorded draws -------------------------------------------------------
class _Replay:
    """Recorded draws served from one queue per kind, reshaped by element count."""

    def __init__(self, events: list[dict], pick: int | None = None):
        self.queues: dict[str, list[torch.Tensor]] = {}
        for e in events:
            kind = "pick" if e["kind"] == "exponential" else e["kind"]
            self.queues.setdefault(kind, []).append(e["value"])
        if pick is not None:
            self.queues["pick"] = [torch.as_tensor(pick)]
        self.last_perm: torch.Tensor | None = None
        self.topk: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # in, vals, idx
        self.multinomial_weights: list[torch.Tensor] = []
        self.elite_to_ours = None  # official pick -> our elite position (see `multinomial`)

    def pop(self, kind: str) -> torch.Tensor:
        queue = self.queues.get(kind)
        if not queue:
            raise AssertionError(f"our code made a {kind} draw the official code did not "
                                 f"make here (recorded draws left: {self.left()})")
        return queue.pop(0)

    def left(self) -> dict[str, int]:
        return {k: len(q) for k, q in self.queues.items() if q}

    # the patched functions
    def randn(self, *size, **kwargs):
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        value = self.pop("randn")
        assert value.numel() == math.prod(size), ("randn", tuple(value.shape), size)
        return value.reshape(size).to(dtype=kwargs.get("dtype") or torch.float32,
                                      device=kwargs.get("device")).clone()

    def randn_like(self, x, **kwargs):
        value = self.pop("randn_like")
        assert value.numel() == x.numel(), ("randn_like", tuple(value.shape), tuple(x.shape))
        return value.reshape(x.shape).to(dtype=kwargs.get("dtype") or x.dtype,
                                         device=x.device).clone()

    def randperm(self, n, **kwargs):
        value = self.pop("randperm")
        assert value.numel() == n, ("randperm", value, n)
        self.last_perm = value.clone()
        return value.to(dtype=kwargs.get("dtype") or torch.int64,
                        device=kwargs.get("device")).clone()

    def multinomial(self, weights, num_samples, *args, **kwargs):
        pick = int(self.pop("pick"))
        self.multinomial_weights.append(weights.detach().clone())
        if self.elite_to_ours is not None:
            pick = self.elite_to_ours(pick)
        assert num_samples == 1 and weights.shape[0] == 1, tuple(weights.shape)
        return torch.full((1, 1), pick, dtype=torch.int64, device=weights.device)

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The recorded mask for x (bool); rows perm[0], perm[1] of the five members' masks
        where our code runs only those two members."""
        value = self.pop("dropout_mask")
        if value.numel() != x.numel():
            m = value.shape[0]
            assert self.last_perm is not None and value.numel() // m * x.shape[0] == x.numel(), \
                ("dropout mask", tuple(value.shape), tuple(x.shape))
            value = value.reshape(m, -1)[self.last_perm[: x.shape[0]]]
        return value.reshape(x.shape)

    def dropout(self, x, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return x
        scaled = self.mask(x).to(x.dtype) / (1 - p)
        return x.mul_(scaled) if inplace else x * scaled

    def _topk(self, orig, x, k, *args, **kwargs):
        out = orig(x, k, *args, **kwargs)
        self.topk.append((x.detach().clone(), out[0].detach().clone(), out[1].clone()))
        return out

    @contextlib.contextmanager
    def patched(self):
        """Patch the draws (and record topk calls) while the section runs; afterwards check
        that every recorded draw was used and the global RNG never moved."""
        saved = []

        def patch(obj, name, fn):
            saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, fn)

        rng = torch.get_rng_state()
        torch_topk, tensor_topk = torch.topk, torch.Tensor.topk
        patch(torch, "randn", self.randn)
        patch(torch, "randn_like", self.randn_like)
        patch(torch, "randperm", self.randperm)
        patch(torch, "multinomial", self.multinomial)
        patch(F, "dropout", self.dropout)
        patch(torch, "topk", lambda x, k, *a, **kw: self._topk(torch_topk, x, k, *a, **kw))
        patch(torch.Tensor, "topk", lambda x, k, *a, **kw: self._topk(tensor_topk, x, k,
                                                                      *a, **kw))
        try:
            yield self
        finally:
            for obj, name, fn in reversed(saved):
                setattr(obj, name, fn)
        assert not self.left(), f"recorded draws not used: {self.left()}"
        assert torch.equal(torch.get_rng_state(), rng), \
            "a random draw outside the replayed ones moved the global RNG"


# -- comparisons ------------------------------------------------------------------------
class _Diffs:
    """Collects every comparison, fails at the end with the list of mismatches."""

    def __init__(self):
        self.failures: list[str] = []
        self.worst: dict[str, float] = {}

    def close(self, what: str, actual, expected, *, atol: float = ATOL, rtol: float = RTOL,
              mask: torch.Tensor | None = None) -> None:
        actual = torch.as_tensor(actual).detach().double()
        expected = torch.as_tensor(expected).detach().double()
        if actual.shape != expected.shape:
            if actual.numel() != expected.numel():
                self.failures.append(f"{what}: shape {tuple(actual.shape)} vs "
                                     f"{tuple(expected.shape)}")
                return
            actual = actual.reshape(expected.shape)
        if mask is not None:
            actual, expected = actual[mask], expected[mask]
        diff = (actual - expected).abs()
        bad = diff > atol + rtol * expected.abs()
        self.worst[what] = float(diff.max()) if diff.numel() else 0.0
        if bool(bad.any()) or not bool(torch.isfinite(actual).all()):
            self.failures.append(f"{what}: max |diff| {float(diff.max()):.3g} "
                                 f"({int(bad.sum())} of {bad.numel()} elements beyond "
                                 f"{atol:g} + {rtol:g} * |expected|)")

    def check(self, what: str, ok: bool, detail: str = "") -> None:
        if not ok:
            self.failures.append(f"{what}: {detail}")

    def assert_ok(self) -> None:
        if self.failures:
            raise AssertionError("parity with the official TD-MPC2 broken:\n  "
                                 + "\n  ".join(self.failures))


def _decode(logits: torch.Tensor, num_bins: int, vmin: float, vmax: float) -> torch.Tensor:
    """Two-hot logits [..., K] -> symexp(E[bin centre]) [..., 1] (the official decoding)."""
    y = F.softmax(logits.double(), -1) @ torch.linspace(vmin, vmax, num_bins,
                                                         dtype=torch.float64)
    return (torch.sign(y) * torch.expm1(y.abs())).unsqueeze(-1)


@contextlib.contextmanager
def _q_outputs(model):
    """(name, training, output) of every call of the Q ensemble and its target copy."""
    calls: list[tuple[str, bool, torch.Tensor]] = []
    handles = []
    subs = dict(model.named_modules())
    for name in ("_Qs", "_target_Qs"):
        if name in subs:
            handles.append(subs[name].register_forward_hook(
                lambda mod, args, out, name=name: calls.append(
                    (name, mod.training, out.detach().clone()))))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


# -- the sections -----------------------------------------------------------------------
def _check_estimate_value(agent, data, diffs: _Diffs) -> None:
    ev, cfg = data["estimate_value"], data["config"]
    model, gamma, H = agent.model, float(data["meta"]["discount"]), cfg["horizon"]
    with torch.no_grad():
        z = model.encode(ev["obs"])
    diffs.close("estimate_value/z", z, ev["z"])

    # the value from the world model's verbs (what the planner's scoring computes)
    replay = _Replay(data["estimate_value_draws"])
    with torch.no_grad(), replay.patched():
        zt, value, discount = z, 0.0, 1.0
        for t in range(H):
            r = model.decode(model.reward(zt, ev["actions"][t]))
            zt = model.next(zt, ev["actions"][t])
            value, discount = value + discount * r, discount * gamma
        a, _ = model.pi(zt)
        value = value + discount * model.Q(zt, a, return_type="avg")
    diffs.close("estimate_value/value (model verbs)", value, ev["value"])

    # ... and from the planner's own scoring, where it has one
    score = getattr(agent.planner, "_score", None)
    if score is not None:
        replay = _Replay(data["estimate_value_draws"])
        with replay.patched():
            value = score(z.unsqueeze(0), ev["actions"].unsqueeze(1))  # [1, 64]
        diffs.close("estimate_value/value (planner)", value.reshape(-1, 1), ev["value"])


def _check_plan(agent, data, i: int, diffs: _Diffs) -> None:
    rec, cfg = data["plan"][i], data["config"]
    K, iters = cfg["num_elites"], cfg["iterations"]
    what = f"plan[{i}]"
    state = agent.planner.state_dict()["prev_mean"].get("train")
    prev = state[0] if state is not None else torch.zeros_like(rec["prev_mean_before"])
    if not bool(rec["t0"]):
        diffs.close(f"{what}/prev_mean_before", prev, rec["prev_mean_before"])

    replay = _Replay(rec["draws"], pick=int(rec["pick"]))
    last_idx = rec["iter_elite_idxs"][-1]

    def elite_to_ours(pick: int) -> int:
        # the recorded pick indexes the official elite order; ours may order elites with
        # values within float error differently: the same candidate, at our position
        elite = [t for t in replay.topk if t[1].shape[-1] == K]
        if not elite:
            return pick
        ours = elite[-1][2].reshape(-1).tolist()
        chosen = int(last_idx[pick])  # elite sets that differ are reported below
        return ours.index(chosen) if chosen in ours else pick

    replay.elite_to_ours = elite_to_ours
    with replay.patched():
        action = agent.act(rec["obs"].unsqueeze(0), torch.tensor([bool(rec["t0"])]),
                           eval_mode=bool(rec["eval_mode"]))
    diffs.close(f"{what}/action", action[0], rec["action"])
    mean = agent.planner.state_dict()["prev_mean"]["train"][0]
    diffs.close(f"{what}/final_mean", mean, rec["final_mean"])
    stats = getattr(agent.planner, "last_stats", None) or {}
    if "final_std" in stats:
        diffs.close(f"{what}/final_std[0] (mean over A)", stats["final_std"],
                    rec["final_std"][0].mean())
    last_value = rec["iter_elite_value"][-1].reshape(-1)
    if "elite_mean" in stats:
        diffs.close(f"{what}/elite_mean", stats["elite_mean"], last_value.mean())
    if "elite_std" in stats:
        diffs.close(f"{what}/elite_std", stats["elite_std"], last_value.std())
    if "chosen_value" in stats:
        diffs.close(f"{what}/chosen_value", stats["chosen_value"],
                    last_value[int(rec["pick"])])

    # every iteration's candidate values and elite set, read at topk
    elite = [t for t in replay.topk if t[1].shape[-1] == K]
    if len(elite) != iters:
        warnings.warn(f"{what}: saw {len(elite)} top-{K} calls (expected {iters}); "
                      "candidate values and elite sets not compared", stacklevel=2)
    else:
        for it, (scores, vals, idx) in enumerate(elite):
            diffs.close(f"{what}/iter{it}/candidate_values", scores.reshape(-1),
                        rec["iter_value"][it].reshape(-1))
            ours, theirs = set(idx.reshape(-1).tolist()), set(
                rec["iter_elite_idxs"][it].tolist())
            diffs.check(f"{what}/iter{it}/elite_set", ours == theirs,
                        f"{sorted(ours ^ theirs)} differ")
            diffs.close(f"{what}/iter{it}/elite_values (sorted)",
                        vals.reshape(-1).sort().values,
                        rec["iter_elite_value"][it].reshape(-1).sort().values)
        # the MPPI weights of the final elite draw, matched by candidate index
        if replay.multinomial_weights:
            w = replay.multinomial_weights[-1].reshape(-1)
            ours_idx = elite[-1][2].reshape(-1).tolist()
            order = [ours_idx.index(c) for c in last_idx.tolist()]
            diffs.close(f"{what}/elite_weights", w[order], rec["iter_score"][-1].reshape(-1))


def _batch(data) -> TensorDict:
    """The official batch in our replay layout (arrival convention: row 0 unread)."""
    b = data["batch"]
    nan = torch.full_like(b["action"][:1], float("nan"))
    return TensorDict({
        OBS: b["obs"].clone(),
        ACTION: torch.cat([nan, b["action"]]),
        REWARD: torch.cat([nan[..., 0], b["reward"][..., 0]]),
        TERMINATED: torch.cat([torch.zeros_like(b["terminated"][:1]),
                               b["terminated"]])[..., 0].bool(),
    }, batch_size=b["obs"].shape[:2])


def _check_update(agent, data, diffs: _Diffs) -> None:
    up, cfg = data["update"], data["config"]
    K, vmin, vmax = cfg["num_bins"], float(cfg["vmin"]), float(cfg["vmax"])
    gamma = float(data["meta"]["discount"])
    replay = _Replay(data["update_draws"])
    with _q_outputs(agent.model) as q_calls, stepped_gradients(agent.model) as stepped, \
            replay.patched():
        out = agent.update(_batch(data))
    grads = {name: g for name, (_, g) in stepped.items() if g is not None}

    # Losses and statistics
    losses = up["losses"]
    expected = {
        "loss_consistency": float(cfg["consistency_coef"]) * losses["consistency_loss"],
        "loss_reward": float(cfg["reward_coef"]) * losses["reward_loss"],
        "loss_value": float(cfg["value_coef"]) * losses["value_loss"],
        "loss_total": losses["total_loss"],
        "loss_policy": losses["pi_loss"],
        "stats/grad_norm_model": up["grad_norm_model"],
        "stats/grad_norm_policy": up["grad_norm_pi"],
        "stats/policy_entropy": losses["pi_entropy"],
        "stats/policy_scaled_entropy": losses["pi_scaled_entropy"],
        "stats/running_scale": up["scale_after"].reshape(()),
        "stats/policy_std": up["pi_log_std"].exp().mean(),
        "stats/td_target_mean": up["td_targets"].mean(),
        "stats/td_target_std": up["td_targets"].std(),
    }
    for key, value in expected.items():
        if key in out.keys():
            diffs.close(f"update/{key}", out[key], value)
        else:
            diffs.check(f"update/{key}", False, "missing from update()'s output")

    # Q logits (model loss), target Q min and TD targets, the policy loss's Q average
    targets = [o for n, tr, o in q_calls if n == "_target_Qs"]
    train_all = [o for n, tr, o in q_calls if n == "_Qs" and o.shape[0] == cfg["num_q"]]
    pairs = [o for n, tr, o in q_calls if n == "_Qs" and o.shape[0] == 2]
    if not q_calls:
        warnings.warn("no call of model._Qs / model._target_Qs seen: Q logits, TD targets "
                      "and the policy's Q average not compared", stacklevel=2)
    if targets:
        q = _decode(targets[0].reshape(2, *up["td_q_min_target"].shape[:2], K), K, vmin,
                    vmax)
        q_min = q.min(0).values
        diffs.close("update/td_q_min_target", q_min, up["td_q_min_target"])
        reward, term = data["batch"]["reward"], data["batch"]["terminated"]
        diffs.close("update/td_targets", reward + gamma * (1 - term) * q_min,
                    up["td_targets"])
    if train_all:
        diffs.close("update/q_logits", train_all[0], up["q_logits"])
    if pairs:
        q = _decode(pairs[-1].reshape(2, *up["pi_q_avg"].shape[:2], K), K, vmin, vmax)
        diffs.close("update/pi_q_avg", q.mean(0), up["pi_q_avg"])

    # Gradients before the steps (clipping inactive: norms well below 20)
    mapping = _mapping(data["state_dict"])
    for off, ours in mapping.items():
        if off not in up["grad_norms_per_tensor"]:
            continue
        g = grads.get(ours)
        g = torch.zeros_like(agent.model.state_dict()[ours]) if g is None else g
        g = _to_official(off, g)
        norm = g.flatten(1).norm(dim=1) if off.startswith("_Qs.") else g.norm()
        diffs.close(f"update/grad_norm/{off}", norm, up["grad_norms_per_tensor"][off])
        if off in up["small_grads"]:
            small = up["small_grads"][off]
            diffs.close(f"update/small_grads/{off}", g.reshape(-1)[small["index"].long()],
                        small["grad"], atol=SMALL_GRAD_ATOL, rtol=0)

    # Parameters after the step, target Q after the soft update
    after = agent.model.state_dict()
    for off, ours in mapping.items():
        expected = up["state_dict_after"][off]
        mask = torch.ones(expected.numel(), dtype=torch.bool)
        small = up["small_grads"].get(off)
        if small is not None:  # Adam's first step there is lr * g / (|g| + eps)
            mask[small["index"].long()] = False
        diffs.close(f"update/after/{off}", _to_official(off, after[ours]).reshape(-1),
                    expected.reshape(-1), mask=mask)


@pytest.mark.parametrize("case", CASES)
def test_matches_official_tdmpc2(case):
    """Every section of the golden fixture within the README's tolerances."""
    data = _load(case)
    torch.manual_seed(0)
    diffs = _Diffs()
    agent = _make_agent(data)
    _check_estimate_value(agent, data, diffs)
    _check_plan(agent, data, 0, diffs)
    _check_plan(agent, data, 1, diffs)
    _check_update(agent, data, diffs)
    diffs.assert_ok()
