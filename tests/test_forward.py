"""``inspect_model`` refuses what ``encode`` cannot score exactly, naming the architecture and the reason."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from hf_ches.forward import UnsupportedModelError, inspect_model


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
