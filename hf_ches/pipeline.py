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

import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from huggingface_hub import DatasetCard

from hf_ches.card import RUN_JSON_PATH, SCORING_FIELDS, RunInfo, public_name
from hf_ches.filtering import (
    DEFAULT_REMOVE_TOP,
    DEFAULT_SCORE_COLUMN,
    Selection,
    SelectionRule,
    check_selectable,
    select_splits,
)
from hf_ches import outputs
from hf_ches.hub import (
    DEFAULT_COMMIT_MESSAGE,
    CHUNKS_DIR,
    PublishResult,
    build_publication,
    check_repo,
    check_target,
    holds_save,
    publish,
    write_scored,
)
from hf_ches.models import check_model, loaded_as, model_commit
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

logger = logging.getLogger(__name__)

Stage = Literal["score", "filter", "publish"]
DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}

DESCRIPTION = """\
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


def _is_hub_id(name: str) -> bool:
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return (not os.path.exists(name) and not glob.has_magic(name) and Path(name).suffix not in DATA_FILE_BUILDERS
            and name not in _PACKAGED_DATASETS_MODULES)


def folder_data_files(folder: str, config: str | None) -> dict[str, list[str]] | None:
    """The data files per split of ``config`` (default: the card's default config) of a local dataset folder, as
    its card's YAML ``configs`` declare them; None when it declares none.

    Loading such a folder by its path would be cached by the folder's name and the config alone (datasets 5.2): an
    earlier folder of the same name would come back, or fail to cast. Its files, given as ``data_files``, are
    cached by what they are. An hf-ches output holds the kept pairs in ``default`` and every pair in ``scored``, so
    there the config must be named.
    """
    readme = Path(folder, "README.md")
    configs = (DatasetCard.load(readme).data.to_dict().get("configs") or []) if readme.is_file() else []
    if not configs:
        return None
    names = [c["config_name"] for c in configs]
    if config is None and Path(folder, RUN_JSON_PATH).is_file():
        raise ValueError(f"--dataset_name {folder!r} is an hf-ches output: pass --dataset_config scored (every pair, "
                         "to select again) or default (the kept pairs)")
    default = [c["config_name"] for c in configs if c.get("default") or c["config_name"] == "default"]
    wanted = config or (default[0] if default else None)
    if wanted not in names:
        raise ValueError(f"--dataset_name {folder!r}: " + (f"no config {config!r}" if config else "no default config")
                         + f"; pass --dataset_config with one of {names}")
    (entry,) = [c for c in configs if c["config_name"] == wanted]
    declared = entry.get("data_files") or []
    if not (isinstance(declared, list) and declared and isinstance(declared[0], dict)):
        declared = [{"split": "train", "path": declared}]  # the short forms: one pattern or a list of them
    files = {}
    for item in declared:
        patterns = [item["path"]] if isinstance(item["path"], str) else item["path"]
        files[item["split"]] = sorted(f for p in patterns for f in glob.glob(os.path.join(folder, p)))
    return files


def data_builder(name: str, files: dict[str, list[str]]) -> str:
    """The `datasets` builder of data files, from their suffix (one kind per dataset).

    >>> data_builder("x", {"train": ["x/data/train-00000-of-00001.parquet"]})
    'parquet'
    """
    suffixes = sorted({Path(f).suffix for split_files in files.values() for f in split_files})
    if len(suffixes) != 1 or suffixes[0] not in DATA_FILE_BUILDERS:
        raise ValueError(f"--dataset_name {name!r}: unknown data file type {', '.join(map(repr, suffixes)) or 'none'}; "
                         f"expected files of one type in {sorted(DATA_FILE_BUILDERS)}")
    return DATA_FILE_BUILDERS[suffixes[0]]


def check_hub_ids(data: DataArguments, models: list[tuple[str | None, str | None]]) -> None:
    """Before any work, one Hub request each: the dataset, when it is a Hub id, and each ``(model, revision)`` exist
    (`hf_ches.hub.check_repo`, `hf_ches.models.check_model`); a missing one, or a Hub out of reach, is one line."""
    if _is_hub_id(data.dataset_name):
        check_repo(data.dataset_name, "dataset", data.dataset_revision, data.token)
    for name, revision in models:
        if name:
            check_model(name, revision, data.token)


def load_source(args: DataArguments) -> DatasetDict:
    """The requested splits of ``--dataset_name`` (Hub id, ``save_to_disk`` folder, dataset folder, data files, or
    a packaged builder such as ``json``), with ``--data_dir`` and ``--data_files`` passed to ``load_dataset``."""
    name, within = args.dataset_name, dict(data_dir=args.data_dir, data_files=args.data_files)
    saved = os.path.isdir(name) and (Path(name, "dataset_dict.json").is_file() or Path(name, "state.json").is_file())
    if (saved or os.path.isfile(name)) and any(within.values()):
        raise ValueError(f"--dataset_name {name!r} is {'a saved dataset' if saved else 'a data file'}: --data_dir and "
                         "--data_files choose files within a Hub dataset or a folder (or give --dataset_name json "
                         "--data_files FILE ...)")
    if saved:
        loaded: Any = load_from_disk(name)
    elif any(within.values()):
        loaded = load_dataset(name, args.dataset_config, revision=args.dataset_revision, token=args.token, **within)
    elif os.path.isfile(name) or glob.has_magic(name) or Path(name).suffix in DATA_FILE_BUILDERS:
        files = sorted(glob.glob(name))
        empty = [f for f in files if os.path.getsize(f) == 0]
        if not files or empty:
            raise ValueError(f"--dataset_name {name!r}: " + (f"split 'train' has no rows (empty file(s) {empty})"
                                                             if files else "no file matches"))
        loaded = load_dataset(data_builder(name, {"train": files}), data_files=files)
    elif os.path.isdir(name) and (files := folder_data_files(name, args.dataset_config)) is not None:
        loaded = load_dataset(data_builder(name, files), data_files=files)
    else:
        loaded = load_dataset(name, args.dataset_config, revision=args.dataset_revision, token=args.token)
    dataset = DatasetDict({"train": loaded}) if isinstance(loaded, Dataset) else loaded
    if not isinstance(dataset, DatasetDict):
        raise ValueError(f"--dataset_name {name!r}: expected a map-style dataset, got {type(dataset).__name__}")
    wanted = args.dataset_splits or list(dataset)
    missing = [split for split in wanted if split not in dataset]
    if missing:
        raise ValueError(f"--dataset_splits: {missing} not in {name!r}; available splits: {list(dataset)}")
    logger.info("Read %s: %s", name, ", ".join(f"{split} {len(dataset[split])} pairs" for split in wanted))
    return DatasetDict({split: dataset[split] for split in wanted})


def source_name(args: DataArguments) -> str:
    """The data's name in what is published: ``--pretty_name``, the Hub id, or a local source's file or folder name
    (`hf_ches.card.public_name`); a publication of the same source replaces an earlier one by this name."""
    return public_name(args.dataset_name, args.pretty_name)


def source_metadata(args: DataArguments, dataset: DatasetDict) -> dict[str, Any]:
    """Source fields of `RunInfo`: the data files read (``--data_dir``, ``--data_files``) and the pair's columns when
    not TRL's names; for a Hub dataset the commit sha and the license of the card at that commit; for local data the
    license in its dataset info."""
    read = {"source_data_dir": args.data_dir, "source_data_files": args.data_files,
            "source_columns": args.pair_columns()}
    if not _is_hub_id(args.dataset_name):
        license_ = next((ds.info.license for ds in dataset.values() if ds.info.license), None)
        return read | {"source_is_hub": False, "source_license": license_}
    from huggingface_hub import DatasetCard, HfApi

    api, found = HfApi(token=args.token), read | {"source_is_hub": True}
    try:  # provenance is best effort: the data itself loaded fine
        found["source_revision"] = api.dataset_info(args.dataset_name, revision=args.dataset_revision).sha
        readme = api.hf_hub_download(args.dataset_name, "README.md", repo_type="dataset",
                                     revision=found["source_revision"])
        license_ = DatasetCard.load(readme).data.license
        found["source_license"] = license_ if isinstance(license_, str) else None
    except Exception as error:
        logger.warning("Could not read the %s of %s: %s", "license" if found.get("source_revision") else "commit",
                       args.dataset_name, error)
    return found


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


def inherited_scoring(args: DataArguments) -> dict[str, Any]:
    """The model fields of `RunInfo` recorded with already-scored data (``RUN_JSON_PATH`` of an hf-ches output
    folder or Hub repo), so that filtering again keeps where the scores came from; empty when there is none."""
    name = args.dataset_name
    try:
        if _is_hub_id(name):
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(name, RUN_JSON_PATH, repo_type="dataset", revision=args.dataset_revision,
                                   token=args.token)
        else:
            path = Path(name, RUN_JSON_PATH)
        scoring = json.loads(Path(path).read_text(encoding="utf-8"))["scoring"]
    except Exception:  # no record (most data): the provenance says the scores came with the input
        return {}
    return {key: scoring.get(key) for key in SCORING_FIELDS}


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
        record = outputs.begin(output.output_dir, f"hf-ches {stage}", source_name(data),
                               overwrite=output.overwrite, resume=True)
    if scoring.model_name_or_path:
        from hf_ches.transform import CHESScorer

        scorer = CHESScorer(scoring.model_name_or_path, **scoring.scorer_options(), **data.pair_columns())
        dataset = score_splits(scorer, scoring, dataset, resume,
                               Path(output.output_dir, CHUNKS_DIR) if stage == "score" else None)
    if not is_main_process():  # under a launcher, rank 0 alone writes and pushes
        return RunResult(scored=dataset, selections={}, files=[])
    if selection is None and holds_save(output.output_dir, dataset):  # a finished score: nothing to load or write
        outputs.finish(output.output_dir, record)
        logger.info("%s holds these scored splits %s already", output.output_dir, list(dataset))
        return RunResult(scored=dataset, selections={}, files=[output.output_dir])
    model_fields = scoring_provenance(scorer, scoring) if scoring.model_name_or_path else inherited_scoring(data)
    source = dict(source_dataset=source_name(data), source_config=data.dataset_config,
                  command=command_line(recipe, list(groups.values())), **source_metadata(data, dataset),
                  **model_fields)
    if selection is None:
        write_scored(dataset, RunInfo(**source), output.output_dir)
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
        files = outputs.write(output.output_dir, f"hf-ches {stage}", info.source_dataset,
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
