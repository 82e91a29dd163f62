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
from dataclasses import dataclass, field

from datasets import Dataset, DatasetDict, concatenate_datasets
from transformers import HfArgumentParser

from hf_ches import LogProbScorer
from hf_ches.pipeline import load_source, shared_field
from hf_ches.ranking import DEFAULT_BETAS, RankingOptions
from hf_ches.report import (
    build_report,
    check_preference_column,
    compute_results,
    model_info,
    push_report,
    render_table,
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


def main(args: ScriptArguments) -> dict:
    check_arguments(args)
    options = RankingOptions(beta=args.beta, seed=args.seed)  # also checks β
    dataset = load_source(args)
    if args.preference_column:
        for split, rows in dataset.items():
            check_preference_column(rows, args.preference_column, split)
    dataset = DatasetDict({split: subsample(rows, args.num_samples, args.seed) for split, rows in dataset.items()})

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
                 "num_samples": args.num_samples, "sample_seed": args.seed},
        policy=model_info(policy),
        reference=model_info(reference) if reference else None,
        scoring={"max_length": args.max_length, "token_budget": args.token_budget},
        options=options,
    )
    print(render_table(report))

    if args.output_dir:
        files = write_local(report, DatasetDict(per_example), args.output_dir)
        logger.info("Wrote %s", ", ".join(files))
    if args.push_to_hub:
        config_name = args.config_name or run_name(args.model_name_or_path)
        url = push_report(report, DatasetDict(per_example), args.repo_id, config_name=config_name, token=args.token,
                          private=args.private)
        logger.info("Pushed config %r and %s/report.json to %s (%s)", config_name, config_name, args.repo_id, url)
    return report


if __name__ == "__main__":
    parser = HfArgumentParser(ScriptArguments)
    (script_args,) = parser.parse_args_into_dataclasses()
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    try:
        main(script_args)
    except ValueError as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
