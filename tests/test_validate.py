"""``hf-ches validate``: its one-step Δ against an independent autograd computation, the exact restore of the
weights, its kernel columns against ``GradientKernelScorer``, and the files it writes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_ches import CHESScorer
from hf_ches.cli import main as cli
from hf_ches.displacement import best_line, partial_spearman, render_table, spearman, top_share
from hf_ches.kernels import GradientKernelScorer, select_parameters
from hf_ches.pairs import read_rows, tokenize_pairs
from hf_ches.testing import synthetic_pairs
from hf_ches.validate import ValidateArguments, dpo_step

BETA = 0.1
N_PAIRS = 4


def load(path: str, dtype: torch.dtype):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = synthetic_pairs(N_PAIRS, seed=3, answer_words=(1, 12))
    return model, tokenizer, rows, tokenize_pairs(read_rows(rows, range(N_PAIRS)), tokenizer)


def reference_deltas(model, spec: str, pair, lr: float, sign: bool) -> tuple[float, float]:
    """The test's own step: full logits, log-softmax, TRL's loss written out, ``loss.backward()``, a manual update
    of a deep copy, and the log-probs again."""
    model = copy.deepcopy(model)
    prompt = pair.prompt_ids

    def logp(completion: list[int]) -> torch.Tensor:
        ids = torch.tensor([prompt + completion])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # [n, V]
        return torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt) :, None]).sum()

    before_c, before_r = logp(pair.chosen_ids), logp(pair.rejected_ids)
    ref_c, ref_r = before_c.item(), before_r.item()  # the reference model is the policy, frozen
    loss = -torch.nn.functional.logsigmoid(BETA * ((before_c - ref_c) - (before_r - ref_r)))
    params = [p for _, p in select_parameters(model, spec)]
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in params:
            p -= lr * (p.grad.sign() if sign else p.grad)
        return logp(pair.chosen_ids).item() - ref_c, logp(pair.rejected_ids).item() - ref_r


@pytest.mark.parametrize("spec, optimizer, lr", [("all", "sgd", 0.5), ("last:1", "sgd", 2.0),
                                                 ("all", "sign", 1e-3), ("output", "sign", 1e-2)])
def test_delta_equals_independent_autograd(tiny_models, spec, optimizer, lr):
    """float64 GPT-2 (tied embeddings; its LayerNorm stays in float64, unlike HF RMSNorm): 1e-6 relative."""
    model, _, _, pairs = load(tiny_models["gpt2"], torch.float64)
    for pair in pairs:
        got = dpo_step(model, [p for _, p in select_parameters(model, spec)], pair, beta=BETA, learning_rate=lr,
                       optimizer=optimizer)
        want_c, want_r = reference_deltas(model, spec, pair, lr, optimizer == "sign")
        assert abs(want_c) > 1e-4 and abs(want_r) > 1e-4  # a step that moves the log-probs
        assert got["delta_chosen_logps"] == pytest.approx(want_c, rel=1e-6)
        assert got["delta_rejected_logps"] == pytest.approx(want_r, rel=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "sign"])
def test_weights_restored_bit_for_bit_after_each_pair(tiny_models, optimizer):
    model, _, _, pairs = load(tiny_models["llama"], torch.float32)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    params = [p for _, p in select_parameters(model, "all")]
    first = []
    for pair in pairs:
        first.append(dpo_step(model, params, pair, beta=BETA, learning_rate=1e-2, optimizer=optimizer))
        assert first[-1]["delta_chosen_logps"] != 0
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, before[name]), name
    again = [dpo_step(model, params, pair, beta=BETA, learning_rate=1e-2, optimizer=optimizer)
             for pair in reversed(pairs)]  # each pair starts from the same weights, whatever came before
    assert again[::-1] == first


def test_kernel_columns_equal_gradient_kernel_scorer(tiny_models):
    model, tokenizer, rows, pairs = load(tiny_models["qwen2"], torch.float64)
    params = [p for _, p in select_parameters(model, "last:1")]
    got = [dpo_step(model, params, pair, beta=BETA, learning_rate=1e-3, optimizer="sgd") for pair in pairs]
    want = GradientKernelScorer(model, tokenizer, parameters="last:1", scores=("ntk", "signgd", "logps")).map(
        Dataset.from_dict(rows))
    for column in ("ntk_displacement", "ntk_cosine", "signgd_displacement", "chosen_logps", "rejected_logps"):
        assert [row[column] for row in got] == pytest.approx(want[column], rel=1e-9), column


def test_first_order_prediction_for_a_small_step(tiny_models):
    """At a small SGD step, Δ log π(y+) ≈ η ℓ′ ntk_displacement with ℓ′ = −β/2: the kernel is the step's own."""
    model, _, _, pairs = load(tiny_models["gpt2"], torch.float64)
    params = [p for _, p in select_parameters(model, "all")]
    for pair in pairs:
        row = dpo_step(model, params, pair, beta=BETA, learning_rate=1e-4, optimizer="sgd")
        assert row["delta_chosen_logps"] == pytest.approx(-BETA / 2 * 1e-4 * row["ntk_displacement"], rel=1e-2)


def test_cli_writes_the_files(tiny_model, tmp_path, capsys):
    Dataset.from_dict(synthetic_pairs(12, seed=5)).to_json(tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    cli(["validate", "--dataset_name", str(tmp_path / "pairs.jsonl"), "--model_name_or_path", tiny_model,
         "--num_samples", "8", "--learning_rate", "1e-2", "--optimizer", "sign", "--parameters", "last:1",
         "--scores", "ches", "ln_ches", "signgd", "--n_resamples", "100", "--output_dir", str(out), "--no_progress"])
    pairs = pd.read_parquet(out / "pairs.parquet")
    assert list(pairs.columns) == ["row_index", "ches", "ln_ches", "signgd_displacement", "chosen_tokens",
                                   "rejected_tokens", "chosen_logps", "rejected_logps", "delta_chosen_logps",
                                   "delta_rejected_logps"]
    assert len(pairs) == 8 and pairs["row_index"].nunique() == 8 and pairs.notna().all().all()
    results = json.loads((out / "validation.json").read_text())
    assert results["counts"] == {"num_rows": 12, "num_samples": 8, "num_scored": 8}
    assert results["options"]["optimizer"] == "sign"
    assert results["model"]["name_or_path"] == Path(tiny_model).name and results["model"]["device"] == "cpu"
    assert results["share_displaced"] == pytest.approx(np.mean(pairs["delta_chosen_logps"] < 0))
    ches = results["spearman"]["ches"]
    assert ches["rho"] == pytest.approx(spearman(pairs["ches"], -pairs["delta_chosen_logps"]))
    assert ches["ci"][0] <= ches["rho"] <= ches["ci"][1]
    lengths = [pairs["chosen_tokens"], pairs["rejected_tokens"]]
    fall = -pairs["delta_chosen_logps"]
    assert ches["partial_rho"] == pytest.approx(partial_spearman(pairs["ches"], fall, lengths))
    assert ches["per_token_rho"] == pytest.approx(spearman(pairs["ches"], fall / pairs["chosen_tokens"]))
    assert ches["top_share"] == top_share(pairs["ches"], fall)
    assert results["spearman"]["-chosen_tokens"]["rho"] == pytest.approx(spearman(-pairs["chosen_tokens"], fall))
    assert np.isnan(results["spearman"]["-chosen_tokens"]["partial_rho"])  # a length adds nothing to the lengths
    assert results["sign_rules"]["ches > 0"]["agreement"] == np.mean((pairs["ches"] > 0) == (fall > 0))
    best = max(["ches", "ln_ches", "signgd_displacement"], key=lambda n: results["spearman"][n]["partial_rho"])
    assert results["best"] == {"score": best, "by": "partial_rho"}
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"Best predictor of the fall of log π(chosen) on this model and data: {best} (partial")
    assert (out / "scatter.png").read_bytes()[:4] == b"\x89PNG"

    # the card of a filter on the same model carries the table and the closing line (--validation_dir)
    cli(["filter", "--dataset_name", str(tmp_path / "pairs.jsonl"), "--model_name_or_path", tiny_model,
         "--validation_dir", str(out), "--output_dir", str(tmp_path / "filtered")])
    card = (tmp_path / "filtered" / "README.md").read_text()
    assert render_table(results) in card and best_line(results) in card
    assert "one sign step per pair at learning rate 0.01, on 8 pairs of `pairs.jsonl`" in card
    assert str(tmp_path) not in card  # local folders are named by their own name only


def test_step_lengths_are_the_completion_tokens(tiny_models):
    """``chosen_tokens``/``rejected_tokens`` are the completions' token counts (EOS included), the n± of ln_ches."""
    model, tokenizer, rows, pairs = load(tiny_models["gpt2"], torch.float32)
    scored = CHESScorer(model, tokenizer).map(Dataset.from_dict(rows))
    assert [len(p.chosen_ids) for p in pairs] == scored["chosen_num_tokens"]
    assert [len(p.rejected_ids) for p in pairs] == scored["rejected_num_tokens"]


@pytest.mark.parametrize("options, message", [({"scores": ["nope"]}, "--scores"),
                                              ({"optimizer": "adam"}, "--optimizer"),
                                              ({"parameters": "last:0"}, "parameters"),
                                              ({"learning_rate": 0.0}, "--learning_rate")])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        ValidateArguments(**options)
