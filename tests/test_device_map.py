"""A model split across devices (``device_map``, ``max_memory``, ``offload_folder``) scores as the whole model does.

Without GPUs the split is across the CPU and the disk: ``accelerate`` keeps the disk's modules on the ``meta``
device and loads their weights at each call, so the output head, the prefix-shared mask and the model cache of
``hf_ches.loading`` meet the same hooks they meet on several GPUs.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hf_ches import CHESScorer, LogProbScorer, cli, loading
from hf_ches.pairs import read_rows, tokenize_pairs
from hf_ches.testing import synthetic_pairs
from tests.plugins.models import assert_matches_reference, reference_pair

ROWS = 24


def half_on_disk(path: str) -> dict[str, str]:
    """An explicit device map: the embedding and the first half of the layers on the CPU, the rest on the disk."""
    layers = AutoConfig.from_pretrained(path).num_hidden_layers
    return {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "disk", "lm_head": "disk",
            **{f"model.layers.{i}": "cpu" if i < layers // 2 else "disk" for i in range(layers)}}


@pytest.fixture(scope="module")
def cases(tiny_models) -> dict[str, tuple[Dataset, list[dict]]]:
    """Per architecture: rows with an ``id`` column and the float64 reference of each row."""
    out = {}
    for arch in ("llama", "qwen2"):
        path, rows = tiny_models[arch], synthetic_pairs(ROWS, seed=11)
        model64 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
        pairs = tokenize_pairs(read_rows(rows, range(ROWS)), AutoTokenizer.from_pretrained(path))
        refs = [reference_pair(model64, p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]
        out[arch] = Dataset.from_dict(rows | {"id": list(range(ROWS))}), refs
    return out


def split_options(arch: str, path: str, folder) -> dict:
    """Llama: an explicit map with half the layers on the disk; Qwen2 (tied embeddings): ``"auto"`` with a CPU
    memory that holds 70% of the weights, so ``accelerate`` offloads the rest."""
    if arch == "llama":
        return dict(device_map=half_on_disk(path), offload_folder=str(folder))
    size = sum(p.numel() * p.element_size() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
    return dict(device_map="auto", max_memory={"cpu": int(0.7 * size)}, offload_folder=str(folder))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("sharing", [True, False])
def test_split_model_scores_as_the_whole_model(cases, tiny_models, arch, sharing, tmp_path):
    """Every score, the output-embedding eNTK included, equals the float64 reference within float32 round-off."""
    rows, refs = cases[arch]
    options = dict(prefix_sharing=sharing, token_budget=300, scores=("ches", "ln_ches", "logps", "entk_w"))
    scorer = CHESScorer(tiny_models[arch], **options, **split_options(arch, tiny_models[arch], tmp_path))
    loaded = scorer.load()
    assert {"cpu", "disk"} == set(loaded.model.hf_device_map.values()), loaded.model.hf_device_map
    assert loaded.head.weight.device.type == "cpu"  # the offloaded head's weights, read once
    assert scorer.shares_prefixes(loaded) is sharing
    scored = scorer.map(rows, batch_size=8)
    assert_matches_reference(scored, refs)
    whole = CHESScorer(tiny_models[arch], **options).map(rows, batch_size=8)
    for column in ("entk_w", "ln_entk_w"):
        torch.testing.assert_close(torch.tensor(scored[column]), torch.tensor(whole[column]), rtol=1e-5, atol=1e-5)


def test_split_model_is_loaded_once_per_process(tiny_model, tmp_path):
    """The policy and the reference scorer of one split model share one load (the cache key holds the split);
    the same model on one device is another load."""
    options = dict(device_map=half_on_disk(tiny_model), offload_folder=str(tmp_path))
    policy, reference = CHESScorer(tiny_model, **options), LogProbScorer(tiny_model, column_prefix="ref_", **options)
    assert policy.load() is reference.load()
    assert CHESScorer(tiny_model).load().model is not policy.load().model


@pytest.mark.parametrize("options, message", [
    (dict(device="cpu", device_map="auto"), "pass device .* or device_map .*, not both"),
    (dict(max_memory={"cpu": "1GiB"}), "pass device_map too"),
    (dict(offload_folder="off"), "pass device_map too"),
])
def test_split_options_that_do_not_go_together(tiny_model, options, message):
    with pytest.raises(ValueError, match=message):
        CHESScorer(tiny_model, **options)


def test_in_memory_model_takes_no_device_map(tiny_model):
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)
    with pytest.raises(ValueError, match="device_map applies when the scorer loads the model"):
        CHESScorer(model, tokenizer, device_map="auto")


def test_each_rank_splits_over_its_own_gpus(monkeypatch):
    """torchrun --nproc_per_node 2 on 8 GPUs: LOCAL_RANK 1 splits over GPUs 4-7, and its GPU 0 is GPU 4."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "3")  # the second node's second rank
    split = SimpleNamespace(device_map={"model": 0, "lm_head": "cuda:3"}, max_memory={0: "70GiB", 3: "70GiB"},
                            offload_folder="off")
    assert loading.process_split(split) == {"device_map": {"model": 4, "lm_head": 7},
                                            "max_memory": {4: "70GiB", 7: "70GiB"}, "offload_folder": "off/rank-3"}
    with pytest.raises(ValueError, match="GPU 4, but this process splits its model over 4 GPU"):
        loading.process_split(SimpleNamespace(device_map={"model": 4}, max_memory=None, offload_folder=None))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    with pytest.raises(ValueError, match="16 processes on this node share 8 GPU"):
        loading.process_split(split)


def test_cli_scores_with_a_split_model(tiny_model, tmp_path, capsys):
    """``hf-ches score --device_map JSON --offload_folder``: the saved provenance names both devices."""
    import json

    from datasets import load_from_disk

    source, out = str(tmp_path / "source"), str(tmp_path / "out")
    Dataset.from_dict(synthetic_pairs(6, seed=2)).save_to_disk(source)
    argv = ["score", "--dataset_name", source, "--model_name_or_path", tiny_model, "--output_dir", out,
            "--device_map", json.dumps(half_on_disk(tiny_model)), "--offload_folder", str(tmp_path / "offload")]
    assert cli.main(argv) == 0
    assert len(load_from_disk(out)["train"]) == 6
    run = json.loads((tmp_path / "out" / "ches" / "run.json").read_text())
    assert run["scoring"]["device"] == "cpu,disk", run["scoring"]


@pytest.mark.parametrize("extra, message", [
    (["--device", "cpu", "--device_map", "auto"], "--device and --device_map: pass one"),
    (["--device_map", "auto", "--dataset_num_proc", "2"], "--dataset_num_proc and --device_map"),
    (["--max_memory", "cpu=1GiB"], "--max_memory and --offload_folder split the model: pass --device_map too"),
])
def test_split_usage_errors(tiny_model, tmp_path, capsys, extra, message):
    argv = ["score", "--dataset_name", str(tmp_path), "--model_name_or_path", tiny_model, "--output_dir",
            str(tmp_path / "out"), *extra]
    assert_usage_error(capsys, argv, message)


def test_validate_refuses_a_split_model(tmp_path, capsys):
    argv = ["validate", "--dataset_name", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--device_map", "auto"]
    assert_usage_error(capsys, argv, "--device_map: validate steps the whole model on one device")


def assert_usage_error(capsys, argv: list[str], message: str) -> None:
    """``hf-ches ARGV`` exits with argparse's usage error: status 2, the usage, then one error line."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"usage: hf-ches {argv[0]} "), err
    assert err.rstrip().splitlines()[-1].startswith(f"hf-ches {argv[0]}: error: {message}"), err
