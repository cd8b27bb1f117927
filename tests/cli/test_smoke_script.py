"""deploy/smoke.sh: valid bash, strict mode, and every ``defectkit`` command in it parses with the real parser."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from defectkit.cli import build_parser

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "smoke.sh"
# Values of the script's variables, as a user would give them.
EXAMPLES = {
    "NAME": "defectkit-smoke", "NAMESPACE": "kubeflow-user-example-com", "IMAGE": "ghcr.io/defectkit/serve:0.1.0",
    "STABLE_URI": "gs://defectkit-models/defect/1", "CANDIDATE_URI": "s3://defectkit-models/defect/2",
    "PROMETHEUS_URL": "http://prometheus.monitoring:9090", "WORK": "/tmp/defectkit-smoke",
}
_VARIABLE = re.compile(r"\$\{?([A-Z_]+)\}?")


def script_commands() -> list[list[str]]:
    """The argument lists of the script's ``defectkit`` commands: continuations joined, pipes and
    ``|| ...`` cut off, variables replaced by example values."""
    commands = []
    for line in SCRIPT.read_text().replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line.startswith("defectkit "):
            continue
        line = re.split(r"\s(?:\||\|\|)\s", line)[0]
        words = shlex.split(_VARIABLE.sub(lambda m: EXAMPLES[m.group(1)], line))
        commands.append(words[1:])
    return commands


COMMANDS = script_commands()


def test_the_script_is_valid_bash_in_strict_mode():
    bash = shutil.which("bash")
    assert bash is not None
    result = subprocess.run([bash, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "set -euo pipefail" in SCRIPT.read_text().splitlines()[:20]


def test_the_script_runs_a_canary_and_prints_the_decision_record():
    verbs = [argv[:2] for argv in COMMANDS]
    assert verbs == [["rollout", "manifest"], ["rollout", "start"], ["rollout", "status"]]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: " ".join(argv[:2]))
def test_script_command_parses(argv):
    args = build_parser().parse_args(argv)
    assert callable(args.func)
    if argv[:2] == ["rollout", "start"]:
        assert args.backend == "kserve" and args.storage_uri == EXAMPLES["CANDIDATE_URI"]
        assert args.prometheus_url == EXAMPLES["PROMETHEUS_URL"]


def test_the_script_refuses_to_start_without_its_required_arguments():
    result = subprocess.run(["bash", str(SCRIPT), "--namespace", "ml"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "missing --image" in result.stderr
