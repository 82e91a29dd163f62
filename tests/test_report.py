"""hf_ches/report.py and hub_scripts/ranking_accuracy_report.py: tiny policy and reference models → LogProbScorer →
the ranking-accuracy metric → the report, checked against float64 log-probs and accuracies worked out by hand."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import datasets
import evaluate
import numpy as np
import pytest
import torch
from datasets import Dataset
from huggingface_hub import HfApi, hf_hub_download
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_ches import CHESScorer, LogProbScorer
from hf_ches.batching import longest_first, pack
from hf_ches.pairs import read_rows, tokenize_pairs
from hf_ches.ranking import DEFAULT_BETAS, RankingOptions
from hf_ches.hub import PublishError, PublishOptions
from hf_ches.report import REPORT_FILE, build_report, compute_results, push_report, run_name
from hf_ches.testing import build_tiny_model, synthetic_pairs
from tests.plugins.output import error_line
from tests.plugins.models import reference_pair
from tests.plugins.hub import assert_no_token

ROOT = Path(__file__).resolve().parents[1]
METRIC_DIR = ROOT / "metrics" / "ranking_accuracy"
SCRIPT = ROOT / "hub_scripts" / "ranking_accuracy_report.py"
BETAS = np.asarray(DEFAULT_BETAS)[:, None]  # [B, 1]
N = 32


@pytest.fixture(scope="module")
def ref_model(tmp_path_factory) -> str:
    """A second tiny Llama: the same architecture and tokenizer as `tiny_model`, other random weights."""
    return build_tiny_model(tmp_path_factory.mktemp("reference"), arch="llama", seed=1)


def with_alpha(rows: dict[str, list], seed: int = 0) -> dict[str, list]:
    """Rows plus an `alpha` column: the share of four raters preferring `chosen` (0.5 is a human tie)."""
    alpha = np.random.default_rng(seed).choice([0.0, 0.25, 0.5, 0.75, 1.0], len(rows["chosen"]))
    return rows | {"alpha": alpha.tolist()}


def token_ids(model_path: str, rows: dict[str, list]):
    """Prompt and completion ids of each row, split as TRL splits them."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return tokenize_pairs(read_rows(rows, range(len(rows["chosen"]))), tokenizer)


def float64_truth(model_path: str, rows: dict[str, list]) -> dict[str, np.ndarray]:
    """Per-example, unpadded float64 log-probs and completion lengths (tests/plugins/models.reference_pair)."""
    model64 = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64).eval()
    found = [reference_pair(model64, p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in token_ids(model_path, rows)]
    names = ("chosen_logps", "rejected_logps", "chosen_num_tokens", "rejected_num_tokens")
    return {name: np.array([row[name] for row in found]) for name in names}


def by_hand(policy: dict[str, np.ndarray], ref: dict[str, np.ndarray], alpha: np.ndarray) -> dict:
    """Every accuracy of the paper from its definitions, in numpy (docs/scores.md §4.1–4.6); flags: [n] or [B, n]."""
    c, r, ref_c, ref_r = policy["chosen_logps"], policy["rejected_logps"], ref["chosen_logps"], ref["rejected_logps"]
    tie = alpha == 0.5  # the raters split evenly: correct when the two log-probs are within 0.01 (Def. C.1)
    sign = np.where(alpha > 0.5, 1.0, -1.0)  # +1 where the raters prefer chosen
    a = np.minimum(np.maximum(alpha, 1 - alpha), 0.999)
    log_odds = np.log(a / (1 - a))
    reward_gap = (c - ref_c) - (r - ref_r)  # β · this is r(chosen) - r(rejected)
    reference_wrong = ~tie & (sign * (ref_c - ref_r) < 0)
    return {
        "correct": c >= r,
        "length_normalized_correct": c / policy["chosen_num_tokens"] >= r / policy["rejected_num_tokens"],
        "ref_correct": ref_c >= ref_r,
        "ref_length_normalized_correct": ref_c / ref["chosen_num_tokens"] >= ref_r / ref["rejected_num_tokens"],
        "directed_correct": np.where(tie, np.abs(c - r) < 0.01, sign * (c - r) >= 0),
        "idealized_correct": np.where(tie, np.abs(ref_c - ref_r) < 0.01, sign * (ref_c - ref_r) + log_odds / BETAS > 0),
        "reward_correct": np.where(tie, np.abs(BETAS * reward_gap) < 0.01, sign * reward_gap > 0),
        "reference_wrong": reference_wrong,
        "flip_loss_threshold_median": np.median(np.log1p(np.exp(-BETAS * np.abs(ref_c - ref_r)[reference_wrong])), 1),
        "listwise_correct": np.where(tie, c == r, sign * (c - r) > 0),
    }


@pytest.fixture(scope="module")
def scored_pairs(tiny_model, ref_model):
    """N synthetic pairs with α, scored by CHESScorer (policy) and LogProbScorer (reference); the float64 truth."""
    rows = with_alpha(synthetic_pairs(N, seed=3))
    scored = CHESScorer(tiny_model).map(Dataset.from_dict(rows))
    scored = LogProbScorer(ref_model, column_prefix="ref_").map(scored)
    policy, ref = float64_truth(tiny_model, rows), float64_truth(ref_model, rows)
    alpha = np.asarray(rows["alpha"])
    # the float32 scores decide every pair as the float64 truth does (no pair sits on a threshold)
    as_scored = [{name: np.asarray(scored[prefix + name][:]) for name in truth} for prefix, truth in
                 (("", policy), ("ref_", ref))]
    for name, flags in by_hand(*as_scored, alpha).items():
        if flags.dtype == bool:
            assert np.array_equal(flags, by_hand(policy, ref, alpha)[name]), f"{name}: a near-tie; change the seed"
    return scored, policy, ref, alpha


def test_scorer_columns_equal_the_float64_reference(scored_pairs):
    scored, policy, ref, _ = scored_pairs
    for prefix, truth in (("", policy), ("ref_", ref)):
        for name in ("chosen_logps", "rejected_logps"):
            np.testing.assert_allclose(scored[prefix + name][:], truth[name], rtol=1e-5)
        for name in ("chosen_num_tokens", "rejected_num_tokens"):
            assert scored[prefix + name][:] == truth[name].tolist()
    assert not np.allclose(policy["chosen_logps"], ref["chosen_logps"], rtol=1e-2)  # two different models


@pytest.mark.parametrize("config_name", ["default", "length_normalized", "idealized", "listwise"])
def test_metric_on_scored_pairs_equals_accuracies_by_hand(scored_pairs, config_name, tmp_path):
    scored, policy, ref, alpha = scored_pairs
    expected = by_hand(policy, ref, alpha)
    col = {name: scored[name][:] for name in scored.column_names}
    metric = evaluate.load(str(METRIC_DIR), config_name=config_name, cache_dir=str(tmp_path))
    logps = {"chosen_logps": col["chosen_logps"], "rejected_logps": col["rejected_logps"]}
    if config_name == "default":
        result = metric.compute(**logps)
        assert result["ranking_accuracy"] == expected["correct"].mean()
    elif config_name == "length_normalized":
        result = metric.compute(**logps, chosen_num_tokens=col["chosen_num_tokens"],
                                rejected_num_tokens=col["rejected_num_tokens"])
        assert result["ranking_accuracy"] == expected["correct"].mean()
        assert result["length_normalized_ranking_accuracy"] == expected["length_normalized_correct"].mean()
    elif config_name == "idealized":
        result = metric.compute(**logps, ref_chosen_logps=col["ref_chosen_logps"],
                                ref_rejected_logps=col["ref_rejected_logps"], preference_probs=col["alpha"])
        ideal = expected["idealized_correct"].mean(axis=1)
        assert result["ranking_accuracy"] == expected["directed_correct"].mean()
        assert result["idealized_ranking_accuracy"] == ideal.tolist()
        assert result["alignment_gap"] == pytest.approx(np.median(ideal) - expected["directed_correct"].mean())
        assert result["reward_accuracy"] == expected["reward_correct"].mean(axis=1).tolist()
        assert result["num_reference_wrong"] == expected["reference_wrong"].sum()
        np.testing.assert_allclose(result["flip_loss_threshold_median"], expected["flip_loss_threshold_median"],
                                   rtol=1e-4)
    else:
        result = metric.compute(logps=[[c, r] for c, r in zip(col["chosen_logps"], col["rejected_logps"])],
                                scores=[[a, 1 - a] for a in col["alpha"]])
        assert result["ranking_accuracy"] == expected["listwise_correct"].mean()
    assert 0 < result["ranking_accuracy"] < 1  # the data exercise both outcomes


def test_report_results_equal_accuracies_by_hand(scored_pairs):
    scored, policy, ref, alpha = scored_pairs
    expected = by_hand(policy, ref, alpha)
    results, per_example = compute_results(scored, reference=True, preference_column="alpha",
                                           options=RankingOptions(n_resamples=200))
    assert results["num_pairs"] == N
    for block, prefix in (("policy", ""), ("reference", "ref_")):
        assert results[block]["ranking_accuracy"] == expected[prefix + "correct"].mean()
        assert results[block]["length_normalized_ranking_accuracy"] == \
            expected[prefix + "length_normalized_correct"].mean()
        for name in ("correct", "length_normalized_correct"):
            assert per_example[prefix + name] == expected[prefix + name].tolist()
    assert results["reward"]["reward_accuracy"] == expected["reward_correct"].mean(axis=1).tolist()
    assert results["idealized"]["idealized_ranking_accuracy"] == expected["idealized_correct"].mean(axis=1).tolist()
    assert results["idealized"]["ranking_accuracy"] == expected["directed_correct"].mean()
    assert per_example["reward_correct"] == expected["reward_correct"].T.tolist()  # [pair][β]
    assert per_example["idealized_correct"] == expected["idealized_correct"].T.tolist()
    c = np.asarray(scored["ref_rejected_logps"][:]) - np.asarray(scored["ref_chosen_logps"][:])
    np.testing.assert_allclose(per_example["reference_log_ratio"], np.where(alpha >= 0.5, 1, -1) * c, rtol=1e-12)
    assert set(results) == {"num_pairs", "policy", "reference", "reward", "idealized"}

    # without α: the reward block alone, every pair taken as preferred by all raters
    results, per_example = compute_results(scored, reference=True, options=RankingOptions(n_resamples=200))
    assert set(results) == {"num_pairs", "policy", "reference", "reward"}
    strict = (policy["chosen_logps"] - ref["chosen_logps"]) > (policy["rejected_logps"] - ref["rejected_logps"])
    assert results["reward"]["reward_accuracy"] == [strict.mean()] * len(DEFAULT_BETAS)


# ----------------------------------------------------------------------------------------------------------------------
# Left padding (docs/scores.md §5.1)


def official_mask_positions(tokenizer, prompt_ids: list[list[int]], full_ids: list[list[int]], side: str) -> list:
    """Text positions the official `compute_ppl` scores: the prompt tokenized alone and padded to the batch length,
    its attention mask flipped, ANDed with the attention mask of prompt + response, all padded on ``side``."""
    tokenizer.padding_side = side
    full = tokenizer.pad({"input_ids": full_ids}, padding="longest", return_tensors="pt")
    width = full["input_ids"].shape[1]
    prompt = tokenizer.pad({"input_ids": prompt_ids}, padding="max_length", max_length=width, return_tensors="pt")
    mask = (1 - prompt["attention_mask"]) * full["attention_mask"]  # [B, L] the official "response" mask
    starts = [width - len(ids) if side == "left" else 0 for ids in full_ids]  # where each text begins
    return [(torch.nonzero(row).ravel() - start).tolist() for row, start in zip(mask, starts)]


def summed_logps(model64, ids: list[int], positions: list[int]) -> float:
    """Σ log p(ids[t] | ids[:t]) over ``positions`` from one unpadded float64 forward (t = 0 has no prefix)."""
    with torch.no_grad():
        logps = torch.log_softmax(model64(input_ids=torch.tensor([ids])).logits[0].double(), -1)  # [L, V]
    return float(sum(logps[t - 1, ids[t]] for t in positions if t > 0))


def test_long_prompts_in_one_batch_score_only_the_completion(tiny_model):
    rows = synthetic_pairs(4, seed=7, prompt_words=(250, 400), answer_words=(1, 3))
    pairs = token_ids(tiny_model, rows)
    prompts = [p.prompt_ids for p in pairs] * 2
    fulls = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    lengths = [len(ids) for ids in fulls]
    assert min(len(ids) for ids in prompts) > 200 and max(n - len(p) for n, p in zip(lengths, prompts)) <= 8
    assert len(set(lengths)) > 1 and len(list(pack(longest_first(lengths), lengths.__getitem__, 16384))) == 1  # one padded batch

    scored = LogProbScorer(tiny_model, token_budget=16384).map(Dataset.from_dict(rows), batch_size=4)
    ours = np.concatenate([scored["chosen_logps"][:], scored["rejected_logps"][:]])
    counts = scored["chosen_num_tokens"][:] + scored["rejected_num_tokens"][:]
    assert counts == [n - len(p) for n, p in zip(lengths, prompts)]

    model64 = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    completion = [list(range(len(p), n)) for p, n in zip(prompts, lengths)]
    truth = [summed_logps(model64, ids, t) for ids, t in zip(fulls, completion)]
    np.testing.assert_allclose(ours, truth, rtol=1e-5)

    # The official mask, right-padded, selects the completion: the emulation is faithful.
    assert official_mask_positions(tokenizer, prompts, fulls, "right") == completion
    # Left-padded, as the official code runs it, it selects the first n_full - n_prompt tokens of the text: prompt.
    wrong = official_mask_positions(tokenizer, prompts, fulls, "left")
    assert wrong == [list(range(len(t))) for t in completion]
    assert all(max(w) < len(p) for w, p in zip(wrong, prompts))
    wrong_logps = np.array([summed_logps(model64, ids, t) for ids, t in zip(fulls, wrong)])
    assert np.abs(ours - wrong_logps).min() > 1.0  # a scorer with that bug would fail the comparison above


# ----------------------------------------------------------------------------------------------------------------------
# The script


def run_script(*args: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run hub_scripts/ranking_accuracy_report.py as `python ranking_accuracy_report.py ARGS` does, in this process."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    runpy.run_path(str(SCRIPT), run_name="__main__")


def test_script_offline_then_pushes_the_same_report(hub_env, tiny_model, ref_model, tmp_path, monkeypatch, capsys):
    data = tmp_path / "pairs.jsonl"
    rows = with_alpha(synthetic_pairs(24, seed=5), seed=1)
    data.write_text("".join(json.dumps(dict(zip(rows, values))) + "\n" for values in zip(*rows.values())))
    common = ["--dataset_name", str(data), "--model_name_or_path", tiny_model, "--ref_model_name_or_path", ref_model,
              "--preference_column", "alpha", "--num_samples", "16", "--beta", "0.1", "1"]

    # offline, as a command: no Hub reachable, no token
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HOME": str(hub_env.hf_home), "HF_HUB_DISABLE_XET": "1"}
    offline = tmp_path / "offline"
    done = subprocess.run([sys.executable, str(SCRIPT), *common, "--output_dir", str(offline)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| train (16) | policy ranking accuracy |" in done.stdout
    report = json.loads((offline / REPORT_FILE).read_text())
    local = datasets.load_dataset(str(offline), split="train")

    expected_rows = np.random.default_rng(0).choice(24, 16, replace=False).tolist()  # the paper's draw
    assert local["row_index"][:] == expected_rows
    assert local["alpha"][:] == [rows["alpha"][i] for i in expected_rows]
    results = report["results"]["train"]
    assert results["num_pairs"] == 16 and report["dataset"]["num_samples"] == {"train": 16}
    assert report["policy"]["dtype"] == "float32" and report["policy"]["device"] == "cpu"  # resolved, never null
    assert report["policy"]["name_or_path"] == Path(tiny_model).name  # by folder name: the report is published
    assert report["reference"]["name_or_path"] == Path(ref_model).name and report["dataset"]["name"] == "pairs.jsonl"
    assert results["policy"]["ranking_accuracy"] == np.mean(local["correct"][:])
    assert results["reference"]["ranking_accuracy"] == np.mean(local["ref_correct"][:])
    assert results["reward"]["reward_accuracy"] == np.mean(local["reward_correct"][:], axis=0).tolist()
    assert results["idealized"]["idealized_ranking_accuracy"] == \
        np.mean(local["idealized_correct"][:], axis=0).tolist()
    assert results["idealized"]["beta"] == [0.1, 1.0]

    # the same run with --push_to_hub, to the loopback Hub
    repo_id = hub_env.repo_id("ranking-accuracy")
    run_script(*common, "--push_to_hub", "--repo_id", repo_id, monkeypatch=monkeypatch)
    assert "| train (16) | alignment gap" in capsys.readouterr().out
    config_name = run_name(tiny_model)
    pushed = json.loads(Path(hf_hub_download(repo_id, f"{config_name}/{REPORT_FILE}", repo_type="dataset")).read_text())
    assert pushed == report
    remote = datasets.load_dataset(repo_id, config_name, split="train")
    assert remote.column_names == local.column_names
    assert remote.to_dict() == local.to_dict()


def test_script_refuses_bad_arguments_before_scoring(tiny_model, tmp_path, monkeypatch, capsys):
    data = tmp_path / "pairs.jsonl"
    rows = synthetic_pairs(3) | {"alpha": [0.5, 1.5, 1.0]}
    data.write_text("".join(json.dumps(dict(zip(rows, values))) + "\n" for values in zip(*rows.values())))
    cases = {
        ("--preference_column", "alpha"): "needs --ref_model_name_or_path too",
        ("--preference_column", "alpha", "--ref_model_name_or_path", tiny_model):
            "split 'train': alpha[1]: expected a share of raters in [0, 1], found 1.5",
        ("--preference_column", "votes", "--ref_model_name_or_path", tiny_model): "no column 'votes'",
        ("--num_samples", "0"): "--num_samples: expected an integer >= 1, found 0",
        ("--push_to_hub",): "--push_to_hub needs --repo_id",
    }
    for extra, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            run_script("--dataset_name", str(data), "--model_name_or_path", tiny_model, *extra, monkeypatch=monkeypatch)
        assert exit_info.value.code == 1
        assert message in capsys.readouterr().err


def script_error(capsys, monkeypatch, *argv: str) -> str:
    """The one line the report script exits with (status 1), checking that nothing else was printed."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_script(*argv, monkeypatch=monkeypatch)
    assert exit_info.value.code == 1
    return error_line(capsys.readouterr().err)


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    data = tmp_path / "pairs.jsonl"
    rows = synthetic_pairs(6, seed=4)
    data.write_text("".join(json.dumps(dict(zip(rows, values))) + "\n" for values in zip(*rows.values())))
    return data


def test_script_checks_the_hub_and_the_models_before_scoring(hub_env, pairs_file, tiny_model, tmp_path, monkeypatch,
                                                             capsys):
    """Issue 15: another user's namespace was scored first, then refused with a 9-frame traceback; a missing model
    path gave an 83-line traceback; a non-empty unrelated --output_dir was written into."""
    def never(*args, **kwargs):
        raise AssertionError("scored before the checks")

    monkeypatch.setattr(LogProbScorer, "map", never)
    data = ["--dataset_name", str(pairs_file)]
    assert script_error(capsys, monkeypatch, *data, "--model_name_or_path", tiny_model, "--push_to_hub",
                        "--repo_id", "other-user/ranking-accuracy") == (
        "ranking_accuracy_report.py: error: --repo_id other-user/ranking-accuracy: the token of 'hf-ches-user' can "
        "write only to ['hf-ches-user']; use a repo there (e.g. hf-ches-user/ranking-accuracy) or a token of "
        "'other-user'")
    assert script_error(capsys, monkeypatch, *data, "--model_name_or_path", tiny_model, "--ref_model_name_or_path",
                        "./models/no_such_model") == (
        "ranking_accuracy_report.py: error: model './models/no_such_model': no such file or folder; pass an existing "
        "model folder, a .gguf file, a Hub id (namespace/name) or one of 'smollm2', 'gemma3-270m'")
    (tmp_path / "notes.txt").write_text("mine")
    assert script_error(capsys, monkeypatch, *data, "--model_name_or_path", tiny_model, "--output_dir",
                        str(tmp_path)) == (
        f"ranking_accuracy_report.py: error: output_dir {str(tmp_path)!r} is not empty and holds no hf-ches output; "
        "choose a new or empty folder")


def test_script_keeps_the_scores_when_the_push_fails(hub_env, pairs_file, tiny_model, monkeypatch, capsys):
    """Issue 15: the per-pair scores were lost when the push failed; `num_samples` above the rows was recorded as
    asked, without a warning; a bare --repo_id goes to the token's user. The push fails for real on the loopback
    Hub: --private asks for a private repo, and the repo exists and is public (refused by the one push helper)."""
    bare = hub_env.repo_id("ranking-accuracy").split("/")[1]
    HfApi().create_repo(f"{hub_env.user}/{bare}", repo_type="dataset")  # public, and empty: check_target lets it be
    with pytest.raises(SystemExit):
        run_script("--dataset_name", str(pairs_file), "--model_name_or_path", tiny_model, "--num_samples", "1000",
                   "--push_to_hub", "--repo_id", bare, "--private", monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    assert "warning: split 'train' has 6 rows, fewer than --num_samples 1000: using all of them" in err
    message = error_line(err)
    prefix = (f"ranking_accuracy_report.py: error: pushing to {hub_env.user}/{bare} failed ({hub_env.user}/{bare} "
              "already exists and is public, but private=True was asked: make it private on the Hub first, or push "
              "without --private); the report and the per-pair scores are kept in ")
    assert message.startswith(prefix)
    kept = Path(message.removeprefix(prefix))
    report = json.loads((kept / REPORT_FILE).read_text())
    assert report["dataset"]["num_samples"] == {"train": 6} and report["dataset"]["num_samples_requested"] == 1000
    assert len(datasets.load_dataset("parquet", data_files=str(kept / "train.parquet"), split="train")) == 6
    assert HfApi().list_repo_files(f"{hub_env.user}/{bare}", repo_type="dataset") == [".gitattributes"]


def test_report_push_is_the_one_push_helper(hub_env):
    """The report's push is `hf_ches.hub.push_repo`, as a publication's: a Hub error is a `PublishError` that names
    the step and never holds the token (it used to be the raw HTTP error), and --create_pr / --revision apply."""
    report = build_report({"train": {"num_pairs": 1}}, dataset={"name": "pairs", "config": None},
                          policy={"name_or_path": "m"})
    per_example = datasets.DatasetDict({"train": Dataset.from_dict({"correct": [True]})})
    repo_id = hub_env.repo_id("reports")
    bad = "hf_not_a_real_token_5e4d3c"
    with pytest.raises(PublishError) as error:
        push_report(report, per_example, PublishOptions(repo_id, token=bad), "m")
    assert str(error.value).startswith(f"creating the dataset repo {repo_id}: the Hub at {hub_env.endpoint} refused "
                                       "the token (401)")
    assert_no_token(error, bad)

    pushed = push_report(report, per_example, PublishOptions(repo_id, create_pr=True, commit_message="r"), "m")
    assert pushed.revision.startswith("refs/pr/") and pushed.pr_url and pushed.files == [f"m/{REPORT_FILE}"]
    api = HfApi()
    assert f"m/{REPORT_FILE}" not in api.list_repo_files(repo_id, repo_type="dataset")  # main is untouched
    assert f"m/{REPORT_FILE}" in api.list_repo_files(repo_id, repo_type="dataset", revision=pushed.revision)


def test_script_leaves_unscorable_pairs_out_with_on_invalid_flag(tiny_model, tmp_path, monkeypatch, capsys):
    """The report has the scoring group's --on_invalid: 'raise' (the default) stops on a pair it cannot read; 'flag'
    leaves that pair out of the accuracies and counts it."""
    rows = synthetic_pairs(6, seed=7)
    rows["chosen"][2] = None
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(dict(zip(rows, values))) + "\n" for values in zip(*rows.values())))
    common = ["--dataset_name", str(data), "--model_name_or_path", tiny_model]
    assert "row 2, column 'chosen'" in script_error(capsys, monkeypatch, *common)
    run_script(*common, "--on_invalid", "flag", "--output_dir", str(tmp_path / "out"), monkeypatch=monkeypatch)
    assert "split 'train': 1 unscorable pairs left out (--on_invalid flag)" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert report["dataset"]["num_unscorable"] == {"train": 1} and report["results"]["train"]["num_pairs"] == 5
    assert report["scoring"]["on_invalid"] == "flag"
    assert 2 not in datasets.load_dataset(str(tmp_path / "out"), split="train")["row_index"][:]


def test_script_resumes_from_its_chunks(tiny_model, ref_model, tmp_path, monkeypatch):
    """Each model scores the sampled rows in chunks kept in the datasets cache: the same command run again scores
    nothing and writes the same report; a chunk lost (an interrupted run) is all it scores again."""
    import hf_ches.transform
    from datasets import config

    from hf_ches.runner import CACHE_DIR_NAME

    rows = synthetic_pairs(10, seed=8)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(dict(zip(rows, values))) + "\n" for values in zip(*rows.values())))
    seen, call = [], hf_ches.transform.CHESScorer.__call__

    def counting(self, batch, *args, **kwargs):
        seen.append(len(batch["chosen"]))
        return call(self, batch, *args, **kwargs)

    monkeypatch.setattr(hf_ches.transform.CHESScorer, "__call__", counting)
    common = ["--dataset_name", str(data), "--model_name_or_path", tiny_model, "--ref_model_name_or_path", ref_model,
              "--num_samples", "8", "--chunk_size", "4", "--output_dir", str(tmp_path / "out")]
    cache = Path(config.HF_DATASETS_CACHE, CACHE_DIR_NAME)
    before = set(cache.glob("*"))
    run_script(*common, monkeypatch=monkeypatch)
    first = (tmp_path / "out" / REPORT_FILE).read_text()
    assert seen == [4, 4, 4, 4]  # two chunks per model
    folders = sorted(set(cache.glob("*")) - before)
    assert [len(list(folder.glob("chunk-*.arrow"))) for folder in folders] == [2, 2]  # the policy's, the reference's
    seen.clear()
    run_script(*common, "--overwrite", monkeypatch=monkeypatch)  # its earlier report is replaced only when asked
    assert seen == [] and (tmp_path / "out" / REPORT_FILE).read_text() == first
    (folders[0] / "chunk-00001-of-00002.arrow").unlink()
    run_script(*common, "--overwrite", monkeypatch=monkeypatch)
    assert seen == [4] and (tmp_path / "out" / REPORT_FILE).read_text() == first
