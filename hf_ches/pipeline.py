"""The score → select → publish recipe behind ``hub_scripts/ches_filter.py`` and ``hf-ches score|filter|publish``.

One `ScriptArguments` dataclass (TRL's argument names) and one `run`; the script and the CLI only parse arguments
into it. Stages:

* ``score``: load the pairs, add the CHES columns, ``save_to_disk`` them to ``--output_dir`` (which
  ``--dataset_name`` reads back);
* ``filter``: load (and score, if ``--model_name_or_path`` is given), select, write the repo's files under
  ``--output_dir`` (the dry run: the same files the push creates);
* ``publish``: the same, then push to ``--repo_id`` with ``--push_to_hub`` (or write ``--output_dir``).

Everything that can be checked without the network (the rule, the repo id, the token's presence, the folders, the
splits and columns once the data is loaded) is checked first; then, still before the model is loaded, the Hub:
who the token belongs to, whether it can write the target's namespace, what the target repo holds
(`hf_ches.hub.check_target`), and whether the model exists (`hf_ches.models.check_model`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shlex
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from huggingface_hub import DatasetCard

from hf_ches.card import RUN_JSON_PATH, SCORING_FIELDS, RunInfo
from hf_ches.filtering import (
    DEFAULT_REMOVE_TOP,
    DEFAULT_SCORE_COLUMN,
    PRESETS,
    Selection,
    SelectionRule,
    check_selectable,
    select_splits,
)
from hf_ches.hub import (
    PublishError,
    PublishOptions,
    PublishResult,
    build_publication,
    check_output_dir,
    check_target,
    publish,
    write_local,
    write_scored,
)
from hf_ches.models import check_model, loaded_as, model_commit

logger = logging.getLogger(__name__)

Stage = Literal["score", "filter", "publish"]
STAGES: tuple[str, ...] = ("score", "filter", "publish")
DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}

DESCRIPTION = f"""\
Score preference pairs (prompt/chosen/rejected, TRL's standard or conversational format) by CHES (Razin et al. 2024,
arXiv 2410.08847), remove the pairs likely to cause likelihood displacement in DPO, and publish the cleaned dataset
with configs `default` (kept pairs), `removed` and `scored`, a dataset card, a score histogram and the run's
parameters. Default selection (no --preset/--remove_top/--keep_bottom/--threshold): remove the top
{DEFAULT_REMOVE_TOP:.0%} of pairs of each split by {DEFAULT_SCORE_COLUMN}. The paper's SORRY-Bench recipe is
--preset sorry-bench (keep the lowest 5%). The token comes from --token, HF_TOKEN or `hf auth login`."""


# Options that every hub script shares, defined once: ``name: type = shared_field("name")``.
SHARED_FIELDS: dict[str, tuple[Any, str]] = {
    "dataset_config": (None, "Dataset configuration name."),
    "dataset_revision": (None, "Branch, tag or commit of a Hub dataset."),
    "dtype": (None, "Model dtype; when not given: float32 on CPU, bfloat16 on CUDA."),
    "max_length": (None, "Truncate prompt+completion to this many tokens (TRL's keep_start); no truncation when "
                         "not given."),
    "token_budget": (None, "Most rows x padded length per forward micro-batch; when not given: 16384 on a GPU, 2048 "
                           "on CPU."),
    "dataset_num_proc": (None, "Processes for scoring (datasets' num_proc; each loads the scoring model(s))."),
    "batch_size": (256, "Rows per datasets.map batch while scoring; the rows of a batch are packed together, so "
                        "larger batches waste less padding."),
    "token": (None, "Hub token; when not given: HF_TOKEN or the saved login."),
    "boundary": ("trl", "Rows whose tokenized prompt is not a token prefix of prompt+completion (a prompt ending "
                        "inside a word, as in HH-RLHF): 'trl' scores them as TRL's DPOTrainer trains them (the last "
                        "prompt tokens move into the completion, counted in prompt_tokens_shifted); 'strict' treats "
                        "them as invalid (see --on_invalid)."),
}


def shared_field(name: str) -> Any:
    """The dataclass ``field`` of a shared option (its default and ``--help`` text)."""
    default, text = SHARED_FIELDS[name]
    choices = {"dtype": ["float32", "bfloat16", "float16"], "boundary": ["trl", "strict"]}
    metadata = {"help": text} | ({"choices": choices[name]} if name in choices else {})
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ScriptArguments:
    """Arguments of the score/filter/publish recipe (TRL's names where TRL has one).

    Args:
        dataset_name (`str`): Hub dataset id, local folder, or data files (``*.jsonl``, ``*.json``, ``*.parquet``,
            ``*.csv``, globs allowed).
        model_name_or_path (`str` or `None`): model whose hidden states score the pairs; omit when the data
            already has the score column.
        push_to_hub (`bool`): push to ``repo_id``; without it nothing leaves the machine.
        output_dir (`str` or `None`): dry run: write the files the push would create into this folder.
    """

    dataset_name: str = field(metadata={"help": "Hub dataset id, local folder, or data files (*.jsonl, *.json, "
                                                "*.parquet, *.csv; globs allowed) of preference pairs."})
    dataset_config: str | None = shared_field("dataset_config")
    dataset_revision: str | None = shared_field("dataset_revision")
    dataset_splits: list[str] | None = field(default=None, metadata={"help": "Splits to process; all when not given."})
    dataset_num_proc: int | None = shared_field("dataset_num_proc")
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Model to score with: Hub id, local folder, .gguf file or 'smollm2'. Omit if the data is scored."})
    model_revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of a Hub model."})
    dtype: str | None = shared_field("dtype")
    max_length: int | None = shared_field("max_length")
    token_budget: int | None = shared_field("token_budget")
    batch_size: int = shared_field("batch_size")
    boundary: str = shared_field("boundary")
    on_invalid: str = field(default="raise", metadata={
        "help": "Rows that cannot be scored (no completion token left, or with --boundary strict a prompt that is "
                "not a token prefix): 'raise' an error, or 'flag' them (unscorable rows get NaN scores and are then "
                "removed with removal_reason=nan_score).", "choices": ["raise", "flag"]})
    preset: str | None = field(default=None, metadata={
        "help": "Named selection rule: 'default' (remove the top 10%% by ln_ches) or 'sorry-bench' (the paper's "
                "Sec. 6 recipe: keep the lowest 5%% by ln_ches).", "choices": sorted(PRESETS)})
    score_column: str = field(default=DEFAULT_SCORE_COLUMN, metadata={"help": "Score to select by (e.g. ln_ches, "
                                                                              "ches)."})
    remove_top: float | None = field(default=None, metadata={
        "help": f"Remove this fraction of pairs with the highest scores, per split. Default rule when no rule is "
                f"given: {DEFAULT_REMOVE_TOP}."})
    keep_bottom: float | None = field(default=None, metadata={"help": "Keep only this fraction of pairs with the "
                                                                      "lowest scores, per split."})
    threshold: float | None = field(default=None, metadata={"help": "Remove pairs whose score is above this value."})
    group_by: str | None = field(default=None, metadata={"help": "Apply --remove_top/--keep_bottom within each value "
                                                                 "of this column (e.g. prompt)."})
    card_examples: int = field(default=5, metadata={"help": "Highest-scoring removed pairs shown in the card."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the result to --repo_id."})
    repo_id: str | None = field(default=None, metadata={"help": "Dataset repo to push to, e.g. user/prefs-ches."})
    private: bool = field(default=False, metadata={"help": "Create the repo private (an existing public repo is "
                                                           "refused)."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to; main when not given."})
    create_pr: bool = field(default=False, metadata={"help": "Open a pull request instead of pushing to the branch."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace what --repo_id holds when it is not an earlier publication of this source dataset "
                "(otherwise refused before any work)."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message of the push."})
    token: str | None = shared_field("token")
    output_dir: str | None = field(default=None, metadata={
        "help": "Dry run: write the files the push would create (README.md, parquet shards, plot, run JSON) here."})


@dataclass(frozen=True)
class RunResult:
    """What a run produced: the scored splits, the selection per split, and where the files went."""

    scored: DatasetDict
    selections: dict[str, Selection]
    files: list[str]
    pushed: PublishResult | None = None


def selection_rule(args: ScriptArguments) -> SelectionRule:
    """The `SelectionRule` the arguments ask for (a preset, an explicit rule, or the default).

    >>> selection_rule(ScriptArguments(dataset_name="x", preset="sorry-bench")).describe()
    'keep the lowest 5% of pairs by ln_ches'
    """
    explicit = {k: getattr(args, k) for k in ("remove_top", "keep_bottom", "threshold") if getattr(args, k) is not None}
    if args.preset is not None:
        if explicit:
            drop = ", ".join(f"--{name}" for name in explicit)
            raise ValueError(f"--preset {args.preset} already sets the rule; drop {drop}")
        return replace(SelectionRule.preset(args.preset), score_column=args.score_column, group_by=args.group_by)
    return SelectionRule(score_column=args.score_column, group_by=args.group_by, **explicit)


def check_arguments(args: ScriptArguments, stage: Stage = "publish") -> SelectionRule:
    """Every offline check of the arguments; returns the selection rule. Raises ``ValueError`` naming the option."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import validate_repo_id

    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {STAGES}, got {stage!r}")
    rule = selection_rule(args)
    if stage == "score" and not (args.model_name_or_path and args.output_dir):
        raise ValueError("score: pass --model_name_or_path and --output_dir")
    if stage == "filter" and (args.output_dir is None or args.push_to_hub):
        raise ValueError("filter writes locally: pass --output_dir (and use `hf-ches publish --push_to_hub` to push)")
    if stage == "publish":
        if args.push_to_hub == (args.output_dir is not None):
            raise ValueError("pass either --push_to_hub with --repo_id, or --output_dir for a dry run")
        if args.push_to_hub:
            if not args.repo_id:
                raise ValueError("--push_to_hub needs --repo_id (e.g. your-name/prefs-ches)")
            try:
                validate_repo_id(args.repo_id)
            except ValueError as err:
                raise ValueError(f"--repo_id {args.repo_id!r}: {err}") from None
            if not (args.token or get_token()):
                raise ValueError("--push_to_hub needs a Hub token: set HF_TOKEN, run `hf auth login`, or pass --token")
    for name in ("batch_size", "token_budget", "card_examples"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "card_examples" else 1):
            raise ValueError(f"--{name}: expected a positive number, got {value}")
    return rule


def _is_hub_id(name: str) -> bool:
    return not os.path.exists(name) and not glob.has_magic(name) and Path(name).suffix not in DATA_FILE_BUILDERS


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


def load_source(args: ScriptArguments) -> DatasetDict:
    """The requested splits of ``--dataset_name`` (Hub id, ``save_to_disk`` folder, dataset folder or data files)."""
    name = args.dataset_name
    if os.path.isdir(name) and (Path(name, "dataset_dict.json").is_file() or Path(name, "state.json").is_file()):
        loaded: Any = load_from_disk(name)
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
    return DatasetDict({split: dataset[split] for split in wanted})


def source_metadata(args: ScriptArguments, dataset: DatasetDict) -> dict[str, Any]:
    """Source fields of `RunInfo`: for a Hub dataset the commit sha and the license of the card at that commit;
    for local data the license in its dataset info."""
    if not _is_hub_id(args.dataset_name):
        license_ = next((ds.info.license for ds in dataset.values() if ds.info.license), None)
        return {"source_is_hub": False, "source_license": license_}
    from huggingface_hub import DatasetCard, HfApi

    api, found = HfApi(token=args.token), {"source_is_hub": True}
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


def score_splits(args: ScriptArguments, dataset: DatasetDict) -> tuple[DatasetDict, dict[str, Any]]:
    """Add the CHES columns to every split; returns the scored splits and the model fields of `RunInfo`."""
    from hf_ches.transform import CHESScorer

    scorer = CHESScorer(args.model_name_or_path, revision=args.model_revision, dtype=args.dtype,
                        max_length=args.max_length, token_budget=args.token_budget, on_invalid=args.on_invalid,
                        boundary=args.boundary)
    model, tokenizer, _ = scorer.load()  # once here: provenance, and the map of the main process reuses it
    workers = args.dataset_num_proc or 1  # with several, each worker loads the model on cuda:rank % n_gpus
    scored = DatasetDict({split: scorer.map(ds, batch_size=args.batch_size, num_proc=args.dataset_num_proc,
                                            with_rank=workers > 1, desc=f"Scoring {split}")
                          for split, ds in dataset.items()})
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return scored, {
        "model": args.model_name_or_path, "model_revision": args.model_revision,
        "model_commit": model_commit(args.model_name_or_path, args.model_revision),
        "model_fingerprint": scorer.identity,
        "tokenizer": tokenizer.name_or_path or args.model_name_or_path,
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
        **loaded_as(model), "max_length": args.max_length, "boundary": args.boundary,
    }


def command_line(args: ScriptArguments, stage: Stage = "publish") -> str:
    """The ``hf-ches`` command that reruns ``args`` (options at their default left out; never the token).

    >>> command_line(ScriptArguments(dataset_name="org/prefs", remove_top=0.2, push_to_hub=True, repo_id="me/x",
    ...                              token="hf_secret"))
    'hf-ches publish --dataset_name org/prefs --remove_top 0.2 --push_to_hub --repo_id me/x'
    """
    parts = ["hf-ches", stage]
    for f in fields(args):
        value = getattr(args, f.name)
        if f.name == "token" or value == f.default:
            continue
        if value is True:
            parts.append(f"--{f.name}")
        else:
            parts += [f"--{f.name}", *(shlex.quote(str(v)) for v in (value if isinstance(value, list) else [value]))]
    return " ".join(parts)


def check_target_repo(args: ScriptArguments) -> ScriptArguments:
    """Before any work: ``--repo_id`` as `hf_ches.hub.check_target` resolves it (a bare name goes to the token's
    user; a namespace the token cannot write, or a repo holding a publication of another source, is refused)."""
    repo_id = check_target(args.repo_id, args.token, (args.dataset_name, args.dataset_config),
                           overwrite=args.overwrite, revision=args.revision)
    logger.info("Publishing to %s", repo_id)
    return replace(args, repo_id=repo_id)


def inherited_scoring(args: ScriptArguments) -> dict[str, Any]:
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


def run(args: ScriptArguments, stage: Stage = "publish") -> RunResult:
    """Load → (score) → select → write locally or push, as ``stage`` and ``args`` say (module docstring)."""
    rule = check_arguments(args, stage)
    if args.output_dir:
        check_output_dir(args.output_dir)  # before the slow steps
    dataset = load_source(args)
    for split, ds in dataset.items():
        check_selectable(ds, rule, split, require_score=args.model_name_or_path is None)
    if args.push_to_hub:  # the Hub checks, after the local ones and before the model is loaded
        args = check_target_repo(args)
    if args.model_name_or_path:
        check_model(args.model_name_or_path, args.model_revision, args.token)
        dataset, model_fields = score_splits(args, dataset)
    else:
        model_fields = inherited_scoring(args)
    source = dict(source_dataset=args.dataset_name, source_config=args.dataset_config,
                  command=command_line(args, stage), **source_metadata(args, dataset), **model_fields)
    if stage == "score":
        write_scored(dataset, RunInfo(**source), args.output_dir)
        logger.info("Saved the scored splits %s to %s", list(dataset), args.output_dir)
        return RunResult(scored=dataset, selections={}, files=[args.output_dir])
    selections = select_splits(dataset, rule)
    for split, sel in selections.items():
        r = sel.report
        logger.info("%s: kept %d of %d pairs, removed %d (%d unscorable); rule: %s", split, r.num_kept, r.num_rows,
                    r.num_removed, r.num_unscorable, rule.describe())
    info = RunInfo(rule=rule, **source)
    publication = build_publication(args.repo_id or args.output_dir, info, selections, examples=args.card_examples)
    if not args.push_to_hub:
        files = write_local(publication, args.output_dir)
        logger.info("Dry run: wrote %d files to %s", len(files), args.output_dir)
        return RunResult(scored=dataset, selections=selections, files=files)
    options = PublishOptions(repo_id=args.repo_id, private=args.private, revision=args.revision,
                             create_pr=args.create_pr, token=args.token, overwrite=args.overwrite,
                             **({"commit_message": args.commit_message} if args.commit_message else {}))
    pushed = publish(publication, options)
    return RunResult(scored=dataset, selections=selections, files=pushed.files, pushed=pushed)


def build_parser(prog: str | None = None):
    """The ``HfArgumentParser`` of `ScriptArguments`, with the description that states the default selection."""
    from transformers import HfArgumentParser

    return HfArgumentParser(ScriptArguments, prog=prog, description=DESCRIPTION)


LIBRARIES = ("datasets", "transformers", "huggingface_hub", "evaluate")


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record comes (pytest's capsys swaps it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def command_logging() -> None:
    """What a command prints besides its progress bars and report: hf-ches' own messages, once each, as ``LEVEL
    name: message`` on stderr, and from the libraries (`LIBRARIES`) only errors. datasets' logger has a handler of
    its own and also passes its records on to the root's, so a root handler (``logging.basicConfig``) printed each
    of its warnings twice; hf-ches adds none there, and its records still reach the root for whoever listens."""
    package = logging.getLogger("hf_ches")
    if not any(isinstance(handler, _Stderr) for handler in package.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
    package.setLevel(logging.INFO)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None, stage: Stage = "publish", prog: str | None = None) -> RunResult:
    """Parse ``argv`` (default ``sys.argv[1:]``) and `run`; bad input and failed pushes exit with a one-line error."""
    parser = build_parser(prog)
    (args,) = parser.parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    command_logging()
    try:
        return run(args, stage)
    except (ValueError, PublishError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
