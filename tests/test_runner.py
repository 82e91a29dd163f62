"""hf_ches.runner: chunked scoring equals one map, resumes only the missing chunks, refuses changed inputs."""

from __future__ import annotations

import os

import numpy as np
import pytest
from datasets import Dataset

from hf_ches import CHESScorer, loading, runner, transform
from hf_ches.pairs import PairError
from hf_ches.testing import synthetic_pairs

ROWS, CHUNK = 13, 5  # 5 does not divide 13: the last chunk has 3 rows


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
    with pytest.raises(KeyboardInterrupt):
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
    word = {"max_length": "scorer_fingerprint", "chunk_size": "chunk_size", "dataset": "dataset_fingerprint"}[change]
    calls.clear()
    with pytest.raises(ValueError, match=f"another {word}.*overwrite=True \\(--overwrite\\)"):
        runner.score_in_chunks(scorer, data, tmp_path, chunk_size=chunk_size)
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


def test_cli_score_twice_scores_nothing_the_second_time(tiny_model, tmp_path, calls, capsys):
    from datasets import DatasetDict, load_from_disk

    from hf_ches import cli

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
    calls.clear()
    assert cli.main(argv) == 0
    assert calls == []
    second = load_from_disk(out)
    for split in ("train", "test"):
        assert_same(second[split], first[split])
    with pytest.raises(SystemExit) as refused:
        cli.main([*argv, "--max_length", "512"])
    assert refused.value.code == 1 and calls == []
    assert "another scorer_fingerprint" in capsys.readouterr().err
    assert cli.main([*argv, "--max_length", "512", "--overwrite"]) == 0
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
