"""The real Gemma 3 270M (``gemma3-270m``) on real HH-RLHF rows: prefix sharing on its sliding-window layers equals
the per-example float64 reference, on rows whose prompt shifts and rows whose prompt does not; a base model without
a chat template refuses conversational rows, saying how to pass one.

The sliding window (512 tokens) is set to 8 in a copy of the model, so that it binds on the few short rows the test
can afford; the weights are the real ones. Reads the real-data folder (`hf_ches.testing.real_data`) and skips
where it is absent.
"""

from __future__ import annotations

import copy
import json
import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM

from hf_ches import CHESScorer
from hf_ches.pairs import PairError, read_rows, tokenize_pairs
from hf_ches.testing import HH_RLHF_SAMPLE
from tests.plugins.models import reference_pair
from tests.plugins.real_data import real_file

COLUMNS = ("ches", "ln_ches", "chosen_logps", "rejected_logps", "last_hidden_ip")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    from hf_ches.models import load_model_and_tokenizer

    return load_model_and_tokenizer("gemma3-270m")


@pytest.fixture(scope="module")
def hh_rows(gemma) -> tuple[Dataset, list[int]]:
    """With Gemma's tokenizer, the shortest HH row whose prompt shifts and the shortest whose prompt does not."""
    lines = real_file(HH_RLHF_SAMPLE).read_text().splitlines()
    rows = Dataset.from_list([json.loads(line) for line in lines])
    pairs = tokenize_pairs(read_rows(rows.to_dict(), range(len(rows))), gemma[1])
    by_length = sorted(range(len(rows)), key=lambda i: 2 * len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids)
                       + len(pairs[i].rejected_ids))
    chosen = [next(i for i in by_length if pairs[i].prompt_shift > 0),
              next(i for i in by_length if pairs[i].prompt_shift == 0)]
    return rows.select(chosen), [pairs[i] for i in chosen]


def test_prefix_sharing_on_sliding_window_layers_equals_the_float64_reference(gemma, hh_rows):
    model, tokenizer = gemma
    rows, pairs = hh_rows
    config = copy.deepcopy(model.config)
    config.sliding_window = 8  # shorter than every sequence here: the window's mask is exercised
    model32 = AutoModelForCausalLM.from_config(config).eval()
    model32.load_state_dict(model.state_dict())
    model64 = copy.deepcopy(model32).double()
    refs = [reference_pair(model64, p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]
    assert min(len(p.prompt_ids) + len(p.chosen_ids) for p in pairs) > config.sliding_window
    scorer = CHESScorer(model64, tokenizer, scores=("ches", "ln_ches", "logps", "last_hidden_ip"), head_bytes=1 << 20)
    assert scorer.shares_prefixes(scorer.load()) and scorer.load().sharing.window == 8
    scored = scorer.map(rows, batch_size=4)
    assert [n > 0 for n in scored["prompt_tokens_shifted"]] == [True, False]
    for row, ref in zip(scored, refs):
        assert (row["chosen_num_tokens"], row["rejected_num_tokens"]) == (ref["chosen_num_tokens"],
                                                                          ref["rejected_num_tokens"])
        for name in COLUMNS:  # float64 weights (the real ones, dequantised): 1e-7 of the terms' scale
            scale = ref.get(f"{name}_scale", abs(ref[name]))
            assert abs(row[name] - ref[name]) <= 1e-7 * scale, (name, row[name], ref[name])
    # The float32 model, as users score with it, sharing on and off. The scoring itself is pinned to 1e-7 above; here
    # the float32 forward pass of Gemma 3's 18 layers (hidden states of norm ~1e2) adds its own round-off: measured
    # up to 1.2e-5 of the scale on these rows, so 3e-5 bounds it.
    for sharing in (True, False):
        float32 = CHESScorer(model32, tokenizer, scores=("ches", "ln_ches", "logps"), prefix_sharing=sharing)
        for row, ref in zip(float32.map(rows, batch_size=4), refs):
            for name in COLUMNS[:4]:
                scale = ref.get(f"{name}_scale", abs(ref[name]))
                assert abs(row[name] - ref[name]) <= 3e-5 * scale, (sharing, name, row[name], ref[name])


def test_conversational_rows_without_a_chat_template_say_how_to_pass_one(gemma):
    model, tokenizer = gemma
    assert not tokenizer.chat_template  # a base model
    rows = Dataset.from_dict({"prompt": [[{"role": "user", "content": "Hi"}]],
                              "chosen": [[{"role": "assistant", "content": "Hello"}]],
                              "rejected": [[{"role": "assistant", "content": "No"}]]})
    with pytest.raises(PairError, match=r"row 0, column 'prompt': .*need a chat template.*--chat_template"):
        CHESScorer(model, tokenizer).map(rows)
    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    scored = CHESScorer(model, copy.deepcopy(tokenizer), chat_template=template).map(rows)
    assert scored["chosen_num_tokens"][0] > 0 and scored["ches"][0] == scored["ches"][0]
