"""Every ``defectkit`` command line in the README parses; those that need no cluster run, and succeed."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from defectkit.cli import build_parser, main

README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
PREFIXES = (".venv/bin/defectkit ", "defectkit ")


def readme_commands() -> list[list[str]]:
    """The argument lists of the README's ``defectkit`` lines, continuations joined, comments dropped."""
    commands = []
    for block in FENCE.findall(README.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith(PREFIXES):
                words = shlex.split(line, comments=True)
                commands.append(words[1:])
    return commands


COMMANDS = readme_commands()


def _id(argv: list[str]) -> str:
    return " ".join(word for word in argv if not word.startswith("-"))[:40]


def test_the_readme_shows_every_command():
    shown = {tuple(word for word in argv[:2] if not word.startswith("-")) for argv in COMMANDS}
    for command in [("sample",), ("train",), ("serve",), ("pipeline", "submit"), ("pipeline", "schedule"),
                    ("rollout", "start"), ("rollout", "status"), ("rollout", "restore"), ("rollout", "manifest"),
                    ("stack", "status"), ("stack", "stop")]:
        assert any(s[:len(command)] == command for s in shown), command


@pytest.mark.parametrize("argv", COMMANDS, ids=_id)
def test_readme_command_parses(argv):
    args = build_parser().parse_args(argv)
    assert callable(args.func)


def _in(argv: list[str], option: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(option) + 1] = value
    return argv


def _runnable(argv: list[str], tmp_path: Path) -> list[str] | None:
    """``argv`` redirected into ``tmp_path`` and made small where it runs here in seconds; None where it cannot."""
    if argv[:2] == ["rollout", "manifest"]:
        return argv
    if argv[:2] in (["rollout", "status"], ["stack", "status"]):
        return _in(argv, "--work", str(tmp_path))
    if argv[0] == "sample":
        small = _in(_in(argv, "--out", str(tmp_path / "data")), "--count", "30")
        return _in(small, "--size", "32")
    return None


RUNNABLE = [argv for argv in COMMANDS if _runnable(argv, Path("x")) is not None]


@pytest.mark.parametrize("argv", RUNNABLE, ids=_id)
def test_readme_command_runs(argv, tmp_path, capsys):
    assert main(_runnable(argv, tmp_path)) == 0
    assert capsys.readouterr().out or any(tmp_path.iterdir())


def test_readme_commands_are_found_and_some_run():
    assert len(COMMANDS) >= 12 and len(RUNNABLE) >= 4


@pytest.mark.parametrize("argv", sorted({tuple(a[:2]) if a[0] in ("pipeline", "rollout", "stack") else (a[0],)
                                         for a in COMMANDS}))
def test_help_of_each_readme_command(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0 and "usage: defectkit" in capsys.readouterr().out
