"""Real preference data in the layouts users keep it in, scored as TRL's DPOTrainer trains it.

LLaMA-Factory's two DPO demo files (ShareGPT layout: ``conversations`` of from/value turns, system turns included,
and ``chosen``/``rejected`` as one message each), and real multi-turn HH-RLHF dialogues rewritten as TRL's
conversational implicit-prompt rows with an ``id`` (the layout of ``trl-lib/hh-rlhf-helpful-base``). The token ids
are compared with TRL's own ``DPOTrainer`` on every row of the same rows converted to TRL's conversational format;
the files are read from the real-data folder (`hf_ches.testing.real_data`) and the tests skip where it is absent.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from datasets import Dataset, load_from_disk
from transformers import AutoTokenizer

from hf_ches import CHESScorer, cli
from hf_ches.pairs import read_rows, tokenize_pairs
from hf_ches.testing import HH_RLHF_SAMPLE, LLAMAFACTORY_DPO
from tests.plugins.models import assert_matches_reference, reference_pair, trl_prepare
from tests.plugins.real_data import real_file, real_rows

ROLES = {"system": "system", "human": "user", "gpt": "assistant"}  # LLaMA-Factory's ShareGPT tags


def to_trl(row: dict) -> dict:
    """One LLaMA-Factory row in TRL's conversational format, converted here independently of hf_ches."""
    def message(turn: dict) -> dict:
        return {"role": ROLES[turn["from"]], "content": turn["value"]}

    return {"prompt": [message(t) for t in row["conversations"]], "chosen": [message(row["chosen"])],
            "rejected": [message(row["rejected"])]}


def hh_conversations(n: int) -> list[dict]:
    """The first ``n`` HH-RLHF rows as TRL's conversational implicit-prompt rows (whole dialogues as message
    lists), with an ``id``."""
    def messages(text: str) -> list[dict]:
        turns = re.split(r"\n\n(Human|Assistant): ", "\n\n" + text.removeprefix("\n\n"))[1:]
        return [{"role": "user" if who == "Human" else "assistant", "content": said}
                for who, said in zip(turns[::2], turns[1::2])]

    rows = real_rows(HH_RLHF_SAMPLE).select(range(n))
    return [{"id": f"hh-{i:04d}", "chosen": messages(r["chosen"]), "rejected": messages(r["rejected"])}
            for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_tiny_model):
    return AutoTokenizer.from_pretrained(smollm2_tiny_model)


@pytest.mark.parametrize("name", LLAMAFACTORY_DPO)
def test_llamafactory_token_ids_equal_trl_on_every_row(name, smollm2_tiny_model, smollm2_tokenizer):
    rows = real_rows(name)
    expected = trl_prepare(smollm2_tiny_model, Dataset.from_list([to_trl(r) for r in rows]))
    ours = tokenize_pairs(read_rows(rows.to_dict(), range(len(rows))), smollm2_tokenizer)
    assert len(ours) == len(rows) == 300
    assert [p.prompt_ids for p in ours] == expected["prompt_ids"]
    assert [p.chosen_ids for p in ours] == expected["chosen_ids"]
    assert [p.rejected_ids for p in ours] == expected["rejected_ids"]
    with_system = [i for i, r in enumerate(rows) if r["conversations"][0]["from"] == "system"]
    assert with_system and all(p.problem is None and p.scorable for p in ours)
    system = rows[with_system[0]]["conversations"][0]["value"]
    assert system in smollm2_tokenizer.decode(ours[with_system[0]].prompt_ids)  # the row's own system turn


@pytest.mark.parametrize("name", LLAMAFACTORY_DPO)
def test_hf_ches_score_keeps_every_llamafactory_row(name, smollm2_tiny_model, tmp_path):
    """The file's layout as a user passes it to ``hf-ches score``: every row, in order, scored, with no truncation
    (a tiny random model with SmolLM2's real tokenizer; the first 16 rows, written as the same JSON array, to keep
    the test short: the token ids of all 600 rows are checked above)."""
    rows = json.loads(real_file(name).read_text(encoding="utf-8"))[:16]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    assert cli.main(["score", "--dataset_name", str(path), "--model_name_or_path", smollm2_tiny_model,
                     "--output_dir", str(tmp_path / "out")]) == 0
    scored = load_from_disk(str(tmp_path / "out"))["train"]
    assert len(scored) == len(rows) and scored["chosen"][:] == [r["chosen"] for r in rows]
    assert not any(x != x for c in ("ln_ches", "chosen_logps", "rejected_logps") for x in scored[c])


def test_column_mapping_gives_the_scores_of_the_original(smollm2_tiny_model, tmp_path):
    """A renamed copy of a real file, read through --prompt_column/--chosen_column/--rejected_column."""
    rows = json.loads(real_file(LLAMAFACTORY_DPO[0]).read_text(encoding="utf-8"))[:12]
    names = {"conversations": "history", "chosen": "better", "rejected": "worse"}
    (tmp_path / "original.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "renamed.json").write_text(json.dumps([{names[k]: v for k, v in r.items()} for r in rows]),
                                           encoding="utf-8")
    scores = {}
    for stem, columns in (("original", []), ("renamed", ["--prompt_column", "history", "--chosen_column", "better",
                                                         "--rejected_column", "worse"])):
        out = tmp_path / f"out-{stem}"
        assert cli.main(["score", "--dataset_name", str(tmp_path / f"{stem}.json"), *columns, "--model_name_or_path",
                         smollm2_tiny_model, "--output_dir", str(out)]) == 0
        scored = load_from_disk(str(out))["train"]
        scores[stem] = {c: scored[c][:] for c in ("ches", "ln_ches", "chosen_logps", "rejected_logps",
                                               "chosen_num_tokens", "rejected_num_tokens")}
    assert scores["renamed"] == scores["original"]
    assert CHESScorer(smollm2_tiny_model, chosen_column="better").identity  # the scorer takes the same keywords


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_hf_ches_score_on_multi_turn_conversations_with_ids(suffix, smollm2_tiny_model, smollm2_tokenizer,
                                                           tmp_path):
    """Real multi-turn human-ranked dialogues in TRL's conversational implicit layout with an ``id`` column, as a
    user scores them: every row kept, in order, with its ``id``, on TRL's tokens."""
    rows = hh_conversations(64)
    path = tmp_path / f"hh-conversational{suffix}"
    getattr(Dataset.from_list(rows), "to_json" if suffix == ".jsonl" else "to_parquet")(str(path))
    assert cli.main(["score", "--dataset_name", str(path), "--model_name_or_path", smollm2_tiny_model,
                     "--output_dir", str(tmp_path / "out")]) == 0
    scored = load_from_disk(str(tmp_path / "out"))["train"]
    assert scored["id"][:] == [r["id"] for r in rows] and not any(x != x for x in scored["ln_ches"])
    assert any(len(r["chosen"]) > 2 for r in rows)  # multi-turn
    expected = trl_prepare(smollm2_tiny_model, Dataset.from_list([{k: r[k] for k in ("chosen", "rejected")}
                                                                  for r in rows]))
    ours = tokenize_pairs(read_rows(Dataset.from_list(rows).to_dict(), range(len(rows))), smollm2_tokenizer)
    assert [p.chosen_ids for p in ours] == expected["chosen_ids"]
    assert [p.rejected_ids for p in ours] == expected["rejected_ids"]
    assert scored["chosen_num_tokens"][:] == [len(ids) for ids in expected["chosen_ids"]]


@pytest.mark.slow
def test_real_smollm2_equals_the_float64_reference_on_llamafactory_rows(smollm2_tiny_model):
    """The real SmolLM2-135M-Instruct on the shortest row of each file that opens with a system turn: the
    scores equal the float64 per-example reference built on TRL's own token ids (TRL tokenizes with SmolLM2's
    tokenizer, which the tiny model carries)."""
    from hf_ches.models import load_model_and_tokenizer

    model64, _ = load_model_and_tokenizer("smollm2", dtype=torch.float64)
    for name in LLAMAFACTORY_DPO:
        rows = real_rows(name)
        size = [len(json.dumps(r, ensure_ascii=False)) for r in rows]
        system = [i for i, r in enumerate(rows) if r["conversations"][0]["from"] == "system"]
        picked = [min(system, key=size.__getitem__)]
        sample = rows.select(picked).add_column("id", list(range(len(picked))))
        trl_rows = trl_prepare(smollm2_tiny_model, Dataset.from_list([to_trl(r) for r in sample]))
        refs = [reference_pair(model64, r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in trl_rows]
        scored = CHESScorer("smollm2", dtype="float32").map(sample, batch_size=2)
        assert_matches_reference(scored, refs)
