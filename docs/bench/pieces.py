"""Speed pieces measured side by side: dog-run, 5M model, paper agent, compiled, 2 threads.

Each variant is one `runners.bench` process; the variants run in alternating blocks
(A B C ... A B C ...) so that drift on a shared machine hits all of them alike, and the
table reports each variant's median over its blocks beside the first variant's.

    # pieces that might close the gap to 2x the official implementation, on today's code
    python docs/bench/pieces.py --set current --blocks 2 --out docs/bench/pieces_current.json
    # the CPU machinery deleted after 9528b09, each piece switched off on its own
    git worktree add /tmp/w9528 9528b09
    python docs/bench/pieces.py --set deleted --code /tmp/w9528 --blocks 2 \
        --out docs/bench/pieces_deleted.json
    # two more blocks of some variants, added to a saved file
    python docs/bench/pieces.py --set current --variants plain,fast_mish --blocks 2 \
        --append --out docs/bench/pieces_current.json
    # the table again from a saved file
    python docs/bench/pieces.py --report docs/bench/pieces_current.json

A tool for speed work, kept out of the package: the variants of the `current` set that
are not gin presets are patches applied in the benchmark process only. Saved files may
hold variants no longer defined here (`mish_one_exp`: one-exponential Mish patched into
`F.mish`, which became `gin/presets/fast_mish.gin`); `--report` still prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH_ARGS = [
    "--gin_file=gin/tdmpc2_dog.gin", "--gin_file=gin/ablations/aux/off.gin",
    "--gin_file=gin/presets/compile.gin", "--gin_param=OnlineRunner.num_threads = 2",
    "--envs=1", "--repeats=5", "--sample_repeats=20", "--e2e_steps=40", "--seed_steps=500",
    "--pretrain_updates=2",
]

# name -> (extra bench args, environment, patch)
SETS = {
    "current": {
        "plain": ([], {}, None),
        "cpp_wrapper": (["--gin_file=gin/presets/compile_cpp_wrapper.gin"], {}, None),
        "max_autotune": (["--gin_param=TDMPC2Agent.compile_options = "
                          "{'fallback_random': True, 'max_autotune': True}"], {}, None),
        "fast_mish": (["--gin_file=gin/presets/fast_mish.gin"], {}, None),
        "simnorm_transposed": ([], {}, "simnorm_transposed"),
    },
    "deleted": {
        "all_on": ([], {}, None),
        "native_kernels_off": ([], {"TDMPC2_NATIVE_KERNELS": "0"}, None),
        "onednn_off": ([], {"TDMPC2_ONEDNN": "0"}, None),
        "malloc_tuning_off": ([], {"TDMPC2_MALLOC_TUNING": "0"}, None),
        "three_off": ([], {"TDMPC2_NATIVE_KERNELS": "0", "TDMPC2_ONEDNN": "0",
                           "TDMPC2_MALLOC_TUNING": "0"}, None),
    },
}
# 9528b09's bench has profiler phases of its own; they are skipped.
OLD_ARGS = ["--breakdown_repeats=0", "--thread_repeats=0"]


# -- patches (current code only) ----------------------------------------------------------
def _simnorm_transposed() -> None:
    """SimNorm's softmax over each group of 8 taken along a transposed view, so that the
    innermost (vectorized) dimension is the L/8 groups instead of the 8 units."""
    import torch.nn.functional as F

    from components.layers import SimNorm

    def forward(self, x):
        groups = x.unflatten(-1, (-1, self.dim)).transpose(-1, -2).contiguous()  # [..., dim, L/dim]
        return F.softmax(groups, dim=-2).transpose(-1, -2).flatten(-2)

    SimNorm.forward = forward


PATCHES = {"simnorm_transposed": _simnorm_transposed}


# -- running ------------------------------------------------------------------------------
def _child(patch: str | None, bench_argv: list[str]) -> int:
    sys.path.insert(0, os.getcwd())
    if patch:
        PATCHES[patch]()
    from runners import bench
    return bench.main(bench_argv)


def _run(name: str, variant, code: Path, out: Path, old: bool, more: list[str]) -> dict:
    extra, env_vars, patch = variant
    argv = [*BENCH_ARGS, *extra, *(OLD_ARGS if old else []), *more, f"--out={out}"]
    env = {**os.environ, **env_vars, "PYTHONPATH": str(code)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", patch or "", "--", *argv]
    print(f"== {name}: {' '.join(f'{k}={v}' for k, v in env_vars.items())} "
          f"{' '.join(extra)} {patch or ''}", flush=True)
    proc = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        print(f"   failed (exit {proc.returncode})", flush=True)
        return {"failed": proc.returncode, "stderr": proc.stderr[-3000:]}
    result = json.loads(out.read_text())
    row = _row(result)
    print(f"   plan {row['plan_ms']:.1f} ms, update {row['update_ms']:.1f} ms, "
          f"e2e {row['env_steps_per_s']:.3f} env steps/s, matmul {row['matmul_gflops']:.0f} GFLOP/s",
          flush=True)
    return result


def _row(result: dict) -> dict:
    parts = result.get("parts", result)  # 9528b09's bench keeps the parts at the top level
    return {
        "plan_ms": parts["plan_E1"]["median_ms"],
        "update_ms": parts["update"]["median_ms"],
        "env_steps_per_s": result["end_to_end"]["env_steps_per_second"],
        "matmul_gflops": result["matmul"]["gflops_per_s"],
    }


def table(saved: dict) -> str:
    ok = {n: [r for r in runs if "failed" not in r] for n, runs in saved["runs"].items()}
    failed = [n for n, runs in ok.items() if not runs]
    names = [n for n in saved["runs"] if n not in failed]
    med = {n: {k: statistics.median(_row(r)[k] for r in ok[n])
               for k in ("plan_ms", "update_ms", "env_steps_per_s", "matmul_gflops")}
           for n in names}
    base = med[names[0]]
    m = saved["machine"]
    counts = {n: len(ok[n]) for n in names}
    runs = (f"{counts[names[0]]} runs each" if len(set(counts.values())) == 1
            else ", ".join(f"{n} {c}" for n, c in counts.items()) + " runs")
    lines = [
        f"- {m['cpu']} | {m['torch']} | {m['torch_threads']} threads | commit {m['commit']} | "
        f"{m['date']} | set `{saved['set']}`, alternating blocks, medians over {runs}",
        "",
        "| variant | plan ms | update ms | plan + update ms | e2e env steps/s | vs "
        f"{names[0]} | matmul GFLOP/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n in names:
        r = med[n]
        lines.append(
            f"| {n} | {r['plan_ms']:.1f} | {r['update_ms']:.1f} | {r['plan_ms'] + r['update_ms']:.1f} "
            f"| {r['env_steps_per_s']:.3f} | {r['env_steps_per_s'] / base['env_steps_per_s']:.3f}x "
            f"| {r['matmul_gflops']:.0f} |")
    lines += [f"| {n} | failed | | | | | |" for n in failed]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child(argv[1] or None, argv[3:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", choices=sorted(SETS), default="current")
    p.add_argument("--variants", help="comma-separated subset of the set (first = baseline)")
    p.add_argument("--code", default=str(ROOT), help="checkout whose runners.bench runs")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--bench_arg", action="append", default=[],
                   help="a further runners.bench argument for every variant (repeatable)")
    p.add_argument("--out", help="JSON with every run")
    p.add_argument("--append", action="store_true",
                   help="add the blocks to the runs already in --out (same set and code)")
    p.add_argument("--report", help="print the table of a saved JSON; runs nothing")
    args = p.parse_args(argv)
    if args.report:
        print(table(json.loads(Path(args.report).read_text())))
        return 0
    variants = SETS[args.set]
    names = args.variants.split(",") if args.variants else list(variants)
    unknown = [n for n in names if n not in variants]
    if unknown:
        p.error(f"unknown variants {unknown}; the set {args.set} has {list(variants)}")
    code = Path(args.code).resolve()
    old = args.set == "deleted"
    saved = {"set": args.set, "code": str(code), "runs": {n: [] for n in names}}
    if args.append:
        if not args.out or not Path(args.out).exists():
            p.error("--append needs an existing --out file")
        saved = json.loads(Path(args.out).read_text())
        if saved["set"] != args.set or saved["code"] != str(code):
            p.error(f"{args.out} holds set {saved['set']} of {saved['code']}, not {args.set} of {code}")
        for n in names:
            saved["runs"].setdefault(n, [])
    with tempfile.TemporaryDirectory(prefix="pieces-") as tmp:
        for block in range(args.blocks):
            for n in names:
                result = _run(n, variants[n], code, Path(tmp) / f"{n}-{block}.json", old,
                              args.bench_arg)
                saved["runs"][n].append(result)
                saved["machine"] = result.get("machine", saved.get("machine"))
                if args.out:
                    Path(args.out).write_text(json.dumps(saved, indent=1))
    print(table(saved))
    return 0


if __name__ == "__main__":
    sys.exit(main())
