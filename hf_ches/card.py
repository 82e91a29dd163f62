"""The dataset card of a CHES-filtered preference dataset: a pure function of the selection and its provenance,
its prose in the template ``hf_ches/templates/dataset_card.md`` (`TEMPLATE`, rendered by ``DatasetCard.from_template``).
It states the selection score and the evidence behind it (`selection_lines`), with the table of ``hf-ches validate``
when it ran on the same model (``RunInfo.validation``).

A published repo holds three configs (``CONFIGS``): ``default`` = the kept pairs (what ``load_dataset(repo)`` gives,
ready for TRL's ``DPOTrainer``; under a flag-only rule with ``flagged``), ``removed`` = the removed pairs with
``removal_reason``, ``scored`` = every input pair with its scores. A config split with no rows is left out
(``datasets`` cannot load an empty split), and a config with no rows at all is not published. Next to the data:
``PLOT_PATH`` (the score histogram with the cut-off, see `histogram_bytes`) and ``RUN_JSON_PATH`` (`run_record`,
also the card's ``hf_ches`` YAML block).

>>> from datasets import Dataset
>>> from hf_ches.filtering import select_pairs
>>> pairs = Dataset.from_dict({"prompt": ["q1", "q2"], "chosen": ["a", "b"], "rejected": ["c", "d"],
...                            "ln_ches": [0.1, 0.9]})
>>> rule = SelectionRule(score_column="ln_ches", remove_top=0.5)
>>> sel = {"train": select_pairs(pairs, rule)}
>>> card = render_card("me/clean-prefs", RunInfo(source_dataset="org/prefs", source_is_hub=True, rule=rule), sel)
>>> [c["config_name"] for c in card.data.configs], card.data.source_datasets
(['default', 'removed', 'scored'], ['org/prefs'])
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from huggingface_hub import DatasetCard, DatasetCardData

from hf_ches import __version__
from hf_ches.displacement import best_line, render_table
from hf_ches.filtering import FLAG_COLUMN, HIGH_SCORE, REASON_COLUMN, SELECTION_EVIDENCE, Selection, SelectionRule
from hf_ches.pairs import SHIFT_COLUMN, Columns, Row, read_rows

CONFIGS = ("default", "removed", "scored")
PLOT_PATH = "ches/score_histogram.png"
RUN_JSON_PATH = "ches/run.json"
TAGS = ["dpo", "preference", "ches", "likelihood-displacement", "trl", "hf-ches"]
PAPER_URL = "https://arxiv.org/abs/2410.08847"
CITATION = """\
@inproceedings{razin2025unintentional,
  title     = {Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization},
  author    = {Razin, Noam and Malladi, Sadhika and Bhaskar, Adithya and Chen, Danqi and Arora, Sanjeev and
               Hanin, Boris},
  booktitle = {International Conference on Learning Representations},
  year      = {2025},
  eprint    = {2410.08847},
  archivePrefix = {arXiv},
}"""
_SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                    (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]


@dataclass(frozen=True)
class RunInfo:
    """Where the pairs and their scores came from and how they were selected (the card's provenance block).

    Model fields are None when the scores came with the input and it holds no record of them (`scoring_record`).
    ``command`` is the command line that reproduces
    the dataset (it never holds a token).
    """

    source_dataset: str
    source_config: str | None = None
    source_revision: str | None = None  # commit sha of the source dataset when known
    source_license: str | None = None
    source_is_hub: bool = False
    source_data_dir: str | None = None  # load_dataset's data_dir, data_files and the pair's columns, as read
    source_data_files: list[str] | None = None
    source_columns: dict[str, str] | None = None  # {"prompt_column": ..., ...}; None: TRL's names
    model: str | None = None
    model_revision: str | None = None
    model_commit: str | None = None
    model_fingerprint: str | None = None
    tokenizer: str | None = None
    chat_template_sha256: str | None = None
    dtype: str | None = None  # as loaded, e.g. "float32"
    device: str | None = None  # as loaded, e.g. "cpu" or "cuda:0"
    max_length: int | None = None
    boundary: str | None = None  # "trl" or "strict" (hf_ches.pairs.tokenize_pairs)
    prefix_sharing: bool | None = None  # whether each prompt was computed once (hf_ches.forward.encode_shared)
    rule: SelectionRule = field(default_factory=SelectionRule)
    validation: dict | None = None  # validation.json of `hf-ches validate` on the same model, when given
    command: str | None = None
    hf_ches_version: str = __version__


def public_name(name_or_path: str, pretty_name: str | None = None) -> str:
    """How what hf-ches publishes (cards, ``ches/run.json``, reports) names a dataset or a model: ``pretty_name``
    when given; a local file or folder by its own name, never its path (which would publish the user's folders);
    a Hub id, or a built-in name such as ``smollm2``, as it is.

    >>> public_name("/home/me/work/prefs.jsonl"), public_name("org/prefs"), public_name("./data/", "My prefs")
    ('prefs.jsonl', 'org/prefs', 'My prefs')
    """
    if pretty_name:
        return pretty_name
    path = os.path.expanduser(name_or_path)
    local = (os.path.exists(path) or os.path.isabs(path) or name_or_path.startswith(".") or glob.has_magic(path)
             or name_or_path.count("/") > 1)
    return (os.path.basename(os.path.normpath(path)) or name_or_path) if local else name_or_path


def config_data_dir(config: str) -> str:
    """The repo folder of a config's parquet shards, as ``push_to_hub`` names it (``data`` for ``default``)."""
    return "data" if config == "default" else config


def config_part(selection: Selection, config: str) -> Any:
    """The rows of one split that ``config`` publishes: kept (``default``), removed, or scored (all)."""
    return {"default": selection.kept, "removed": selection.removed, "scored": selection.scored}[config]


def config_datasets(selections: dict[str, Selection]) -> dict[str, dict[str, Any]]:
    """``{config: {split: Dataset}}`` of what is published: splits with rows only, configs with any rows only.

    >>> from datasets import Dataset
    >>> from hf_ches.filtering import select_pairs
    >>> sel = {"train": select_pairs(Dataset.from_dict({"entk_w": [0.1, 0.9]}), SelectionRule(threshold=5.0))}
    >>> {config: list(splits) for config, splits in config_datasets(sel).items()}
    {'default': ['train'], 'scored': ['train']}
    """
    out: dict[str, dict[str, Any]] = {}
    for config in CONFIGS:
        splits = {split: config_part(sel, config) for split, sel in selections.items() if len(config_part(sel, config))}
        if splits:
            out[config] = splits
    return out


def configs_metadata(layout: dict[str, list[str]]) -> list[dict]:
    """The ``configs`` YAML list for ``{config: [split, ...]}``, in the exact form ``push_to_hub`` writes."""
    return [{"config_name": config, "data_files": [{"split": split, "path": f"{config_data_dir(config)}/{split}-*"}
                                                   for split in splits]} for config, splits in layout.items()]


def size_category(num_rows: int) -> str:
    """The Hub's ``size_categories`` value for ``num_rows``.

    >>> size_category(999), size_category(1000), size_category(250_000)
    ('n<1K', '1K<n<10K', '100K<n<1M')
    """
    return next((name for limit, name in _SIZE_CATEGORIES if num_rows < limit), "n>1B")


def num_shifted(selection: Selection) -> int | None:
    """Rows of a split whose last prompt tokens moved into the completions (TRL's boundary rule; see
    :func:`hf_ches.pairs.tokenize_pairs`), or None when the data has no ``prompt_tokens_shifted`` column."""
    if SHIFT_COLUMN not in selection.scored.column_names:
        return None
    return int(np.count_nonzero(np.asarray(selection.scored[SHIFT_COLUMN])))


# The `RunInfo` fields of the model that made the scores.
SCORING_FIELDS = ("model", "model_revision", "model_commit", "model_fingerprint", "tokenizer", "chat_template_sha256",
                  "dtype", "device", "max_length", "boundary", "prefix_sharing")


def scoring_record(info: RunInfo) -> dict[str, Any]:
    """Where the pairs and their scores came from, as plain JSON-able data. `hf-ches score` writes it (with the
    command) to ``RUN_JSON_PATH`` beside the scored splits, and `run_record` starts with it; the ``scoring`` block
    holds the `RunInfo` fields of the same names, so a later run on those scores keeps their provenance.

    >>> scoring_record(RunInfo(source_dataset="org/prefs", model="m"))["scoring"]["model"]
    'm'
    """
    return {
        "hf_ches_version": info.hf_ches_version,
        "source": {"dataset": info.source_dataset, "config": info.source_config, "revision": info.source_revision,
                   "data_dir": info.source_data_dir, "data_files": info.source_data_files,
                   "columns": info.source_columns},
        "scoring": {name: getattr(info, name) for name in SCORING_FIELDS},
    }


def run_record(info: RunInfo, selections: dict[str, Selection]) -> dict[str, Any]:
    """The run's parameters and results as plain JSON-able data: ``RUN_JSON_PATH`` and the card's ``hf_ches`` block."""
    rule = info.rule
    return scoring_record(info) | {
        "selection": {"score_column": rule.score_column, "rule": rule.kind, "value": rule.value,
                      "flag_only": rule.flag_only, "group_by": rule.group_by, "description": rule.describe(),
                      "evidence": SELECTION_EVIDENCE, "nan_scores": f"removed with {REASON_COLUMN}=nan_score"},
        "splits": {split: {"num_rows": s.report.num_rows, "num_kept": s.report.num_kept,
                           "num_flagged": s.report.num_flagged,
                           "num_removed": s.report.num_removed, "num_unscorable": s.report.num_unscorable,
                           "num_prompt_shifted": num_shifted(s), "cutoff": s.report.cutoff,
                           "score_summary": s.report.summary}
                   for split, s in selections.items()},
        "command": info.command,
    }


def _histogram_figure(selections: dict[str, Selection], rule: SelectionRule) -> Any:
    """One stacked histogram (kept, removed; under a flag-only rule: not flagged, flagged) per split, the cut-off as
    a dashed line (matplotlib's object API on the Agg canvas, so pyplot and the user's backend are never touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(selections), 3.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(selections), squeeze=False)[0]
    for ax, (split, sel) in zip(axes, selections.items()):
        kept, removed = (np.asarray(part.with_format("numpy")[rule.score_column], dtype=np.float64)
                         for part in (sel.kept, sel.removed))
        removed = removed[~np.isnan(removed)]  # unscorable rows have no place on the axis
        labels = ["kept", "removed"]
        if rule.flag_only:
            flagged = np.asarray(sel.kept[FLAG_COLUMN], dtype=bool)
            kept, removed, labels = kept[~flagged], kept[flagged], ["not flagged", "flagged (kept)"]
        bins = np.histogram_bin_edges(np.concatenate([kept, removed]), bins=40)
        ax.hist([kept, removed], bins=bins, stacked=True, color=["#4c78a8", "#f58518"], label=labels)
        report = sel.report
        if report.cutoff is not None:
            ax.axvline(report.cutoff, color="#d62728", linestyle="--", label=f"cut-off {report.cutoff:.4g}")
        ax.legend(loc="upper left", fontsize=8)
        ax.set_title(f"{split}: kept {report.num_kept} of {report.num_rows}", fontsize=10)
        ax.set_xlabel(rule.score_column)
        ax.set_ylabel("pairs")
    return fig


def histogram_bytes(selections: dict[str, Selection], rule: SelectionRule) -> bytes:
    """The PNG histogram of ``rule.score_column`` per split, with the cut-off line: what is uploaded as ``PLOT_PATH``."""
    buffer = io.BytesIO()
    _histogram_figure(selections, rule).savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _cell(value: Any, limit: int = 160, end: bool = False) -> str:
    """One text or conversation as a short, table-safe markdown cell; a long one keeps its start (its ``end``).

    >>> _cell([{"role": "user", "content": "Hi | there"}, {"role": "assistant", "content": "<b>x</b>"}])
    'user: Hi \\\\| there / assistant: &lt;b&gt;x&lt;/b&gt;'
    >>> _cell("Human: hi Assistant: hello Human: and then?", limit=20, end=True)
    '…lo Human: and then?'
    """
    if isinstance(value, list):
        value = " / ".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in value if isinstance(m, dict))
    text = re.sub(r"\s+", " ", str(value)).strip()
    if len(text) > limit:
        text = "…" + text[-(limit - 1):].lstrip() if end else text[: limit - 1] + "…"
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _split_prompt(row: dict[str, Any], columns: dict[str, str] | None) -> Row:
    """Prompt, chosen and rejected of a row as scored (`hf_ches.pairs.read_rows`): an implicit prompt (as in
    HH-RLHF) is extracted, so the table shows where the answers differ, not their shared dialogue twice; other
    layouts are converted to TRL's."""
    return read_rows({name: [value] for name, value in row.items()}, [row["original_index"]], "flag",
                     Columns.named(columns))[0]


def _top_picked(selections: dict[str, Selection], rule: SelectionRule, k: int) -> list[tuple[float, str, dict]]:
    """The ``k`` highest-scoring rows the rule picked over all splits, highest first: the removed ones (NaN-score
    rows excluded), or under a flag-only rule the flagged ones."""
    found = []
    for split, sel in selections.items():
        rows = sel.kept if rule.flag_only else sel.removed
        scores = np.asarray(rows.with_format("numpy")[rule.score_column], dtype=np.float64)
        picked = np.asarray(rows[FLAG_COLUMN], dtype=bool) if rule.flag_only else (
            np.array(list(rows[REASON_COLUMN])) == HIGH_SCORE)
        scores = np.where(picked, scores, np.nan)
        for i in np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")[:k]:
            if not np.isnan(scores[i]):
                found.append((float(scores[i]), split, rows[int(i)]))
    return sorted(found, key=lambda item: -item[0])[:k]


def selection_lines(info: RunInfo, selections: dict[str, Selection]) -> list[str]:
    """The card's lines on the selection score and the evidence behind it (one sentence and the link), what a
    flag-only rule flagged, and the table of ``hf-ches validate`` when it ran on the same model (``info.validation``).

    >>> print(selection_lines(RunInfo("local/prefs"), {})[0][:31])
    Selection score: `entk_w`. Why:
    """
    rule = info.rule
    lines = [f"Selection score: `{rule.score_column}`. Why: {rule.why()}.", ""]
    if rule.flag_only:
        flagged = sum(sel.report.num_flagged for sel in selections.values())
        lines += [f"{flagged} pairs are flagged (column `{FLAG_COLUMN}`) and kept; none is removed for its score."
                  if flagged else "No pair is predicted to displace (the rule picks none), so none is flagged and "
                  "none is removed for its score.", ""]
    if info.validation is not None:
        v = info.validation
        lines += [f"`hf-ches validate` on the same model (`{public_name(v['model']['name_or_path'])}`), one "
                  f"{v['options']['optimizer']} step per pair at learning rate {v['options']['learning_rate']:g}, on "
                  f"{v['counts']['num_scored']} pairs of `{public_name(v['options']['dataset_name'])}`:", "",
                  render_table(v), "", best_line(v) + ".", ""]
    return lines


def loading_code(repo_id: str, layout: dict[str, list[str]], local: bool = False) -> list[str]:
    """The card's lines that load each config: from the Hub by ``repo_id``; for a dry run (``local``, ``repo_id``
    the folder) by the folder's parquet files, since ``datasets`` caches ``load_dataset(folder, config)`` by the
    folder's name alone and would hand back an earlier folder of the same name. The path is the folder's name,
    relative to where it lies, so the card holds no local path.

    >>> loading_code("me/prefs", {"default": ["train"], "removed": ["train"]})
    ['ds = load_dataset("me/prefs")  # kept pairs: the default config', 'removed = load_dataset("me/prefs", "removed")']
    >>> loading_code("out/pub", {"default": ["train"]}, local=True)[1]
    'ds = load_dataset("parquet", data_files={"train": "pub/data/train-*.parquet"})  # kept pairs: the default config'
    """
    if not local:
        return [f'ds = load_dataset("{repo_id}")  # kept pairs: the default config'] + [
            f'{config} = load_dataset("{repo_id}", "{config}")' for config in layout if config != "default"]
    folder = Path(repo_id).name
    lines = [f"# run where the {folder}/ folder lies; a folder is loaded by its files (a dry run: nothing pushed)"]
    for config, splits in layout.items():
        files = ", ".join(f'"{split}": "{folder}/{config_data_dir(config)}/{split}-*.parquet"' for split in splits)
        name = "ds" if config == "default" else config
        comment = "  # kept pairs: the default config" if config == "default" else ""
        lines.append(f'{name} = load_dataset("parquet", data_files={{{files}}}){comment}')
    return lines


TEMPLATE = Path(__file__).parent / "templates" / "dataset_card.md"  # the card's prose; the tables come from here
CONFIG_CONTENTS = {"default": "kept pairs, with their scores (train on this)",
                   "removed": f"removed pairs, with `{REASON_COLUMN}`", "scored": "every input pair with its scores"}


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _card_fields(repo_id: str, info: RunInfo, selections: dict[str, Selection], layout: dict[str, list[str]],
                 examples: int, local: bool = False) -> dict[str, Any]:
    """What `TEMPLATE` fills in: the source, the rule, and the lines of each table and list."""
    rule, record = info.rule, run_record(info, selections)
    source = f"[{info.source_dataset}](https://huggingface.co/datasets/{info.source_dataset})" if info.source_is_hub \
        else f"`{info.source_dataset}`"
    config_table = ["| config | contents | " + " | ".join(f"{split} rows" for split in selections) + " |",
                    "|---|---|" + "---|" * len(selections)]
    for config in CONFIGS:
        counts = [str(len(config_part(s, config))) for s in selections.values()]
        name = f"`{config}`" if config in layout else f"`{config}` (not published: no rows)"
        config_table.append(f"| {name} | {CONFIG_CONTENTS[config]} | " + " | ".join(counts) + " |")
    selection_rows = [f"| {split} | {r.num_rows} | {r.num_kept} | {r.num_flagged} | {r.num_removed} | "
                      f"{r.num_unscorable} | "
                      f"{_number(r.cutoff)} | {_number(s['mean'])} | {_number(s['p50'])} | {_number(s['p90'])} | "
                      f"{_number(s['max'])} |"
                      for split, sel in selections.items() for r, s in [(sel.report, sel.report.summary)]]
    top = _top_picked(selections, rule, examples)
    picked_table = [f"| {rule.score_column} | split | index | prompt | chosen | rejected |",
                     "|---|---|---|---|---|---|"] + [
        f"| {score:.4g} | {split} | {row['original_index']} | {_cell(pair.prompt, end=True)} | {_cell(pair.chosen)} | "
        f"{_cell(pair.rejected)} |" for score, split, row in top for pair in [_split_prompt(row, info.source_columns)]
    ] if top else [f"No pair was {'flagged' if rule.flag_only else 'removed'} for its score."]
    scoring = record["scoring"]
    model = "scores provided with the input" if info.model is None else (
        f"`{info.model}`" + (f" (revision `{info.model_revision}`)" if info.model_revision else "")
        + (f", commit `{info.model_commit}`" if info.model_commit else ""))
    provenance = [
        f"- source: {source}" + (f", config `{info.source_config}`" if info.source_config else "")
        + (f", revision `{info.source_revision}`" if info.source_revision else ""),
        f"- model: {model}" + (f"; weights fingerprint `{info.model_fingerprint}`" if info.model_fingerprint else ""),
        f"- tokenizer: `{scoring['tokenizer']}`; chat template sha256: `{scoring['chat_template_sha256']}`",
        f"- dtype: `{scoring['dtype']}`; max_length: `{scoring['max_length']}`; prefix sharing: "
        f"`{scoring['prefix_sharing']}`",
        *_shift_lines(record),
        f"- hf-ches {info.hf_ches_version}; all parameters and statistics: [`{RUN_JSON_PATH}`]({RUN_JSON_PATH}) "
        "(also the `hf_ches` block of this card's YAML)",
    ]
    return dict(title=info.source_dataset.rstrip("/").split("/")[-1], source=source, rule=rule.describe(),
                score_column=rule.score_column, reason_column=REASON_COLUMN, paper_url=PAPER_URL, plot_path=PLOT_PATH,
                config_table=config_table, loading_code=loading_code(repo_id, layout, local),
                selection_rows=selection_rows, picked_table=picked_table, provenance=provenance,
                picked="flagged" if rule.flag_only else "removed", flag_column=FLAG_COLUMN,
                selection_lines=selection_lines(info, selections),
                command=info.command or "# (the command was not recorded)", citation=CITATION)


def _shift_lines(record: dict[str, Any]) -> list[str]:
    """The provenance line on rows scored with TRL's boundary rule (none when the data was not scored here)."""
    counts = {split: r["num_prompt_shifted"] for split, r in record["splits"].items()}
    if None in counts.values():
        return []
    per_split = ", ".join(f"{split} {n} of {record['splits'][split]['num_rows']}" for split, n in counts.items())
    return [f"- rows whose tokenized prompt is not a token prefix of prompt + completion: {per_split}; they are scored "
            f"as TRL's `DPOTrainer` trains them, with the last prompt tokens moved into the completions (column "
            f"`{SHIFT_COLUMN}`" + (f"; boundary rule `{rule}`)" if (rule := record["scoring"]["boundary"]) else ")")]


def render_card(repo_id: str, info: RunInfo, selections: dict[str, Selection], dataset_info: list | dict | None = None,
                examples: int = 5, local: bool = False) -> DatasetCard:
    """The dataset card (YAML metadata + markdown body) of a filtered dataset published at ``repo_id`` (``local``:
    written to the folder ``repo_id`` by a dry run, `loading_code`).

    ``dataset_info`` is the block ``push_to_hub`` measured on the Hub (features and byte sizes per config); the
    card keeps it so that pushing the card last does not drop it. ``examples`` highest-scoring removed pairs are shown.
    """
    layout = {config: list(splits) for config, splits in config_datasets(selections).items()}
    num_kept = sum(s.report.num_kept for s in selections.values())
    data = DatasetCardData(
        pretty_name=f"{info.source_dataset.rstrip('/').split('/')[-1]} (CHES-filtered)",
        license=info.source_license,
        tags=TAGS,
        source_datasets=[info.source_dataset] if info.source_is_hub else None,
        size_categories=[size_category(num_kept)],
        configs=configs_metadata(layout),
        dataset_info=dataset_info,
        hf_ches=run_record(info, selections),
    )
    return DatasetCard.from_template(data, template_path=str(TEMPLATE),
                                     **_card_fields(repo_id, info, selections, layout, examples, local))


def card_bytes(card: DatasetCard) -> bytes:
    """The README.md bytes of a card (what is uploaded and what the dry run writes)."""
    return str(card).encode("utf-8")


def run_json_bytes(info: RunInfo, selections: dict[str, Selection]) -> bytes:
    """``RUN_JSON_PATH``'s content."""
    return (json.dumps(run_record(info, selections), indent=2) + "\n").encode("utf-8")

