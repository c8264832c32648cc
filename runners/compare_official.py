"""Side by side with the official TD-MPC2: `python -m runners.compare_official --official=PATH`.

Builds the official agent (`TDMPC2(cfg)` from a checkout of nicklashansen/tdmpc2, which
the user supplies: nothing of it is copied here) and ours (the paper's agent: gin/base +
a model size + the envpool DMC preset + gin/ablations/aux/off.gin, + gin/presets/compile.gin
with `--compile`) for the same task, model size, device and threads, then times them
call by call, alternating the two sides, on the same random observation and batch:

- one planning call (act on one observation, after a first call that starts an episode);
- one update (official: `agent.update(buffer)` with a stand-in buffer whose `sample()`
  returns the batch, as its trainer calls it; ours: `agent.update(batch)`);
- a plain 2048^3 fp32 matmul, the machine's reference, timed alongside.

It prints the median ms of plan, update and plan + update per side, official/ours, the
agent steps/s that plan + update allow, and the matmul GFLOP/s; the warm-up calls
(torch.compile's compilation, when on) are timed apart. `--out` keeps everything as JSON
with the machine and both commits.

The official config is its `tdmpc2/config.yaml` with its `parse_cfg` steps for a single
task (its model-size table, bin size, no task embedding) and the dimensions its
`make_env` sets (read from our env layer: same DMC task, action repeat 2, 500 agent
steps). Two adaptations let the official code run here; neither changes its math:
- the official code puts everything on `cuda:0`; for another device its
  `torch.device('cuda:0')` calls are redirected while the agent is built, and on CPU
  its Adam optimizers run without `capturable` (a CUDA-graph option CPU Adam lacks);
- tensordict >= 0.14 changed `to_module`'s default (`preserve_module_state=True`), which
  breaks the official world model's construction; its calls run with the behaviour of
  the tensordict it pins (0.8.3), `preserve_module_state=False`.

Flags: `--official` (or $TDMPC2_OFFICIAL_DIR), `--task` (dog-run), `--model_size` (5),
`--compile`, `--device`, `--threads`, `--repeats`, `--warmup`, `--matmul_precision` (both
sides; the official train.py sets `high`, TF32 on recent GPUs), `--gin_file` /
`--gin_param` (further config for ours, e.g. gin/presets/cuda_graphs.gin), `--out`.
Example (GPU): `python -m runners.compare_official --official=~/tdmpc2 --compile
--device=cuda --out=compare.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tensordict import TensorDict, TensorDictBase

from rlcore.types import ACTION, EPISODE, OBS, REWARD, TERMINATED
from runners import common
from runners.bench import Matmul, machine_info, summarize

MODEL_SIZES = (1, 5, 19, 48, 317)
BATCH_SIZE, HORIZON = 256, 3  # the official defaults (and ours)
CHECKOUT_HINT = ("pass --official=PATH, the root of a checkout of the official code "
                 "(git clone https://github.com/nicklashansen/tdmpc2 PATH), the folder that "
                 "holds tdmpc2/tdmpc2.py")


# -- the official agent -----------------------------------------------------------------
def check_checkout(path: str | None) -> Path:
    """The official checkout's root, or ConfigError naming --official and the fix."""
    if not path:
        raise common.ConfigError(f"--official is required: {CHECKOUT_HINT}")
    root = Path(path).expanduser().resolve()
    missing = [p for p in ("tdmpc2/tdmpc2.py", "tdmpc2/config.yaml",
                           "tdmpc2/common/world_model.py") if not (root / p).is_file()]
    if missing:
        raise common.ConfigError(f"--official={path} is not a checkout of the official "
                                 f"TD-MPC2 (no {missing[0]} there): {CHECKOUT_HINT}")
    return root


def _import_official(root: Path):
    """The official `tdmpc2`, `common` and `common.scale` modules, imported from the
    checkout (they import each other as top-level modules, as the official train.py runs
    them)."""
    src = str(root / "tdmpc2")
    for name in [n for n in sys.modules if n in ("tdmpc2", "common") or n.startswith("common.")]:
        if not str(getattr(sys.modules[name], "__file__", "")).startswith(src):
            del sys.modules[name]  # another checkout's, or a clash: import this one
    sys.path.insert(0, src)
    try:
        modules = [importlib.import_module(n) for n in ("tdmpc2", "common", "common.scale")]
    except ImportError as e:
        raise common.ConfigError(f"cannot import the official TD-MPC2 from {root}: {e} (its "
                                 "agent needs torch and tensordict only)") from None
    finally:
        sys.path.remove(src)
    return modules


def _scalar(text: str) -> Any:
    """A YAML scalar as OmegaConf reads it (3e-4 a float, 10_000_000 an int, ??? missing)."""
    if text in ("true", "false"):
        return text == "true"
    if text == "???":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def official_config(root: Path, off_common, *, task: str, model_size: int, obs_dim: int,
                    action_dim: int, episode_length: int, compile: bool) -> Any:
    """The official config for one single-task state run: config.yaml's defaults after
    its parse_cfg, with the fields its make_env sets; a dataclass with `get`, as its
    `cfg_to_dataclass` builds."""
    cfg = {}
    for line in (root / "tdmpc2" / "config.yaml").read_text().splitlines():
        key, sep, text = line.split("#", 1)[0].partition(":")  # flat `key: value` lines
        if sep and key.isidentifier() and text.strip():  # not hydra's `defaults:` list
            cfg[key] = _scalar(text.strip())
    cfg.update(off_common.MODEL_SIZE[model_size])
    cfg.update(task=task, model_size=model_size, obs="state", compile=compile,
               task_title=task.replace("-", " ").title(), multitask=False, task_dim=0,
               tasks=[task], bin_size=(cfg["vmax"] - cfg["vmin"]) / (cfg["num_bins"] - 1),
               obs_shape={"state": (obs_dim,)}, action_dim=action_dim,
               episode_length=episode_length, seed_steps=max(1000, 5 * episode_length))
    if (cfg["batch_size"], cfg["horizon"]) != (BATCH_SIZE, HORIZON):
        raise common.ConfigError(f"the official config.yaml has batch_size "
                                 f"{cfg['batch_size']}, horizon {cfg['horizon']}; this "
                                 f"comparison expects {BATCH_SIZE}, {HORIZON}")
    fields = [(k, Any, dataclasses.field(default_factory=lambda v=v: v)) for k, v in cfg.items()]
    Config = dataclasses.make_dataclass("Config", fields)
    Config.get = lambda self, key, default=None: getattr(self, key, default)
    return Config()


@contextlib.contextmanager
def official_tensordict():
    """tensordict's `to_module` with the behaviour of the version the official code pins
    (0.8.3): a plain tensor written into a module replaces the attribute as it is."""
    original = TensorDictBase.to_module

    @functools.wraps(original)
    def to_module(self, module, *args, preserve_module_state=False, **kwargs):
        return original(self, module, *args, preserve_module_state=preserve_module_state,
                        **kwargs)

    TensorDictBase.to_module = to_module  # shadows the inherited method
    try:
        yield
    finally:
        del TensorDictBase.to_module


class _TorchOnDevice:
    """The `torch` module seen by official code, with `torch.device('cuda:0')` -> device."""

    def __init__(self, device: torch.device):
        self._device = device

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def device(self, *args, **kwargs) -> torch.device:
        d = torch.device(*args, **kwargs)
        return self._device if d.type == "cuda" else d


def build_official(off_tdmpc2, off_scale, cfg, device: torch.device):
    modules = (off_tdmpc2, off_scale)
    if device != torch.device("cuda:0"):
        for m in modules:
            m.torch = _TorchOnDevice(device)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its prints: keep stdout for the table
            agent = off_tdmpc2.TDMPC2(cfg)
    finally:
        for m in modules:
            m.torch = torch
    if device.type != "cuda":
        for optim in (agent.optim, agent.pi_optim):
            for group in optim.param_groups:
                group["capturable"] = False
    return agent


class _Buffer:
    """The official trainer's buffer as `update` uses it: `sample()` -> a fixed batch."""

    def __init__(self, obs, action, reward, terminated):
        self.batch = (obs, action, reward, terminated, None)

    def sample(self):
        return self.batch


# -- ours -------------------------------------------------------------------------------
def gin_files(model_size: int, compile: bool, extra: Sequence[str] = ()) -> list[str]:
    return ["gin/base/tdmpc2.gin", f"gin/model_size/{model_size}m.gin",
            "gin/env/dmc_envpool.gin", "gin/ablations/aux/off.gin",
            *(["gin/presets/compile.gin"] if compile else []), *extra]


def build_ours(args: argparse.Namespace, device: torch.device):
    """(our agent, the task's EnvSpec), from the gin layering of gin/tdmpc2_dog.gin."""
    import gin

    from rlcore.config import load_gin

    load_gin(gin_files(args.model_size, args.compile, args.gin_file),
             [f"TASK = '{args.task}'", "EnvpoolVecEnv.num_envs = 1", *args.gin_param],
             finalize=False)
    try:
        env = gin.get_configurable("envs.EnvpoolVecEnv")(seed=1)
    except ValueError as e:  # an unknown task: the message names the valid ones
        raise common.ConfigError(f"--task: {e}") from None
    spec = env.spec
    env.close()
    return gin.get_configurable("agents.TDMPC2Agent")(spec, device), spec


# -- timing -----------------------------------------------------------------------------
def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _warm_up(side: str, c: dict[str, Callable[[], Any]], n: int,
             device: torch.device) -> dict[str, float]:
    """The first planning call and update (compilation, when on), timed apart, and the
    seconds with `n` more calls of each."""
    import torch._dynamo

    try:
        w = {"plan_first_s": _timed(c["plan_first"], device)}
        w["plan_s"] = w["plan_first_s"] + sum(_timed(c["plan"], device) for _ in range(n))
        w["update_first_s"] = _timed(c["update"], device)
        w["update_s"] = w["update_first_s"] + sum(_timed(c["update"], device)
                                                  for _ in range(n))
    except torch._dynamo.exc.BackendCompilerFailed as e:
        hint = ("; the official Q ensemble's randperm(2)[:2] (model size 1: 2 Q heads) hits "
                "PyTorch issue 158457 in inductor: use another --model_size, or no --compile"
                if side == "official" and "slice_shape" in str(e) else "")
        cause = next((line for line in str(e).splitlines() if "Error" in line), type(e).__name__)
        raise common.RunError(f"torch.compile failed on the {side} side: {cause}{hint}") from None
    return w


def _commit(path: Path) -> str | None:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"],
                              cwd=path, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def compare(args: argparse.Namespace) -> dict[str, Any]:
    root = check_checkout(args.official)
    if args.model_size not in MODEL_SIZES:
        raise common.ConfigError(f"--model_size must be one of {MODEL_SIZES}, got "
                                 f"{args.model_size}")
    if args.repeats < 1 or args.warmup < 0:
        raise common.ConfigError("--repeats must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise common.ConfigError(f"--device={args.device} but torch sees no CUDA device")
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None
                              else device.index)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(args.matmul_precision)
    off_tdmpc2, off_common, off_scale = _import_official(root)

    torch.manual_seed(args.seed)
    ours, spec = build_ours(args, device)
    (obs_dim,), A = spec.obs_shape, spec.action_dim
    cfg = official_config(root, off_common, task=args.task, model_size=args.model_size,
                          obs_dim=obs_dim, action_dim=A, episode_length=spec.episode_length,
                          compile=args.compile)
    with official_tensordict():
        torch.manual_seed(args.seed)
        official = build_official(off_tdmpc2, off_scale, cfg, device)

    # The same inputs for both: one observation, one batch [T+1, B] in our replay's layout
    # and the official buffer's (action, reward, terminated of rows 1..T).
    g = torch.Generator().manual_seed(args.seed)
    T, B = HORIZON, BATCH_SIZE
    obs = torch.randn(obs_dim, generator=g)
    batch = TensorDict({
        OBS: torch.randn(T + 1, B, obs_dim, generator=g),
        ACTION: torch.rand(T + 1, B, A, generator=g) * 2 - 1,
        REWARD: torch.rand(T + 1, B, generator=g),
        TERMINATED: torch.zeros(T + 1, B, dtype=torch.bool),
        EPISODE: torch.zeros(T + 1, B, dtype=torch.int64),
    }, batch_size=[T + 1, B]).to(device)
    buffer = _Buffer(batch[OBS], batch[ACTION][1:], batch[REWARD][1:].unsqueeze(-1),
                     batch[TERMINATED][1:].unsqueeze(-1).float())
    first, later = torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)
    calls = {
        "official": {"plan_first": lambda: official.act(obs, t0=True),
                     "plan": lambda: official.act(obs, t0=False),
                     "update": lambda: official.update(buffer)},
        "ours": {"plan_first": lambda: ours.act(obs[None], first),
                 "plan": lambda: ours.act(obs[None], later),
                 "update": lambda: ours.update(batch)},
    }
    sides = tuple(calls)
    matmul = Matmul(device)

    with official_tensordict():
        warmup = {side: _warm_up(side, calls[side], args.warmup, device) for side in sides}
        times = {side: {"plan": [], "update": []} for side in sides}
        mm = []
        for r in range(args.repeats):  # call by call, the order swapped every repeat
            order = sides if r % 2 == 0 else sides[::-1]
            mm.append(_timed(matmul, device))
            for part in ("plan", "update"):
                for side in order:
                    times[side][part].append(_timed(calls[side][part], device))

    result: dict[str, Any] = {
        "machine": {**machine_info(device), "official_commit": _commit(root),
                    "official_path": str(root), "matmul_precision": args.matmul_precision},
        "config": {"task": args.task, "obs_dim": obs_dim, "action_dim": A,
                   "episode_length": spec.episode_length, "model_size": args.model_size,
                   "compile": args.compile, "ours_compiled": ours.compiled,
                   "batch_size": B, "horizon": T,
                   "gin_files": gin_files(args.model_size, args.compile, args.gin_file),
                   "gin_params": args.gin_param,
                   "parameters": {"official": official.model.total_params,
                                  "ours": sum(p.numel() for p in ours.model.parameters()
                                              if p.requires_grad)},
                   "planner_iterations": {"official": cfg.iterations,
                                          "ours": ours.planner.iterations}},
        "matmul": matmul.rate(mm),
        "args": vars(args),
    }
    for t in times.values():
        t["plan_update"] = [p + u for p, u in zip(t["plan"], t["update"])]
    for side in sides:
        t = times[side]
        result[side] = {"plan": summarize(t["plan"]), "update": summarize(t["update"]),
                        "plan_update": summarize(t["plan_update"]),
                        "agent_steps_per_second": 1 / statistics.median(t["plan_update"]),
                        "warmup": warmup[side]}
    parts = ("plan", "update", "plan_update")
    result["official_over_ours"] = {
        part: result["official"][part]["median_ms"] / result["ours"][part]["median_ms"]
        for part in parts}
    # the ratio of the calls of each repeat, which ran side by side: robust to the drift
    # of a shared machine's speed over the run, which the ratio of medians is not
    result["official_over_ours_paired"] = {part: statistics.median(
        o / u for o, u in zip(times["official"][part], times["ours"][part])) for part in parts}
    return result


def _modes(cfg: dict[str, Any]) -> str:
    """'compiled', 'eager', or each side's mode when they differ (ours compiled through a
    --gin_file)."""
    official = "compiled" if cfg["compile"] else "eager"
    compiled = cfg.get("ours_compiled")
    if compiled is None:  # files written before the field existed
        compiled = cfg["compile"] or any(f in ("gin/presets/compile.gin",
                                               "gin/presets/cuda_graphs.gin")
                                         for f in cfg.get("gin_files", ()))
    ours = "compiled" if compiled else "eager"
    return official if official == ours else f"official {official}, ours {ours}"


def format_table(r: dict[str, Any]) -> str:
    m, cfg, off, ours, ratio = (r["machine"], r["config"], r["official"], r["ours"],
                                r["official_over_ours"])
    lines = [
        f"### official TD-MPC2 vs ours: {cfg['task']}, model size {cfg['model_size']} "
        f"({cfg['parameters']['official'] / 1e6:.2f}M / {cfg['parameters']['ours'] / 1e6:.2f}M "
        f"parameters), {_modes(cfg)}, batch {cfg['batch_size']}, "
        f"horizon {cfg['horizon']}, planner iterations {cfg['planner_iterations']['official']}"
        f" / {cfg['planner_iterations']['ours']}",
        "",
        f"- machine: {m.get('gpu') or m['cpu']} | {m['device']} | torch {m['torch']} | "
        f"{m['torch_threads']} threads | matmul precision {m['matmul_precision']} | "
        f"ours {m.get('commit')} | official {m.get('official_commit')} | {m['date']}",
        f"- ours: {', '.join(cfg['gin_files'])}" + "".join(f"; `{b}`" for b in cfg["gin_params"]),
        f"- fp32 matmul reference ({r['matmul']['size']}^3, timed alongside): "
        f"{r['matmul']['gflops_per_s']:.1f} GFLOP/s median",
        "",
        "| median over " + f"{off['plan']['n']} calls | official | ours | official / ours |",
        "| --- | ---: | ---: | ---: |",
    ]
    for part, name in (("plan", "plan ms"), ("update", "update ms"),
                       ("plan_update", "plan + update ms")):
        lines.append(f"| {name} | {off[part]['median_ms']:.2f} | {ours[part]['median_ms']:.2f} "
                     f"| {ratio[part]:.2f} |")
    lines.append(f"| agent steps/s (1 / (plan + update)) | {off['agent_steps_per_second']:.2f}"
                 f" | {ours['agent_steps_per_second']:.2f} | "
                 f"{off['agent_steps_per_second'] / ours['agent_steps_per_second']:.2f} |")
    paired = r["official_over_ours_paired"]
    lines.append("")
    lines.append(f"- official / ours call by call (median of each repeat's ratio): plan "
                 f"{paired['plan']:.2f}, update {paired['update']:.2f}, plan + update "
                 f"{paired['plan_update']:.2f}")
    for side, w in (("official", off["warmup"]), ("ours", ours["warmup"])):
        lines.append(f"- warm-up, {side} (compilation included; in no figure above): first "
                     f"plan {w['plan_first_s']:.2f} s, first update {w['update_first_s']:.2f} s;"
                     f" with the further warm-up calls {w['plan_s']:.2f} s and "
                     f"{w['update_s']:.2f} s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    common.configure_process()
    p = argparse.ArgumentParser(description="Time the official TD-MPC2 and ours side by side.")
    p.add_argument("--official", default=os.environ.get("TDMPC2_OFFICIAL_DIR"),
                   help="root of a checkout of nicklashansen/tdmpc2 (default: "
                        "$TDMPC2_OFFICIAL_DIR)")
    p.add_argument("--task", default="dog-run", help="DMC task, TD-MPC2 naming")
    p.add_argument("--model_size", type=int, default=5, help=f"one of {MODEL_SIZES} (M)")
    p.add_argument("--compile", action="store_true",
                   help="both compiled: official compile=true, ours gin/presets/compile.gin")
    p.add_argument("--gin_file", action="append", default=[],
                   help="a further gin file for ours, after the layering (repeatable), e.g. "
                        "gin/presets/cuda_graphs.gin")
    p.add_argument("--gin_param", action="append", default=[],
                   help="a further gin binding for ours (repeatable)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per part and side")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed calls per part and side after the first")
    p.add_argument("--matmul_precision", default="highest", choices=("highest", "high", "medium"),
                   help="torch.set_float32_matmul_precision for both sides and the reference "
                        "(the official train.py sets high: TF32 on recent GPUs)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)
    try:
        if args.out and Path(args.out).is_dir():
            raise common.ConfigError(f"--out {args.out} is a directory; give a file path")
        result = compare(args)
    except (common.ConfigError, common.RunError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    text = format_table(result)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        text += f"\n\nsaved {out}"
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
