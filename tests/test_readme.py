"""The README's set-up commands and .ci/run stay in step."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()]
    return [ln for ln in lines if ln.startswith("python3 -m venv .venv")]


def test_readme_gives_two_setup_commands():
    cmds = _commands()
    assert len(cmds) == 2
    assert "runners.online --gin_file=gin/tdmpc2_dog.gin" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _commands()[1] in ci
