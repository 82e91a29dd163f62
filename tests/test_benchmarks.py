"""The benchmarks and the device check run end to end on tiny inputs (their numbers are not checked here).

They are what a lent GPU runs, a few minutes at a time: a script that broke unnoticed would waste that time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_ches.testing import HH_RLHF_SAMPLE
from tests.plugins.real_data import real_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script, args, expected",
    [
        ("bench_ches.py", ["--pairs", "4", "--naive_pairs", "2", "--repeats", "1"], "map_speedup_over_naive"),
        ("bench_ches.py", ["--data", "hh", "--pairs", "3", "--naive_pairs", "1", "--repeats", "1"],
         "shared_over_unshared_pairs_per_s"),
        ("bench_chunks.py", ["--pairs", "8", "--chunk_size", "4", "--batch_size", "4", "--repeats", "1", "--threads",
                             "1"], "chunked_over_map"),
        ("bench_host.py", ["--pairs", "8", "--batch_sizes", "4", "--repeats", "1"], "limit / map"),
        ("bench_kernel_cost.py", ["--pairs", "2"], "ntk+signgd[last:1]"),
        ("bench_memory.py", ["--models", "tiny", "--data", "synthetic", "--pairs", "8", "--token_budgets", "256", "512",
                             "--out", os.devnull], "MiB per 1,000 tokens of budget"),
        ("bench_kernels.py", ["--pairs", "6", "--pretrain-steps", "2"], "ntk[all], 512-sketch"),
        ("bench_metric.py", ["--pairs", "1000", "--repeats", "1"], "listwise  evaluate compute"),
        ("bench_trl.py", ["--pairs", "4", "--repeats", "1"], "speedup_over_trl_precompute"),
        ("check_device.py", ["--rows", "3"], "PASS"),
    ],
)
def test_script_runs(script, args, expected):
    if script == "bench_chunks.py" or "hh" in args:
        real_file(HH_RLHF_SAMPLE)  # these read the real HH-RLHF sample: skipped, saying why, where it is absent
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert expected in done.stdout, done.stdout[-3000:]


def test_reproduce_displacement_runs(tiny_model, tmp_path):
    """The paper-1 rerun, end to end on a tiny model and synthetic implicit-prompt pairs (its numbers mean nothing)."""
    import json

    from hf_ches.testing import synthetic_pairs

    rows = synthetic_pairs(30, seed=2)
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for prompt, chosen, rejected in zip(rows["prompt"], rows["chosen"], rows["rejected"]):
            f.write(json.dumps({"chosen": prompt + chosen, "rejected": prompt + rejected}) + "\n")
    out = tmp_path / "out.json"
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    args = ["--data", str(tmp_path / "pairs.jsonl"), "--model_name_or_path", tiny_model, "--pool_size", "20",
            "--subset_size", "4", "--sample_size", "10", "--epochs", "1", "--batch_size", "2", "--lr_grid", "1e-3",
            "--output", str(out)]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reproduce_displacement.py"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["subsets"]) == {"random", "ln_ches bottom", "ln_ches middle", "ln_ches top", "ches bottom",
                                       "ches middle", "ches top"}
    assert set(results["filtering"]) == {"whole sample", "less top 10% ln_ches", "less random 10%"}
    assert results["filtering"]["less top 10% ln_ches"]["num_trained"] == 9
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")
                                          if "ArgumentParser(" in p.read_text() and p.name != "__init__.py"))
def test_help_describes_the_script_in_whole_sentences(script, monkeypatch, capsys):
    """``--help`` opens with the docstring's first paragraph, whole, not its first line cut mid-sentence."""
    import ast
    import runpy

    doc = ast.get_docstring(ast.parse((ROOT / "benchmarks" / script).read_text()))
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    with pytest.raises(SystemExit):
        runpy.run_path(str(ROOT / "benchmarks" / script), run_name="__main__")
    assert " ".join(doc.split("\n\n")[0].split()) in " ".join(capsys.readouterr().out.split())
