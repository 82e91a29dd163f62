"""``inspect_model`` refuses what ``encode`` cannot score exactly, naming the architecture and the reason;
``encode_shared`` equals ``encode`` (sliding windows included) where ``inspect_sharing`` allows it, and the scorer
falls back, saying so, where it does not."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config, MistralConfig

from hf_ches import CHESScorer
from hf_ches.batching import PairBatch
from hf_ches.forward import UnsupportedModelError, encode, encode_shared, inspect_model, inspect_sharing
from hf_ches.pairs import TokenizedPair
from hf_ches.testing import synthetic_pairs


@pytest.fixture
def model(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    inspect_model(model)  # the unmodified model passes
    return model


def test_refuses_a_trunk_that_is_not_causal(model):
    """encode right-pads without an attention mask, which is exact only when later tokens cannot change earlier ones."""
    for layer in model.model.layers:
        layer.self_attn.is_causal = False
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM: later tokens change the trunk's earlier"):
        inspect_model(model)


def test_refuses_logits_the_head_does_not_reproduce(model):
    model.config.final_logit_softcapping = 0.5  # read by the head, ignored by Llama's own forward
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM: its logits get a post-processing"):
        inspect_model(model)


def _random_pairs(n: int, vocab: int, seed: int = 0) -> PairBatch:
    rng = random.Random(seed)
    ids = lambda lo, hi: [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]  # noqa: E731
    return PairBatch([TokenizedPair(i, ids(1, 12), ids(1, 9), ids(1, 9)) for i in range(n)])


@pytest.mark.parametrize("config_class", [Gemma2Config, MistralConfig])
def test_shared_pass_keeps_sliding_windows(config_class):
    """Sequences longer than the window: Gemma 2's sliding layers (a mask per layer type) and Mistral's (all layers)
    must see only the window, as the model's own mask does in the plain pass."""
    torch.manual_seed(0)
    config = config_class(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=5,
                          attn_implementation="eager")
    model = AutoModelForCausalLM.from_config(config).eval()
    head = inspect_model(model)
    attention = inspect_sharing(model, head)
    assert attention is not None and attention.window == 5
    batch = _random_pairs(9, 50)
    needs = {"logps", "last_hidden", "states"}
    shared = encode_shared(model, batch, attention, token_budget=40, needs=needs, head=head)
    plain = encode(model, batch.sequences, batch.prompt_lens, needs=needs, head=head)
    for field in ("sums", "logps", "last_hidden"):
        torch.testing.assert_close(getattr(shared, field), getattr(plain, field), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(shared.states), torch.cat(plain.states), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(shared.lse), torch.cat(plain.lse), rtol=1e-5, atol=1e-5)
    windowless = encode_shared(model, batch, attention.__class__(attention.additive), token_budget=40, head=head)
    assert not torch.allclose(windowless.sums, plain.sums, atol=1e-3)  # the windows matter on these lengths


def test_unsupported_attention_falls_back_with_one_info_line(tiny_model, caplog):
    """A model whose layers the shared mask does not cover runs each sequence whole, with the same scores."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    model.config.layer_types = ["chunked_attention"] * model.config.num_hidden_layers  # Llama's forward ignores it
    rows = Dataset.from_dict(synthetic_pairs(12))
    with caplog.at_level(logging.INFO, logger="hf_ches.forward"):
        scorer = CHESScorer(model, tokenizer, fingerprint="chunked")
        assert not scorer.shares_prefixes(scorer.load())
    assert [r.message for r in caplog.records if "prefix sharing is off" in r.message] == [
        "prefix sharing is off for LlamaForCausalLM: it has layers of types ['chunked_attention'] (full and "
        "sliding-window attention are covered); every sequence runs whole"]
    fallback = scorer.map(rows, batch_size=12)
    shared = CHESScorer(tiny_model).map(rows, batch_size=12)
    for column in ("ches", "ln_ches", "chosen_logps", "rejected_logps"):
        scale = np.abs(shared[column]).max()
        np.testing.assert_allclose(fallback[column], shared[column], rtol=1e-5, atol=1e-5 * scale)
