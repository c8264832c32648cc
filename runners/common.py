"""Shared plumbing of the `python -m runners.X` entry points.

Flags (every runner): `--gin_file` (repeatable), `--gin_param` (repeatable; Dopamine's
`--gin_bindings` spelling is accepted too), `--run_dir`, `--list_components`. Errors in
user input end the process with one clear message and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from rlcore.config import ConfigError, load_gin

__all__ = ["ConfigError", "RunError", "main", "make_parser", "select_device"]

CONFIG_FILE = "config.gin"

_log = logging.getLogger("runners")


class RunError(RuntimeError):
    """A problem with a run (directory, checkpoint, training) that the user must fix."""


class RunInterrupted(Exception):
    """A run stopped by a signal after writing a checkpoint; `exit_code` is 128 + signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR2")  # SIGUSR2: submitit's requeue signal


@contextlib.contextmanager
def stop_on_signals(runner) -> Iterator[None]:
    """While running, SIGINT/SIGTERM/SIGUSR2 set `runner.stop_signal`; the runner finishes
    its step, checkpoints and raises RunInterrupted. A second signal stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if runner.stop_signal is not None:  # asked twice: stop now
            raise SystemExit(128 + signum)
        runner.stop_signal = signum  # nothing else here: no logging inside a handler

    previous = {}
    for name in STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def make_parser(description: str, *, root: str = "OnlineRunner", prefix: str | None = "online",
                run_dir_help: str | None = None, gin_flags: bool = True
                ) -> argparse.ArgumentParser:
    """The shared flags; `root` names the runner's configurable in the --gin_param example,
    `prefix` the default run dir (None: --run_dir has no default), `run_dir_help` replaces
    the training runners' --run_dir text, and `gin_flags=False` hides the gin flags (tools
    that rebuild a run from its own config.gin)."""
    p = argparse.ArgumentParser(description=description)
    hide = {} if gin_flags else {"help": argparse.SUPPRESS}
    p.add_argument("--gin_file", action="append", default=[],
                   **(hide or {"help": "gin file (repeatable; later files override earlier ones)"}))
    p.add_argument("--gin_param", "--gin_bindings", dest="gin_param", action="append",
                   default=[], **(hide or {"help": f"gin binding, e.g. '{root}.seed = 2' "
                                                   "(repeatable)"}))
    if run_dir_help is None:
        run_dir_help = (f"run directory (default runs/{prefix}-<date>-<time>); an existing one "
                        "resumes from its newest complete checkpoint, and a finished one is "
                        "left as it is")
    p.add_argument("--run_dir", default=None, help=run_dir_help)
    p.add_argument("--list_components", action="store_true",
                   help="list registered components with their parameters and defaults")
    return p


def select_device(device: str = "auto") -> torch.device:
    """CUDA when present, else CPU; `device` other than `auto` overrides."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def write_atomic(path: Path, text: str) -> None:
    """Write under a temporary name, then rename: the file appears whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp_{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def config_files_for(run_dir: str | None, gin_files: Sequence[str]) -> list[str]:
    """The gin files to load: those given, or a resumed run's saved config.gin."""
    if gin_files:
        return list(gin_files)
    if run_dir and (Path(run_dir) / CONFIG_FILE).exists():
        return [str(Path(run_dir) / CONFIG_FILE)]
    raise ConfigError("no --gin_file given (and no config.gin in --run_dir to resume from). "
                      "Pass e.g. --gin_file=gin/tdmpc2_dog.gin")


def build_and_run(runner_cls: Callable[[str], object], run_dir: str | None, prefix: str) -> int:
    """Build a pipeline (bad values surface as ConfigError) and run it in `run_dir`
    (default `runs/<prefix>-<time>`)."""
    import time

    run_dir = run_dir or str(Path("runs") / time.strftime(f"{prefix}-%Y%m%d-%H%M%S"))
    try:
        runner = runner_cls(run_dir)
    except (ValueError, TypeError) as e:  # bad values reach components as they are built
        raise ConfigError(f"could not build the run: {strip_gin_context(str(e))}") from None
    try:
        with stop_on_signals(runner):
            runner.run()
    except RunInterrupted as e:
        sys.stderr.write(f"{e}\n")
        return e.exit_code
    return 0


def strip_gin_context(message: str) -> str:
    """Drop the `  In call to configurable 'X' (<class ...>)` lines gin appends."""
    return "\n".join(ln for ln in message.splitlines()
                     if not ln.strip().startswith("In call to configurable")).rstrip()


def list_components() -> str:
    import components
    import rlcore.envs  # noqa: F401 - registers the env layer
    from rlcore import registry

    components.import_all()
    return registry.describe()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each record.

    A handler bound to the stderr object of the moment breaks once that object is closed
    (an entry point called in-process by a test under output capture, then a later log).
    """

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        """Through tqdm's writer: a progress bar on stderr is cleared and redrawn around
        the line instead of being glued to it."""
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)

    @stream.setter
    def stream(self, value):
        pass


def configure_logging() -> None:
    """INFO logs to stderr with timestamps, once per process."""
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def configure_process() -> None:
    """What every runner entry point sets up first."""
    configure_logging()


def main(argv: Sequence[str] | None, description: str, run: Callable[[argparse.Namespace], int],
         **parser_options) -> int:
    """Parse flags (`parser_options` go to make_parser), load gin, call `run(args)`; map
    user errors to exit code 2."""
    configure_process()
    args = make_parser(description, **parser_options).parse_args(argv)
    if args.list_components:
        sys.stdout.write(list_components() + "\n")
        return 0
    try:
        load_gin(config_files_for(args.run_dir, args.gin_file), args.gin_param, finalize=False)
        return run(args)
    except (ConfigError, RunError) as e:
        sys.stderr.write(f"error: {strip_gin_context(str(e))}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted before the run started\n")
        return 130
