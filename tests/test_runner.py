"""hf_ches.runner: chunked scoring equals one map, resumes only the missing chunks, refuses changed inputs, and
under torchrun shares the chunks among the ranks with the result of one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, DatasetDict, load_from_disk

from hf_ches import CHESScorer, cli, loading, runner, transform
from hf_ches.pairs import PairError
from hf_ches.testing import synthetic_pairs

ROWS, CHUNK = 13, 5  # 5 does not divide 13: the last chunk has 3 rows
ROOT = Path(__file__).resolve().parents[1]
ENV = os.environ | {"PYTHONPATH": str(ROOT), "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


@pytest.fixture()
def dataset() -> Dataset:
    return Dataset.from_dict(synthetic_pairs(ROWS, seed=3))


@pytest.fixture()
def calls(monkeypatch) -> list[list[int]]:
    """The dataset row indices of every map batch the scorer is called on."""
    seen, call = [], transform.CHESScorer.__call__

    def counting(self, batch, *args, **kwargs):
        seen.append([i + kwargs.get("index_offset", 0) for i in args[0]])
        return call(self, batch, *args, **kwargs)

    monkeypatch.setattr(transform.CHESScorer, "__call__", counting)
    return seen


def assert_same(got: Dataset, want: Dataset) -> None:
    assert got.features == want.features and got.column_names == want.column_names
    for column in want.column_names:
        np.testing.assert_array_equal(np.asarray(got[column], dtype=object), np.asarray(want[column], dtype=object))


def test_chunked_equals_one_map(tiny_model, dataset, tmp_path):
    scorer = CHESScorer(tiny_model)
    got = runner.score_in_chunks(scorer, dataset, tmp_path, chunk_size=CHUNK, batch_size=CHUNK)
    assert sorted(p.name for p in tmp_path.glob("chunk-*")) == runner.chunk_names(ROWS, CHUNK)
    assert_same(got, scorer.map(dataset, batch_size=CHUNK))


def test_resume_scores_only_the_missing_chunk(tiny_model, dataset, tmp_path, calls):
    scorer = CHESScorer(tiny_model)
    first = runner.score_in_chunks(scorer, dataset, tmp_path, chunk_size=CHUNK, batch_size=CHUNK)
    names = runner.chunk_names(ROWS, CHUNK)
    kept = {name: os.stat(tmp_path / name).st_mtime_ns for name in (names[0], names[2])}
    (tmp_path / names[1]).unlink()  # an interrupted run: chunk 2 never finished
    calls.clear()
    again = runner.score_in_chunks(scorer, dataset, tmp_path, chunk_size=CHUNK, batch_size=CHUNK)
    assert calls == [list(range(5, 10))]
    assert {name: os.stat(tmp_path / name).st_mtime_ns for name in kept} == kept
    assert_same(again, first)


def test_failed_chunk_resumes(tiny_model, dataset, tmp_path, monkeypatch):
    scorer, write = CHESScorer(tiny_model), runner._write_arrow

    def fail_on_last(scored, tmp):
        if scored.num_rows == ROWS % CHUNK:
            raise KeyboardInterrupt
        write(scored, tmp)

    monkeypatch.setattr(runner, "_write_arrow", fail_on_last)
    with pytest.raises(runner.Interrupted, match="resumes from chunk 3 of 3"):
        runner.score_in_chunks(scorer, dataset, tmp_path, chunk_size=CHUNK)
    assert sorted(p.name for p in tmp_path.iterdir()) == [*runner.chunk_names(ROWS, CHUNK)[:2], runner.MANIFEST]
    monkeypatch.setattr(runner, "_write_arrow", write)
    assert len(runner.score_in_chunks(scorer, dataset, tmp_path, chunk_size=CHUNK)) == ROWS


@pytest.mark.parametrize("change", ["max_length", "chunk_size", "dataset"])
def test_changed_input_is_refused(tiny_model, dataset, tmp_path, calls, change):
    runner.score_in_chunks(CHESScorer(tiny_model), dataset, tmp_path, chunk_size=CHUNK)
    scorer = CHESScorer(tiny_model, max_length=512 if change == "max_length" else None)
    data = dataset.select(range(ROWS - 1)) if change == "dataset" else dataset
    chunk_size = CHUNK + 1 if change == "chunk_size" else CHUNK
    named = {"max_length": "--max_length (None then, 512 now)", "chunk_size": f"--chunk_size ({CHUNK} then, "
             f"{CHUNK + 1} now)", "dataset": "the data (another --dataset_name"}[change]
    calls.clear()
    with pytest.raises(ValueError) as info:
        runner.score_in_chunks(scorer, data, tmp_path, chunk_size=chunk_size)
    assert f"other options: {named}" in str(info.value) and "Rerun with --overwrite_chunks" in str(info.value)
    assert "fingerprint" not in str(info.value) and "overwrite=True" not in str(info.value)
    assert calls == []
    fresh = runner.score_in_chunks(scorer, data, tmp_path, chunk_size=chunk_size, overwrite=True)
    assert len(fresh) == len(data) and len(list(tmp_path.glob("chunk-*"))) == -(-len(data) // chunk_size)
    if change == "max_length":
        assert "truncated" in fresh.column_names


def test_finished_folder_does_not_load_the_model(tiny_model, dataset, tmp_path, monkeypatch):
    scorer = CHESScorer(tiny_model)
    first = runner.score_in_chunks(scorer, dataset, tmp_path, chunk_size=CHUNK)

    def no_load(*args, **kwargs):
        raise AssertionError("a finished folder loaded the model")

    monkeypatch.setattr(loading, "load", no_load)
    assert_same(runner.score_in_chunks(CHESScorer(tiny_model), dataset, tmp_path, chunk_size=CHUNK), first)


def test_error_in_a_later_chunk_names_the_dataset_row(tiny_model, tmp_path):
    rows = synthetic_pairs(ROWS)
    rows["rejected"][7] = None  # chunk 2, its third row
    with pytest.raises(PairError) as info:
        runner.score_in_chunks(CHESScorer(tiny_model), Dataset.from_dict(rows), tmp_path, chunk_size=CHUNK)
    assert (info.value.row, info.value.column) == (7, "rejected")
    assert "row 7, column 'rejected'" in str(info.value)
    assert [p.name for p in tmp_path.glob("chunk-*")] == runner.chunk_names(ROWS, CHUNK)[:1]


def test_cli_score_twice_scores_nothing_the_second_time(tiny_model, tmp_path, calls, capsys, monkeypatch):
    source, out = str(tmp_path / "source"), str(tmp_path / "scored")
    DatasetDict({"train": Dataset.from_dict(synthetic_pairs(ROWS, seed=3)),
                 "test": Dataset.from_dict(synthetic_pairs(4, seed=4))}).save_to_disk(source)
    argv = ["score", "--dataset_name", source, "--model_name_or_path", tiny_model, "--output_dir", out,
            "--chunk_size", str(CHUNK)]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "scored" / "chunks" / "train").glob("chunk-*")) == \
        runner.chunk_names(ROWS, CHUNK)
    first, scored_rows = load_from_disk(out), sum(len(batch) for batch in calls)
    assert scored_rows == ROWS + 4
    saved = {path: path.stat().st_mtime_ns for path in (tmp_path / "scored").rglob("*") if path.is_file()}
    calls.clear()

    def no_load(*args, **kwargs):
        raise AssertionError("a finished output dir loaded the model")

    with monkeypatch.context() as patch:
        patch.setattr(loading, "load", no_load)
        assert cli.main(argv) == 0
    assert calls == [] and "holds these scored splits ['train', 'test'] already" in capsys.readouterr().err
    assert {path: path.stat().st_mtime_ns for path in saved} == saved  # nothing written again
    second = load_from_disk(out)
    for split in ("train", "test"):
        assert_same(second[split], first[split])
    with pytest.raises(SystemExit) as refused:
        cli.main([*argv, "--max_length", "512"])
    assert refused.value.code == 1 and calls == []
    refusal = capsys.readouterr().err.splitlines()[-1]  # one line naming the option that changed, and the flag
    assert refusal.startswith("hf-ches score: error: ") and "other options: --max_length (None then, 512 now). " \
        "Rerun with --overwrite_chunks" in refusal
    assert cli.main([*argv, "--max_length", "512", "--overwrite_chunks"]) == 0
    assert "truncated" in load_from_disk(out)["train"].column_names


def test_shifted_rows_warn_once_per_run(tiny_model, tmp_path, caplog):
    """Rows TRL's boundary rule shifts, in several chunks, give one warning for the run, not one per chunk."""
    rows = synthetic_pairs(6, seed=1)
    for i in (0, 3, 5):  # a prompt that ends inside a word, in chunks 1, 2 and 3
        rows["prompt"][i], rows["chosen"][i] = "the answ", "er is good"
    with caplog.at_level("WARNING", logger="hf_ches.transform"):
        scored = runner.score_in_chunks(CHESScorer(tiny_model), Dataset.from_dict(rows), tmp_path, chunk_size=2)
    assert [scored["prompt_tokens_shifted"][i] > 0 for i in (0, 3, 5)] == [True] * 3
    warnings = [r.getMessage() for r in caplog.records if "prompt tokens move into the completion" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("3 of 6 rows"), warnings


def test_shifted_rows_warning_loads_the_tokenizer_only(tiny_model, tmp_path, monkeypatch, caplog):
    rows = synthetic_pairs(2, seed=1)
    rows["prompt"][1], rows["chosen"][1] = "the answ", "er is good"
    scored = CHESScorer(tiny_model).map(Dataset.from_dict(rows), warn=False)

    def no_load(*args, **kwargs):
        raise AssertionError("the warning loaded the model")

    monkeypatch.setattr(loading, "load", no_load)
    with caplog.at_level("WARNING", logger="hf_ches.transform"):
        CHESScorer(tiny_model).warn_shifted(Dataset.from_dict(rows), scored)
    assert "Row 1: 2 prompt token(s) moved" in caplog.text


def test_shifted_rows_warning_decodes_with_the_loaded_models_tokenizer(tiny_model, monkeypatch, caplog):
    """A process that scored keeps one tokenizer: a large vocabulary's takes hundreds of MB."""
    from hf_ches import models

    monkeypatch.setattr(loading, "_TOKENIZERS", {})
    rows = synthetic_pairs(2, seed=1)
    rows["prompt"][1], rows["chosen"][1] = "the answ", "er is good"
    scorer = CHESScorer(tiny_model)
    scored = scorer.map(Dataset.from_dict(rows), warn=False)

    def no_second_tokenizer(*args, **kwargs):
        raise AssertionError("the warning loaded a second tokenizer")

    monkeypatch.setattr(models, "load_tokenizer", no_second_tokenizer)
    with caplog.at_level("WARNING", logger="hf_ches.transform"):
        scorer.warn_shifted(Dataset.from_dict(rows), scored)
    assert "Row 1: 2 prompt token(s) moved" in caplog.text
    assert loading.tokenizer(scorer.config, scorer.identity) is scorer.load().tokenizer


def test_filter_keeps_its_chunks_in_the_datasets_cache(tiny_model, tmp_path, calls):
    """filter and publish score in chunks too; with no folder of scored rows to keep them in, they go to the
    datasets cache, named by what they are scored from: the same command again scores nothing."""
    from datasets import config

    source = str(tmp_path / "source")
    Dataset.from_dict(synthetic_pairs(ROWS, seed=5)).save_to_disk(source)
    argv = ["filter", "--dataset_name", source, "--model_name_or_path", tiny_model, "--output_dir",
            str(tmp_path / "out"), "--chunk_size", str(CHUNK)]
    assert cli.main(argv) == 0 and sum(len(batch) for batch in calls) == ROWS
    manifests = list(Path(config.HF_DATASETS_CACHE, runner.CACHE_DIR_NAME).glob(f"*/{runner.MANIFEST}"))
    assert any(len(list(m.parent.glob("chunk-*.arrow"))) == 3 for m in manifests), manifests
    first = (tmp_path / "out" / "scored" / "train-00000-of-00001.parquet").read_bytes()
    calls.clear()
    assert cli.main([*argv, "--overwrite"]) == 0 and calls == []
    assert (tmp_path / "out" / "scored" / "train-00000-of-00001.parquet").read_bytes() == first


def test_a_rank_scores_its_share_of_the_missing_chunks(tiny_model, dataset, tmp_path, calls, monkeypatch):
    """Rank 1 of 2, resuming: it takes every second chunk of rank 0's missing list, whichever chunks those are,
    then waits for the others' files; a folder it never sees them in is not shared by every rank."""
    import torch.distributed

    scorer = CHESScorer(tiny_model)
    runner.score_in_chunks(scorer, dataset, tmp_path, chunk_size=CHUNK)
    names = runner.chunk_names(ROWS, CHUNK)
    for name in names[1:]:
        (tmp_path / name).unlink()
    monkeypatch.setattr(runner, "ranks", lambda: (1, 2))
    monkeypatch.setattr(runner, "_from_rank_0", lambda value, world_size: ([1, 2], None))  # rank 0 found: missing
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    monkeypatch.setattr(runner, "VISIBLE_WITHIN_S", 0.0)
    calls.clear()
    with pytest.raises(ValueError, match=f"{names[1]} is missing after every rank scored its chunks: the chunk "
                                         "folder must be one folder that every rank reaches"):
        runner.score_in_chunks(scorer, dataset, tmp_path, chunk_size=CHUNK)
    assert calls == [list(range(10, ROWS))]
    assert sorted(p.name for p in tmp_path.glob("chunk-*")) == [names[0], names[2]]


def test_other_ranks_write_nothing(tiny_model, tmp_path, monkeypatch):
    """Under a launcher only rank 0 writes: filter's files, validate's files."""
    from hf_ches import pipeline, validate
    from hf_ches.recipes import DataArguments, OutputArguments, ScoringArguments

    source = str(tmp_path / "scored")
    Dataset.from_dict(synthetic_pairs(4) | {"entk_w": [0.1, -0.2, 0.3, -0.4]}).save_to_disk(source)
    monkeypatch.setattr(runner, "ranks", lambda: (1, 2))
    monkeypatch.setattr(runner, "_from_rank_0", lambda value, world_size: (None, None))  # rank 0's checks passed
    result = pipeline.run_filter(DataArguments(source), output=OutputArguments(str(tmp_path / "filtered")))
    assert result.files == [] and len(result.scored["train"]) == 4
    assert validate.run(DataArguments(source), ScoringArguments(tiny_model),
                        output=OutputArguments(str(tmp_path / "validated"))) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored"]


def torchrun(*argv: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m hf_ches ARGV`` (gloo on this CPU), its output captured."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "hf_ches", *argv], env=ENV, capture_output=True, text=True, timeout=300)


def assert_same_saves(got: str, want: str) -> None:
    got_splits, want_splits = load_from_disk(got), load_from_disk(want)
    assert list(got_splits) == list(want_splits)
    for split in want_splits:
        assert_same(got_splits[split], want_splits[split])


def test_torchrun_resumes_a_killed_run_and_equals_one_process(tiny_model, tmp_path):
    """One process killed by a real SIGKILL after its first chunks; ``torchrun --nproc_per_node 2`` then scores only
    the missing chunks (of train; all of test, split between the ranks), leaves the others as they were, and saves,
    from rank 0 alone, bit for bit what one uninterrupted process saves. (One test for both: a torchrun start costs
    seconds of imports per rank.)"""
    source, out, rows = str(tmp_path / "source"), str(tmp_path / "out"), 40
    DatasetDict({"train": Dataset.from_dict(synthetic_pairs(rows, seed=6)),
                 "test": Dataset.from_dict(synthetic_pairs(4, seed=4))}).save_to_disk(source)
    argv = ["score", "--dataset_name", source, "--model_name_or_path", tiny_model, "--chunk_size", "2"]
    chunks, names = tmp_path / "out" / "chunks" / "train", runner.chunk_names(rows, 2)
    killed = subprocess.Popen([sys.executable, "-m", "hf_ches", *argv, "--output_dir", out], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(chunks.glob("chunk-*.arrow")):
        assert killed.poll() is None and time.monotonic() < deadline, "the run ended before its first chunk"
        time.sleep(0.005)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    kept = {path.name: path.stat().st_mtime_ns for path in chunks.glob("chunk-*.arrow")}
    assert 0 < len(kept) < len(names), kept
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "hf_ches", *argv, "--output_dir", out], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()  # rank 0 speaks for all: each line once
    assert lines.count(f"Scoring train: {len(kept)} of {len(names)} chunks scored earlier, "
                       f"{len(names) - len(kept)} to score") == 1, lines
    assert lines.count(f"Saved the scored splits ['train', 'test'] to {out}") == 1, lines
    assert {name: (chunks / name).stat().st_mtime_ns for name in kept} == kept
    assert sorted(p.name for p in chunks.iterdir()) == [*names, runner.MANIFEST]  # no half-written file left
    assert cli.main([*argv, "--output_dir", str(tmp_path / "uninterrupted")]) == 0
    got, want = load_from_disk(out), load_from_disk(str(tmp_path / "uninterrupted"))
    assert list(got) == list(want) == ["train", "test"]
    for split in want:
        assert_same(got[split], want[split])


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_of_two_ranks_equal_one_process(tiny_model, tmp_path):
    """Two ``torchrun`` agents, as two nodes would start them (``--nnodes 2 --node_rank 0/1``, a c10d rendezvous,
    gloo), each with two ranks, score into one shared ``--output_dir``: bit for bit what one process saves with
    the same ``--chunk_size``."""
    source, out, rows = str(tmp_path / "source"), str(tmp_path / "out"), 14
    DatasetDict({"train": Dataset.from_dict(synthetic_pairs(rows, seed=8))}).save_to_disk(source)
    argv = ["score", "--dataset_name", source, "--model_name_or_path", tiny_model, "--chunk_size", "2"]
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node",
         "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "two-nodes", "--rdzv_conf",
         f"is_host={node == 0}", "--local_addr", "127.0.0.1", "-m", "hf_ches", *argv, "--output_dir", out],
        env=ENV | {"OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node in (0, 1)]
    finished = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(err[-3000:] for _, err in finished)
    logs = "\n".join(err for _, err in finished)
    assert "Scoring train (4 processes): 100%" in logs, logs[-3000:]  # rank 0's one bar over all four ranks
    assert cli.main([*argv, "--output_dir", str(tmp_path / "one")]) == 0
    assert_same_saves(out, str(tmp_path / "one"))


def test_torchrun_refuses_a_changed_option_and_asks_the_hub_from_rank_0(tiny_model, tmp_path, capfd):
    """A model from the (loopback) Hub, scored by one process; the same command under ``torchrun`` with another
    --max_length is refused on every rank before any chunk is scored, and the Hub's model check before it was made
    once, by rank 0 (the server logs every request)."""
    from huggingface_hub import HfApi

    from hf_ches.testing.local_hub import LocalHub, clients_pointed_at

    source, out = str(tmp_path / "source"), str(tmp_path / "out")
    Dataset.from_dict(synthetic_pairs(6, seed=9)).save_to_disk(source)
    with LocalHub(verbose=True) as hub, clients_pointed_at(hub.endpoint, hub.token, tmp_path / "hf_home"):
        model_id = f"{hub.user}/tiny"
        HfApi().create_repo(model_id)
        HfApi().upload_folder(repo_id=model_id, folder_path=tiny_model)
        argv = ["score", "--dataset_name", source, "--model_name_or_path", model_id, "--output_dir", out,
                "--chunk_size", "2"]
        assert cli.main(argv) == 0
        capfd.readouterr()
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "hf_ches", *argv, "--max_length", "512"], env=os.environ | ENV,
                              capture_output=True, text=True, timeout=300)
        requests = capfd.readouterr().err
    assert done.returncode == 1, done.stderr[-3000:]
    refused = [line for line in done.stderr.splitlines() if line.startswith("hf-ches score: error:")]
    assert len(refused) == 2 and all("holds chunks scored with other options: --max_length (None then, 512 now)"
                                     in line for line in refused), done.stderr  # each rank's error, rank 0's found
    assert requests.count(f"GET /api/models/{model_id}") == 1, requests
    assert sorted(p.name for p in Path(out, "chunks", "train").iterdir()) == [
        *runner.chunk_names(6, 2), runner.MANIFEST]
