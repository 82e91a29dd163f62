"""Tiny random models and the independent float64 reference that every score is checked against."""

from __future__ import annotations

import tempfile

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from hf_ches.testing import build_tiny_model

ARCHS = ("llama", "qwen2", "gpt2", "gemma2")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Paths of tiny random models, one per architecture (Llama, tied-embedding Qwen2, GPT-2, soft-capped Gemma 2)."""
    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_model(root, arch=arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_model(tiny_models) -> str:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def smollm2_tiny_model(tmp_path_factory) -> str:
    """A tiny random Llama with the real SmolLM2-135M-Instruct tokenizer (read from the shipped GGUF file), saved
    together: real token ids (what TRL's parity is about) at a tiny model's cost."""
    from hf_ches.models import fetch_smollm2

    gguf = fetch_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return build_tiny_model(tmp_path_factory.mktemp("smollm2-tiny"), arch="llama", tokenizer=tokenizer)


def trl_prepare(model_path: str, dataset: Dataset, precompute_ref_log_probs: bool = False) -> Dataset:
    """What TRL's DPOTrainer trains on: its ``prompt_ids``/``chosen_ids``/``rejected_ids`` of ``dataset`` and, with
    ``precompute_ref_log_probs``, its reference log-probs (the model is the reference). ``max_length=None``: with
    its default (1024) TRL drops the rows whose prompt alone fills it, and every row must stay."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=tempfile.mkdtemp(), report_to="none", precompute_ref_log_probs=precompute_ref_log_probs,
        max_length=None,
        use_cpu=True, bf16=False, per_device_train_batch_size=8, precompute_ref_batch_size=8,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return DPOTrainer(model=model_path, args=args, train_dataset=dataset, processing_class=tokenizer).train_dataset


def reference_pair(model64, prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int]) -> dict:
    """Scores of one pair straight from the paper's definition: per example, unpadded, float64.

    ``hidden_states[-1]`` of the full sequence at positions ``P-1 … end-1`` (the states that produce the logits of
    the completion tokens), and log-probs from ``log_softmax(model(full).logits)`` gathered on the completion tokens.
    """
    stats = []
    for completion in (chosen_ids, rejected_ids):
        ids = torch.tensor([prompt_ids + completion])
        P, L = len(prompt_ids), ids.shape[1]
        with torch.no_grad():
            out = model64(input_ids=ids, output_hidden_states=True)
        H = out.hidden_states[-1][0, P - 1 : L - 1]  # [n, d]
        logp = torch.log_softmax(out.logits[0, P - 1 : L - 1].double(), -1).gather(1, ids[0, P:, None]).sum()
        stats.append((H.sum(0), H.shape[0], float(logp), H[-1]))
    (s_c, n_c, lp_c, last_c), (s_r, n_r, lp_r, last_r) = stats
    dot, sq = float(s_c @ s_r), float(s_c @ s_c)
    return {
        "ches": dot - sq,
        "ches_scale": abs(dot) + sq,
        "ln_ches": dot / (n_c * n_r) - sq / n_c**2,
        "ln_ches_scale": abs(dot) / (n_c * n_r) + sq / n_c**2,
        "chosen_logps": lp_c,
        "rejected_logps": lp_r,
        "last_hidden_ip": float(last_c @ last_r),
        "chosen_num_tokens": n_c,
        "rejected_num_tokens": n_r,
    }


def assert_matches_reference(scored: Dataset, refs: list[dict]) -> None:
    """Every scored row (found by its ``id``) equals its :func:`reference_pair` to float32 round-off."""
    for row in scored:
        ref = refs[row["id"]]
        assert row["chosen_num_tokens"] == ref["chosen_num_tokens"]
        assert row["rejected_num_tokens"] == ref["rejected_num_tokens"]
        for name in ("ches", "ln_ches"):
            assert abs(row[name] - ref[name]) <= 1e-5 * ref[f"{name}_scale"], (name, row[name], ref[name])
        for name in ("chosen_logps", "rejected_logps"):
            assert abs(row[name] - ref[name]) <= 1e-5 * max(1.0, abs(ref[name])), (name, row[name], ref[name])
