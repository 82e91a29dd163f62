"""hub_scripts/ches_filter.py and the `hf-ches` CLI (hf_ches/pipeline.py, hf_ches/cli.py), end to end: tiny model,
synthetic pairs, the loopback Hub, TRL's DPOTrainer."""

from __future__ import annotations

import importlib.machinery
import json
import os
import re
import runpy
import socket
import subprocess
import sys
import types
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from huggingface_hub import DatasetCard, HfApi, hf_hub_download

from hf_ches import cli
from hf_ches.card import PLOT_PATH, RUN_JSON_PATH
from hf_ches.filtering import SELECTION_EVIDENCE
from hf_ches.pipeline import PUBLISH
from hf_ches.recipes import DataArguments, HubArguments, SelectionArguments, command_line
from hf_ches.sources import load_source
from hf_ches.testing import synthetic_pairs
from tests.plugins.output import error_line

SCRIPT = Path(__file__).resolve().parents[1] / "hub_scripts" / "ches_filter.py"
SCORE_COLUMNS = {"ches", "ln_ches", "chosen_logps", "rejected_logps", "chosen_num_tokens", "rejected_num_tokens"}


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory) -> str:
    """300 train + 60 test synthetic pairs, saved with save_to_disk (so datasets caches the scoring map)."""
    path = tmp_path_factory.mktemp("source") / "prefs"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(synthetic_pairs(300, seed=0)),
                          "test": datasets.Dataset.from_dict(synthetic_pairs(60, seed=1))}).save_to_disk(path)
    return str(path)


@pytest.fixture(scope="module")
def scored_dir(source_dir, tiny_model, tmp_path_factory) -> str:
    """`hf-ches score`: the same pairs with the CHES columns, saved to disk."""
    path = str(tmp_path_factory.mktemp("scored") / "prefs")
    assert cli.main(["score", "--dataset_name", source_dir, "--model_name_or_path", tiny_model, "--output_dir", path]) == 0
    return path


def run_script(*args: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run hub_scripts/ches_filter.py as `python ches_filter.py ARGS` does, in this process."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    runpy.run_path(str(SCRIPT), run_name="__main__")


def card(repo_id: str) -> tuple[dict, str]:
    _, head, body = open(hf_hub_download(repo_id, "README.md", repo_type="dataset")).read().split("---\n", 2)
    return yaml.safe_load(head), body


def sizes(dataset_dict) -> dict[str, int]:
    return {split: len(ds) for split, ds in dataset_dict.items()}


def test_script_scores_filters_publishes_and_updates(hub_env, tiny_model, source_dir, monkeypatch):
    repo_id = hub_env.repo_id("prefs-ches")
    run_script("--dataset_name", source_dir, "--model_name_or_path", tiny_model, "--score_column", "ln_ches",
               "--remove_top", "0.1", "--push_to_hub", "--repo_id", repo_id, monkeypatch=monkeypatch)

    kept, removed, scored = (datasets.load_dataset(repo_id, *config) for config in ((), ("removed",), ("scored",)))
    assert sizes(scored) == {"train": 300, "test": 60}
    assert sizes(kept) == {"train": 270, "test": 54} and sizes(removed) == {"train": 30, "test": 6}  # top 10% out
    for split in ("train", "test"):
        assert SCORE_COLUMNS <= set(kept[split].column_names) and "original_index" in kept[split].column_names
        indices = sorted([*kept[split]["original_index"], *removed[split]["original_index"]])
        assert indices == list(range(len(scored[split])))
        assert max(kept[split]["ln_ches"]) <= min(removed[split]["ln_ches"])
        assert set(removed[split]["removal_reason"]) == {"high_score"}
        by_index = {row["original_index"]: row for row in kept[split].to_list()}
        for i, row in enumerate(scored[split].to_list()):
            if i in by_index:
                assert {k: by_index[i][k] for k in row} == row  # kept rows are the scored rows, unchanged

    meta, body = card(repo_id)
    assert [c["config_name"] for c in meta["configs"]] == ["default", "removed", "scored"]
    assert {"dpo", "preference", "ches", "trl"} <= set(meta["tags"])
    assert meta["hf_ches"]["scoring"]["model"] == Path(tiny_model).name and meta["hf_ches"]["scoring"]["dtype"] == "float32"
    assert meta["hf_ches"]["command"].startswith("hf-ches publish --dataset_name")
    files = HfApi().list_repo_files(repo_id, repo_type="dataset")
    assert PLOT_PATH in files and RUN_JSON_PATH in files and f"]({PLOT_PATH})" in body

    # again, with the paper's recipe: the repo is updated, the counts in the card change
    run_script("--dataset_name", source_dir, "--model_name_or_path", tiny_model, "--preset", "sorry-bench",
               "--push_to_hub", "--repo_id", repo_id, monkeypatch=monkeypatch)
    meta, body = card(repo_id)
    assert {s: r["num_kept"] for s, r in meta["hf_ches"]["splits"].items()} == {"train": 15, "test": 3}
    assert meta["hf_ches"]["selection"]["description"] == "keep the lowest 5% of pairs by ln_ches"
    assert sizes(datasets.load_dataset(repo_id)) == {"train": 15, "test": 3}
    assert sizes(datasets.load_dataset(repo_id, "removed")) == {"train": 285, "test": 57}
    assert "| train | 300 | 15 | 0 | 285 | 0 |" in body


def test_hub_source_then_dpo_on_the_published_default_config(hub_env, tiny_model, scored_dir):
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    source = hub_env.repo_id("source")  # a scored dataset on the Hub, with a license in its card
    datasets.load_from_disk(scored_dir).push_to_hub(source)
    source_card = DatasetCard.load(source, repo_type="dataset")
    source_card.data.license = "apache-2.0"
    source_card.push_to_hub(source, repo_type="dataset")
    repo_id = hub_env.repo_id("dpo-ready")
    assert cli.main(["publish", "--dataset_name", source, "--push_to_hub", "--repo_id", repo_id]) == 0
    meta, _ = card(repo_id)
    assert meta["source_datasets"] == [source] and meta["license"] == "apache-2.0"
    assert meta["hf_ches"]["source"]["revision"] == HfApi().dataset_info(source).sha
    train = datasets.load_dataset(repo_id, split="train")

    args = DPOConfig(output_dir=str(hub_env.hf_home / "dpo"), max_steps=2, per_device_train_batch_size=2,
                     report_to="none", use_cpu=True, bf16=False, logging_steps=1, save_strategy="no",
                     train_sampling_strategy="sequential")
    trainer = DPOTrainer(model=tiny_model, args=args, train_dataset=train,
                         processing_class=AutoTokenizer.from_pretrained(tiny_model))
    trainer.train()
    first = trainer.state.log_history[0]
    assert trainer.state.global_step == 2 and np.isfinite(first["loss"])
    # step 1 saw rows 0 and 1, before any update: TRL's own log-probs are the published ones
    assert first["logps/chosen"] == pytest.approx(np.mean(train["chosen_logps"][:2]), rel=1e-4)
    assert first["logps/rejected"] == pytest.approx(np.mean(train["rejected_logps"][:2]), rel=1e-4)


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_bad_input_fails_before_any_network_call(hub_env, scored_dir, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    url = closed_port_url()  # every Hub call would fail with a connection error (see the control test below)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", url)
    push = ["--push_to_hub", "--repo_id", f"{hub_env.user}/never"]

    def error_of(*args: str) -> str:
        with pytest.raises(SystemExit) as exit_:
            run_script(*args, monkeypatch=monkeypatch)
        assert exit_.value.code == 1
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert "score column 'helpfulness' not found; columns: ['prompt', 'chosen', 'rejected', 'ches', 'ln_ches'" in \
        error_of("--dataset_name", scored_dir, "--score_column", "helpfulness", *push)
    assert "remove_top: expected a fraction in [0, 1], got 1.5" in error_of("--dataset_name", scored_dir,
                                                                           "--remove_top", "1.5", *push)
    (tmp_path / "empty.jsonl").write_text("")  # (datasets itself cannot save or load a DatasetDict with an empty split)
    assert "split 'train' has no rows (empty file(s)" in error_of("--dataset_name", str(tmp_path / "empty.jsonl"), *push)
    assert "--push_to_hub needs --repo_id" in error_of("--dataset_name", scored_dir, "--push_to_hub")
    assert "--dataset_splits: ['validation'] not in" in error_of("--dataset_name", scored_dir, "--dataset_splits",
                                                                 "validation", *push)
    monkeypatch.delenv("HF_TOKEN")
    assert "--push_to_hub needs a Hub token" in error_of("--dataset_name", scored_dir, *push)


def test_control_a_valid_run_does_reach_for_the_closed_endpoint(hub_env, scored_dir, monkeypatch, capsys):
    import huggingface_hub.constants

    url = closed_port_url()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    with pytest.raises(SystemExit):
        run_script("--dataset_name", scored_dir, "--push_to_hub", "--repo_id", f"{hub_env.user}/never",
                   monkeypatch=monkeypatch)
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"ches_filter.py: error: checking the token: cannot reach the Hub at {url}")
    assert hub_env.token not in message


def test_a_dry_run_folder_is_read_afresh_whatever_its_name(scored_dir, tmp_path):
    """Two dry runs into folders of the same name: --dataset_name reads each one's own rows, not a cached other."""
    for parent, fraction in (("a", "0.5"), ("b", "0.2")):
        (tmp_path / parent).mkdir()
        assert cli.main(["filter", "--dataset_name", scored_dir, "--keep_bottom", fraction,
                         "--output_dir", str(tmp_path / parent / "out")]) == 0
    for parent, kept in (("a", {"train": 150, "test": 30}), ("b", {"train": 60, "test": 12})):
        folder = str(tmp_path / parent / "out")
        assert sizes(load_source(DataArguments(dataset_name=folder, dataset_config="default"))) == kept
        assert sizes(load_source(DataArguments(dataset_name=folder, dataset_config="scored"))) == {"train": 300,
                                                                                                  "test": 60}
    # an hf-ches output holds the kept pairs (default) and every pair (scored): the config must be named
    with pytest.raises(ValueError, match=r"is an hf-ches output: pass --dataset_config scored \(every pair, to "
                                         r"select again\) or default \(the kept pairs\)$"):
        load_source(DataArguments(dataset_name=str(tmp_path / "a" / "out")))


def test_two_folders_of_the_same_name_with_different_columns_load_their_own_rows(tmp_path):
    """Issue 15: after y1/same (standard) was loaded, y2/same (conversational) failed with "Couldn't cast
    list<struct<role,content>> to string": datasets caches a folder with configs by its name alone."""
    standard = synthetic_pairs(6, seed=1)
    conversational = {key: [[{"role": "user" if key == "prompt" else "assistant", "content": text}] for text in texts]
                      for key, texts in synthetic_pairs(4, seed=2).items()}
    for parent, rows in (("y1", standard), ("y2", conversational)):
        folder = tmp_path / parent / "same"
        (folder / "data").mkdir(parents=True)
        datasets.Dataset.from_dict(rows).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
        (folder / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                          "    path: data/train-*\n---\n")
    for parent, rows in (("y1", standard), ("y2", conversational), ("y1", standard)):
        loaded = load_source(DataArguments(dataset_name=str(tmp_path / parent / "same")))
        assert loaded["train"].to_dict() == rows
    with pytest.raises(ValueError, match=r"no config 'scored'; pass --dataset_config with one of \['default'\]$"):
        load_source(DataArguments(dataset_name=str(tmp_path / "y1" / "same"), dataset_config="scored"))


def test_score_then_filter_locally_with_the_cli(scored_dir, tiny_model, tmp_path):
    scored = datasets.load_from_disk(scored_dir)
    assert SCORE_COLUMNS <= set(scored["train"].column_names) and sizes(scored) == {"train": 300, "test": 60}
    out = tmp_path / "filtered"
    assert cli.main(["filter", "--dataset_name", scored_dir, "--keep_bottom", "0.5", "--output_dir", str(out)]) == 0
    assert sizes(datasets.load_dataset(str(out))) == {"train": 150, "test": 30}
    assert sizes(datasets.load_dataset(str(out), "removed")) == {"train": 150, "test": 30}
    run = json.loads((out / RUN_JSON_PATH).read_text())
    # by folder names: no local path in what is published
    assert run["command"] == f"hf-ches filter --dataset_name {Path(scored_dir).name} --keep_bottom 0.5 --output_dir filtered"
    # issue 15: the scores' provenance comes from the scored folder (it used to be `scoring.model: None`)
    assert run["scoring"] == json.loads(Path(scored_dir, RUN_JSON_PATH).read_text())["scoring"]
    assert run["scoring"]["model"] == Path(tiny_model).name and run["scoring"]["dtype"] == "float32"
    # the filtered folder is itself a valid --dataset_name: re-select from its `scored` config
    again = tmp_path / "again"
    assert cli.main(["filter", "--dataset_name", str(out), "--dataset_config", "scored", "--score_column", "ln_ches",
                     "--threshold", "0", "--output_dir", str(again)]) == 0
    kept = sum(int(np.sum(np.array(scored[s]["ln_ches"]) <= 0)) for s in scored)
    assert sum(sizes(datasets.load_dataset(str(again))).values()) == kept


def test_script_help_states_the_default_selection():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert ("Default selection (no --preset/--remove_top/--keep_bottom/--threshold): flag the pairs with entk_w > 0 "
            f"(remove none). Why: {SELECTION_EVIDENCE}.") in text
    for option in ("--dataset_name", "--dataset_config", "--dataset_splits", "--model_name_or_path", "--push_to_hub",
                   "--repo_id", "--dataset_num_proc", "--dtype", "--max_length", "--token_budget", "--batch_size",
                   "--preset", "--remove_top", "--keep_bottom", "--threshold", "--group_by", "--private",
                   "--revision", "--create_pr", "--token", "--commit_message", "--output_dir"):
        assert option in text


def test_cli_dispatch(monkeypatch, capsys):
    assert cli.main(["frobnicate"]) == 2 and "unknown command 'frobnicate'" in capsys.readouterr().err
    assert cli.main([]) == 2
    calls = []
    demo = types.ModuleType("hf_ches.demo")
    demo.__spec__ = importlib.machinery.ModuleSpec("hf_ches.demo", None)
    demo.main = lambda argv: calls.append(argv)
    monkeypatch.setitem(sys.modules, "hf_ches.demo", demo)
    assert cli.main(["demo", "--fast"]) == 0 and calls == [["--fast"]]


def test_load_source_from_data_files(tmp_path):
    rows = synthetic_pairs(12, seed=3)
    for name in ("a.jsonl", "b.jsonl"):
        datasets.Dataset.from_dict(rows).to_json(tmp_path / name)
    one = load_source(DataArguments(dataset_name=str(tmp_path / "a.jsonl")))
    both = load_source(DataArguments(dataset_name=str(tmp_path / "*.jsonl")))
    assert sizes(one) == {"train": 12} and sizes(both) == {"train": 24}
    assert one["train"].to_dict() == rows
    (tmp_path / "c.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unknown data file type '\.txt'"):
        load_source(DataArguments(dataset_name=str(tmp_path / "c.txt")))
    with pytest.raises(ValueError, match="no file matches"):  # a typo is not sent to the Hub as a dataset id
        load_source(DataArguments(dataset_name=str(tmp_path / "typo.jsonl")))


def test_rule_and_command_from_arguments():
    assert SelectionArguments().rule().describe() == "flag the pairs with entk_w > 0 (remove none)"
    assert SelectionArguments(preset="sorry-bench").rule().describe() == "keep the lowest 5% of pairs by ln_ches"
    assert SelectionArguments(threshold=0.2, score_column="ches").rule().describe() == "remove pairs with ches > 0.2"
    with pytest.raises(ValueError, match="--preset sorry-bench already sets the rule; drop --remove_top"):
        SelectionArguments(preset="sorry-bench", remove_top=0.2)
    groups = [DataArguments("my data/x.jsonl", token="hf_secret"), SelectionArguments(remove_top=0.2),
              HubArguments(private=True)]
    assert command_line(PUBLISH, groups) == \
        "hf-ches publish --dataset_name 'my data/x.jsonl' --remove_top 0.2 --private"


def cli_error(capsys, *argv: str) -> str:
    """The one line that `hf-ches ARGV` exits with (status 1), checking that nothing else was printed."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(argv))
    assert exit_.value.code == 1
    return error_line(capsys.readouterr().err)


def test_hub_target_is_checked_before_the_model_is_loaded(hub_env, source_dir, scored_dir, tiny_model, monkeypatch,
                                                          capsys):
    """Issue 15: a repo in someone else's namespace was scored first and only then refused with 403; a bare repo id
    replaced an earlier publication of another source without a word."""
    import hf_ches.pipeline

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the Hub checks")

    monkeypatch.setattr(hf_ches.pipeline, "score_splits", never)
    score = ["--dataset_name", source_dir, "--model_name_or_path", tiny_model]
    assert cli_error(capsys, "publish", *score, "--push_to_hub", "--repo_id", "other-user/prefs-ches") == (
        "hf-ches publish: error: --repo_id other-user/prefs-ches: the token of 'hf-ches-user' can write only to "
        "['hf-ches-user']; use a repo there (e.g. hf-ches-user/prefs-ches) or a token of 'other-user'")

    bare = hub_env.repo_id("bare").split("/")[1]  # a name no other test uses
    assert cli.main(["publish", "--dataset_name", scored_dir, "--push_to_hub", "--repo_id", bare]) == 0
    assert f"Publishing to {hub_env.user}/{bare}" in capsys.readouterr().err
    assert HfApi().dataset_info(f"{hub_env.user}/{bare}").id == f"{hub_env.user}/{bare}"
    other = str(Path(scored_dir).parent / "other")  # another source dataset, into the same repo
    datasets.load_from_disk(scored_dir).save_to_disk(other)
    assert cli_error(capsys, "publish", "--dataset_name", other, "--push_to_hub", "--repo_id", bare) == (
        f"hf-ches publish: error: --repo_id {hub_env.user}/{bare} already holds a publication of 'prefs' "
        f"(ches/run.json), not of 'other'; pass --overwrite to replace it, or choose another --repo_id")  # by name
    assert cli.main(["publish", "--dataset_name", scored_dir, "--push_to_hub", "--repo_id", bare]) == 0  # same source
    assert cli.main(["publish", "--dataset_name", other, "--push_to_hub", "--repo_id", bare, "--overwrite"]) == 0
    record = json.load(open(hf_hub_download(f"{hub_env.user}/{bare}", RUN_JSON_PATH, repo_type="dataset")))
    assert record["source"]["dataset"] == "other"  # the folder's name, never its path


def test_missing_model_is_a_one_line_error(hub_env, source_dir, tmp_path, capsys):
    """Issue 15: a missing model path gave an 83-line traceback ending in "Repo id must be in the form ..."."""
    out = str(tmp_path / "out")
    assert cli_error(capsys, "score", "--dataset_name", source_dir, "--model_name_or_path", "./models/no_such_model",
                     "--output_dir", out) == (
        "hf-ches score: error: model './models/no_such_model': no such file or folder; pass an existing model "
        "folder, a .gguf file, a Hub id (namespace/name) or one of 'smollm2', 'gemma3-270m'")
    assert cli_error(capsys, "score", "--dataset_name", source_dir, "--model_name_or_path", "nobody/no-such-model",
                     "--output_dir", out) == (
        f"hf-ches score: error: model 'nobody/no-such-model': no such local file or folder, and no such model on the Hub at "
        f"{hub_env.endpoint} (or it is private: pass a token that can read it)")


def test_model_commit_of_a_hub_model_is_recorded(hub_env, source_dir, tiny_model, tmp_path):
    """Issue 15: the card's model_commit was always null (transformers 5 has no `config._commit_hash`)."""
    api = HfApi()
    repo_id = hub_env.repo_id("tiny-model")
    api.create_repo(repo_id)
    sha = api.upload_folder(folder_path=tiny_model, repo_id=repo_id).oid
    out = tmp_path / "filtered"
    assert cli.main(["filter", "--dataset_name", source_dir, "--model_name_or_path", repo_id,
                     "--output_dir", str(out)]) == 0
    scoring = json.loads((out / RUN_JSON_PATH).read_text())["scoring"]
    assert scoring["model"] == repo_id and scoring["model_commit"] == sha
    assert f"commit `{sha}`" in (out / "README.md").read_text()


def test_score_refuses_a_non_empty_unrelated_output_dir(source_dir, tiny_model, tmp_path, capsys):
    """Issue 15: `score` wrote into a non-empty, unrelated --output_dir (publish refused it)."""
    (tmp_path / "mine.txt").write_text("keep me")
    assert cli_error(capsys, "score", "--dataset_name", source_dir, "--model_name_or_path", tiny_model,
                     "--output_dir", str(tmp_path)) == (
        f"hf-ches score: error: output_dir {str(tmp_path)!r} is not empty and holds no hf-ches output; "
        "choose a new or empty folder")
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_publish_prints_its_own_lines_once_and_no_library_chatter(hub_env, scored_dir, capfd):
    """Issue 15 / 11: every library warning printed twice, "Setting num_proc from 1 back to 1" once per split and
    config, and a nested upload bar per parquet file."""
    import logging

    # capfd: library handlers bound the stream at import, so only the file descriptor sees all they print

    capfd.readouterr()
    repo_id = hub_env.repo_id("quiet")
    assert cli.main(["publish", "--dataset_name", scored_dir, "--push_to_hub", "--repo_id", repo_id]) == 0
    err = capfd.readouterr().err
    for chatter in ("Setting num_proc", "Uploading the dataset shards", "Creating parquet", "WARNING datasets"):
        assert chatter not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert f"Publishing to {repo_id}" in lines and len(lines) == len(set(lines))
    # hf-ches' warnings are printed once, by its own handler (none on the root, which datasets' records reach too)
    assert not [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]
    logging.getLogger("hf_ches.pipeline").warning("just once")
    logging.getLogger("datasets.arrow_dataset").warning("library chatter")
    err = capfd.readouterr().err
    assert err.count("warning: just once") == 1 and "library chatter" not in err


# The options of each group, written out here (not read from hf_ches.recipes), and the groups of each command.
DATA = {"--dataset_name", "--dataset_config", "--dataset_revision", "--dataset_splits", "--data_dir", "--data_files",
        "--prompt_column", "--chosen_column", "--rejected_column", "--token", "--pretty_name"}
SCORING = {"--model_name_or_path", "--model_revision", "--dtype", "--device", "--max_length", "--boundary",
           "--on_invalid", "--token_budget", "--prefix_sharing", "--no_prefix_sharing", "--batch_size",
           "--dataset_num_proc", "--device_map", "--max_memory", "--offload_folder", "--chat_template"}
SELECTION = {"--preset", "--score_column", "--remove_top", "--keep_bottom", "--threshold", "--group_by",
             "--flag_only", "--card_examples", "--validation_dir"}
HUB = {"--push_to_hub", "--repo_id", "--private", "--revision", "--create_pr", "--commit_message"}
OUTPUT = {"--output_dir", "--overwrite"}
RESUME = {"--chunk_size", "--overwrite_chunks"}
SAMPLING = {"--num_samples", "--seed"}
COMMAND_OPTIONS = {
    "score": DATA | SCORING | RESUME | OUTPUT,
    "filter": DATA | SCORING | SELECTION | RESUME | OUTPUT,
    "publish": DATA | SCORING | SELECTION | RESUME | HUB | OUTPUT,
    "validate": DATA | SCORING | SAMPLING | OUTPUT | {"--beta", "--learning_rate", "--optimizer", "--parameters",
                                                      "--scores", "--n_resamples", "--confidence_level",
                                                      "--progress", "--no_progress"},
    "demo": SCORING | SELECTION | OUTPUT,
}
REPORT_OPTIONS = DATA | SCORING | SAMPLING | RESUME | HUB | OUTPUT | {"--ref_model_name_or_path", "--ref_model_revision",
                                                            "--preference_column", "--beta", "--config_name"}
RAW_RST = re.compile(r"``|:(func|mod|class|meth|attr):`")


def help_options(text: str) -> set[str]:
    """The options a --help lists, by their first (snake_case) spelling at the start of an option line."""
    return {name for name in re.findall(r"^  (--[a-z_]+)", text, re.M) if name != "--help"}


def cli_output(capsys, *argv: str) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of `hf-ches ARGV`, in this process (an exception other than SystemExit, as a
    traceback would show, fails the test)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(argv))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


@pytest.mark.parametrize("command", sorted(COMMAND_OPTIONS))
def test_each_command_helps_with_its_own_options_only(command, capsys):
    code, out, _ = cli_output(capsys, command, "--help")
    assert code == 0 and out.startswith(f"usage: hf-ches {command} ")
    assert help_options(out) == COMMAND_OPTIONS[command]
    description = out.split("\n\n")[1]
    assert len(description) > 200 and not RAW_RST.search(out), description


def test_report_script_helps_with_its_own_options_and_a_description():
    import hf_ches.report

    text = hf_ches.report.REPORT.build_parser("ranking_accuracy_report.py").format_help()
    assert help_options(text) == REPORT_OPTIONS and not RAW_RST.search(text)
    assert "Ranking accuracy of a policy (and its reference) on preference pairs" in text
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "ranking_accuracy_report.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and help_options(done.stdout) == REPORT_OPTIONS, done.stderr


@pytest.mark.parametrize("argv, unknown", [
    (["score", "--dataset_name", "x", "--model_name_or_path", "m", "--output_dir", "o"], ["--push_to_hub"]),
    (["score", "--dataset_name", "x", "--model_name_or_path", "m", "--output_dir", "o"],
     ["--repo_id", "me/x", "--remove_top", "0.2"]),
    (["filter", "--dataset_name", "x", "--output_dir", "o"], ["--push_to_hub"]),
    (["publish", "--dataset_name", "x", "--output_dir", "o"], ["--learning_rate", "1e-5"]),
    (["validate", "--dataset_name", "x", "--output_dir", "o"], ["--remove_top", "0.2"]),
    (["demo"], ["--dataset_name", "x"]),
    (["publish", "--dataset_name", "x", "--output_dir", "o"], ["--frobnicate"]),
])
def test_an_option_of_another_command_is_a_usage_error(argv, unknown, capsys):
    """Issue 16: `score` took --push_to_hub, --repo_id and --remove_top and ignored them; `filter` listed
    --push_to_hub, then refused it."""
    code, out, err = cli_output(capsys, *argv, *unknown)
    assert code == 2 and not out
    assert err.startswith(f"usage: hf-ches {argv[0]} ")
    assert err.rstrip().endswith(f"hf-ches {argv[0]}: error: unrecognized arguments: {' '.join(unknown)}"), err


def test_usage_errors_print_no_traceback():
    """As commands: `hf-ches score --push_to_hub` and the report script with a publish-only option."""
    env = os.environ | {"PYTHONPATH": str(SCRIPT.parents[1])}
    for argv in (["-m", "hf_ches.cli", "score", "--dataset_name", "x", "--model_name_or_path", "m", "--output_dir",
                  "o", "--push_to_hub"],
                 [str(SCRIPT.parent / "ranking_accuracy_report.py"), "--dataset_name", "x", "--model_name_or_path",
                  "m", "--preset", "sorry-bench"]):
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith("usage: ") and "error: unrecognized arguments: --" in done.stderr
