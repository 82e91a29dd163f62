"""The dataset card (hf_ches/card.py): YAML metadata, configs, provenance, body, histogram."""

from __future__ import annotations

from functools import partial

import io
import json

import numpy as np
import pytest
import yaml
from datasets import Dataset, DatasetDict
from PIL import Image

from hf_ches.card import (
    PLOT_PATH,
    RUN_JSON_PATH,
    RunInfo,
    _histogram_figure,
    config_datasets,
    render_card,
    run_json_bytes,
    histogram_bytes,
    run_record,
)
from hf_ches.filtering import SELECTION_EVIDENCE, SelectionRule, select_splits

ln_rule = partial(SelectionRule, score_column="ln_ches")  # these tests select by the ln_ches column

REPO = "me/prefs-ches"


def split(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset.from_dict({
        "prompt": [f"question {i} " + "long words " * 30 for i in range(n)],
        "chosen": [f"good answer {i} | with a pipe" for i in range(n)],
        "rejected": [f"bad answer {i} <b>" for i in range(n)],
        "ln_ches": rng.normal(size=n).round(3).tolist(),
    })


@pytest.fixture(scope="module")
def selections():
    data = DatasetDict({"train": split(200, 0), "test": split(40, 1)})
    return select_splits(data, ln_rule(remove_top=0.1))


@pytest.fixture(scope="module")
def info():
    return RunInfo(source_dataset="org/prefs", source_config="main", source_revision="a" * 40, source_license="mit",
                   source_is_hub=True, model="org/model", model_revision="v1", model_commit="b" * 40,
                   model_fingerprint="hub:org/model@v1", tokenizer="org/model", chat_template_sha256="c" * 64,
                   dtype="bfloat16", max_length=1024, rule=ln_rule(remove_top=0.1),
                   command="hf-ches publish --dataset_name org/prefs --model_name_or_path org/model --push_to_hub "
                           "--repo_id me/prefs-ches")


def front_matter(card) -> tuple[dict, str]:
    _, head, body = str(card).split("---\n", 2)
    return yaml.safe_load(head), body


def test_yaml_metadata(selections, info):
    meta, _ = front_matter(render_card(REPO, info, selections))
    assert {"dpo", "preference", "ches", "trl"} <= set(meta["tags"])
    assert meta["source_datasets"] == ["org/prefs"] and meta["license"] == "mit"
    assert meta["size_categories"] == ["n<1K"]  # 180 + 36 kept rows
    assert meta["configs"] == [
        {"config_name": config, "data_files": [{"split": s, "path": f"{folder}/{s}-*"} for s in ("train", "test")]}
        for config, folder in (("default", "data"), ("removed", "removed"), ("scored", "scored"))]
    assert "dataset_info" not in meta


def test_provenance_block_matches_the_run_json(selections, info):
    meta, _ = front_matter(render_card(REPO, info, selections))
    record = meta["hf_ches"]
    assert record == json.loads(run_json_bytes(info, selections)) == json.loads(json.dumps(run_record(info, selections)))
    assert record["source"] == {"dataset": "org/prefs", "config": "main", "revision": "a" * 40, "data_dir": None,
                                "data_files": None, "columns": None}
    assert record["scoring"]["model_commit"] == "b" * 40 and record["scoring"]["chat_template_sha256"] == "c" * 64
    assert record["scoring"]["dtype"] == "bfloat16" and record["scoring"]["max_length"] == 1024
    assert record["selection"] == {"score_column": "ln_ches", "rule": "remove_top", "value": 0.1, "flag_only": False,
                                   "group_by": None, "description": "remove the top 10% of pairs by ln_ches",
                                   "evidence": SELECTION_EVIDENCE, "nan_scores": "removed with removal_reason=nan_score"}
    assert {s: (r["num_rows"], r["num_kept"], r["num_removed"]) for s, r in record["splits"].items()} == {
        "train": (200, 180, 20), "test": (40, 36, 4)}
    train = selections["train"]
    assert record["splits"]["train"]["cutoff"] == max(train.kept["ln_ches"]) < min(train.removed["ln_ches"])
    assert record["splits"]["train"]["score_summary"]["count"] == 200
    assert record["hf_ches_version"]


def test_body_explains_loads_shows_and_reproduces(selections, info):
    _, body = front_matter(render_card(REPO, info, selections, examples=3))
    assert "https://arxiv.org/abs/2410.08847" in body and "likelihood displacement" in body
    assert f'load_dataset("{REPO}")' in body and f'load_dataset("{REPO}", "removed")' in body
    assert f'load_dataset("{REPO}", "scored")' in body
    assert f"]({PLOT_PATH})" in body and f"({RUN_JSON_PATH})" in body
    assert info.command in body
    assert "| train | 200 | 180 | 0 | 20 | 0 |" in body and "| test | 40 | 36 | 0 | 4 | 0 |" in body
    # the three highest-scoring removed pairs, truncated and escaped for the table
    rows = [(s, r) for sel in selections.values() for s, r in zip(sel.removed["ln_ches"], sel.removed.to_list())]
    top = sorted(rows, key=lambda item: -item[0])[:3]
    section = body.split("## Highest-scoring removed pairs")[1].split("##")[0]
    table_rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ln_ches")]
    assert len(table_rows) == 3
    for (score, row), line in zip(top, table_rows):
        assert line.startswith(f"| {score:.4g} |") and f"| {row['original_index']} |" in line
        assert "…" in line and "\\| with a pipe" in line and "&lt;b&gt;" in line
    assert f"revision `{'a' * 40}`" in body and f"commit `{'b' * 40}`" in body
    assert "Razin" in body.split("## Citation")[1]


def test_configs_without_rows_are_left_out(info):
    data = DatasetDict({"train": split(10, 0), "test": split(5, 1)})
    keep_all = select_splits(data, ln_rule(threshold=100.0))
    assert list(config_datasets(keep_all)) == ["default", "scored"]
    meta, body = front_matter(render_card(REPO, info, keep_all))
    assert [c["config_name"] for c in meta["configs"]] == ["default", "scored"]
    assert "`removed` (not published: no rows)" in body and "No pair was removed for its score." in body
    assert f'load_dataset("{REPO}", "removed")' not in body
    # a split with no kept rows is left out of the default config only
    one_sided = select_splits(DatasetDict({"train": split(10, 0), "test": split(1, 1)}), ln_rule(remove_top=0.5))
    assert {c: list(s) for c, s in config_datasets(one_sided).items()} == {
        "default": ["train"], "removed": ["train", "test"], "scored": ["train", "test"]}


def test_local_source_has_no_source_datasets_or_license(selections):
    info = RunInfo(source_dataset="/data/prefs.jsonl", rule=ln_rule(remove_top=0.1))
    meta, body = front_matter(render_card(REPO, info, selections))
    assert "source_datasets" not in meta and "license" not in meta
    assert "scores provided with the input" in body and meta["hf_ches"]["scoring"]["model"] is None


def test_dataset_info_is_kept(selections, info):
    dataset_info = [{"config_name": "default", "splits": [{"name": "train", "num_examples": 180}]}]
    meta, _ = front_matter(render_card(REPO, info, selections, dataset_info=dataset_info))
    assert meta["dataset_info"] == dataset_info


def test_histogram_png_with_cutoff_line(selections):
    image = Image.open(io.BytesIO(histogram_bytes(selections, ln_rule(remove_top=0.1))))
    assert image.format == "PNG" and image.size[0] > image.size[1] > 100
    axes = _histogram_figure(selections, ln_rule(remove_top=0.1)).axes
    assert [ax.get_title() for ax in axes] == ["train: kept 180 of 200", "test: kept 36 of 40"]
    assert [ax.lines[0].get_xdata()[0] for ax in axes] == [selections[s].report.cutoff for s in ("train", "test")]
    grouped = select_splits(DatasetDict({"train": split(20, 0)}), ln_rule(remove_top=0.1, group_by="prompt"))
    assert len(_histogram_figure(grouped, ln_rule(remove_top=0.1, group_by="prompt")).axes[0].lines) == 0


def test_card_states_the_selection_score_its_evidence_the_flags_and_the_validation_table(tmp_path):
    """The default flags and removes none; the card names the score, says why (with the link to the study), says
    when nothing is flagged, and carries the Spearman table of ``hf-ches validate`` when given one."""
    from hf_ches.filtering import SELECTION_DOC, SELECTION_EVIDENCE
    from hf_ches.displacement import render_table

    def split(values):
        return Dataset.from_dict({"prompt": [f"q{i}" for i in range(len(values))], "chosen": ["a"] * len(values),
                                  "rejected": ["b"] * len(values), "entk_w": values})

    none = select_splits(DatasetDict({"train": split([-3.0, -1.0, -2.0])}), SelectionRule())
    _, body = front_matter(render_card(REPO, RunInfo("local/prefs"), none))
    assert f"Selection score: `entk_w`. Why: {SELECTION_EVIDENCE}." in body and SELECTION_DOC in body
    assert "No pair is predicted to displace" in body
    some = select_splits(DatasetDict({"train": split([-3.0, 1.0, 2.0])}), SelectionRule())
    validation = {"model": {"name_or_path": "smollm2"}, "counts": {"num_scored": 3}, "share_displaced": 0.0,
                  "options": {"optimizer": "sgd", "learning_rate": 1e-5, "dataset_name": "pairs.jsonl"},
                  "sign_rules": {}, "best": {"score": "entk_w", "by": "rho"},
                  "spearman": {"entk_w": {"rho": 0.5, "ci": [0.1, 0.8]}}}
    _, body = front_matter(render_card(REPO, RunInfo("local/prefs", validation=validation), some))
    assert "2 pairs are flagged (column `flagged`) and kept; none is removed for its score." in body
    assert render_table(validation) in body and "Best predictor of the fall of log π(chosen)" in body
