"""No command loses or misreports a user's data: output folders (hf_ches.outputs), the dry-run card's loading code,
one-line failures when the Hub is out of reach or an id is wrong, and Ctrl-C during scoring."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
from datasets import Dataset, load_from_disk

from hf_ches import cli, outputs, runner
from hf_ches.report import main as report_main
from hf_ches.filtering import DEFAULT_SCORE_COLUMN
from hf_ches.testing import synthetic_pairs

ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"PYTHONPATH": str(ROOT), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def scored_source(folder: Path, rows: int, seed: int = 0) -> str:
    """Pairs with a column of the default selection's score (filter and publish need no model then), saved to
    ``folder``."""
    pairs = synthetic_pairs(rows, seed=seed)
    Dataset.from_dict(pairs | {DEFAULT_SCORE_COLUMN: [float(i) for i in range(rows)]}).save_to_disk(str(folder))
    return str(folder)


def refused(argv: list[str], capsys) -> str:
    """Run ``hf-ches ARGV``, expect exit status 1, return the one line it printed."""
    capsys.readouterr()  # what earlier commands printed
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and len(err) == 1, err
    return err[0]


def test_demo_refuses_a_folder_with_a_users_file(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    line = refused(["demo", "--output_dir", str(mine)], capsys)
    assert line == f"hf-ches demo: error: output_dir {str(mine.resolve())!r} is not empty and holds no hf-ches " \
                   "output; choose a new or empty folder"
    assert files(mine) == {"thesis.tex": b"years of work"}


def test_score_refuses_a_publish_folder_and_publish_its_own_without_overwrite(tiny_model, tmp_path, capsys):
    source, pub = scored_source(tmp_path / "source", 20), tmp_path / "pub"
    assert cli.main(["publish", "--dataset_name", source, "--output_dir", str(pub)]) == 0
    before = files(pub)
    line = refused(["score", "--dataset_name", source, "--model_name_or_path", tiny_model, "--output_dir", str(pub)],
                   capsys)
    assert line == f"hf-ches score: error: output_dir {str(pub)!r} holds the output of `hf-ches publish` (from " \
                   "source); choose another folder"
    line = refused(["filter", "--dataset_name", source, "--output_dir", str(pub)], capsys)
    assert "holds the output of `hf-ches publish`" in line
    line = refused(["publish", "--dataset_name", source, "--output_dir", str(pub), "--remove_top", "0.5"], capsys)
    assert line.endswith("holds an earlier `hf-ches publish` output (from source); pass --overwrite to replace it, "
                         "or choose another folder")
    assert files(pub) == before

    (pub / "notes.md").write_text("my notes")  # a file the user adds to the output is never deleted
    assert cli.main(["publish", "--dataset_name", source, "--output_dir", str(pub), "--remove_top", "0.5",
                     "--overwrite"]) == 0
    after = files(pub)
    assert after["notes.md"] == b"my notes" and after["README.md"] != before["README.md"]
    assert "notes.md" not in outputs.read(pub).files


def test_validate_refuses_its_earlier_results_without_overwrite(tiny_model, tmp_path, capsys):
    source, out = scored_source(tmp_path / "source", 6), tmp_path / "validated"
    argv = ["validate", "--dataset_name", source, "--model_name_or_path", tiny_model, "--output_dir", str(out),
            "--num_samples", "4"]
    cli.main(argv)
    first = files(out)
    assert {"pairs.parquet", "validation.json", "scatter.png"} <= set(first)
    line = refused([*argv, "--seed", "1"], capsys)
    assert line.endswith("holds an earlier `hf-ches validate` output (from source); pass --overwrite to replace it, "
                         "or choose another folder")
    assert files(out) == first
    cli.main([*argv, "--seed", "1", "--overwrite"])
    assert files(out)["validation.json"] != first["validation.json"]


def test_an_interrupted_attempt_is_taken_up_without_overwrite(tmp_path):
    folder = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with outputs.claim(folder, "hf-ches filter", "org/prefs"):
            (folder / "half.parquet").write_bytes(b"half")
            raise RuntimeError("killed")
    assert outputs.read(folder).finished is False
    assert outputs.write(folder, "hf-ches filter", "org/prefs", {"whole.parquet": b"whole"}) == ["whole.parquet"]
    assert sorted(files(folder)) == [outputs.MARKER, "whole.parquet"]  # the half-written file went with its attempt


def card_loading_code(folder: Path) -> str:
    """The Python block of the dry run's card."""
    return re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)


def test_same_named_dry_runs_load_their_own_rows_by_the_cards_code(tmp_path, monkeypatch):
    """datasets caches ``load_dataset(folder, config)`` by the folder's name: the card's code must not."""
    loaded = {}
    for name, rows in (("a", 10), ("b", 30)):
        source = scored_source(tmp_path / f"source-{name}", rows, seed=rows)
        (tmp_path / name).mkdir()
        out = tmp_path / name / "pub-std"
        assert cli.main(["filter", "--dataset_name", source, "--remove_top", "0.1", "--output_dir", str(out)]) == 0
        code = card_loading_code(out)
        assert str(tmp_path) not in code
        monkeypatch.chdir(tmp_path / name)  # the card says: run where the folder lies
        namespace: dict = {}
        exec(code, namespace)
        loaded[name] = {config: len(namespace[var]["train"]) for config, var in
                        (("default", "ds"), ("removed", "removed"), ("scored", "scored"))}
    assert loaded == {"a": {"default": 9, "removed": 1, "scored": 10}, "b": {"default": 27, "removed": 3, "scored": 30}}


@pytest.fixture()
def closed_hub(monkeypatch) -> str:
    """The Hub client pointed at a loopback port where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return url


@pytest.mark.parametrize("command", ["score", "filter", "validate", "report"])
def test_an_unreachable_hub_is_one_line_at_once(command, closed_hub, tiny_model, tmp_path, capsys):
    source = scored_source(tmp_path / "source", 4)
    capsys.readouterr()
    cases = [(["--dataset_name", "org/prefs", "--model_name_or_path", tiny_model], "dataset 'org/prefs'"),
             (["--dataset_name", source, "--model_name_or_path", "org/model"], "model 'org/model'")]
    for options, what in cases:
        start = time.monotonic()
        options += ["--output_dir", str(tmp_path / "out")]
        with pytest.raises(SystemExit) as exit_info:
            report_main(options, prog="report") if command == "report" else cli.main([command, *options])
        seconds = time.monotonic() - start
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 1 and seconds < 5, (exit_info.value.code, seconds)
        assert err == [f"{'report' if command == 'report' else 'hf-ches ' + command}: error: {what}: cannot reach the "
                       f"Hub at {closed_hub} (ConnectError); to work offline from the local cache, set "
                       "HF_HUB_OFFLINE=1"], err
    assert not (tmp_path / "out").exists()


def test_ctrl_c_is_one_line_and_the_rerun_resumes(tiny_model, tmp_path):
    source, out, rows = str(tmp_path / "source"), tmp_path / "out", 60
    Dataset.from_dict(synthetic_pairs(rows, seed=6)).save_to_disk(source)
    argv = [sys.executable, "-m", "hf_ches", "score", "--dataset_name", source, "--model_name_or_path", tiny_model,
            "--chunk_size", "2", "--output_dir", str(out)]
    chunks, names = out / "chunks" / "train", runner.chunk_names(rows, 2)
    run = subprocess.Popen(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(chunks.glob("chunk-*.arrow")):
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before its first chunk"
        time.sleep(0.005)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    kept = sorted(p.name for p in chunks.glob("chunk-*.arrow"))
    assert run.returncode == 130 and 0 < len(kept) < len(names), (run.returncode, err[-2000:])
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == \
        f"hf-ches score: interrupted; the same command resumes from chunk {len(kept) + 1} of {len(names)}"
    assert sorted(p.name for p in chunks.iterdir()) == [*kept, runner.MANIFEST]  # no half-written chunk
    done = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"Scoring train: {len(kept)} of {len(names)} chunks scored earlier, {len(names) - len(kept)} to score" \
        in done.stderr, done.stderr[-2000:]
    assert len(load_from_disk(str(out))["train"]) == rows and outputs.read(out).finished
