"""A ranking-accuracy report: how often a policy (and its reference) ranks preference pairs the way raters do.

`hub_scripts/ranking_accuracy_report.py` is the recipe. It scores the pairs with `LogProbScorer` (the policy, and
the reference with ``column_prefix="ref_"``), then calls the functions here:

- `subsample`: the paper's seeded draw of ``num_samples`` rows (``default_rng(0).choice``, no replacement).
- `check_preference_column`: the rater-agreement column α is there and holds shares in [0, 1].
- `compute_results`: the `RankingAccuracy` metric on one split, as a summary and as per-example columns.
- `build_report`, `render_table`, `report_json`: the JSON report and a Markdown table, pure.
- `write_local` and `push_report`: the side effects, last and only on request. The push works as reward-bench's
  does: the per-example scores as a dataset config of a results repo, and the report JSON next to them.

What each block of the results holds (one per split):

- ``policy`` and ``reference``: the "default" and "length_normalized" configs of the metric on that model's
  log-probs, i.e. the ranking accuracy by sum and by mean log-prob per token, with bootstrap intervals.
- ``reward`` (with a reference): DPO reward accuracy (strictly higher implicit reward for the preferred response)
  per β, and how hard each pair the reference ranks wrongly is to flip (Thm. 4.1). Without an α column every
  pair counts as preferred by all raters (α = 1); these outputs do not depend on α beyond its direction.
- ``idealized`` (with a reference and an α column): the "idealized" config's accuracy of the exact DPO optimum per
  β (Cor. 3.3), the alignment gap, and the observed accuracy in the raters' direction (α < 0.5 flips a pair).

>>> from datasets import Dataset
>>> scored = Dataset.from_dict({"chosen_logps": [-3.0, -5.0, -2.0], "rejected_logps": [-4.0, -4.0, -6.0],
...                             "chosen_num_tokens": [3, 5, 2], "rejected_num_tokens": [2, 2, 3]})
>>> results, per_example = compute_results(scored, options=RankingOptions(n_resamples=100))
>>> results["policy"]["ranking_accuracy"], results["policy"]["length_normalized_ranking_accuracy"]
(0.6666666666666666, 1.0)
>>> per_example["correct"]
[True, False, True]
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict

from hf_ches import __version__
from hf_ches.metric import RankingAccuracy
from hf_ches.ranking import RankingOptions, as_probabilities

REPORT_FILE = "report.json"
ROW_INDEX = "row_index"  # the row's position in its split before sampling
PAPER_URL = "https://arxiv.org/abs/2405.19534"
LOGPS = "sum of the completion-token log-probs given the prompt, EOS included (TRL's DPOTrainer)"
# Outputs of the metric that are per example; everything else is a summary.
PER_EXAMPLE = frozenset({"correct", "tie", "length_normalized_correct", "length_normalized_tie", "human_tie",
                         "idealized_correct", "reward_correct", "reference_log_ratio", "reference_wrong"})
# Outputs of the "idealized" config that do not depend on α beyond which response the raters prefer.
REWARD_KEYS = ("beta", "reward_accuracy", "reward_accuracy_ci", "num_reference_wrong", "flip_loss_threshold_mean",
               "flip_loss_threshold_q25", "flip_loss_threshold_median", "flip_loss_threshold_q75")


# ----------------------------------------------------------------------------------------------------------------------
# Inputs


def subsample(dataset: Dataset, num_samples: int | None = None, seed: int = 0) -> Dataset:
    """``num_samples`` rows drawn as the paper's code draws them, ``np.random.default_rng(seed).choice(n,
    num_samples, replace=False)``, in draw order, with their position in the split in a ``row_index`` column.

    All rows, in order, when ``num_samples`` is None or not below the number of rows.

    >>> rows = Dataset.from_dict({"prompt": list("abcdef")})
    >>> subsample(rows, 3)["row_index"][:], subsample(rows)["row_index"][:]
    ([4, 5, 3], [0, 1, 2, 3, 4, 5])
    """
    if ROW_INDEX in dataset.column_names:
        raise ValueError(f"column {ROW_INDEX!r}: the report adds it (each row's position in its split), but the "
                         f"dataset already has it; rename or remove that column")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples: expected an integer >= 1, found {num_samples}")
    n = len(dataset)
    if num_samples is None or num_samples >= n:
        return dataset.add_column(ROW_INDEX, list(range(n)))
    indices = np.random.default_rng(seed).choice(n, num_samples, replace=False).tolist()
    return dataset.select(indices).add_column(ROW_INDEX, indices)


def check_preference_column(dataset: Dataset, column: str, split: str) -> None:
    """Raise a ValueError unless ``column`` holds a share of raters in [0, 1] (α) on every row of ``split``.

    >>> check_preference_column(Dataset.from_dict({"alpha": [0.75, 1.5]}), "alpha", "train")
    Traceback (most recent call last):
    ...
    ValueError: split 'train': alpha[1]: expected a share of raters in [0, 1], found 1.5
    """
    if column not in dataset.column_names:
        raise ValueError(f"split {split!r}: no column {column!r} (the preference column, α); found columns "
                         f"{dataset.column_names}")
    try:
        as_probabilities(column, dataset[column][:])
    except ValueError as err:
        raise ValueError(f"split {split!r}: {err}") from None


# ----------------------------------------------------------------------------------------------------------------------
# The metric


def _metric(config_name: str, options: RankingOptions, **inputs: list) -> dict:
    """`RankingAccuracy` of ``config_name`` on ``inputs``, with per-example flags, kept in memory (no cache file)."""
    metric = RankingAccuracy(config_name=config_name, keep_in_memory=True)
    return metric.compute(**inputs, **asdict(replace(options, return_per_example=True)))


def _summary(result: dict, keys: tuple[str, ...] | None = None) -> dict:
    return {k: v for k, v in result.items() if k not in PER_EXAMPLE and (keys is None or k in keys)}


def _by_row(flags_by_beta: list[list]) -> list[list]:
    """[β][pair] → [pair][β], one list per row."""
    return np.asarray(flags_by_beta).T.tolist()


def _accuracies(columns: dict[str, list], prefix: str, options: RankingOptions) -> tuple[dict, dict[str, list]]:
    """Sum and length-normalized ranking accuracy of the model whose columns start with ``prefix``."""
    logps = {name: columns[prefix + name] for name in ("chosen_logps", "rejected_logps")}
    counts = {name: columns[prefix + name] for name in ("chosen_num_tokens", "rejected_num_tokens")}
    by_sum = _metric("default", options, **logps)
    by_mean = _metric("length_normalized", options, **logps, **counts)
    summary = _summary(by_sum) | {k: v for k, v in _summary(by_mean).items() if k.startswith("length_normalized_")}
    flags = {f"{prefix}correct": by_sum["correct"],
             f"{prefix}length_normalized_correct": by_mean["length_normalized_correct"]}
    return summary, flags


def compute_results(
    scored: Dataset,
    *,
    reference: bool = False,
    preference_column: str | None = None,
    options: RankingOptions = RankingOptions(),
) -> tuple[dict, dict[str, list]]:
    """The ranking-accuracy metric on one split of scored pairs (see the module docstring for the blocks).

    Args:
        scored: rows with ``chosen_logps``, ``rejected_logps``, ``chosen_num_tokens``, ``rejected_num_tokens``
            (`LogProbScorer`), and the same columns with ``ref_`` in front when ``reference`` is True.
        reference: also report the reference model and the DPO reward accuracy.
        preference_column: the column with α, the share of raters preferring ``chosen``; with ``reference`` it
            adds the idealized block.
        options: β values, tie margin and bootstrap settings (``return_per_example`` is always on here).

    Returns:
        ``(results, per_example)``: the summary (``num_pairs`` and the blocks), and per-example columns in row
        order: ``correct`` and ``length_normalized_correct`` (policy), ``ref_correct`` and
        ``ref_length_normalized_correct``, ``reward_correct`` (one flag per β), ``reference_log_ratio`` (c) and
        ``reference_wrong``, and with α ``idealized_correct`` (one flag per β) and ``human_tie``.
    """
    if preference_column is not None and not reference:
        raise ValueError("preference_column: the idealized ranking accuracy needs a reference model's log-probs too")
    prefixes = ("", "ref_") if reference else ("",)
    needed = [p + name for p in prefixes for name in ("chosen_logps", "rejected_logps", "chosen_num_tokens",
                                                      "rejected_num_tokens")]
    needed += [preference_column] if preference_column else []
    missing = [name for name in needed if name not in scored.column_names]
    if missing:
        raise ValueError(f"missing columns {missing}; found {scored.column_names}")
    columns = scored.select_columns(needed).to_dict()

    results: dict[str, Any] = {"num_pairs": len(scored)}
    per_example: dict[str, list] = {}
    for prefix, block in zip(prefixes, ("policy", "reference")):
        results[block], flags = _accuracies(columns, prefix, options)
        per_example |= flags
    if reference:
        alpha = columns[preference_column] if preference_column else [1.0] * len(scored)
        names = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
        both = _metric("idealized", options, **{name: columns[name] for name in names}, preference_probs=alpha)
        results["reward"] = _summary(both, REWARD_KEYS)
        per_example |= {"reward_correct": _by_row(both["reward_correct"]),
                        "reference_log_ratio": both["reference_log_ratio"],
                        "reference_wrong": both["reference_wrong"]}
        if preference_column:
            results["idealized"] = {k: v for k, v in _summary(both).items() if k not in REWARD_KEYS or k == "beta"}
            per_example |= {"idealized_correct": _by_row(both["idealized_correct"]), "human_tie": both["human_tie"]}
    return results, per_example


# ----------------------------------------------------------------------------------------------------------------------
# The report


def model_info(scorer: Any) -> dict:
    """What identifies a `LogProbScorer`'s model in the report: its name, revision and commit, the dtype and device
    it was loaded with (resolved), and its weights fingerprint."""
    from hf_ches.models import loaded_as, model_commit

    config = scorer.config
    return {"name_or_path": config.model, "revision": config.revision,
            "commit": model_commit(config.model, config.revision), **loaded_as(scorer.load()[0]),
            "fingerprint": scorer.identity}


def report_source(report: dict) -> tuple[str, str | None]:
    """The (dataset, config) a report was made on: what `hf_ches.hub.check_target` compares before a push.

    >>> report_source({"dataset": {"name": "org/prefs", "config": None, "splits": ["test"]}})
    ('org/prefs', None)
    """
    return report["dataset"]["name"], report["dataset"]["config"]


def run_name(model_name_or_path: str) -> str:
    """A name for a report in a results repo (its config name there): a Hub id with ``__`` for ``/``, or the
    folder name of a local model.

    >>> run_name("HuggingFaceTB/SmolLM2-135M-Instruct"), run_name("/tmp/models/tiny llama/")
    ('HuggingFaceTB__SmolLM2-135M-Instruct', 'tiny-llama')
    """
    path = Path(model_name_or_path)
    name = path.name if path.is_absolute() or path.exists() else model_name_or_path.replace("/", "__")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "report"


def build_report(
    results: dict[str, dict],
    *,
    dataset: dict,
    policy: dict,
    reference: dict | None = None,
    scoring: dict | None = None,
    options: RankingOptions = RankingOptions(),
) -> dict:
    """The JSON report: provenance first, then ``results`` per split (`compute_results`' summaries).

    >>> report = build_report({"test": {"num_pairs": 2}}, dataset={"name": "org/prefs"}, policy={"name_or_path": "m"})
    >>> list(report)  # doctest: +NORMALIZE_WHITESPACE
    ['metric', 'paper', 'hf_ches_version', 'dataset', 'policy', 'reference', 'log_probs', 'scoring', 'options',
     'results']
    """
    return {
        "metric": "ranking_accuracy",
        "paper": PAPER_URL,
        "hf_ches_version": __version__,
        "dataset": dataset,
        "policy": policy,
        "reference": reference,
        "log_probs": LOGPS,
        "scoring": scoring or {},
        "options": {k: v for k, v in asdict(options).items() if k != "return_per_example"} | {
            "beta": list(options.beta)},
        "results": results,
    }


def report_json(report: dict) -> str:
    """The report as indented JSON; NaN or infinity would be a bug, so they raise instead of writing bad JSON."""
    return json.dumps(report, indent=2, allow_nan=False) + "\n"


def _value(value: float, interval: list[float]) -> list[str]:
    return [f"{value:.4f}", f"[{interval[0]:.4f}, {interval[1]:.4f}]"]


def _table_rows(results: dict) -> list[list[str]]:
    """(metric, value, interval) rows of one split's results."""
    rows = []
    for block in ("policy", "reference"):
        if block in results:
            found = results[block]
            rows.append([f"{block} ranking accuracy", *_value(found["ranking_accuracy"], found["ranking_accuracy_ci"])])
            rows.append([f"{block} ranking accuracy, length-normalized",
                         *_value(found["length_normalized_ranking_accuracy"],
                                 found["length_normalized_ranking_accuracy_ci"])])
    if "reward" in results:
        found = results["reward"]
        for beta, value, interval in zip(found["beta"], found["reward_accuracy"], found["reward_accuracy_ci"]):
            rows.append([f"DPO reward accuracy, β={beta:g}", *_value(value, interval)])
    if "idealized" in results:
        found = results["idealized"]
        rows.append(["policy ranking accuracy, raters' direction",
                     *_value(found["ranking_accuracy"], found["ranking_accuracy_ci"])])
        for beta, value, interval in zip(found["beta"], found["idealized_ranking_accuracy"],
                                         found["idealized_ranking_accuracy_ci"]):
            rows.append([f"idealized ranking accuracy, β={beta:g}", *_value(value, interval)])
        rows.append(["alignment gap (median idealized − observed)",
                     *_value(found["alignment_gap"], found["alignment_gap_ci"])])
    return rows


def render_table(report: dict) -> str:
    """A Markdown table of every accuracy in the report, one row per split and metric.

    >>> results = {"num_pairs": 4, "policy": {"ranking_accuracy": 0.75, "ranking_accuracy_ci": [0.25, 1.0],
    ...            "length_normalized_ranking_accuracy": 0.5, "length_normalized_ranking_accuracy_ci": [0.0, 1.0]}}
    >>> print(render_table(build_report({"test": results}, dataset={}, policy={})))
    | split (pairs) | metric | value | 95% CI |
    |---|---|---|---|
    | test (4) | policy ranking accuracy | 0.7500 | [0.2500, 1.0000] |
    | test (4) | policy ranking accuracy, length-normalized | 0.5000 | [0.0000, 1.0000] |
    """
    level = report["options"]["confidence_level"]
    lines = [f"| split (pairs) | metric | value | {level:.0%} CI |", "|---|---|---|---|"]
    for split, results in report["results"].items():
        lines += [f"| {split} ({results['num_pairs']}) | " + " | ".join(row) + " |" for row in _table_rows(results)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Side effects


def write_local(report: dict, per_example: DatasetDict, output_dir: str | Path) -> list[str]:
    """Write ``report.json`` and one ``<split>.parquet`` of per-example scores per split into ``output_dir``.

    ``load_dataset(output_dir)`` reads the splits back. Returns the paths written.
    """
    from hf_ches.hub import quiet_writes

    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT_FILE).write_text(report_json(report), encoding="utf-8")
    with quiet_writes():
        for split, rows in per_example.items():
            rows.to_parquet(str(folder / f"{split}.parquet"))
    return [str(folder / REPORT_FILE), *(str(folder / f"{split}.parquet") for split in per_example)]


def push_report(
    report: dict,
    per_example: DatasetDict,
    repo_id: str,
    *,
    config_name: str,
    token: str | None = None,
    private: bool = False,
) -> str:
    """Push the per-example scores as config ``config_name`` of the dataset repo ``repo_id`` and the report as
    ``<config_name>/report.json`` beside them; return the URL of the report's commit.

    The repo is created if needed (``private`` applies only then). One repo can collect the reports of many
    models, one config each: ``load_dataset(repo_id, config_name)`` gives that run's per-example scores.
    """
    from huggingface_hub import HfApi

    from hf_ches.hub import quiet_writes

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True).repo_id
    model = report["policy"]["name_or_path"]
    with quiet_writes():
        per_example.push_to_hub(repo_id, config_name=config_name, token=token,
                                commit_message=f"Add per-example ranking-accuracy scores of {model}")
    commit = api.upload_file(path_or_fileobj=report_json(report).encode("utf-8"),
                             path_in_repo=f"{config_name}/{REPORT_FILE}", repo_id=repo_id, repo_type="dataset",
                             commit_message=f"Add the ranking-accuracy report of {model}")
    return commit.commit_url
