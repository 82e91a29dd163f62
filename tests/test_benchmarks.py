"""The benchmarks and the device check run end to end on tiny inputs (their numbers are not checked here).

They are what a lent GPU runs, a few minutes at a time: a script that broke unnoticed would waste that time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script, args, expected",
    [
        ("bench_ches.py", ["--pairs", "4", "--naive_pairs", "2", "--repeats", "1"], "map_speedup_over_naive"),
        ("bench_host.py", ["--pairs", "8", "--batch_sizes", "4", "--repeats", "1"], "limit / map"),
        ("bench_kernel_cost.py", ["--pairs", "2"], "ntk+signgd[last:1]"),
        ("bench_kernels.py", ["--pairs", "6", "--pretrain-steps", "2"], "ntk[all], 512-sketch"),
        ("bench_metric.py", ["--pairs", "1000", "--repeats", "1"], "listwise  evaluate compute"),
        ("check_device.py", ["--rows", "3"], "PASS"),
    ],
)
def test_script_runs(script, args, expected):
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert expected in done.stdout, done.stdout[-3000:]
