"""The chaos runner: its table, its exit status, and a scenario that raises."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import __main__ as runner
from tests.chaos.harness import Outcome, Scenario, run_scenario, table


def _outcome(met: bool, attempted: int = 1000, succeeded: int = 999) -> Outcome:
    return Outcome("demo", "503 from storage", attempted, succeeded, 0, 1.25, ">= 99.9% 2xx", met)


def test_the_table_shows_each_outcome_and_flags_a_missed_goal():
    text = table([_outcome(True), Outcome("demo", "server killed", 10, 5, 2, None, "nothing lost", False)])
    rows = text.splitlines()
    assert rows[0].startswith("| scenario | fault | operations | success rate | data lost | time to recover")
    assert "| demo | 503 from storage | 1000 | 99.90% | 0 | 1.25 s | >= 99.9% 2xx | yes |" in rows
    assert "| demo | server killed | 10 | 50.00% | 2 | - | nothing lost | **NO** |" in rows


def test_a_scenario_that_raises_is_a_missed_goal_with_its_error(tmp_path):
    def broken(work: Path, short: bool) -> list[Outcome]:
        raise ConnectionError("emulator gone")

    outcomes, _ = run_scenario(Scenario("broken", broken), tmp_path, short=True)
    assert [o.met for o in outcomes] == [False]
    assert outcomes[0].details["error"] == "ConnectionError: emulator gone"
    empty, _ = run_scenario(Scenario("empty", lambda work, short: []), tmp_path, short=True)
    assert empty[0].details["error"] == "RuntimeError: measured nothing"


@pytest.mark.parametrize("met, status", [(True, 0), (False, 1)])
def test_the_runner_exits_non_zero_when_a_goal_is_missed(monkeypatch, capsys, tmp_path, met, status):
    seen = []

    def scenario(work: Path, short: bool) -> list[Outcome]:
        seen.append(short)
        return [_outcome(met)]

    monkeypatch.setattr(runner, "scenarios", lambda: [Scenario("demo", scenario), Scenario("other", scenario)])
    assert runner.main(["--short", "--only", "demo", "--json", str(tmp_path / "out.json")]) == status
    assert seen == [True]  # only the chosen scenario ran, in its short form
    assert "| demo | 503 from storage |" in capsys.readouterr().out
    assert '"success_rate": 0.999' in (tmp_path / "out.json").read_text()


def test_an_unknown_scenario_name_is_refused_with_the_choices(monkeypatch, capsys):
    monkeypatch.setattr(runner, "scenarios", lambda: [Scenario("demo", lambda w, s: [])])
    with pytest.raises(SystemExit):
        runner.main(["--only", "nope"])
    assert "no scenario named nope; choose from demo" in capsys.readouterr().err
