"""The score → select → publish recipe behind ``hub_scripts/ches_filter.py`` and ``hf-ches score|filter|publish``.

Each stage is a `hf_ches.recipes.Recipe` (`SCORE`, `FILTER`, `PUBLISH`): the argument groups of
`hf_ches.recipes` it needs, as TRL's scripts compose theirs; the script and the CLI only parse them and call its
function (`run_score`, `run_filter`, `run_publish`), which reads top to bottom, one comment per step. Stages:

* ``score`` (data, scoring, resume, output): load the pairs, add the CHES columns ``--chunk_size`` rows at a time,
  keeping the finished chunks under ``--output_dir``/chunks (`hf_ches.runner`: the same command run again resumes),
  and ``save_to_disk`` the splits to ``--output_dir`` (which ``--dataset_name`` reads back);
* ``filter`` (data, scoring, selection, resume, output): load (and score, if ``--model_name_or_path`` is given, in
  chunks kept in the datasets cache), select, write the repo's files under ``--output_dir`` (the dry run: the same
  files the push creates);
* ``publish`` (data, scoring, selection, resume, Hub, output): the same, then push to ``--repo_id`` with
  ``--push_to_hub`` (or write ``--output_dir``).

Under a launcher (``torchrun``, ``accelerate launch``) every rank runs the same command: the ranks share the
chunks (`hf_ches.runner.score_in_chunks`), then rank 0 alone saves, writes and pushes; the others return.

Everything that can be checked without the network (the rule, the repo id, the token's presence, the output
folder) is checked first; then that the dataset and the model exist (`check_hub_ids`: one request each, one line
when one is missing or the Hub is out of reach); then, once the data is loaded, its splits and columns; then,
still before the model is loaded, the push target: who the token belongs to, whether it can write the target's
namespace, and what the target repo holds (`hf_ches.hub.check_target`). Under a launcher, rank 0 alone asks the
Hub and tells the others (`hf_ches.runner.on_main_process`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from datasets import DatasetDict

from hf_ches.card import RunInfo
from hf_ches import outputs
from hf_ches.filtering import (
    SELECTION_EVIDENCE,
    Selection,
    SelectionRule,
    check_selectable,
    select_splits,
)
from hf_ches.hub import DEFAULT_COMMIT_MESSAGE, PublishResult, build_publication, publish
from hf_ches.recipes import (
    MODEL_HELP,
    DataArguments,
    HubArguments,
    OutputArguments,
    Recipe,
    ResumeArguments,
    ScoringArguments,
    SelectionArguments,
    check_arguments,
    command_line,
    run_recipe,
)
from hf_ches.runner import is_main_process, on_main_process, score_splits
from hf_ches.sources import (
    check_hub_ids,
    inherited_scoring,
    load_source,
    model_provenance,
    push_target,
    source_metadata,
    source_name,
)

logger = logging.getLogger(__name__)

Stage = Literal["score", "filter", "publish"]

DESCRIPTION = """\
Score preference pairs (prompt/chosen/rejected, TRL's standard or conversational format) by CHES (Razin et al. 2024,
arXiv 2410.08847) and the output-layer kernel (entk_w), flag or remove the pairs likely to cause likelihood
displacement in DPO, and publish the dataset with configs "default" (kept pairs), "removed" and "scored", a dataset
card, a score histogram and the run's parameters."""
SELECTION = f"""\
Default selection (no --preset/--remove_top/--keep_bottom/--threshold): {SelectionRule().describe()}. Why:
{SELECTION_EVIDENCE}. The paper's SORRY-Bench recipe is --preset sorry-bench (keep the lowest 5% by ln_ches)."""
ABOUT = """\
CHES (Razin et al. 2024, arXiv 2410.08847) predicts which pairs make DPO lower the probability of the chosen
response (likelihood displacement). Pairs: prompt/chosen/rejected, in TRL's standard or conversational format. The
token comes from --token, HF_TOKEN or "hf auth login"."""
# filter and publish take already-scored data too
SCORED_MODEL_HELP = MODEL_HELP + " Omit it when the data already has the score column."


SCORE = Recipe("score", (DataArguments, ScoringArguments, ResumeArguments, OutputArguments), required=(
    "model_name_or_path", "output_dir"), description="""\
Score preference pairs by CHES and save them: load the pairs, add the CHES columns, entk_w (which the default
selection reads) and the DPO log-probs, and save_to_disk them to --output_dir, which --dataset_name reads back for filter or publish. The pairs are scored
--chunk_size rows at a time and each finished chunk is kept under --output_dir/chunks/<split>: after an
interruption, the same command scores only the missing chunks.

""" + ABOUT)
FILTER = Recipe("filter", (DataArguments, ScoringArguments, SelectionArguments, ResumeArguments, OutputArguments),
                required=("output_dir",), helps={"model_name_or_path": SCORED_MODEL_HELP}, description="""\
Select preference pairs by their scores and write the result to --output_dir: load (and score, with
--model_name_or_path), remove (or flag) the pairs the rule selects, and write the files a publication holds (configs "default" = kept pairs,
"removed" and "scored", the card, the score histogram, ches/run.json). The dry run of publish: nothing leaves the
machine.

""" + SELECTION + "\n\n" + ABOUT)


def _push_or_dry_run(groups: dict[type, Any]) -> None:
    """publish: either a push or a dry run, not both and not neither."""
    if groups[HubArguments].push_to_hub == (groups[OutputArguments].output_dir is not None):
        raise ValueError("pass either --push_to_hub with --repo_id, or --output_dir for a dry run")


PUBLISH = Recipe("publish", (DataArguments, ScoringArguments, SelectionArguments, ResumeArguments, HubArguments,
                             OutputArguments), check=_push_or_dry_run, helps={"model_name_or_path": SCORED_MODEL_HELP},
                 description="""\
Publish preference pairs filtered by CHES: load (and score, with --model_name_or_path), select, and push to
--repo_id with --push_to_hub (configs "default" = kept pairs, "removed" and "scored", the card, the score
histogram, ches/run.json), or write the same files to --output_dir. hub_scripts/ches_filter.py is this command.

""" + SELECTION + "\n\n" + ABOUT)
RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (SCORE, FILTER, PUBLISH)}
ROLES = {DataArguments: "data", ScoringArguments: "scoring", SelectionArguments: "selection", HubArguments: "hub",
         OutputArguments: "output", ResumeArguments: "resume"}  # the keyword of the run functions that takes each group


@dataclass(frozen=True)
class RunResult:
    """What a run produced: the scored splits, the selection per split, and where the files went."""

    scored: DatasetDict
    selections: dict[str, Selection]
    files: list[str]
    pushed: PublishResult | None = None


# The fields of `RunInfo` that `model_provenance` fills, by their name there.
RUN_INFO_MODEL = {"name_or_path": "model", "revision": "model_revision", "commit": "model_commit",
                  "fingerprint": "model_fingerprint", "tokenizer": "tokenizer",
                  "chat_template_sha256": "chat_template_sha256", "dtype": "dtype", "device": "device",
                  "prefix_sharing": "prefix_sharing"}


def load_pairs(data: DataArguments, scoring: ScoringArguments, rule: SelectionRule) -> DatasetDict:
    """The dataset and the model exist (rank 0 asks the Hub, `check_hub_ids`), the pairs loaded, and each split has
    what ``rule`` needs (the score column, unless a model is to add it)."""
    on_main_process(lambda: check_hub_ids(data, [(scoring.model_name_or_path, scoring.model_revision)]))
    dataset = load_source(data)
    for split, rows in dataset.items():
        check_selectable(rows, rule, split, require_score=scoring.model_name_or_path is None)
    return dataset


def scores_for(column: str) -> tuple[str, ...]:
    """The scorer's default scores, and the score that adds ``column`` when they lack it (``entk_w`` for the
    default selection).

    >>> scores_for("entk_w"), scores_for("ln_ches")
    (('ches', 'ln_ches', 'logps', 'entk_w'), ('ches', 'ln_ches', 'logps'))
    """
    from hf_ches.scores import SCORES
    from hf_ches.transform import DEFAULT_SCORES

    return (*DEFAULT_SCORES, *(name for name, score in SCORES.items()
                               if column in score.columns and name not in DEFAULT_SCORES))


def scorer_of(data: DataArguments, scoring: ScoringArguments, rule: SelectionRule) -> Any:
    """The `CHESScorer` of the scoring options, reading the pairs from ``data``'s columns, with the scores that
    ``rule`` selects by (`scores_for`)."""
    from hf_ches.transform import CHESScorer

    return CHESScorer(scoring.model_name_or_path, scores=scores_for(rule.score_column), **scoring.scorer_options(),
                      **data.pair_columns())


def score_if_asked(dataset: DatasetDict, data: DataArguments, scoring: ScoringArguments, resume: ResumeArguments,
                   rule: SelectionRule) -> tuple[DatasetDict, Any]:
    """``dataset`` scored by `scorer_of` in chunks kept in the datasets cache, and the scorer, when a model is given;
    as it is, and None, when not (the data holds the scores)."""
    if not scoring.model_name_or_path:
        return dataset, None
    scorer = scorer_of(data, scoring, rule)
    return score_splits(scorer, dataset, scoring, resume), scorer


def write_dry_run(publication: Any, command: str, data: DataArguments, output: OutputArguments) -> list[str]:
    """Write what a push of ``publication`` would create to ``--output_dir``, as ``command``'s output."""
    files = outputs.write(output.output_dir, command, source_name(data),
                          publication.local_files(), overwrite=output.overwrite)
    logger.info("Dry run: wrote %d files to %s", len(files), output.output_dir)
    return files


def run_info(recipe: Recipe, groups: dict[type, Any], dataset: DatasetDict, scorer: Any,
             rule: SelectionRule | None = None) -> RunInfo:
    """The provenance of a run: its source, its command line, and where the scores came from (``scorer``'s model,
    or with ``scorer`` None the record that came with already-scored data)."""
    data, scoring = groups[DataArguments], groups[ScoringArguments]
    if scorer is None:
        model = inherited_scoring(data)
    else:
        model = {RUN_INFO_MODEL[k]: v for k, v in model_provenance(scorer).items()}
        model |= {"max_length": scoring.max_length, "boundary": scoring.boundary}
    selection = groups.get(SelectionArguments)
    return RunInfo(source_dataset=source_name(data), source_config=data.dataset_config,
                   command=command_line(recipe, list(groups.values())), **source_metadata(data, dataset), **model,
                   **({"rule": rule} if rule else {}),
                   validation=selection.validation() if selection is not None else None)


def select(dataset: DatasetDict, rule: SelectionRule) -> dict[str, Selection]:
    """Select every split by ``rule``, one line each."""
    selections = select_splits(dataset, rule)
    for split, sel in selections.items():
        r = sel.report
        flagged = f", flagged {r.num_flagged}" if rule.flag_only else ""
        logger.info("%s: kept %d of %d pairs%s, removed %d (%d unscorable); rule: %s", split, r.num_kept, r.num_rows,
                    flagged, r.num_removed, r.num_unscorable, rule.describe())
    return selections


def run_score(data: DataArguments, scoring: ScoringArguments, resume: ResumeArguments | None = None,
              output: OutputArguments | None = None) -> RunResult:
    """``hf-ches score``: load, score in chunks kept under ``--output_dir``, save the scored splits there."""
    groups = check_arguments(SCORE, [g for g in (data, scoring, resume, output) if g is not None])
    resume, output, command = groups[ResumeArguments], groups[OutputArguments], "hf-ches score"
    # The output folder before any slow step (the same command's earlier output is resumed)
    outputs.check(output.output_dir, command, overwrite=output.overwrite, resume=True)
    # The dataset and the model exist; load the pairs
    rule = SelectionRule()  # the scores that the default selection needs, so that filter and publish can read them
    dataset = load_pairs(data, scoring, rule)
    # Claim the output folder: the chunks go into it (rank 0 alone writes)
    if is_main_process():
        record = outputs.begin(output.output_dir, command, source_name(data),
                               overwrite=output.overwrite, resume=True)
    # Score, in chunks kept under --output_dir/chunks/<split>; every rank scores its share
    scorer = scorer_of(data, scoring, rule)
    dataset = score_splits(scorer, dataset, scoring, resume, Path(output.output_dir, outputs.CHUNKS_DIR))
    if not is_main_process():
        return RunResult(scored=dataset, selections={}, files=[])
    # Save the scored splits with their provenance, unless the folder holds them already (a finished score)
    if outputs.holds_save(output.output_dir, dataset):
        logger.info("%s holds these scored splits %s already", output.output_dir, list(dataset))
    else:
        outputs.write_scored(dataset, run_info(SCORE, groups, dataset, scorer), output.output_dir)
        logger.info("Saved the scored splits %s to %s", list(dataset), output.output_dir)
    outputs.finish(output.output_dir, record)
    return RunResult(scored=dataset, selections={}, files=[output.output_dir])


def run_filter(data: DataArguments, scoring: ScoringArguments | None = None,
               selection: SelectionArguments | None = None, resume: ResumeArguments | None = None,
               output: OutputArguments | None = None) -> RunResult:
    """``hf-ches filter``: load, score if a model is given, select, write the publication's files to
    ``--output_dir``."""
    groups = check_arguments(FILTER, [g for g in (data, scoring, selection, resume, output) if g is not None])
    scoring, selection, output = groups[ScoringArguments], groups[SelectionArguments], groups[OutputArguments]
    rule, command = selection.rule(), "hf-ches filter"
    # The output folder before any slow step
    outputs.check(output.output_dir, command, overwrite=output.overwrite)
    # The dataset and the model exist; load the pairs
    dataset = load_pairs(data, scoring, rule)
    # Score them, in chunks kept in the datasets cache, when a model is given; every rank scores its share
    dataset, scorer = score_if_asked(dataset, data, scoring, groups[ResumeArguments], rule)
    if not is_main_process():
        return RunResult(scored=dataset, selections={}, files=[])
    # Select
    selections = select(dataset, rule)
    # Write what a push would publish to --output_dir
    publication = build_publication(output.output_dir, run_info(FILTER, groups, dataset, scorer, rule), selections,
                                    examples=selection.card_examples)
    files = write_dry_run(publication, command, data, output)
    return RunResult(scored=dataset, selections=selections, files=files)


def run_publish(data: DataArguments, scoring: ScoringArguments | None = None,
                selection: SelectionArguments | None = None, resume: ResumeArguments | None = None,
                hub: HubArguments | None = None, output: OutputArguments | None = None) -> RunResult:
    """``hf-ches publish``: load, score if a model is given, select, push to ``--repo_id`` (or write the same files
    to ``--output_dir``)."""
    groups = check_arguments(PUBLISH, [g for g in (data, scoring, selection, resume, hub, output) if g is not None])
    scoring, selection, hub = groups[ScoringArguments], groups[SelectionArguments], groups[HubArguments]
    output, rule, command = groups[OutputArguments], selection.rule(), "hf-ches publish"
    # The output folder (a dry run) before any slow step
    if output.output_dir:
        outputs.check(output.output_dir, command, overwrite=output.overwrite)
    # The dataset and the model exist; load the pairs
    dataset = load_pairs(data, scoring, rule)
    # The push target, before the model is loaded
    if repo_id := push_target(data, hub, output.overwrite):
        logger.info("Publishing to %s", repo_id)
        hub = groups[HubArguments] = replace(hub, repo_id=repo_id)
    # Score them, in chunks kept in the datasets cache, when a model is given; every rank scores its share
    dataset, scorer = score_if_asked(dataset, data, scoring, groups[ResumeArguments], rule)
    if not is_main_process():
        return RunResult(scored=dataset, selections={}, files=[])
    # Select
    selections = select(dataset, rule)
    publication = build_publication(hub.repo_id or output.output_dir, run_info(PUBLISH, groups, dataset, scorer, rule),
                                    selections, examples=selection.card_examples)
    # Push, or write the same files to --output_dir
    if not hub.push_to_hub:
        files = write_dry_run(publication, command, data, output)
        return RunResult(scored=dataset, selections=selections, files=files)
    pushed = publish(publication, hub.publish_options(data.token, DEFAULT_COMMIT_MESSAGE, output.overwrite))
    return RunResult(scored=dataset, selections=selections, files=pushed.files, pushed=pushed)


RUNS = {"score": run_score, "filter": run_filter, "publish": run_publish}


def main(argv: list[str] | None = None, stage: Stage = "publish", prog: str | None = None) -> RunResult:
    """Parse ``argv`` (default ``sys.argv[1:]``) into the groups of ``stage`` and run it (`run_score`, `run_filter`,
    `run_publish`); bad input and failed pushes exit with a one-line error."""
    return run_recipe(RECIPES[stage], lambda *groups: RUNS[stage](**{ROLES[type(g)]: g for g in groups}), argv, prog)
