"""The TD-MPC2 agent: acting (planner or policy prior) and updates (Hansen et al., 2024).

The agent builds its collaborators from gin references with the values known at run
time (the EnvSpec, the discount, the device), sums the losses' `loss_*` terms, and owns
the optimizers, the running scale and the reset strategy.

Update pathways (variant, SPEC §6): `full` trains world model, value, auxiliary heads and
policy; `actor_critic` trains value, auxiliary heads and policy on detached latents,
without the model losses; `policy` trains the policy alone on detached latents.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from tensordict import TensorDict

from components.losses import RunningScale
from rlcore import math as rmath
from rlcore.registry import register
from rlcore.types import ACTION, OBS, REWARD, TERMINATED, EnvSpec

PATHWAYS = ("full", "actor_critic", "policy")


def _sum_losses(td: TensorDict) -> torch.Tensor:
    terms = [v for k, v in td.items() if k.startswith("loss_")]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def compile_networks(model: nn.Module, *, mode: str | None = None,
                     options: dict[str, Any] | None = None) -> None:
    """Compile each network of `model` (its direct submodules) in place."""
    import torch._dynamo

    # Planning, evaluation and updates call the same networks on several batch shapes.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for module in model.children():
        module.compile(mode=mode, options=options)


def _merge(*tds: TensorDict) -> TensorDict:
    out: dict[str, torch.Tensor] = {}
    for td in tds:
        out.update(td.to_dict())
    return TensorDict(out, batch_size=[])


@register("agents")
class TDMPC2Agent:
    """Model-based agent that plans in the latent space of a learned world model.

    Args:
        spec: the environment's EnvSpec.
        device: where the model lives (chosen once by the runner).
        world_model, planner, model_loss, policy_loss: gin references (classes).
        extra_losses: further model-side loss classes (auxiliary value, termination), each
            called like `model_loss`; a class attribute `pathways` says which update
            pathways include it.
        reset: a reset strategy class (None: never reset).
        discount: gamma; None derives it from the episode length (SPEC §6).
        lr: Adam learning rate of model and policy; the encoder's is lr * enc_lr_scale.
        grad_clip_norm: gradient-norm clip for each optimizer.
        tau: Polyak rate of the target Q copies, after every value update.
        mpc: act with the planner (True) or the policy prior alone (False).
        grad_log_every: every this many updates, add per-loss, per-module-group gradient
            norms to the metrics (extra backward passes; 0 disables).
        fused_optimizer: run Adam as one fused kernel per step (same update as the
            per-parameter loop, within float tolerance; several times faster on CPU).
        compile: compile every network of the world model with `torch.compile` (each
            module in place, so parameter names and checkpoints are unchanged), the
            planner's whole search as one graph (its `compile()`, where it has one), and
            each update's model-side and policy losses as one graph each. The first
            calls are slow.
        compile_options: inductor options for every compiled graph. The compile preset
            sets `fallback_random`, so compiled code draws from eager PyTorch's
            generator and a seed gives eager's outputs, within float tolerance.
        cuda_graphs: with `compile`, also capture the compiled networks as CUDA graphs
            (torch.compile's `reduce-overhead` mode), removing per-kernel launch cost.
            Needs a CUDA device.
        compile_cpp_wrapper: with `compile` on CPU, inductor writes each graph's wrapper
            (the code that calls its kernels and products) in C++ instead of Python
            (inductor's `cpp_wrapper` option): less time between kernels, most
            visible in planning, whose graph runs a few hundred small kernels per call.
            Compiling takes longer (a C++ build per graph). Same results as `compile`.

    Shapes: act(obs [E, *obs], is_first [E]) -> [E, A]; update(batch [T+1, B]).
    """

    def __init__(self, spec: EnvSpec, device: torch.device | str = "cpu", *,
                 world_model: Callable[..., Any], planner: Callable[..., Any],
                 model_loss: Callable[..., Any], policy_loss: Callable[..., Any],
                 extra_losses: Sequence[Callable[..., Any]] = (),
                 reset: Callable[..., Any] | None = None,
                 discount: float | None = None, lr: float = 3e-4, enc_lr_scale: float = 0.3,
                 policy_eps: float = 1e-5, grad_clip_norm: float = 20.0, tau: float = 0.01,
                 scale_tau: float = 0.01, mpc: bool = True, grad_log_every: int = 0,
                 fused_optimizer: bool = True, compile: bool = False,
                 compile_options: dict[str, Any] | None = None,
                 cuda_graphs: bool = False, compile_cpp_wrapper: bool = False):
        self.spec = spec
        self.device = torch.device(device)
        if discount is None:
            discount = rmath.episode_discount(spec.episode_length)
        if not 0.0 < discount < 1.0:
            raise ValueError(f"TDMPC2Agent.discount must lie in (0, 1), got {discount}")
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"TDMPC2Agent.tau must lie in (0, 1], got {tau}")
        self.discount = float(discount)
        self.model = world_model(spec).to(self.device)
        self.planner = planner(self.model, spec.action_dim, self.discount)
        self.model_loss = model_loss()
        self.policy_loss = policy_loss()
        self.extra_losses = [cls() for cls in extra_losses]
        self.reset_strategy = reset() if reset is not None else None
        self.grad_clip_norm, self.tau, self.mpc = grad_clip_norm, tau, mpc
        self.grad_log_every = grad_log_every
        self.num_updates = 0
        groups = self.model.module_groups()
        fused = {"fused": True} if fused_optimizer and self.device.type in ("cpu", "cuda") else {}
        self.model_optim = torch.optim.Adam([
            {"params": groups["encoder"].parameters(), "lr": lr * enc_lr_scale},
            *({"params": m.parameters()} for name, m in groups.items()
              if name not in ("encoder", "policy")),
        ], lr=lr, **fused)
        self.pi_optim = torch.optim.Adam(groups["policy"].parameters(), lr=lr, eps=policy_eps,
                                         **fused)
        self.scale = RunningScale(scale_tau, device=self.device)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"TDMPC2Agent.cuda_graphs needs a CUDA device, but the agent runs "
                             f"on {self.device}; set TDMPC2Agent.cuda_graphs = False (or run "
                             "on a GPU)")
        if cuda_graphs and not compile:
            raise ValueError("TDMPC2Agent.cuda_graphs captures the compiled networks; set "
                             "TDMPC2Agent.compile = True as well")
        if compile_cpp_wrapper and not compile:
            raise ValueError("TDMPC2Agent.compile_cpp_wrapper changes how compiled graphs are "
                             "built; set TDMPC2Agent.compile = True as well")
        if compile_cpp_wrapper and self.device.type != "cpu":
            raise ValueError(f"TDMPC2Agent.compile_cpp_wrapper is for CPU agents (it is "
                             f"tested there only), but the agent runs on {self.device}; "
                             "set TDMPC2Agent.compile_cpp_wrapper = False")
        self.cuda_graphs, self.compile_cpp_wrapper = cuda_graphs, compile_cpp_wrapper
        if compile:
            # torch.compile takes a mode or options, not both: reduce-overhead is the
            # option triton.cudagraphs
            options = dict(compile_options or {})
            if cuda_graphs:
                options["triton.cudagraphs"] = True
            if compile_cpp_wrapper:
                options["cpp_wrapper"] = True
            mode, options = None, options or None
            compile_networks(self.model, mode=mode, options=options)
            # the policy graph updates the running scale in place: a static address lets
            # CUDA graphs capture that graph (a mutated plain input makes them skip it)
            torch._dynamo.mark_static_address(self.scale.value)
            if hasattr(self.planner, "compile"):  # the whole search as one graph
                self.planner.compile(mode=mode, options=options)
            # each update's two loss computations as one graph each (forward and backward)
            self._model_forward = torch.compile(self._model_forward, mode=mode,
                                                options=options, dynamic=False)
            self._policy_forward = torch.compile(self._policy_forward, mode=mode,
                                                 options=options, dynamic=False)
        self.model.eval()

    def _step_begin(self) -> None:
        """A new step for CUDA graphs: outputs of earlier replays may be overwritten."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def _kept(self, terms: TensorDict) -> TensorDict:
        """Detached loss terms to return; copies under CUDA graphs, whose outputs the next
        step's replay overwrites."""
        return terms.detach().clone() if self.cuda_graphs else terms.detach()

    # -- acting -----------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: torch.Tensor, is_first: torch.Tensor, *, eval_mode: bool = False,
            use_planner: bool | None = None) -> torch.Tensor:
        """One action per env, on the CPU.  obs [E, *obs], is_first [E] -> [E, A]."""
        self._step_begin()
        obs = obs.to(self.device, non_blocking=True)
        z = self.model.encode(obs)  # [E, L]
        if self.mpc if use_planner is None else use_planner:
            a = self.planner.plan(z, is_first.to(self.device), eval_mode=eval_mode)
        else:
            a, _ = self.model.pi(z, deterministic=eval_mode, target=True)
        return a.cpu()

    # -- losses -----------------------------------------------------------------------
    def _unpack(self, batch: TensorDict):
        """Arrival convention: rows 1..T hold the action and reward that led to obs_t."""
        batch = batch.to(self.device)
        obs = batch[OBS]  # [T+1, B, *obs]
        action = batch[ACTION][1:]  # [T, B, A]
        reward = batch[REWARD][1:].unsqueeze(-1)  # [T, B, 1]
        terminated = batch[TERMINATED][1:].unsqueeze(-1).float()  # [T, B, 1]
        return obs, action, reward, terminated

    def _rollout(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Latent rollout from z_0 = enc(o_0).  -> zs [T+1, B, L]."""
        z = self.model.encode(obs[0])  # [B, L]
        zs = [z]
        for t in range(action.shape[0]):
            z = self.model.next(z, action[t])
            zs.append(z)
        return torch.stack(zs)  # [T+1, B, L]

    def _model_terms(self, pathway: str, zs, next_z, action, reward, terminated) -> TensorDict:
        args = (self.model, zs, next_z, action, reward, terminated, self.discount)
        terms = [self.model_loss(*args, value_only=pathway == "actor_critic")]
        terms += [loss(*args) for loss in self.extra_losses if pathway in loss.pathways]
        return _merge(*terms)

    def _latents(self, obs: torch.Tensor, action: torch.Tensor, pathway: str):
        """zs [T+1, B, L] (detached unless `full`) and next_z [T, B, L] (target encoder, no
        gradient)."""
        with torch.no_grad():
            next_z = self.model.encode(obs[1:], target=True)  # [T, B, L]
        with torch.set_grad_enabled(pathway == "full" and torch.is_grad_enabled()):
            zs = self._rollout(obs, action)  # [T+1, B, L]
        return zs, next_z

    def _prepare(self, batch: TensorDict, pathway: str):
        """Latents for one pathway (see `_latents`) and action, reward, terminated
        [T, B, ...]."""
        obs, action, reward, terminated = self._unpack(batch)
        zs, next_z = self._latents(obs, action, pathway)
        return zs, next_z, action, reward, terminated

    def _model_forward(self, obs, action, reward, terminated, pathway: str):
        """Latents zs and the model-side loss terms (a dict) of one update: one graph
        under `compile`."""
        zs, next_z = self._latents(obs, action, pathway)
        terms = self._model_terms(pathway, zs, next_z, action, reward, terminated)
        return zs, dict(terms.items())

    def _policy_forward(self, zs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The policy terms of one update (updates the running scale): one graph under
        `compile`."""
        return dict(self.policy_loss(self.model, zs, self.scale).items())

    def losses(self, batch: TensorDict, pathway: str = "full", *,
               update_scale: bool = True) -> tuple[TensorDict, TensorDict]:
        """(model-side terms, policy terms) for one batch on one pathway, without stepping."""
        zs, next_z, action, reward, terminated = self._prepare(batch, pathway)
        model_terms = (self._model_terms(pathway, zs, next_z, action, reward, terminated)
                       if pathway != "policy" else TensorDict({}, batch_size=[]))
        pi_terms = self.policy_loss(self.model, zs, self.scale, update_scale=update_scale)
        return model_terms, pi_terms

    # -- updates ----------------------------------------------------------------------
    def update(self, batch: TensorDict, pathway: str = "full") -> TensorDict:
        """One update on `pathway` (`full`, `actor_critic` or `policy`) from a batch [T+1, B]."""
        if pathway not in PATHWAYS:
            raise ValueError(f"unknown update pathway {pathway!r}; expected one of {PATHWAYS}")
        self._step_begin()
        self.model.train()
        obs, action, reward, terminated = self._unpack(batch)
        out: dict[str, torch.Tensor] = {}
        # Model / value update
        if pathway == "policy":
            zs, _ = self._latents(obs, action, pathway)
        else:
            zs, terms = self._model_forward(obs, action, reward, terminated, pathway)
            model_terms = TensorDict(terms, batch_size=[])
            model_total = _sum_losses(model_terms)
            if self.grad_log_every and self.num_updates % self.grad_log_every == 0:
                out.update(self._grad_norms(model_terms))
            self.model_optim.zero_grad(set_to_none=True)
            model_total.backward()
            out["stats/grad_norm_model"] = nn.utils.clip_grad_norm_(
                self.model.model_parameters(), self.grad_clip_norm).detach()
            self.model_optim.step()
            out.update(self._kept(model_terms).to_dict())
            out["loss_total"] = model_total.detach()
        # Policy update
        pi_terms = TensorDict(self._policy_forward(zs), batch_size=[])
        self.pi_optim.zero_grad(set_to_none=True)
        _sum_losses(pi_terms).backward()
        out["stats/grad_norm_policy"] = nn.utils.clip_grad_norm_(
            self.model.module_groups()["policy"].parameters(), self.grad_clip_norm).detach()
        self.pi_optim.step()
        out.update(self._kept(pi_terms).to_dict())
        # Target and EMA copies
        groups = ["policy"] if pathway == "policy" else None
        self.model.soft_update_targets(self.tau, groups)
        self.model.eval()
        self.num_updates += 1
        if self.reset_strategy is not None and self.reset_strategy(self, self.num_updates):
            out["stats/reset"] = torch.ones(())
        return TensorDict(out, batch_size=[])

    def _grad_norms(self, terms: TensorDict) -> dict[str, torch.Tensor]:
        """Gradient norm of each loss term with respect to each module group."""
        groups = {n: [p for p in m.parameters() if p.requires_grad]
                  for n, m in self.model.module_groups().items() if n != "policy"}
        out = {}
        for key, value in terms.items():
            if not key.startswith("loss_") or not value.requires_grad:
                continue
            for gname, params in groups.items():
                grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
                sq = [g.pow(2).sum() for g in grads if g is not None]
                out[f"grad/{key[5:]}/{gname}"] = (torch.stack(sq).sum().sqrt() if sq
                                                   else torch.zeros(())).detach()
        return out

    @torch.no_grad()
    def validate(self, batch: TensorDict) -> TensorDict:
        """Every loss on a batch, in eval mode, without gradients or any state change.

        The running scale is read, not updated; RNG draws (member choice, policy noise)
        use a private generator state so training's random stream is unchanged.
        """
        self._step_begin()
        was_training = self.model.training
        self.model.eval()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            model_terms, pi_terms = self.losses(batch, "full", update_scale=False)
        self.model.train(was_training)
        out = _merge(model_terms, pi_terms)
        out["loss_total"] = _sum_losses(model_terms)
        return out

    # -- resets -----------------------------------------------------------------------
    def on_reset(self, params: Sequence[nn.Parameter], groups: Sequence[str]) -> None:
        """After a reset: clear the touched parameters' optimizer moments, re-sync the
        target/EMA copies of the reset groups and reset the running scale."""
        touched = {id(p) for p in params}
        for optim in (self.model_optim, self.pi_optim):
            for group in optim.param_groups:
                for p in group["params"]:
                    if id(p) in touched and p in optim.state:
                        del optim.state[p]
        self.model.sync_copies(groups)
        self.scale.reset()

    # -- state ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), "model_optim": self.model_optim.state_dict(),
                 "pi_optim": self.pi_optim.state_dict(), "scale": self.scale.state_dict(),
                 "planner": self.planner.state_dict(), "num_updates": self.num_updates}
        if self.reset_strategy is not None and hasattr(self.reset_strategy, "state_dict"):
            state["reset"] = self.reset_strategy.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.model_optim.load_state_dict(state["model_optim"])
        self.pi_optim.load_state_dict(state["pi_optim"])
        self.scale.load_state_dict(state["scale"])
        self.planner.load_state_dict(state["planner"])
        self.num_updates = state.get("num_updates", 0)
        if "reset" in state and self.reset_strategy is not None:
            self.reset_strategy.load_state_dict(state["reset"])
