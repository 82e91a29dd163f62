"""What the commands show people and what they publish: no local path in a published file, one line per step and
one progress bar per scoring pass without library chatter, ``-v`` for the details, a ``--help`` per command."""

from __future__ import annotations

import json
import re
import runpy
import sys
from pathlib import Path

import pytest
from datasets import Dataset
from huggingface_hub import HfApi, hf_hub_download

from hf_ches import cli
from hf_ches.testing import synthetic_pairs

ROOT = Path(__file__).resolve().parents[1]
# What third-party libraries print when nobody stops them: progress bars and warnings.
CHATTER = ("Generating train split", "Map:", "Map (num_proc", "Saving the dataset", "Creating parquet",
           "Loading weights", "Flattening the indices", "de-quantizing", "Uploading", "Downloading", "UserWarning",
           "FutureWarning", "DeprecationWarning", "WARNING", "warning:")


def private_paths(*folders: Path) -> list[str]:
    """The absolute paths a published file must not hold: the given folders and the home folder."""
    return [str(folder.resolve()) for folder in folders] + [str(Path.home())]


def leaks(folder: Path, paths: list[str]) -> dict[str, list[str]]:
    """The files under ``folder`` that hold any of ``paths``, with the paths each holds."""
    found = {}
    for file in folder.rglob("*"):
        if file.is_file():
            content = file.read_bytes()
            held = [path for path in paths if path.encode() in content]
            if held:
                found[str(file.relative_to(folder))] = held
    return found


def pushed_files(repo_id: str, into: Path) -> Path:
    """Every file of the dataset repo ``repo_id``, downloaded back into ``into``."""
    for name in HfApi().list_repo_files(repo_id, repo_type="dataset"):
        hf_hub_download(repo_id, name, repo_type="dataset", local_dir=into)
    return into


@pytest.fixture
def private_source(tmp_path_factory) -> Path:
    """Preference pairs in a folder of their own, as a user's local file."""
    folder = tmp_path_factory.mktemp("my-private-project")
    Dataset.from_dict(synthetic_pairs(12, seed=2)).to_json(str(folder / "prefs.jsonl"))
    return folder / "prefs.jsonl"


def test_published_files_name_local_data_and_model_by_their_names(hub_env, private_source, tiny_model, tmp_path,
                                                                  monkeypatch, capsys):
    """A publication and a report pushed from local data with a local model, downloaded back, hold no local path:
    the card, ches/run.json and report.json name the data and the model by file or folder name."""
    private = private_paths(private_source.parent, Path(tiny_model).parent)
    repo_id = hub_env.repo_id("private-paths")
    assert cli.main(["publish", "--dataset_name", str(private_source), "--model_name_or_path", tiny_model,
                     "--push_to_hub", "--repo_id", repo_id]) == 0
    report_repo = hub_env.repo_id("private-paths-report")
    monkeypatch.setattr(sys, "argv", ["ranking_accuracy_report.py", "--dataset_name", str(private_source),
                                      "--model_name_or_path", tiny_model, "--push_to_hub", "--repo_id", report_repo])
    runpy.run_path(str(ROOT / "hub_scripts" / "ranking_accuracy_report.py"), run_name="__main__")
    for repo in (repo_id, report_repo):
        folder = pushed_files(repo, tmp_path / repo.replace("/", "--"))
        assert len(list(folder.rglob("*.parquet"))) >= 1
        assert leaks(folder, private) == {}, repo
    card = (tmp_path / repo_id.replace("/", "--") / "README.md").read_text()
    assert "# prefs.jsonl, filtered by CHES" in card
    assert f"--dataset_name prefs.jsonl --model_name_or_path {Path(tiny_model).name}" in card
    record = json.loads((tmp_path / repo_id.replace("/", "--") / "ches" / "run.json").read_text())
    assert record["source"]["dataset"] == "prefs.jsonl" and record["scoring"]["model"] == Path(tiny_model).name
    capsys.readouterr()

    # the same source under a name the user chose; publishing it again is the same source, not another one
    assert cli.main(["publish", "--dataset_name", str(private_source), "--model_name_or_path", tiny_model,
                     "--push_to_hub", "--repo_id", repo_id, "--pretty_name", "prefs.jsonl"]) == 0
    renamed = hub_env.repo_id("pretty")
    assert cli.main(["publish", "--dataset_name", str(private_source), "--model_name_or_path", tiny_model,
                     "--push_to_hub", "--repo_id", renamed, "--pretty_name", "Team preferences v2"]) == 0
    card = Path(hf_hub_download(renamed, "README.md", repo_type="dataset")).read_text()
    assert "# Team preferences v2, filtered by CHES" in card and "pretty_name: Team preferences v2" in card


def test_dry_run_folder_holds_no_path_of_the_source(private_source, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "dry"
    assert cli.main(["publish", "--dataset_name", str(private_source), "--model_name_or_path", tiny_model,
                     "--output_dir", str(out)]) == 0
    assert leaks(out, private_paths(private_source.parent, Path(tiny_model).parent)) == {}


def demo_lines(tiny_model: str, out: Path, capfd, *options: str) -> tuple[list[str], str]:
    """Run ``hf-ches demo`` on the tiny model; its output as a terminal shows it (a progress bar's last state), and
    everything it wrote to the file descriptors."""
    from hf_ches.demo import main

    capfd.readouterr()
    assert main(["--model_name_or_path", tiny_model, "--output_dir", str(out), *options]) == 0
    captured = capfd.readouterr()
    printed = captured.err + captured.out
    return [line.rsplit("\r", 1)[-1] for line in printed.rstrip("\n").split("\n")], printed


def test_demo_prints_steps_one_bar_per_pass_and_the_report_on_one_screen(tiny_model, tmp_path, capfd):
    """The demo's output fits on one screen: its steps, one progress bar per scoring pass, the report; no library
    warning, progress bar or log line with a cache path or a chunk hash. Its files hold no path of the project."""
    lines, printed = demo_lines(tiny_model, tmp_path / "demo", capfd)
    assert len(lines) < 60, "\n".join(lines)
    assert [chatter for chatter in CHATTER if chatter in printed] == [], printed
    assert not re.search(r"[0-9a-f]{16}", re.sub(r"https?://\S+", "", printed)), printed  # no cache folder hashes
    assert "hf_ches_chunks" not in printed and "INFO" not in printed
    bars = [line for line in lines if "%|" in line]
    assert [bar.split(":")[0] for bar in bars if bar.startswith("Scoring")] == ["Scoring train"] * 2, bars
    assert sum(line.startswith("==> ") for line in lines) == 6
    published = [tmp_path / "demo" / name for name in ("hub", "standard", "conversational", "report.json")]
    for path in published:
        assert path.exists()
        held = leaks(path, private_paths(ROOT, Path(tiny_model).parent)) if path.is_dir() else \
            [p for p in private_paths(ROOT, Path(tiny_model).parent) if p in path.read_text()]
        assert not held, (path, held)


def test_verbose_brings_the_details_back(tiny_model, tmp_path, capfd):
    """``-v``: hf-ches' debug lines (where the chunks are kept) and the libraries' own progress bars."""
    source = tmp_path / "pairs.jsonl"
    Dataset.from_dict(synthetic_pairs(6, seed=1)).to_json(str(source))
    argv = ["score", "--dataset_name", str(source), "--model_name_or_path", tiny_model]
    capfd.readouterr()
    assert cli.main([*argv, "--output_dir", str(tmp_path / "quiet")]) == 0
    quiet = capfd.readouterr().err
    assert cli.main([*argv, "--output_dir", str(tmp_path / "verbose"), "-v"]) == 0
    verbose = capfd.readouterr().err
    assert "chunks of 4096 rows to score" not in quiet and "Saving the dataset" not in quiet
    assert f"DEBUG hf_ches.runner: {tmp_path / 'verbose' / 'chunks' / 'train'}: 1 of 1 chunks" in verbose
    assert "Saving the dataset" in verbose
    assert cli.main([*argv, "--output_dir", str(tmp_path / "quiet")]) == 0  # back to the quiet default
    assert "Saving the dataset" not in capfd.readouterr().err


@pytest.mark.parametrize("command", ["score", "filter", "publish", "validate", "demo"])
def test_each_command_help_describes_that_command(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]  # after the usage: the command's own description first
    opening = {"score": "Score preference pairs", "filter": "Select preference pairs",
               "publish": "Publish preference pairs", "validate": "Does a score predict",
               "demo": "The main job on built-in defaults"}[command]
    assert description.startswith(opening), description
    assert "-v, --verbose" in text
    model_help = " ".join(text.split("--model_name_or_path")[1].split("--model_revision")[0].split())
    if command in ("demo", "validate"):
        assert "filter" not in model_help and "publish" not in model_help, model_help
