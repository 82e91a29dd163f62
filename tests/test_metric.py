"""hf_ches.metric and metrics/ranking_accuracy: the evaluate module, loaded for real, offline."""

import doctest
import importlib.metadata
import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import evaluate
import numpy as np
import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

import hf_ches.metric
from hf_ches import ranking
from hf_ches.metric import RankingAccuracy

METRIC_DIR = Path(__file__).resolve().parents[1] / "metrics" / "ranking_accuracy"

rng = np.random.default_rng(0)
N = 24
INPUTS = {
    "default": {"chosen_logps": rng.normal(-50, 5, N).tolist(), "rejected_logps": rng.normal(-50, 5, N).tolist()},
    "length_normalized": {
        "chosen_logps": rng.normal(-50, 5, N).tolist(),
        "rejected_logps": rng.normal(-50, 5, N).tolist(),
        "chosen_num_tokens": rng.integers(1, 40, N).tolist(),
        "rejected_num_tokens": rng.integers(1, 40, N).tolist(),
    },
    "idealized": {
        "chosen_logps": rng.normal(-50, 5, N).tolist(),
        "rejected_logps": rng.normal(-50, 5, N).tolist(),
        "ref_chosen_logps": rng.normal(-50, 5, N).tolist(),
        "ref_rejected_logps": rng.normal(-50, 5, N).tolist(),
        "preference_probs": rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], N).tolist(),
    },
    "listwise": {
        "logps": [rng.normal(size=k).tolist() for k in rng.integers(2, 5, N)],
        "scores": None,  # filled below, one score per response
    },
}
INPUTS["listwise"]["scores"] = [
    rng.integers(0, 3, len(row)).astype(float).tolist() for row in INPUTS["listwise"]["logps"]
]
PURE = {
    "default": ranking.ranking_accuracy,
    "length_normalized": ranking.ranking_accuracy,
    "idealized": ranking.idealized_ranking_accuracy,
    "listwise": ranking.listwise_ranking_accuracy,
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")


def batches(inputs: dict, size: int) -> list[dict]:
    return [{name: values[start : start + size] for name, values in inputs.items()} for start in range(0, N, size)]


@pytest.mark.parametrize(
    "where", ["relative from the repo root", "absolute from another cwd", "relative from another cwd", "script file"]
)
def test_evaluate_load_from_any_path(where, tmp_path, monkeypatch):
    if where == "relative from the repo root":
        monkeypatch.chdir(METRIC_DIR.parents[1])
        path = "metrics/ranking_accuracy"
    else:
        monkeypatch.chdir(tmp_path)
        path = {
            "absolute from another cwd": str(METRIC_DIR),
            "relative from another cwd": os.path.relpath(METRIC_DIR, tmp_path),
            "script file": str(METRIC_DIR / "ranking_accuracy.py"),
        }[where]
    metric = evaluate.load(path, cache_dir=str(tmp_path / "cache"))
    assert type(metric) is RankingAccuracy  # one class, whether loaded by evaluate or imported
    assert metric.name == "ranking_accuracy"
    assert metric.compute(chosen_logps=[-1.0, -3.0], rejected_logps=[-2.0, -2.0])["ranking_accuracy"] == 0.5


@pytest.mark.parametrize("config_name", list(INPUTS))
def test_compute_is_the_pure_function(config_name, tmp_path):
    metric = evaluate.load(str(METRIC_DIR), config_name=config_name, cache_dir=str(tmp_path))
    options = {"return_per_example": True, "n_resamples": 200, "seed": 5}
    expected = PURE[config_name](**INPUTS[config_name], options=ranking.RankingOptions(**options))
    assert metric.compute(**INPUTS[config_name], **options) == expected
    assert set(metric.features) == set(INPUTS[config_name])


@pytest.mark.parametrize("config_name", list(INPUTS))
def test_add_batch_over_batches_equals_one_compute(config_name, tmp_path):
    whole = RankingAccuracy(config_name=config_name, cache_dir=str(tmp_path))
    expected = whole.compute(**INPUTS[config_name], return_per_example=True)
    metric = RankingAccuracy(config_name=config_name, cache_dir=str(tmp_path))
    for batch in batches(INPUTS[config_name], size=7):
        metric.add_batch(**batch)
    assert metric.compute(return_per_example=True) == expected


def test_idealized_options_reach_the_math(tmp_path):
    metric = RankingAccuracy(config_name="idealized", cache_dir=str(tmp_path))
    result = metric.compute(**INPUTS["idealized"], beta=0.5, confidence_level=0.5)
    assert result["beta"] == [0.5]
    low, high = result["ranking_accuracy_ci"]
    wide = metric.compute(**INPUTS["idealized"], beta=0.5)["ranking_accuracy_ci"]
    assert wide[0] < low <= high < wide[1]


def test_none_becomes_a_clear_error(tmp_path):
    metric = RankingAccuracy(cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"rejected_logps\[1\]: expected a finite number, found nan \(None or NaN\)"):
        metric.compute(chosen_logps=[-1.0, -2.0], rejected_logps=[-2.0, None])
    metric = RankingAccuracy(config_name="length_normalized", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"chosen_num_tokens\[0\]: expected a finite number"):
        metric.compute(chosen_logps=[-1.0], rejected_logps=[-2.0], chosen_num_tokens=[None], rejected_num_tokens=[3])
    metric = RankingAccuracy(config_name="listwise", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"scores\[0\]\[2\]: expected a finite number"):
        metric.compute(logps=[[-1.0, -2.0, -3.0]], scores=[[1.0, 2.0, None]])


def test_unknown_config_and_option_raise(tmp_path):
    configs = r"\['default', 'length_normalized', 'idealized', 'listwise'\]"
    with pytest.raises(ValueError, match=rf"config_name: expected one of {configs}, found 'pairwise'"):
        RankingAccuracy(config_name="pairwise", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"^betas: not an input of the 'default' config \(did you mean 'beta'\?\)"):
        RankingAccuracy(cache_dir=str(tmp_path)).compute(chosen_logps=[-1.0], rejected_logps=[-2.0], betas=[1.0])


def test_misspelt_or_missing_input_is_a_one_line_error(tmp_path):
    # Issue 15: `chosen_logp` got evaluate's "cache file doesn't exist ... call add"; the length_normalized config
    # without token counts got "TypeError: object of type 'NoneType' has no len()".
    metric = RankingAccuracy(cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"^chosen_logp: not an input of the 'default' config \(did you mean "
                                         r"'chosen_logps'\?\); its inputs are \['chosen_logps', 'rejected_logps'\]$"):
        metric.compute(chosen_logp=[-1.0], rejected_logps=[-2.0])
    with pytest.raises(ValueError, match=r"^chosen_logp: not an input"):
        metric.add_batch(chosen_logp=[-1.0], rejected_logps=[-2.0])
    normalized = RankingAccuracy(config_name="length_normalized", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"^the 'length_normalized' config needs chosen_num_tokens, "
                                         r"rejected_num_tokens too; pass them to compute\(\) or add_batch\(\)$"):
        normalized.compute(chosen_logps=[-1.0], rejected_logps=[-2.0])
    # Inputs given through add_batch first: compute() without inputs is right, and still works.
    metric.add_batch(chosen_logps=[-1.0, -3.0], rejected_logps=[-2.0, -2.0])
    assert metric.compute()["ranking_accuracy"] == 0.5


def test_docstring_examples_run():
    # pytest --doctest-modules runs them too; this keeps them checked when only tests/ is run.
    (test,) = [t for t in doctest.DocTestFinder().find(hf_ches.metric) if t.name.endswith("RankingAccuracy")]
    result = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS).run(test)
    assert result.failed == 0
    assert result.attempted >= 15


def test_metric_card_examples_run(monkeypatch):
    monkeypatch.chdir(METRIC_DIR.parents[1])  # the card loads "metrics/ranking_accuracy" from the repo root
    card = (METRIC_DIR / "README.md").read_text(encoding="utf-8")
    section = card.split("### Examples", 1)[1].split("## Limitations", 1)[0]
    examples = "\n".join("" if line.startswith("```") else line for line in section.splitlines())  # drop fences
    test = doctest.DocTestParser().get_doctest(examples, {"evaluate": evaluate}, "README.md", str(METRIC_DIR), 0)
    result = doctest.DocTestRunner().run(test)
    assert result.failed == 0
    assert result.attempted >= 8


def _compute_as_rank(rank: int, metric_dir: str, cache_dir: str, batch: dict, queue) -> None:
    """One process of evaluate's distributed mode; puts (rank, result or error text) on the queue."""
    try:
        metric = evaluate.load(metric_dir, config_name="idealized", num_process=2, process_id=rank,
                               experiment_id="test-distributed", cache_dir=cache_dir)
        metric.add_batch(**batch)
        queue.put((rank, metric.compute(return_per_example=True, beta=[0.1, 1.0])))
    except Exception as err:  # reported to the parent, which fails the test with it
        queue.put((rank, f"{type(err).__name__}: {err}"))


def test_distributed_two_processes_equal_one(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # the children's evaluate module cache
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    half = N // 2
    shards = [{k: v[part] for k, v in INPUTS["idealized"].items()} for part in (slice(0, half), slice(half, N))]
    processes = [
        context.Process(target=_compute_as_rank, args=(rank, str(METRIC_DIR), str(tmp_path / "shared"), shard, queue))
        for rank, shard in enumerate(shards)
    ]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=240) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    assert results[1] is None, results[1]  # only process 0 computes
    expected = RankingAccuracy(config_name="idealized", cache_dir=str(tmp_path / "single")).compute(
        **INPUTS["idealized"], return_per_example=True, beta=[0.1, 1.0]
    )
    assert results[0] == expected


DATASET = datasets.Dataset.from_dict(INPUTS["idealized"]).select(range(N - 1, -1, -1))
FAST_PATH_CASES = {  # inputs that take the pyarrow path, and inputs that fall back to evaluate's own encoding
    "lists": ("default", {"chosen_logps": [-1.0, -2.5, -3.0], "rejected_logps": [-2.0, -2.5, -1.0]}),
    "float32 array": ("default", {"chosen_logps": np.array([-1.1, -2.5], np.float32), "rejected_logps": [-2.0, -2.5]}),
    "ints": ("default", {"chosen_logps": [-1, -2], "rejected_logps": [-2, -2]}),
    "None": ("default", {"chosen_logps": [-1.0, None], "rejected_logps": [-2.0, -2.0]}),
    "strings": ("default", {"chosen_logps": ["-1.5", "-2"], "rejected_logps": [-2.0, -2.0]}),
    "lengths differ": ("default", {"chosen_logps": [-1.0, -2.0], "rejected_logps": [-2.0]}),
    "torch": ("default", {"chosen_logps": torch.tensor([-1.0, -2.0]), "rejected_logps": torch.tensor([-2.0, -1.0])}),
    "float counts": ("length_normalized", {"chosen_logps": [-1.0, -2.0], "rejected_logps": [-2.0, -1.0],
                                           "chosen_num_tokens": [2.0, 3.7], "rejected_num_tokens": [1, 4]}),
    "NaN count": ("length_normalized", {"chosen_logps": [-1.0, -2.0], "rejected_logps": [-2.0, -1.0],
                                        "chosen_num_tokens": [float("nan"), 3], "rejected_num_tokens": [1, 4]}),
    "listwise": ("listwise", {"logps": [np.array([-1.0, -2.0]), [-3.0, -1.0, -2.0]], "scores": [[1, 0], [2, 2, 1]]}),
    "listwise None": ("listwise", {"logps": [None, [-3.0, -1.0]], "scores": [[1.0, 0.0], [2, 1]]}),
    "dataset columns": ("idealized", {name: DATASET[name] for name in INPUTS["idealized"]}),
}


@pytest.mark.parametrize("case", list(FAST_PATH_CASES))
def test_compute_from_the_inputs_gives_what_evaluates_own_path_gives(case, tmp_path):
    """``compute(**inputs)`` computes from pyarrow's conversion of the inputs (or falls back to evaluate's own
    ``compute``): the same values, and the same errors, as evaluate's own ``add_batch`` and ``compute``."""
    config_name, inputs = FAST_PATH_CASES[case]
    options = dict(return_per_example=True, n_resamples=50)

    def run(compute, folder: str) -> tuple:
        metric = RankingAccuracy(config_name=config_name, cache_dir=str(tmp_path / folder))
        try:
            return "ok", compute(metric)
        except Exception as err:
            return type(err).__name__, str(err)

    def stock(metric: RankingAccuracy) -> dict:
        evaluate.Metric.add_batch(metric, **inputs)
        return metric.compute(**options)

    assert run(lambda metric: metric.compute(**inputs, **options), "direct") == run(stock, "evaluate")


# ----------------------------------------------------------------------------------------------------------------------
# A light metric: no torch on its path, and only evaluate's public API


def test_the_metric_uses_no_private_evaluate_api():
    """Every private name (``_x``) that hf_ches/metric.py reads from ``self``, ``super()`` or ``evaluate`` is one it
    defines itself (``_info`` and ``_compute``, which evaluate's modules define, included), so that a new evaluate
    release cannot break it."""
    import ast

    tree = ast.parse(Path(hf_ches.metric.__file__).read_text(encoding="utf-8"))
    defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    read = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr.startswith("_")
            and not node.attr.startswith("__") and ast.unparse(node.value) in ("self", "super()", "evaluate")}
    assert read and read <= defined, read - defined


def test_evaluate_is_pinned_alike_for_the_package_and_the_metric():
    """One range in pyproject.toml (as installed) and in the metric's requirements.txt; it holds the installed
    version."""
    package = [Requirement(line) for line in importlib.metadata.requires("hf-ches")]
    metric = [Requirement(line) for line in (METRIC_DIR / "requirements.txt").read_text().split()]
    pins = {str(req.specifier) for req in package + metric if req.name == "evaluate"}
    assert len(pins) == 1 and SpecifierSet(pins.pop()).contains(evaluate.__version__), pins


def test_the_metric_alone_installs_and_loads_without_torch(tmp_path):
    """In a fresh virtual environment, what the metric card tells a metric-only user to install: evaluate, and
    hf-ches without its dependencies. `evaluate.load` of the folder then computes, with no torch installed."""
    source = tmp_path / "hf-ches"  # the package's files only: building in the checkout would leave build/ there
    shutil.copytree(METRIC_DIR.parents[1] / "hf_ches", source / "hf_ches", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(METRIC_DIR.parents[1] / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--disable-pip-version-check"]
    evaluate_pin = (METRIC_DIR / "requirements.txt").read_text().split()[0]
    for args in ([evaluate_pin], ["--no-deps", str(source)]):
        done = subprocess.run(pip + args, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    code = ("import importlib.util, sys, evaluate\n"
            "assert importlib.util.find_spec('torch') is None, 'torch is installed'\n"
            "metric = evaluate.load(sys.argv[1])\n"
            "print(metric.compute(chosen_logps=[-1.0, -3.0], rejected_logps=[-2.0, -2.0])['ranking_accuracy'])\n"
            "print(type(metric).__module__, sorted({'torch', 'transformers'} & set(sys.modules)))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HOME": str(tmp_path / "hf"),
                                                                          "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(python), "-c", code, str(METRIC_DIR)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["0.5", "hf_ches.metric", "[]"]
