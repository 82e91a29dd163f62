"""CHESScorer against the independent float64 reference and against TRL's own tokenization and log-probs."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_ches import CHESScorer, transform
from hf_ches.scores import SCORES
from hf_ches.pairs import PairError, PendingPairs, read_rows, tokenize_pairs
from hf_ches.testing import synthetic_pairs
from tests.plugins.models import assert_matches_reference, reference_pair, trl_prepare

FORMATS = ("standard", "conversational", "implicit")
N_ROWS = 64


@pytest.fixture(scope="module")
def cases(tiny_models):
    """Per (arch, format): rows with an ``id`` column, TRL's prepared rows and the float64 reference per row."""
    out = {}
    for arch, path in tiny_models.items():
        model64 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
        for seed, fmt in enumerate(FORMATS):
            rows = synthetic_pairs(N_ROWS, fmt, seed=seed)
            trl_rows = trl_prepare(path, Dataset.from_dict(rows), precompute_ref_log_probs=True)
            refs = [
                reference_pair(model64, r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trl_rows
            ]
            out[arch, fmt] = (rows | {"id": list(range(N_ROWS))}, trl_rows, refs)
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gemma2"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_float64_reference(cases, tiny_models, arch, fmt, monkeypatch):
    """Any batch size, token budget, row order, packing order and slicing of the output embedding, with and without
    prefix sharing, gives the paper's per-example float64 numbers. (``head_bytes=1``: the log-probs one completion
    position a slice, where the default takes a tiny model's whole micro-batch in one.)"""
    rows, _, refs = cases[arch, fmt]
    ds = Dataset.from_dict(rows)
    default = transform.HEAD_BYTES
    runs = [(False, 1, 1 << 20, False, True, default), (False, 64, 16, True, True, default),
            (False, 64, 1 << 20, True, False, default), (False, 7, 300, False, True, default),
            (True, 64, 2000, True, True, default), (True, 64, 2000, True, False, default),
            (False, 64, 2000, True, True, 1), (True, 7, 300, False, False, 1)]
    for ahead, batch_size, token_budget, shuffle, sharing, head_bytes in runs:
        monkeypatch.setattr(transform, "tokenize_ahead", lambda device: ahead)  # True: the accelerator's order
        data = ds.shuffle(seed=batch_size) if shuffle else ds
        scorer = CHESScorer(tiny_models[arch], token_budget=token_budget, prefix_sharing=sharing,
                            head_bytes=head_bytes)
        assert scorer.shares_prefixes(scorer.load()) is sharing  # every tiny architecture takes the shared layout
        assert_matches_reference(scorer.map(data, batch_size=batch_size), refs)


@pytest.mark.parametrize("fmt", FORMATS)
def test_token_ids_and_logps_equal_trl(cases, tiny_models, fmt):
    """Our split equals TRL's tokenization; our log-probs equal DPOTrainer's precomputed ref_*_logps."""
    from hf_ches.pairs import read_rows, tokenize_pairs

    rows, trl_rows, _ = cases["llama", fmt]
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    batch = {k: v for k, v in rows.items() if k != "id"}
    ours = tokenize_pairs(read_rows(batch, range(N_ROWS)), tokenizer)
    for pair, trl_row in zip(ours, trl_rows):
        assert pair.prompt_ids == trl_row["prompt_ids"]
        assert pair.chosen_ids == trl_row["chosen_ids"]
        assert pair.rejected_ids == trl_row["rejected_ids"]
    scored = CHESScorer(tiny_models["llama"]).map(Dataset.from_dict(rows), batch_size=16)
    np.testing.assert_allclose(scored["chosen_logps"], trl_rows["ref_chosen_logps"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scored["rejected_logps"], trl_rows["ref_rejected_logps"], rtol=1e-4, atol=1e-4)


def test_in_memory_model_and_baselines(cases, tiny_models):
    rows, trl_rows, refs = cases["qwen2", "standard"]
    path = tiny_models["qwen2"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    scorer = CHESScorer(model, tokenizer, scores=("ches", "ln_ches", "logps", "edit_distance", "last_hidden_ip"))
    scored = scorer.map(Dataset.from_dict(rows), batch_size=10)
    assert_matches_reference(scored, refs)
    for row, trl_row in zip(scored, trl_rows):
        ref = refs[row["id"]]
        assert abs(row["last_hidden_ip"] - ref["last_hidden_ip"]) <= 1e-5 * max(1.0, abs(ref["last_hidden_ip"]))
        c, r = trl_row["chosen_ids"], trl_row["rejected_ids"]
        assert 0.0 <= row["edit_distance"] <= 1.0
        assert (row["edit_distance"] == 0.0) == (c == r)


def test_ches_only_skips_output_embedding(tiny_model):
    """scores=("ches", "ln_ches") never calls the output embedding on the scored sequences."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    scorer = CHESScorer(model, tokenizer, scores=("ches", "ln_ches"))
    scorer.load()  # the architecture check runs the full model once, before we count
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    scored = scorer.map(Dataset.from_dict(synthetic_pairs(8)))
    assert calls == [] and "chosen_logps" not in scored.column_names
    assert np.isfinite(scored["ches"]).all()


def test_output_dtypes_declared(tiny_model):
    scored = CHESScorer(tiny_model, max_length=60).map(Dataset.from_dict(synthetic_pairs(6, answer_words=(20, 40))))
    types = {k: v.dtype for k, v in scored.features.items()}
    assert types["ches"] == "float64" and types["chosen_num_tokens"] == "int32" and types["truncated"] == "bool"
    # also without the helper: the arrays we return carry their dtypes
    plain = Dataset.from_dict(synthetic_pairs(6)).map(CHESScorer(tiny_model), batched=True)
    assert plain.features["chosen_num_tokens"].dtype == "int32"


def test_max_length_truncates_keep_start(tiny_model):
    rows = synthetic_pairs(12, seed=3, answer_words=(20, 40))
    full = CHESScorer(tiny_model).map(Dataset.from_dict(rows))
    cut = CHESScorer(tiny_model, max_length=40).map(Dataset.from_dict(rows))
    assert any(cut["truncated"]) and not all(cut["truncated"])
    for a, b in zip(full, cut):
        if not b["truncated"]:
            assert a["ches"] == pytest.approx(b["ches"], rel=1e-6)
        assert b["chosen_num_tokens"] <= a["chosen_num_tokens"]


def test_iterable_dataset_map(tiny_model):
    rows = synthetic_pairs(10)
    eager = CHESScorer(tiny_model).map(Dataset.from_dict(rows))
    lazy = Dataset.from_dict(rows).to_iterable_dataset().map(CHESScorer(tiny_model), batched=True, batch_size=4)
    np.testing.assert_allclose([r["ches"] for r in lazy], eager["ches"], rtol=1e-6)


def test_map_each_split_of_a_dataset_dict(tiny_model):
    from datasets import DatasetDict

    dd = DatasetDict({"train": Dataset.from_dict(synthetic_pairs(6)), "test": Dataset.from_dict(synthetic_pairs(3))})
    scored = CHESScorer(tiny_model).map(dd)
    assert {k: len(v) for k, v in scored.items()} == {"train": 6, "test": 3}
    assert scored["test"]["ches"] == CHESScorer(tiny_model).map(dd["test"])["ches"]


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_pending_pairs_are_the_tokenized_pairs(tiny_model, fmt):
    """Tokenizing ahead in slices on threads, longest first, gives each row the pair tokenize_pairs gives it."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = read_rows(synthetic_pairs(10, fmt=fmt), range(10))
    expected = tokenize_pairs(rows, tokenizer)
    for threads, slice_rows in [(1, 16), (3, 2), (2, 3)]:
        assert list(PendingPairs(rows, tokenizer, threads=threads, slice_rows=slice_rows)) == expected
    sizes = [max(row.sizes()) for row in rows]
    order = PendingPairs(rows, tokenizer).sequence_order()
    assert sorted(order) == list(range(20)) and max(sizes) in (rows[order[0] % 10].sizes())


def test_an_error_reaches_whoever_asks_for_its_row(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    raw = synthetic_pairs(10)
    raw["prompt"][7], raw["chosen"][7] = "the answ", "er is good"  # BPE merges across the prompt/completion boundary
    pairs = PendingPairs(read_rows(raw, range(10)), tokenizer, threads=2, slice_rows=1, boundary="strict")
    assert pairs[3].index == 3  # other slices are unaffected
    with pytest.raises(PairError, match="row 7, column 'prompt'"):
        pairs[7]


def test_accelerator_order_gives_every_column_of_the_cpu_order(tiny_model, monkeypatch):
    """Packing longest-first by characters while tokenizing (the GPU path) changes no output, flagged rows included."""
    rows = synthetic_pairs(12, prompt_words=(3, 5))
    rows["prompt"][1] = " ".join(["the answer"] * 40)  # no completion token left under max_length: NaN, flagged
    rows["prompt"][4], rows["chosen"][4] = "the answ", "er is good"  # not a token prefix: scored, flagged
    options = dict(scores=tuple(SCORES), max_length=60, on_invalid="flag", boundary="strict", token_budget=200)
    cpu = CHESScorer(tiny_model, **options).map(Dataset.from_dict(rows), batch_size=5)
    monkeypatch.setattr(transform, "tokenize_ahead", lambda device: True)  # pack as on an accelerator
    accelerator = CHESScorer(tiny_model, **options).map(Dataset.from_dict(rows), batch_size=5)
    assert cpu.column_names == accelerator.column_names
    for name in cpu.column_names:
        if isinstance(cpu[0][name], float):
            np.testing.assert_allclose(accelerator[name], cpu[name], rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            assert accelerator[name] == cpu[name], name
    assert np.isnan(cpu["ches"][1]) and cpu["ches_flag"][4] and not np.isnan(cpu["ches"][4])
    assert cpu["prompt_tokens_shifted"][4] > 0
