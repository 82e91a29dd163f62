# Copyright 2025 The hf-ches authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Ranking accuracy of a policy (and its reference) on preference pairs (Chen et al. 2024, arXiv 2405.19534).

    python hub_scripts/ranking_accuracy_report.py \\
        --dataset_name trl-lib/ultrafeedback_binarized --dataset_splits test \\
        --model_name_or_path your-name/Qwen2.5-0.5B-DPO --ref_model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --num_samples 1000 --output_dir report/ --push_to_hub --repo_id your-name/ranking-accuracy

Scores every pair with the policy (and the reference) as DPO does: the sum of the completion-token log-probs given
the prompt, EOS included, with right padding, so only completion tokens are scored. Then it computes the
`RankingAccuracy` metric on each split: ranking accuracy by sum and by mean log-prob per token, for the policy and
the reference; with a reference, the DPO reward accuracy and the difficulty of flipping each wrongly ranked pair;
with a reference and `--preference_column` (α, the share of raters preferring `chosen`), the idealized ranking
accuracy and the alignment gap. It prints a table and writes a JSON report. `--push_to_hub` adds the per-example
scores as config `--config_name` of the dataset repo `--repo_id` and the report as `<config_name>/report.json`.
"""

import logging
import tempfile
from dataclasses import dataclass, field

from datasets import Dataset, DatasetDict, concatenate_datasets
from transformers import HfArgumentParser

from hf_ches import LogProbScorer
from hf_ches.hub import PublishError, check_output_dir, check_target
from hf_ches.models import check_model
from hf_ches.pipeline import command_logging, load_source, shared_field
from hf_ches.ranking import DEFAULT_BETAS, RankingOptions
from hf_ches.report import (
    REPORT_FILE,
    build_report,
    check_preference_column,
    compute_results,
    model_info,
    push_report,
    render_table,
    report_source,
    run_name,
    subsample,
    write_local,
)

logger = logging.getLogger("hf_ches.report")


@dataclass
class ScriptArguments:
    """Arguments of the ranking-accuracy report.

    Args:
        dataset_name (`str`): Hub dataset id, local folder (`save_to_disk` or data files), or data files
            (`*.jsonl`, `*.json`, `*.parquet`, `*.csv`; globs allowed) of preference pairs.
        model_name_or_path (`str`): the policy whose rankings are measured.
        ref_model_name_or_path (`str` or `None`): the reference model; adds its accuracy and the DPO reward accuracy.
        preference_column (`str` or `None`): α, the share of raters preferring `chosen`; with a reference, adds
            the idealized ranking accuracy and the alignment gap.
        num_samples (`int` or `None`): rows per split, drawn as the paper does (`default_rng(seed).choice`).
        push_to_hub (`bool`): push the per-example scores and the report to `repo_id`.
    """

    dataset_name: str = field(metadata={"help": "Hub dataset id, local folder, or data files (*.jsonl, *.json, "
                                                "*.parquet, *.csv; globs allowed) of preference pairs."})
    model_name_or_path: str = field(metadata={"help": "The policy: Hub id, local folder, .gguf file or 'smollm2'."})
    dataset_config: str | None = shared_field("dataset_config")
    dataset_revision: str | None = shared_field("dataset_revision")
    dataset_splits: list[str] | None = field(default=None, metadata={
        "help": "Splits to report on, each separately; all splits when not given."})
    model_revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of the policy."})
    ref_model_name_or_path: str | None = field(default=None, metadata={
        "help": "The reference model (e.g. the SFT model DPO started from); adds its ranking accuracy, the DPO "
                "reward accuracy and the difficulty of flipping each pair."})
    ref_model_revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of the reference."})
    preference_column: str | None = field(default=None, metadata={
        "help": "Column with α, the share of raters preferring `chosen` (0.5 is a tie); with a reference it adds "
                "the idealized ranking accuracy and the alignment gap."})
    beta: list[float] = field(default_factory=lambda: list(DEFAULT_BETAS), metadata={
        "help": "DPO β values for the reward accuracy and the idealized ranking accuracy (the paper's grid)."})
    num_samples: int | None = field(default=None, metadata={
        "help": "Rows per split, drawn as the paper does: numpy default_rng(seed).choice without replacement "
                "(the paper: 1000). All rows when not given."})
    seed: int = field(default=0, metadata={"help": "Seed of the row sample and of the bootstrap intervals."})
    dtype: str | None = shared_field("dtype")
    max_length: int | None = shared_field("max_length")
    boundary: str = shared_field("boundary")
    token_budget: int | None = shared_field("token_budget")
    batch_size: int = shared_field("batch_size")
    dataset_num_proc: int | None = shared_field("dataset_num_proc")
    output_dir: str | None = field(default=None, metadata={
        "help": "Write report.json and the per-example scores (<split>.parquet) here."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the per-example scores and the report to "
                                                               "--repo_id."})
    repo_id: str | None = field(default=None, metadata={"help": "Dataset repo collecting reports, e.g. "
                                                                "your-name/ranking-accuracy."})
    config_name: str | None = field(default=None, metadata={
        "help": "Config of this run in --repo_id; default: the policy's name (org__name, or the folder name)."})
    private: bool = field(default=False, metadata={"help": "Create --repo_id as a private repo."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace --config_name in --repo_id when it holds a report on another dataset (otherwise refused "
                "before any work)."})
    token: str | None = shared_field("token")


def check_arguments(args: ScriptArguments) -> None:
    """The checks that need no data or model, so that a mistake fails before minutes of scoring."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import validate_repo_id

    if args.preference_column and not args.ref_model_name_or_path:
        raise ValueError("--preference_column: the idealized ranking accuracy needs --ref_model_name_or_path too")
    if args.push_to_hub:
        if not args.repo_id:
            raise ValueError("--push_to_hub needs --repo_id (e.g. your-name/ranking-accuracy)")
        validate_repo_id(args.repo_id)
        if not (args.token or get_token()):
            raise ValueError("--push_to_hub needs a Hub token: set HF_TOKEN, run `hf auth login`, or pass --token")
    for name in ("num_samples", "batch_size", "token_budget"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name}: expected an integer >= 1, found {value}")


def check_hub(args: ScriptArguments, config_name: str) -> str | None:
    """The checks that need the Hub, before any scoring: the models exist, and with ``--push_to_hub`` the token can
    write ``--repo_id`` (a bare name goes to the token's user) and its ``config_name`` holds no report on another
    dataset. Returns the full repo id."""
    for name, revision in ((args.model_name_or_path, args.model_revision),
                           (args.ref_model_name_or_path, args.ref_model_revision)):
        if name:
            check_model(name, revision, args.token)
    if not args.push_to_hub:
        return None
    repo_id = check_target(args.repo_id, args.token, (args.dataset_name, args.dataset_config),
                           record_path=f"{config_name}/{REPORT_FILE}", record_source=report_source,
                           overwrite=args.overwrite)
    logger.info("Pushing to %s, config %r", repo_id, config_name)
    return repo_id


def sample(dataset: DatasetDict, num_samples: int | None, seed: int) -> DatasetDict:
    """`subsample` of every split, with a warning for a split that has fewer rows than asked for."""
    for split, rows in dataset.items():
        if num_samples is not None and num_samples > len(rows):
            logger.warning("split %r has %d rows, fewer than --num_samples %d: using all of them", split, len(rows),
                           num_samples)
    return DatasetDict({split: subsample(rows, num_samples, seed) for split, rows in dataset.items()})


def push(args: ScriptArguments, report: dict, per_example: DatasetDict, repo_id: str, config_name: str) -> None:
    """`push_report`; when it fails, the report and the per-pair scores stay on disk (``--output_dir``, or a new
    temporary folder) and the error says where."""
    try:
        url = push_report(report, per_example, repo_id, config_name=config_name, token=args.token,
                          private=args.private)
    except Exception as error:
        folder = args.output_dir or tempfile.mkdtemp(prefix="ranking-report-")
        if not args.output_dir:
            write_local(report, per_example, folder)
        raise PublishError(f"pushing to {repo_id} failed ({str(error).splitlines()[0]}); the report and the per-pair "
                           f"scores are kept in {folder}") from None
    logger.info("Pushed config %r and %s/report.json to %s (%s)", config_name, config_name, repo_id, url)


def main(args: ScriptArguments) -> dict:
    check_arguments(args)
    if args.output_dir:
        check_output_dir(args.output_dir, marker=REPORT_FILE)
    options = RankingOptions(beta=args.beta, seed=args.seed)  # also checks β
    dataset = load_source(args)
    if args.preference_column:
        for split, rows in dataset.items():
            check_preference_column(rows, args.preference_column, split)
    config_name = args.config_name or run_name(args.model_name_or_path)
    repo_id = check_hub(args, config_name)
    dataset = sample(dataset, args.num_samples, args.seed)

    scoring = dict(dtype=args.dtype, max_length=args.max_length, token_budget=args.token_budget,
                   boundary=args.boundary)
    map_kwargs = dict(batch_size=args.batch_size, num_proc=args.dataset_num_proc,
                      with_rank=(args.dataset_num_proc or 1) > 1)
    policy = LogProbScorer(args.model_name_or_path, revision=args.model_revision, **scoring)
    dataset = DatasetDict({split: policy.map(rows, **map_kwargs) for split, rows in dataset.items()})
    reference = None
    if args.ref_model_name_or_path:
        reference = LogProbScorer(args.ref_model_name_or_path, revision=args.ref_model_revision,
                                  column_prefix="ref_", **scoring)
        dataset = DatasetDict({split: reference.map(rows, **map_kwargs) for split, rows in dataset.items()})

    results, per_example = {}, {}
    for split, scored in dataset.items():
        results[split], flags = compute_results(scored, reference=reference is not None,
                                                preference_column=args.preference_column, options=options)
        per_example[split] = concatenate_datasets([scored, Dataset.from_dict(flags)], axis=1)
    report = build_report(
        results,
        dataset={"name": args.dataset_name, "config": args.dataset_config, "revision": args.dataset_revision,
                 "splits": list(dataset), "preference_column": args.preference_column,
                 "num_samples": {split: len(rows) for split, rows in dataset.items()},
                 "num_samples_requested": args.num_samples, "sample_seed": args.seed},
        policy=model_info(policy),
        reference=model_info(reference) if reference else None,
        scoring={"max_length": args.max_length, "token_budget": args.token_budget, "boundary": args.boundary},
        options=options,
    )
    print(render_table(report))

    if args.output_dir:
        files = write_local(report, DatasetDict(per_example), args.output_dir)
        logger.info("Wrote %s", ", ".join(files))
    if repo_id:
        push(args, report, DatasetDict(per_example), repo_id, config_name)
    return report


if __name__ == "__main__":
    parser = HfArgumentParser(ScriptArguments)
    (script_args,) = parser.parse_args_into_dataclasses()
    command_logging()
    try:
        main(script_args)
    except (ValueError, PublishError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
