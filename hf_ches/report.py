"""A ranking-accuracy report: how often a policy (and its reference) ranks preference pairs the way raters do.

`run_report` is the recipe behind ``hub_scripts/ranking_accuracy_report.py`` (`REPORT`: the data, scoring, sampling,
resume, Hub and output groups of `hf_ches.recipes` and its own `ReportArguments`). It scores the pairs with
`LogProbScorer` (the policy, and the reference with ``column_prefix="ref_"``), each in chunks kept in the datasets
cache (`hf_ches.runner`: a rerun scores only what is missing; under ``torchrun`` the ranks share the chunks and rank
0 alone reports, writes and pushes), then calls the functions here:

- `check_preference_column`: the rater-agreement column α is there and holds shares in [0, 1].
- `compute_results`: the `RankingAccuracy` metric on one split, as a summary and as per-example columns.
- `build_report`, `render_table`, `report_json`: the JSON report and a Markdown table, pure.
- `report_files` (for `hf_ches.hub.write_local`) and `push_report` (with `hf_ches.hub.push_repo`): the side
  effects, last and only on request. The push works as reward-bench's does: the per-example scores as a dataset
  config of a results repo, and the report JSON next to them.

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
import logging
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict, concatenate_datasets

from hf_ches import __version__
from hf_ches.metric import RankingAccuracy
from hf_ches.ranking import DEFAULT_BETAS, RankingOptions, as_probabilities
from hf_ches.recipes import (
    DataArguments,
    HubArguments,
    OutputArguments,
    Recipe,
    ResumeArguments,
    SamplingArguments,
    ScoringArguments,
    check_arguments,
    run_recipe,
)

logger = logging.getLogger(__name__)

REPORT_FILE = "report.json"
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




def report_files(report: dict, per_example: DatasetDict) -> dict[str, bytes | Dataset]:
    """The local output of a report: ``report.json`` and one ``<split>.parquet`` of per-example scores per split
    (``load_dataset(output_dir)`` reads the splits back); for `hf_ches.hub.write_local`."""
    return {REPORT_FILE: report_json(report).encode("utf-8"),
            **{f"{split}.parquet": rows for split, rows in per_example.items()}}


def push_report(report: dict, per_example: DatasetDict, options: Any, config_name: str) -> Any:
    """Push the per-example scores as config ``config_name`` of the dataset repo ``options.repo_id`` and the report
    as ``<config_name>/report.json`` beside them, with `hf_ches.hub.push_repo` (the push every hf-ches command
    uses: a failure is a `PublishError` that names the step and hides the token); returns its `PublishResult`.

    One repo can collect the reports of many models, one config each, as reward-bench's results repo does:
    ``load_dataset(repo_id, config_name)`` gives that run's per-example scores.
    """
    from huggingface_hub import CommitOperationAdd

    from hf_ches.hub import push_repo

    path = f"{config_name}/{REPORT_FILE}"
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=report_json(report).encode("utf-8"))]
    return push_repo(options, {config_name: per_example}, lambda api, repo_id, revision: operations,
                     what=f"the report {path}", files=[path])


# ----------------------------------------------------------------------------------------------------------------------
# The recipe: hub_scripts/ranking_accuracy_report.py


@dataclass(frozen=True)
class ReportArguments:
    """The report's own options: the reference model, the raters' agreement, the β grid, the config name."""

    _argument_group_name = "report arguments"

    ref_model_name_or_path: str | None = field(default=None, metadata={
        "help": "The reference model (e.g. the SFT model DPO started from); adds its ranking accuracy, the DPO "
                "reward accuracy and the difficulty of flipping each pair."})
    ref_model_revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of the reference."})
    preference_column: str | None = field(default=None, metadata={
        "help": "Column with alpha, the share of raters preferring chosen (0.5 is a tie); with a reference it adds "
                "the idealized ranking accuracy and the alignment gap."})
    beta: list[float] = field(default_factory=lambda: list(DEFAULT_BETAS), metadata={
        "help": "DPO beta values for the reward accuracy and the idealized ranking accuracy (the paper's grid)."})
    config_name: str | None = field(default=None, metadata={
        "help": "Config of this run in --repo_id; default: the policy's name (org__name, or the folder name)."})

    def __post_init__(self) -> None:
        if self.preference_column and not self.ref_model_name_or_path:
            raise ValueError("--preference_column: the idealized ranking accuracy needs --ref_model_name_or_path too")
        RankingOptions(beta=self.beta)  # checks β


REPORT_DESCRIPTION = """\
Ranking accuracy of a policy (and its reference) on preference pairs (Chen et al. 2024, arXiv 2405.19534).

Scores every pair with the policy (and the reference) as DPO does: the sum of the completion-token log-probs given
the prompt, EOS included. Then computes the ranking accuracy by sum and by mean log-prob per token for each model;
with a reference, the DPO reward accuracy and the difficulty of flipping each wrongly ranked pair; with a reference
and --preference_column, the idealized ranking accuracy and the alignment gap. Prints a table, writes report.json
and the per-pair scores to --output_dir, and with --push_to_hub adds the per-pair scores as config --config_name
of the dataset repo --repo_id and the report as <config_name>/report.json."""
COMMAND = "hub_scripts/ranking_accuracy_report.py"  # how its outputs name it
REPORT = Recipe("report", (DataArguments, ScoringArguments, SamplingArguments, ReportArguments, ResumeArguments,
                           HubArguments, OutputArguments), required=("model_name_or_path",),
                description=REPORT_DESCRIPTION)


def score_models(dataset: DatasetDict, scoring: ScoringArguments, report: ReportArguments,
                 resume: ResumeArguments, columns: dict[str, str] | None = None) -> tuple[DatasetDict, Any, list]:
    """The policy's log-prob columns (and the reference's, ``ref_`` in front) on every split, each model's scored
    from the rows alone (read from ``columns``, `DataArguments.pair_columns`), in chunks kept in the datasets cache
    (`hf_ches.runner.score_splits`), with the rows that ``--on_invalid flag`` flagged left out; returns the
    scored splits and the two scorers."""
    from hf_ches import LogProbScorer
    from hf_ches.runner import score_splits

    options = scoring.scorer_options() | (columns or {})
    policy = LogProbScorer(scoring.model_name_or_path, **options)
    scorers = [policy]
    if report.ref_model_name_or_path:
        options |= {"revision": report.ref_model_revision}
        scorers.append(LogProbScorer(report.ref_model_name_or_path, column_prefix="ref_", **options))
    chunked = [score_splits(scorer, dataset, scoring, resume) for scorer in scorers]
    scored = {}
    for split, rows in dataset.items():
        added = [by_split[split].select_columns(list(scorer.output_features()))
                 for by_split, scorer in zip(chunked, scorers)]
        scored[split] = _scorable(concatenate_datasets([rows, *added], axis=1), split)
    return DatasetDict(scored), policy, scorers[1:]


def _scorable(rows: Dataset, split: str) -> Dataset:
    """``rows`` without those a scorer flagged (``*ches_flag`` not empty, NaN log-probs), with a warning."""
    flags = [name for name in rows.column_names if name.endswith("ches_flag")]
    if not flags:
        return rows
    keep = [i for i, row in enumerate(zip(*(rows[name][:] for name in flags))) if not any(row)]
    if len(keep) < len(rows):
        logger.warning("split %r: %d unscorable pairs left out (--on_invalid flag)", split, len(rows) - len(keep))
    return rows.select(keep)


def run_report(data: DataArguments, scoring: ScoringArguments, sampling: SamplingArguments,
               report_args: ReportArguments, resume: ResumeArguments, hub: HubArguments,
               output: OutputArguments) -> dict | None:
    """Check, sample, score, compute, print; write ``--output_dir`` and push, as the options say; returns the report
    (under a launcher: on rank 0, and None on the other ranks, which only score)."""
    from hf_ches import outputs
    from hf_ches.sources import check_hub_ids, load_source, model_provenance, push_target, sample, source_name
    from hf_ches.runner import is_main_process, on_main_process

    check_arguments(REPORT, [data, scoring, sampling, report_args, resume, hub, output])
    if output.output_dir:
        outputs.check(output.output_dir, COMMAND, overwrite=output.overwrite)
    options = RankingOptions(beta=report_args.beta, seed=sampling.seed)
    on_main_process(lambda: check_hub_ids(data, [(scoring.model_name_or_path, scoring.model_revision),
                                              (report_args.ref_model_name_or_path, report_args.ref_model_revision)]))
    dataset = load_source(data)
    if report_args.preference_column:
        for split, rows in dataset.items():
            check_preference_column(rows, report_args.preference_column, split)
    config_name = report_args.config_name or run_name(scoring.model_name_or_path)
    repo_id = push_target(data, hub, output.overwrite, record_path=f"{config_name}/{REPORT_FILE}",
                          record_source=report_source)
    if repo_id:
        logger.info("Pushing to %s, config %r", repo_id, config_name)
    sampled = sample(dataset, sampling.num_samples, sampling.seed)
    dataset, policy, reference = score_models(sampled, scoring, report_args, resume, data.pair_columns())
    if not is_main_process():
        return None
    results, per_example = {}, {}
    for split, scored in dataset.items():
        results[split], flags = compute_results(scored, reference=bool(reference), options=options,
                                                preference_column=report_args.preference_column)
        per_example[split] = concatenate_datasets([scored, Dataset.from_dict(flags)], axis=1)
    report = build_report(
        results,
        dataset={"name": source_name(data), "config": data.dataset_config, "revision": data.dataset_revision,
                 "data_dir": data.data_dir, "data_files": data.data_files, "columns": data.pair_columns(),
                 "splits": list(dataset), "preference_column": report_args.preference_column,
                 "num_samples": {split: len(rows) for split, rows in dataset.items()},
                 "num_samples_requested": sampling.num_samples, "sample_seed": sampling.seed,
                 "num_unscorable": {split: len(sampled[split]) - len(rows) for split, rows in dataset.items()}},
        policy=model_provenance(policy), reference=model_provenance(reference[0]) if reference else None,
        scoring={"max_length": scoring.max_length, "token_budget": scoring.token_budget,
                 "boundary": scoring.boundary, "on_invalid": scoring.on_invalid},
        options=options,
    )
    print(render_table(report))
    per_example = DatasetDict(per_example)
    if output.output_dir:
        files = outputs.write(output.output_dir, COMMAND, source_name(data),
                              report_files(report, per_example), overwrite=output.overwrite)
        logger.info("Wrote %s", ", ".join(str(Path(output.output_dir, name)) for name in files))
    if repo_id:
        push(report, per_example, replace(hub, repo_id=repo_id), data.token, config_name, output)
    return report


def push(report: dict, per_example: DatasetDict, hub: HubArguments, token: str | None, config_name: str,
         output: OutputArguments) -> None:
    """`push_report`; when it fails, the report and the per-pair scores stay on disk (``--output_dir``, or a new
    temporary folder) and the error says where."""
    import tempfile

    from hf_ches import outputs
    from hf_ches.hub import PublishError

    options = hub.publish_options(token, f"Add the ranking-accuracy report of {report['policy']['name_or_path']}",
                                  output.overwrite)
    try:
        pushed = push_report(report, per_example, options, config_name)
    except Exception as error:
        folder = output.output_dir or tempfile.mkdtemp(prefix="ranking-report-")
        if not output.output_dir:
            outputs.write(folder, COMMAND, report["dataset"]["name"],
                          report_files(report, per_example))
        raise PublishError(f"pushing to {options.repo_id} failed ({str(error).splitlines()[0]}); the report and the "
                           f"per-pair scores are kept in {folder}") from None
    logger.info("Pushed config %r and %s/%s to %s (%s)", config_name, config_name, REPORT_FILE, pushed.repo_id,
                pushed.commit_url)


def main(argv: list[str] | None = None, prog: str | None = None) -> dict | None:
    """``hub_scripts/ranking_accuracy_report.py``: parse ``argv`` (default ``sys.argv[1:]``) into the report's
    groups and `run_report`; bad input and failed pushes exit with a one-line error."""
    return run_recipe(REPORT, run_report, argv, prog)
