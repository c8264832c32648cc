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
import torch._dynamo
import torch.nn as nn
from tensordict import TensorDict

from components.losses import RunningScale
from rlcore import math as rmath
from rlcore import optim as roptim
from rlcore.registry import register
from rlcore.types import ACTION, OBS, REWARD, TERMINATED, EnvSpec

PATHWAYS = ("full", "actor_critic", "policy")


def _sum_losses(terms) -> torch.Tensor:
    """The sum of the `loss_*` entries of a TensorDict or dict."""
    terms = [v for k, v in terms.items() if k.startswith("loss_")]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def _configure_dynamo() -> None:
    # Acting, evaluation and the update pathways trace several graphs each.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # Trace `backward()` into the update's graph instead of breaking the graph there.
    torch._dynamo.config.trace_autograd_ops = True


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
        fused_optimizer: run Adam as one fused kernel per step in eager mode (same update
            as the per-parameter loop, within float tolerance; several times faster on CPU).
        compile: compile a whole acting call (encoder, every planning iteration, the
            action) and a whole update (losses, backward, clipping, both optimizer steps,
            target and EMA copies, running scale) with `torch.compile`, one graph each per
            batch shape and pathway, with no graph break. Parameter names and checkpoints
            are unchanged. The first calls are slow.
        compile_options: inductor options for every compiled graph. The compile preset
            sets `fallback_random`, so compiled code draws from eager PyTorch's
            generator and a seed gives eager's outputs, within float tolerance.
        cuda_graphs: with `compile`, also capture those graphs as CUDA graphs
            (torch.compile's `reduce-overhead` mode), removing per-kernel launch cost. What
            they update in place (parameters, optimizer state, running scale, the
            planner's warm-start means) keeps its address. Needs a CUDA device.
        compile_cpp_wrapper: with `compile` on CPU, inductor writes each graph's wrapper
            (the code that calls its kernels and products) in C++ instead of Python
            (inductor's `cpp_wrapper` option): less time between kernels, most
            visible in planning, whose graph runs a few hundred small kernels per call.
            Compiling takes longer (a C++ build per graph). Same results as `compile`.
        model_transforms: functions applied in order to the built world model, each
            returning the model to use: the drop-in parts of `components/accel.py`
            (`@accel.<name>`), which a speed preset swaps in whole. Empty by default.

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
                 cuda_graphs: bool = False, compile_cpp_wrapper: bool = False,
                 model_transforms: Sequence[Callable[[nn.Module], nn.Module]] = ()):
        self.spec = spec
        self.device = torch.device(device)
        if discount is None:
            discount = rmath.episode_discount(spec.episode_length)
        if not 0.0 < discount < 1.0:
            raise ValueError(f"TDMPC2Agent.discount must lie in (0, 1), got {discount}")
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"TDMPC2Agent.tau must lie in (0, 1], got {tau}")
        self.discount = float(discount)
        self.model = world_model(spec)
        for transform in model_transforms:
            self.model = transform(self.model)
        self.model = self.model.to(self.device)
        self.planner = planner(self.model, spec.action_dim, self.discount)
        self.model_loss = model_loss()
        self.policy_loss = policy_loss()
        self.extra_losses = [cls() for cls in extra_losses]
        self.reset_strategy = reset() if reset is not None else None
        self.grad_clip_norm, self.tau, self.mpc = grad_clip_norm, tau, mpc
        self.grad_log_every = grad_log_every
        self.num_updates = 0
        groups = self.model.module_groups()
        # Eager: torch's fused Adam kernel. Compiled: the foreach form, which inductor fuses
        # into the update's graph (its step counters on the device, as CUDA graphs need).
        if compile:
            fused = {"foreach": True, "capturable": True}
        elif fused_optimizer and self.device.type in ("cpu", "cuda"):
            fused = {"fused": True}
        else:
            fused = {}
        self.model_optim = torch.optim.Adam([
            {"params": groups["encoder"].parameters(), "lr": lr * enc_lr_scale},
            *({"params": m.parameters()} for name, m in groups.items()
              if name not in ("encoder", "policy")),
        ], lr=lr, **fused)
        self.pi_optim = torch.optim.Adam(groups["policy"].parameters(), lr=lr, eps=policy_eps,
                                         **fused)
        for optim in (self.model_optim, self.pi_optim):
            roptim.init_adam_state(optim)
        self.scale = RunningScale(scale_tau, device=self.device)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"TDMPC2Agent.cuda_graphs needs a CUDA device, but the agent runs "
                             f"on {self.device}; set TDMPC2Agent.cuda_graphs = False (or run "
                             "on a GPU)")
        if cuda_graphs and not compile:
            raise ValueError("TDMPC2Agent.cuda_graphs captures the compiled graphs; set "
                             "TDMPC2Agent.compile = True as well")
        if compile_cpp_wrapper and not compile:
            raise ValueError("TDMPC2Agent.compile_cpp_wrapper changes how compiled graphs are "
                             "built; set TDMPC2Agent.compile = True as well")
        if compile_cpp_wrapper and self.device.type != "cpu":
            raise ValueError(f"TDMPC2Agent.compile_cpp_wrapper is for CPU agents (it is "
                             f"tested there only), but the agent runs on {self.device}; "
                             "set TDMPC2Agent.compile_cpp_wrapper = False")
        self.cuda_graphs, self.compile_cpp_wrapper = cuda_graphs, compile_cpp_wrapper
        self.compiled = compile
        if compile:
            # torch.compile takes a mode or options, not both: reduce-overhead is the
            # option triton.cudagraphs
            options = dict(compile_options or {})
            if cuda_graphs:
                options["triton.cudagraphs"] = True
            if compile_cpp_wrapper:
                options["cpp_wrapper"] = True
            _configure_dynamo()
            self._act = torch.compile(self._act, options=options or None, dynamic=False,
                                      fullgraph=True)
            self._update = torch.compile(self._update, options=options or None, dynamic=False,
                                         fullgraph=True)
            self._mark_static_state()
        self.model.eval()

    def _mark_static_state(self) -> None:
        """The tensors the update graph changes in place keep their addresses (CUDA graphs
        skip a graph that mutates an input whose address may change)."""
        torch._dynamo.mark_static_address(self.scale.value)
        for optim in (self.model_optim, self.pi_optim):
            for state in optim.state.values():
                for value in state.values():
                    torch._dynamo.mark_static_address(value)

    def _step_begin(self) -> None:
        """A new step for CUDA graphs: outputs of earlier replays may be overwritten."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    # -- acting -----------------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: torch.Tensor, is_first: torch.Tensor, *, eval_mode: bool = False,
            use_planner: bool | None = None) -> torch.Tensor:
        """One action per env, on the CPU.  obs [E, *obs], is_first [E] -> [E, A]."""
        self._step_begin()
        obs = obs.to(self.device, non_blocking=True)
        use_planner = self.mpc if use_planner is None else use_planner
        if not use_planner:
            return self._act(obs, None, None, eval_mode)[0].cpu()
        prev_mean = self.planner.warm_start(obs, eval_mode)
        a, stats = self._act(obs, is_first.to(self.device), prev_mean, eval_mode)
        self.planner.keep_stats(stats)
        return a.cpu()

    def _act(self, obs, is_first, prev_mean, eval_mode: bool):
        """Encode and plan (or, without `prev_mean`, take the policy prior's action): one
        graph under `compile`.  -> (action [E, A], planner stats)."""
        z = self.model.encode(obs)  # [E, L]
        if prev_mean is None:
            a, _ = self.model.pi(z, deterministic=eval_mode, target=True)
            return a, {}
        return self.planner.step(z, is_first, prev_mean, eval_mode)

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
        obs, action, reward, terminated = self._unpack(batch)
        out: dict[str, torch.Tensor] = {}
        self.model.train()
        if (pathway != "policy" and self.grad_log_every
                and self.num_updates % self.grad_log_every == 0):
            out.update(self._grad_norms(obs, action, reward, terminated, pathway))
        terms = self._update(obs, action, reward, terminated, pathway)
        self.model.eval()
        # copies under CUDA graphs, whose outputs the next step's replay overwrites
        out.update({k: v.clone() if self.cuda_graphs else v for k, v in terms.items()})
        self.num_updates += 1
        if self.reset_strategy is not None and self.reset_strategy(self, self.num_updates):
            out["stats/reset"] = torch.ones(())
        return TensorDict(out, batch_size=[])

    def _update(self, obs, action, reward, terminated, pathway: str) -> dict[str, torch.Tensor]:
        """The model / value step, the policy step and the target copies: one graph under
        `compile`.  -> detached loss terms and gradient norms."""
        out: dict[str, torch.Tensor] = {}
        # Model / value update
        zs, next_z = self._latents(obs, action, pathway)
        if pathway != "policy":
            # plain dicts of tensors: no object escapes the graph holding what backward frees
            terms = self._model_terms(pathway, zs, next_z, action, reward, terminated).to_dict()
            model_total = _sum_losses(terms)
            model_params = self.model.model_parameters()
            roptim.zero_grads(model_params)
            model_total.backward()
            out["stats/grad_norm_model"] = nn.utils.clip_grad_norm_(
                model_params, self.grad_clip_norm).detach()
            roptim.adam_step(self.model_optim)
            out.update({k: v.detach() for k, v in terms.items()})
            out["loss_total"] = model_total.detach()
        # Policy update (on the rollout's latents, detached by the policy loss)
        pi_terms = self.policy_loss(self.model, zs, self.scale).to_dict()
        pi_params = list(self.model.module_groups()["policy"].parameters())
        roptim.zero_grads(pi_params)
        _sum_losses(pi_terms).backward()
        out["stats/grad_norm_policy"] = nn.utils.clip_grad_norm_(
            pi_params, self.grad_clip_norm).detach()
        roptim.adam_step(self.pi_optim)
        out.update({k: v.detach() for k, v in pi_terms.items()})
        # Target and EMA copies
        groups = ["policy"] if pathway == "policy" else None
        self.model.soft_update_targets(self.tau, groups)
        # every update starts without gradients (a compiled update would otherwise be
        # traced again on its second call, when the gradients it left exist)
        roptim.zero_grads(self.model.parameters())
        return out

    def _grad_norms(self, obs, action, reward, terminated, pathway: str) -> dict[str, torch.Tensor]:
        """Gradient norm of each model-side loss term with respect to each module group,
        from the update's own forward pass (the same random draws: the generator's state
        is restored afterwards, so the update that follows is unchanged)."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            zs, next_z = self._latents(obs, action, pathway)
            terms = self._model_terms(pathway, zs, next_z, action, reward, terminated)
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
        for optim in (self.model_optim, self.pi_optim):
            roptim.reset_adam_state(optim, params)
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
        for optim, key in ((self.model_optim, "model_optim"), (self.pi_optim, "pi_optim")):
            roptim.load_adam_state(optim, state[key])
        if self.compiled:
            self._mark_static_state()
        self.scale.load_state_dict(state["scale"])
        self.planner.load_state_dict(state["planner"])
        self.num_updates = state.get("num_updates", 0)
        if "reset" in state and self.reset_strategy is not None:
            self.reset_strategy.load_state_dict(state["reset"])
