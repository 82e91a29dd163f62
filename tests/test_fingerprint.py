"""Stable datasets fingerprints, cache reuse across runs (whatever the run options), and identical scores with
num_proc=2 / with_rank=True."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from datasets import Dataset, load_from_disk
from datasets.fingerprint import Hasher
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_ches import CHESScorer, loading
from hf_ches.testing import synthetic_pairs

HASH_SNIPPET = """
import sys
from datasets import load_from_disk
from datasets.fingerprint import Hasher
from hf_ches import CHESScorer
scorer = CHESScorer(sys.argv[1], token_budget=512, max_length=300)
ds = load_from_disk(sys.argv[2])
print(Hasher.hash(scorer), ds.map(scorer, batched=True, with_indices=True, load_from_cache_file=False)._fingerprint)
"""


def test_same_fingerprint_in_separate_processes(tiny_model, tmp_path):
    Dataset.from_dict(synthetic_pairs(4)).save_to_disk(tmp_path / "ds")
    outputs = set()
    for seed in ("1", "2"):  # different hash seeds: nothing may depend on Python's str hashing
        env = {"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin", "HF_DATASETS_CACHE": str(tmp_path / f"c{seed}")}
        run = subprocess.run([sys.executable, "-c", HASH_SNIPPET, tiny_model, str(tmp_path / "ds")],
                             capture_output=True, text=True, env=env, check=True)
        outputs.add(run.stdout.strip().splitlines()[-1])
    assert len(outputs) == 1
    scorer_hash = outputs.pop().split()[0]
    assert scorer_hash == Hasher.hash(CHESScorer(tiny_model, token_budget=512, max_length=300))
    assert scorer_hash != Hasher.hash(CHESScorer(tiny_model, token_budget=512, max_length=301))


def test_hash_never_touches_weights(tiny_model):
    """The pickled scorer holds settings and identity only, so hashing cost does not grow with the model."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    for scorer in (CHESScorer(tiny_model), CHESScorer(model, tokenizer)):
        scorer.load() if scorer.config.model != "<in-memory>" else None
        assert len(pickle.dumps(scorer)) < 2_000
    # a different in-memory model (other weights) gets a different identity
    other = AutoModelForCausalLM.from_pretrained(tiny_model)
    with __import__("torch").no_grad():
        other.get_output_embeddings().weight.add_(1.0)
    assert CHESScorer(other, tokenizer).identity != CHESScorer(model, tokenizer).identity


def test_second_run_loads_from_cache(tiny_model, tmp_path, monkeypatch):
    Dataset.from_dict(synthetic_pairs(12)).save_to_disk(tmp_path / "ds")
    ds = load_from_disk(tmp_path / "ds")
    first = CHESScorer(tiny_model).map(ds, batch_size=4)
    again = CHESScorer(tiny_model, prefix_sharing=False)  # a fresh scorer, as in a new run; how it computes differs

    def no_model(*args):
        raise AssertionError("the scorer ran: the result did not come from the cache file")

    monkeypatch.setattr(loading, "load", no_model)
    second = again.map(load_from_disk(tmp_path / "ds"), batch_size=4)
    assert second.cache_files == first.cache_files
    assert second["ches"] == first["ches"]


@pytest.mark.parametrize("options", [dict(prefix_sharing=False),
                                     dict(device_map="auto", max_memory={"cpu": "1GiB"}, offload_folder="off")])
def test_run_options_reach_workers_but_not_the_fingerprint(tiny_model, options):
    """prefix_sharing and the split across devices change how, not what: datasets' hash ignores them (so the ranks
    of a launcher, each on its own GPUs, agree on the chunks' manifest); the pickle a num_proc worker gets keeps
    them."""
    import dill

    other = CHESScorer(tiny_model, **options)
    assert Hasher.hash(other) == Hasher.hash(CHESScorer(tiny_model))
    for unpickled in (dill.loads(dill.dumps(other)), pickle.loads(pickle.dumps(other))):  # multiprocess uses dill
        assert {name: getattr(unpickled.run, name) for name in options} == options


def test_num_proc_2_with_rank_gives_identical_scores(tiny_model, tmp_path):
    Dataset.from_dict(synthetic_pairs(16)).save_to_disk(tmp_path / "ds")
    ds = load_from_disk(tmp_path / "ds")
    single = CHESScorer(tiny_model).map(ds, batch_size=4)
    multi = CHESScorer(tiny_model).map(ds, batch_size=4, num_proc=2, with_rank=True)
    assert len(multi.cache_files) == 2  # one shard per worker
    for column in ("ches", "ln_ches", "chosen_logps", "rejected_logps"):
        np.testing.assert_array_equal(multi[column], single[column])


def test_fingerprints_of_existing_scorers_are_pinned(monkeypatch):
    """The ``datasets`` fingerprint of a scorer is its settings, its model identity and the package version: a
    refactor of how the options are declared must leave it as it was, or every cached map and kept chunk would be
    scored again. The values were computed before the options took one shape (``fingerprint=`` names the weights,
    so no model is built; the version is fixed so that a release does not move them)."""
    import hf_ches
    from hf_ches import LogProbScorer

    monkeypatch.setattr(hf_ches, "__version__", "pinned")
    model, tokenizer = torch.nn.Linear(1, 1), object()
    ches = CHESScorer(model, tokenizer, fingerprint="pinned-weights", token_budget=512, max_length=300,
                      boundary="strict")
    ref = LogProbScorer(model, tokenizer, fingerprint="pinned-weights", column_prefix="ref_", prefix_sharing=False)
    renamed = CHESScorer(model, tokenizer, fingerprint="pinned-weights", chosen_column="better")
    assert [Hasher.hash(ches), Hasher.hash(ref), Hasher.hash(renamed), Hasher.hash(ches.config)] == [
        "c89d5577db762c1b", "6b56a49817f87e1c", "4e5bcf29b51a2f91", "33c286cc9a05d804"]
