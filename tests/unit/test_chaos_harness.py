"""The chaos runner: its table, its exit status, and a scenario that raises."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import __main__ as runner
from tests.chaos.harness import Outcome, Scenario, rate_meets, run_scenario, table


def _outcome(met: bool, attempted: int = 1000, succeeded: int = 999) -> Outcome:
    return Outcome("demo", "503 from storage", attempted, succeeded, 0, 1.25, ">= 99.9% 2xx", met,
                   {"why": "the store answered 503"})


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
    out = capsys.readouterr().out
    assert "| demo | 503 from storage |" in out
    # a missed goal is followed by its details, so that a CI log says why
    assert ('demo / 503 from storage: {"why": "the store answered 503"}' in out) is (not met)
    assert '"success_rate": 0.999' in (tmp_path / "out.json").read_text()


def test_an_unknown_scenario_name_is_refused_with_the_choices(monkeypatch, capsys):
    monkeypatch.setattr(runner, "scenarios", lambda: [Scenario("demo", lambda w, s: [])])
    with pytest.raises(SystemExit):
        runner.main(["--only", "nope"])
    assert "no scenario named nope; choose from demo" in capsys.readouterr().err


@pytest.mark.parametrize("succeeded, attempted, met", [
    (60, 60, True),
    (59, 60, True),  # one failure in 60 happens 6% of the time at a 0.1% failure rate
    (58, 60, False),  # two happen 0.17% of the time: the rate is below 99.9%
    (2997, 3000, True),
    (2990, 3000, False),
    (0, 0, False),  # nothing measured proves nothing
])
def test_a_success_rate_goal_is_missed_only_when_the_failures_are_improbable_at_that_rate(succeeded, attempted, met):
    assert rate_meets(succeeded, attempted, 0.999) is met
