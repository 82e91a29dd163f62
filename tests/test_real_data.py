"""1,156 real HH-RLHF pairs (harmless-base, split test; read from the real-data folder, `hf_ches.testing.real_data`,
and skipped where it is absent) with SmolLM2-135M-Instruct's real tokenizer.

HH-RLHF's implicit prompt often ends inside a word, so about one row in ten has a tokenized prompt that is not a
token prefix of prompt + completion. These tests hold us to TRL 1.16's DPOTrainer on every row: the same token ids,
scores equal to the float64 reference built on TRL's ids, and the whole job (publish, report) with no error, no NaN
and no lost row. The model is a tiny random one carrying the real tokenizer; the real model runs in docs/validation.md's
"On real data" figures.
"""

from __future__ import annotations

import gzip
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_ches import CHESScorer, cli
from hf_ches.card import RUN_JSON_PATH
from hf_ches.pairs import read_rows, tokenize_pairs
from hf_ches.testing import HH_RLHF_SAMPLE
from tests.plugins.models import assert_matches_reference, reference_pair, trl_prepare
from tests.plugins.real_data import real_rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hh() -> Dataset:
    return real_rows(HH_RLHF_SAMPLE)


@pytest.fixture(scope="module")
def hh_pairs(hh, smollm2_tiny_model):
    """Our tokenization of every HH row (default options: TRL's boundary rule)."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tiny_model)
    return tokenize_pairs(read_rows(hh.to_dict(), range(len(hh))), tokenizer)


def test_token_ids_equal_trl_dpo_trainer_on_every_row(hh, hh_pairs, smollm2_tiny_model):
    expected = trl_prepare(smollm2_tiny_model, hh)
    assert [p.prompt_ids for p in hh_pairs] == expected["prompt_ids"]
    assert [p.chosen_ids for p in hh_pairs] == expected["chosen_ids"]
    assert [p.rejected_ids for p in hh_pairs] == expected["rejected_ids"]
    shifted = sum(p.prompt_shift > 0 for p in hh_pairs)
    assert 50 < shifted < 200  # ~1 row in 10 ends its prompt inside a word
    assert all(p.problem is None and p.scorable for p in hh_pairs)


@pytest.mark.parametrize("batch_size", [1, 7])
def test_shifted_and_clean_rows_equal_the_float64_reference(hh, hh_pairs, smollm2_tiny_model, batch_size):
    """Four shifted and four clean rows (the shortest of each), reference built on TRL's own ids."""
    by_length = sorted(range(len(hh)), key=lambda i: len(hh[i]["chosen"]) + len(hh[i]["rejected"]))
    shifted = [i for i in by_length if hh_pairs[i].prompt_shift > 0][:4]
    clean = [i for i in by_length if hh_pairs[i].prompt_shift == 0][:4]
    rows = hh.select(shifted + clean).add_column("id", list(range(8)))
    trl_rows = trl_prepare(smollm2_tiny_model, rows)
    model64 = AutoModelForCausalLM.from_pretrained(smollm2_tiny_model, dtype=torch.float64).eval()
    refs = [reference_pair(model64, r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trl_rows]
    scored = CHESScorer(smollm2_tiny_model).map(rows.shuffle(seed=batch_size), batch_size=batch_size)
    assert_matches_reference(scored, refs)
    by_id = dict(zip(scored["id"], scored["prompt_tokens_shifted"]))
    assert [by_id[i] > 0 for i in range(8)] == [True] * 4 + [False] * 4


@pytest.fixture(scope="module")
def hh_file(hh, tmp_path_factory) -> str:
    """The first 96 HH rows as a .jsonl file (shifted rows among them), as a user passes data files."""
    path = tmp_path_factory.mktemp("hh") / "hh-rlhf-harmless.jsonl"
    hh.select(range(96)).to_json(path)
    return str(path)


def test_publish_dry_run_keeps_every_row(hh_file, smollm2_tiny_model, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="hf_ches"):
        assert cli.main(["publish", "--dataset_name", hh_file, "--model_name_or_path", smollm2_tiny_model,
                         "--output_dir", str(out)]) == 0
    # the default selection flags (entk_w > 0) and removes none: no `removed` config
    kept, scored = (load_dataset(str(out), config, split="train") for config in ("default", "scored"))
    assert len(kept) == len(scored) == 96 and not (out / "removed").exists()
    assert not any(x != x for x in [*scored["ln_ches"], *scored["entk_w"]]) and "ches_flag" not in scored.column_names
    assert list(kept["flagged"]) == [x > 0 for x in kept["entk_w"]]
    shifted = sum(n > 0 for n in scored["prompt_tokens_shifted"])
    assert shifted > 0
    run = json.loads((out / RUN_JSON_PATH).read_text())
    assert run["splits"]["train"]["num_prompt_shifted"] == shifted and run["scoring"]["boundary"] == "trl"
    assert f"train {shifted} of 96; they are scored as TRL's `DPOTrainer` trains them" in (out / "README.md").read_text()
    warnings = [r.getMessage() for r in caplog.records if "not a prefix" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"{shifted} of 96 rows")


def test_ranking_accuracy_report_on_hh(hh_file, smollm2_tiny_model, tmp_path, monkeypatch):
    script = ROOT / "hub_scripts" / "ranking_accuracy_report.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--dataset_name", hh_file, "--model_name_or_path",
                                      smollm2_tiny_model, "--output_dir", str(tmp_path / "report")])
    runpy.run_path(str(script), run_name="__main__")
    pairs = load_dataset(str(tmp_path / "report"), split="train")
    assert len(pairs) == 96 and not any(x != x for x in pairs["chosen_logps"][:] + pairs["rejected_logps"][:])
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["scoring"]["boundary"] == "trl"



def test_publish_from_the_hub_with_data_dir(hub_env, hh_file, smollm2_tiny_model, tmp_path):
    """The HH-RLHF command as a user runs it (``--dataset_name Anthropic/hh-rlhf --data_dir harmless-base
    --dataset_splits test``), against a loopback Hub repo laid out as the real one: real rows (the first 96 of the
    sample, to keep the test short) gzipped under ``harmless-base/``, beside a folder the command must not read."""
    from huggingface_hub import HfApi

    source, target = hub_env.repo_id("hh-rlhf"), hub_env.repo_id("hh-rlhf-ches")
    api = HfApi(token=hub_env.token)
    api.create_repo(source, repo_type="dataset")
    test_file = tmp_path / "test.jsonl.gz"
    test_file.write_bytes(gzip.compress(Path(hh_file).read_bytes()))
    api.upload_file(path_or_fileobj=str(test_file), path_in_repo="harmless-base/test.jsonl.gz", repo_id=source,
                    repo_type="dataset")
    api.upload_file(path_or_fileobj=b"not json", path_in_repo="helpful-base/test.jsonl.gz", repo_id=source,
                    repo_type="dataset")
    assert cli.main(["publish", "--dataset_name", source, "--data_dir", "harmless-base", "--dataset_splits", "test",
                     "--model_name_or_path", smollm2_tiny_model, "--push_to_hub", "--repo_id", target]) == 0
    scored = load_dataset(target, "scored", split="test")
    assert len(scored) == 96 and not any(x != x for x in scored["ln_ches"])
    run = json.loads(Path(api.hf_hub_download(target, RUN_JSON_PATH, repo_type="dataset")).read_text())
    assert run["source"]["data_dir"] == "harmless-base" and run["source"]["revision"]
    assert f"--dataset_name {source} --data_dir harmless-base --dataset_splits test" in run["command"]
