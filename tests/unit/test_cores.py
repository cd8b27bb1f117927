"""The cores threads are sized by are the ones this process may run on, not the machine's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from defectkit.cores import usable_cores

ROOT = Path(__file__).resolve().parents[2]


def test_usable_cores_are_the_processes_affinity():
    assert usable_cores() == len(os.sched_getaffinity(0))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_a_process_pinned_to_one_core_sizes_its_threads_for_one():
    # As a container pinned to a cpuset: the machine still has every core (os.cpu_count), the process one.
    core = min(os.sched_getaffinity(0))
    code = (f"import os; os.sched_setaffinity(0, {{{core}}}); "
            "from defectkit.cores import usable_cores; "
            "from defectkit.exported import session_options; "
            "from defectkit.serving.server import default_torch_threads; "
            "from defectkit.serving.predictor import ServingConfig; "
            "print(usable_cores(), session_options().intra_op_num_threads, default_torch_threads(ServingConfig()), "
            "os.cpu_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.split()
    assert [int(v) for v in out[:3]] == [1, 1, 1]
    assert int(out[3]) == os.cpu_count()
