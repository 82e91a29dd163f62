"""The score → select → publish recipe behind ``hub_scripts/ches_filter.py`` and ``hf-ches score|filter|publish``.

Each stage is a `hf_ches.recipes.Recipe` (`SCORE`, `FILTER`, `PUBLISH`): the argument groups of
`hf_ches.recipes` it needs, as TRL's scripts compose theirs; the script and the CLI only parse them and call `run`.
Stages:

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

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from datasets import DatasetDict

from hf_ches.card import RunInfo, public_name
from hf_ches.filtering import (
    DEFAULT_REMOVE_TOP,
    DEFAULT_SCORE_COLUMN,
    Selection,
    SelectionRule,
    check_selectable,
    select_splits,
)
from hf_ches import outputs
from hf_ches.hub import DEFAULT_COMMIT_MESSAGE, PublishResult, build_publication, check_target, publish
from hf_ches.models import loaded_as, model_commit
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
from hf_ches.runner import is_main_process, on_main_process
from hf_ches.sources import check_hub_ids, inherited_scoring, load_source, source_metadata, source_name

logger = logging.getLogger(__name__)

Stage = Literal["score", "filter", "publish"]

DESCRIPTION = f"""\
Score preference pairs (prompt/chosen/rejected, TRL's standard or conversational format) by CHES (Razin et al. 2024,
arXiv 2410.08847), remove the pairs likely to cause likelihood displacement in DPO, and publish the cleaned dataset
with configs "default" (kept pairs), "removed" and "scored", a dataset card, a score histogram and the run's
parameters."""
SELECTION = f"""\
Default selection (no --preset/--remove_top/--keep_bottom/--threshold): remove the top {DEFAULT_REMOVE_TOP:.0%} of
pairs of each split by {DEFAULT_SCORE_COLUMN}. The paper's SORRY-Bench recipe is --preset sorry-bench (keep the
lowest 5%)."""
ABOUT = """\
CHES (Razin et al. 2024, arXiv 2410.08847) predicts which pairs make DPO lower the probability of the chosen
response (likelihood displacement). Pairs: prompt/chosen/rejected, in TRL's standard or conversational format. The
token comes from --token, HF_TOKEN or "hf auth login"."""
# filter and publish take already-scored data too
SCORED_MODEL_HELP = MODEL_HELP + " Omit it when the data already has the score column."


SCORE = Recipe("score", (DataArguments, ScoringArguments, ResumeArguments, OutputArguments), required=(
    "model_name_or_path", "output_dir"), description="""\
Score preference pairs by CHES and save them: load the pairs, add the CHES columns (and the DPO log-probs) and
save_to_disk them to --output_dir, which --dataset_name reads back for filter or publish. The pairs are scored
--chunk_size rows at a time and each finished chunk is kept under --output_dir/chunks/<split>: after an
interruption, the same command scores only the missing chunks.

""" + ABOUT)
FILTER = Recipe("filter", (DataArguments, ScoringArguments, SelectionArguments, ResumeArguments, OutputArguments),
                required=("output_dir",), helps={"model_name_or_path": SCORED_MODEL_HELP}, description="""\
Select preference pairs by CHES and write the result to --output_dir: load (and score, with --model_name_or_path),
remove the pairs the rule selects, and write the files a publication holds (configs "default" = kept pairs,
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
         OutputArguments: "output", ResumeArguments: "resume"}  # the keyword of `run` that takes each group


@dataclass(frozen=True)
class RunResult:
    """What a run produced: the scored splits, the selection per split, and where the files went."""

    scored: DatasetDict
    selections: dict[str, Selection]
    files: list[str]
    pushed: PublishResult | None = None


def score_splits(scorer: Any, scoring: ScoringArguments, dataset: DatasetDict, resume: ResumeArguments,
                 chunks_dir: str | Path | None = None) -> DatasetDict:
    """Add ``scorer``'s columns to every split, in chunks (`hf_ches.runner`) under ``chunks_dir``/<split>, or in
    the datasets cache when ``chunks_dir`` is None; under a launcher, every rank scores its share."""
    from hf_ches.runner import score_in_chunks

    return DatasetDict({split: score_in_chunks(scorer, ds, Path(chunks_dir, split) if chunks_dir else None,
                                               chunk_size=resume.chunk_size, overwrite=resume.overwrite_chunks,
                                               **scoring.map_options(f"Scoring {split}"))
                        for split, ds in dataset.items()})


def scoring_provenance(scorer: Any, scoring: ScoringArguments) -> dict[str, Any]:
    """The model fields of `RunInfo`: the model's identity and commit, its tokenizer and chat template, the dtype
    and device it was loaded with (rank 0's under a launcher) and whether it shared prefixes (which takes the loaded
    model: loaded once per process, so a process that scored here loads nothing more)."""
    model_id, revision = scoring.model_name_or_path, scoring.model_revision
    loaded = scorer.load()
    template = loaded.tokenizer.chat_template if isinstance(loaded.tokenizer.chat_template, str) else None
    return {
        "model": public_name(model_id), "model_revision": revision, "model_commit": model_commit(model_id, revision),
        "model_fingerprint": scorer.identity,
        "tokenizer": public_name(model_id),  # the model's own, read from its files (a GGUF file holds it too)
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
        **loaded_as(loaded.model), "max_length": scoring.max_length, "boundary": scoring.boundary,
        "prefix_sharing": scorer.shares_prefixes(loaded),
    }


def check_target_repo(data: DataArguments, hub: HubArguments, overwrite: bool) -> HubArguments:
    """Before any work: ``--repo_id`` as `hf_ches.hub.check_target` resolves it (a bare name goes to the token's
    user; a namespace the token cannot write, or a repo holding a publication of another source, is refused
    unless ``overwrite``)."""
    repo_id = check_target(hub.repo_id, data.token, (source_name(data), data.dataset_config),
                           overwrite=overwrite, revision=hub.revision)
    logger.info("Publishing to %s", repo_id)
    return replace(hub, repo_id=repo_id)


def run(data: DataArguments, scoring: ScoringArguments | None = None, selection: SelectionArguments | None = None,
        hub: HubArguments | None = None, output: OutputArguments | None = None,
        resume: ResumeArguments | None = None, *, stage: Stage = "publish") -> RunResult:
    """Load → (score) → select → write locally or push, as ``stage`` and the groups say (module docstring); a
    group of ``stage`` that is not given has its defaults."""
    if stage not in RECIPES:
        raise ValueError(f"stage: expected one of {list(RECIPES)}, got {stage!r}")
    recipe = RECIPES[stage]
    groups = check_arguments(recipe, [g for g in (data, scoring, selection, hub, output, resume) if g is not None])
    scoring, output, resume = groups[ScoringArguments], groups[OutputArguments], groups[ResumeArguments]
    selection, hub = groups.get(SelectionArguments), groups.get(HubArguments, HubArguments())
    rule = selection.rule() if selection else SelectionRule()
    if output.output_dir:  # before slow steps; score resumes its own output
        outputs.check(output.output_dir, f"hf-ches {stage}", overwrite=output.overwrite, resume=stage == "score")
    on_main_process(lambda: check_hub_ids(data, [(scoring.model_name_or_path, scoring.model_revision)]))
    dataset = load_source(data)
    for split, ds in dataset.items():
        check_selectable(ds, rule, split, require_score=scoring.model_name_or_path is None)
    if hub.push_to_hub:  # the push target, after the local checks and before the model is loaded; rank 0 asks
        hub = groups[HubArguments] = on_main_process(lambda: check_target_repo(data, hub, output.overwrite))
    if stage == "score" and is_main_process():  # the chunks go into the output folder: claim it first
        record = outputs.begin(output.output_dir, f"hf-ches {stage}", outputs.source_name(data.dataset_name),
                               overwrite=output.overwrite, resume=True)
    if scoring.model_name_or_path:
        from hf_ches.transform import CHESScorer

        scorer = CHESScorer(scoring.model_name_or_path, **scoring.scorer_options(), **data.pair_columns())
        dataset = score_splits(scorer, scoring, dataset, resume,
                               Path(output.output_dir, outputs.CHUNKS_DIR) if stage == "score" else None)
    if not is_main_process():  # under a launcher, rank 0 alone writes and pushes
        return RunResult(scored=dataset, selections={}, files=[])
    if selection is None and outputs.holds_save(output.output_dir, dataset):  # a finished score: nothing to load or write
        outputs.finish(output.output_dir, record)
        logger.info("%s holds these scored splits %s already", output.output_dir, list(dataset))
        return RunResult(scored=dataset, selections={}, files=[output.output_dir])
    model_fields = scoring_provenance(scorer, scoring) if scoring.model_name_or_path else inherited_scoring(data)
    source = dict(source_dataset=source_name(data), source_config=data.dataset_config,
                  command=command_line(recipe, list(groups.values())), **source_metadata(data, dataset),
                  **model_fields)
    if selection is None:
        outputs.write_scored(dataset, RunInfo(**source), output.output_dir)
        outputs.finish(output.output_dir, record)
        logger.info("Saved the scored splits %s to %s", list(dataset), output.output_dir)
        return RunResult(scored=dataset, selections={}, files=[output.output_dir])
    return select_and_write(dataset, RunInfo(rule=rule, **source), selection, hub, output, data.token, stage)


def select_and_write(dataset: DatasetDict, info: RunInfo, selection: SelectionArguments, hub: HubArguments,
                     output: OutputArguments, token: str | None, stage: Stage) -> RunResult:
    """Select every split by ``info.rule``, then write the publication to ``--output_dir`` (as ``stage``'s
    output) or push it."""
    selections = select_splits(dataset, info.rule)
    for split, sel in selections.items():
        r = sel.report
        logger.info("%s: kept %d of %d pairs, removed %d (%d unscorable); rule: %s", split, r.num_kept, r.num_rows,
                    r.num_removed, r.num_unscorable, info.rule.describe())
    publication = build_publication(hub.repo_id or output.output_dir, info, selections,
                                    examples=selection.card_examples)
    if not hub.push_to_hub:
        files = outputs.write(output.output_dir, f"hf-ches {stage}", outputs.source_name(info.source_dataset),
                              publication.local_files(), overwrite=output.overwrite)
        logger.info("Dry run: wrote %d files to %s", len(files), output.output_dir)
        return RunResult(scored=dataset, selections=selections, files=files)
    pushed = publish(publication, hub.publish_options(token, DEFAULT_COMMIT_MESSAGE, output.overwrite))
    return RunResult(scored=dataset, selections=selections, files=pushed.files, pushed=pushed)


def main(argv: list[str] | None = None, stage: Stage = "publish", prog: str | None = None) -> RunResult:
    """Parse ``argv`` (default ``sys.argv[1:]``) into the groups of ``stage`` and `run`; bad input and failed pushes
    exit with a one-line error."""
    return run_recipe(RECIPES[stage], lambda *groups: run(**{ROLES[type(g)]: g for g in groups}, stage=stage), argv,
                      prog)
