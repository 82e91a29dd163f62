"""Publishing (hf_ches/hub.py) over HTTP to the loopback Hub: configs, card, dry run, updates, PRs, privacy, errors."""

from __future__ import annotations

from functools import partial

import json
import socket

import datasets
import numpy as np
import pytest
import yaml
from datasets import Dataset, DatasetDict
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import RepositoryNotFoundError

from hf_ches.card import PLOT_PATH, RUN_JSON_PATH, RunInfo, loading_code
from hf_ches.filtering import SelectionRule, select_splits
from hf_ches import outputs
from hf_ches.hub import PublishError, PublishOptions, build_publication, publish
from tests.plugins.hub import assert_no_token

ln_rule = partial(SelectionRule, score_column="ln_ches")  # these tests select by the ln_ches column


def scored_pairs(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=n)
    scores[::17] = np.nan  # unscorable rows go to `removed`
    return Dataset.from_dict({"prompt": [f"q{seed}-{i}" for i in range(n)], "chosen": [f" yes {i}" for i in range(n)],
                              "rejected": [f" no {i}" for i in range(n)], "ln_ches": scores.tolist()})


DATA = DatasetDict({"train": scored_pairs(60, 0), "test": scored_pairs(20, 1)})
CLEAN = DatasetDict({split: ds.filter(lambda row: row["ln_ches"] == row["ln_ches"]) for split, ds in DATA.items()})


def publication(repo_id: str, rule: SelectionRule = ln_rule(remove_top=0.1), data: DatasetDict = DATA,
                examples: int = 5):
    info = RunInfo(source_dataset="local/prefs", rule=rule, command=f"hf-ches publish --repo_id {repo_id}")
    return build_publication(repo_id, info, select_splits(data, rule), examples=examples)


def readme(repo_id: str, revision: str | None = None) -> tuple[dict, str]:
    text = open(hf_hub_download(repo_id, "README.md", repo_type="dataset", revision=revision)).read()
    _, head, body = text.split("---\n", 2)
    return yaml.safe_load(head), body


def repo_files(repo_id: str, revision: str | None = None) -> list[str]:
    files = HfApi().list_repo_files(repo_id, repo_type="dataset", revision=revision)
    return sorted(f for f in files if f != ".gitattributes")  # made by the Hub at creation, not by the push


def rows(dataset_dict) -> str:
    """The rows of every split as JSON (NaN scores compare equal as ``NaN`` text)."""
    return json.dumps({split: ds.to_list() for split, ds in dataset_dict.items()})


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def dry_run(folder, pub, overwrite: bool = False) -> list[str]:
    """``pub``'s dry run into ``folder``, as ``hf-ches filter`` writes it."""
    return outputs.write(folder, "hf-ches filter", "org/prefs", pub.local_files(), overwrite=overwrite)


def written(folder) -> list[str]:
    """The files under ``folder`` but its `hf_ches.outputs` record."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != outputs.MARKER)


def test_push_creates_the_files_of_the_dry_run(hub_env, tmp_path):
    repo_id = hub_env.repo_id("clean")
    pub = publication(repo_id)
    dry = dry_run(tmp_path / "dry", pub)
    result = publish(pub, PublishOptions(repo_id))

    assert repo_files(repo_id) == dry == result.files == pub.paths()
    assert written(tmp_path / "dry") == dry
    assert {"README.md", PLOT_PATH, RUN_JSON_PATH, "data/train-00000-of-00001.parquet",
            "removed/test-00000-of-00001.parquet", "scored/train-00000-of-00001.parquet"} <= set(dry)
    for path in (PLOT_PATH, RUN_JSON_PATH):
        assert open(hf_hub_download(repo_id, path, repo_type="dataset"), "rb").read() == (tmp_path / "dry" / path).read_bytes()
    # the pushed README is the dry run's plus the dataset_info that push_to_hub measured, and it loads by repo id
    meta, body = readme(repo_id)
    _, dry_head, dry_body = (tmp_path / "dry" / "README.md").read_text().split("---\n", 2)
    layout = {config: ["train", "test"] for config in ("default", "removed", "scored")}
    local, hub = ("\n".join(loading_code(repo_id, layout, local)) for local in (True, False))
    assert local in dry_body
    assert body == dry_body.replace(local, hub) and {k: v for k, v in meta.items() if k != "dataset_info"} == yaml.safe_load(dry_head)
    assert {info["config_name"]: {s["name"]: s["num_examples"] for s in info["splits"]} for info in meta["dataset_info"]} \
        == {"default": {"train": 50, "test": 16}, "removed": {"train": 10, "test": 4}, "scored": {"train": 60, "test": 20}}
    # the Hub repo and the local folder load the same, config by config
    for config in ("default", "removed", "scored"):
        assert rows(datasets.load_dataset(repo_id, config)) == rows(datasets.load_dataset(str(tmp_path / "dry"), config))
    removed = datasets.load_dataset(repo_id, "removed")["train"]
    assert removed["removal_reason"].count("nan_score") == 4  # rows 0, 17, 34, 51


def test_pushing_again_updates_the_repo(hub_env):
    repo_id = hub_env.repo_id("update")
    publish(publication(repo_id, ln_rule(remove_top=0.1)), PublishOptions(repo_id))
    before = HfApi().dataset_info(repo_id).sha

    publish(publication(repo_id, ln_rule(threshold=0.0)), PublishOptions(repo_id))
    meta, body = readme(repo_id)
    assert HfApi().dataset_info(repo_id).sha != before
    assert meta["hf_ches"]["selection"]["rule"] == "threshold"
    kept = {split: int(np.sum(np.array(ds["ln_ches"], dtype=float) <= 0.0)) for split, ds in DATA.items()}
    assert {s: r["num_kept"] for s, r in meta["hf_ches"]["splits"].items()} == kept != {"train": 50, "test": 16}
    assert {split: len(ds) for split, ds in datasets.load_dataset(repo_id).items()} == kept

    # nothing removed now (no NaN score either): the `removed` config and its shards are gone, not left stale
    publish(publication(repo_id, ln_rule(threshold=100.0), CLEAN), PublishOptions(repo_id))
    meta, body = readme(repo_id)
    assert [c["config_name"] for c in meta["configs"]] == ["default", "scored"]
    assert [i["config_name"] for i in meta["dataset_info"]] == ["default", "scored"]
    assert not any(f.startswith("removed/") for f in repo_files(repo_id))
    assert "`removed` (not published: no rows)" in body

    # asking for privacy on an existing public repo is refused, and nothing is pushed
    before = HfApi().dataset_info(repo_id).sha
    with pytest.raises(PublishError, match="already exists and is public"):
        publish(publication(repo_id, ln_rule(threshold=0.0)), PublishOptions(repo_id, private=True))
    assert HfApi().dataset_info(repo_id).sha == before


def test_create_pr_puts_all_commits_in_one_pull_request(hub_env):
    repo_id = hub_env.repo_id("pr")
    publish(publication(repo_id, ln_rule(remove_top=0.1)), PublishOptions(repo_id))
    result = publish(publication(repo_id, ln_rule(keep_bottom=0.5)), PublishOptions(repo_id, create_pr=True))

    assert result.revision == "refs/pr/1" and result.pr_url.endswith("/discussions/1")
    refs = HfApi().list_repo_refs(repo_id, repo_type="dataset", include_pull_requests=True)
    assert [pr.ref for pr in refs.pull_requests] == ["refs/pr/1"]
    assert readme(repo_id)[0]["hf_ches"]["selection"]["rule"] == "remove_top"  # main untouched
    assert readme(repo_id, "refs/pr/1")[0]["hf_ches"]["selection"]["rule"] == "keep_bottom"
    assert len(datasets.load_dataset(repo_id, split="train", revision="refs/pr/1")) == 28  # half of 56 scored rows


def test_create_pr_when_only_the_card_changes(hub_env):
    repo_id = hub_env.repo_id("pr-card")
    publish(publication(repo_id), PublishOptions(repo_id))
    main_sha = HfApi().dataset_info(repo_id).sha
    result = publish(publication(repo_id, examples=2), PublishOptions(repo_id, create_pr=True))  # same data

    assert result.revision == "refs/pr/1" and HfApi().dataset_info(repo_id).sha == main_sha
    titles = [c.title for c in HfApi().list_repo_commits(repo_id, repo_type="dataset", revision="refs/pr/1")]
    assert titles[:2] == ["Publish CHES-filtered preference pairs (hf-ches)"] * 2  # the card commit, on main's card
    assert readme(repo_id, "refs/pr/1")[1].count("| 0.") + readme(repo_id, "refs/pr/1")[1].count("| 1.") \
        < readme(repo_id)[1].count("| 0.") + readme(repo_id)[1].count("| 1.")  # fewer example rows


def test_push_to_a_branch(hub_env):
    repo_id = hub_env.repo_id("branch")
    result = publish(publication(repo_id), PublishOptions(repo_id, revision="dev", commit_message="CHES v1"))
    assert result.revision == "dev" and repo_files(repo_id) == []
    assert repo_files(repo_id, "dev") == result.files
    titles = [c.title for c in HfApi().list_repo_commits(repo_id, repo_type="dataset", revision="dev")]
    assert titles[0] == "CHES v1" and "CHES v1 (removed config)" in titles


def test_private_repo_needs_the_token(hub_env):
    repo_id = hub_env.repo_id("private")
    publish(publication(repo_id), PublishOptions(repo_id, private=True))

    with pytest.raises((datasets.exceptions.DatasetNotFoundError, RepositoryNotFoundError)):
        datasets.load_dataset(repo_id, token=False)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).dataset_info(repo_id)
    assert len(datasets.load_dataset(repo_id, "removed", token=hub_env.token)["train"]) == 10


def test_token_errors_are_clear_and_never_show_the_token(hub_env, monkeypatch):
    repo_id = hub_env.repo_id("tokens")
    pub = publication(repo_id)
    bad = "hf_not_a_real_token_9f8e7d"
    with pytest.raises(PublishError) as error:
        publish(pub, PublishOptions(repo_id, token=bad))
    assert "checking the token: the Hub at" in str(error.value) and "refused the token (401)" in str(error.value)
    assert_no_token(error, bad)

    with pytest.raises(PublishError, match="the token of 'hf-ches-user' is read-only"):
        publish(pub, PublishOptions(repo_id, token="hf_reader"))
    with pytest.raises(PublishError) as error:
        publish(pub, PublishOptions(repo_id, token="hf_other"))  # another user, our namespace
    # refused before anything is created (issue 15: it used to be scored first, then refused with 403)
    assert str(error.value) == (f"--repo_id {repo_id}: the token of 'other-user' can write only to ['other-user']; "
                                f"use a repo there (e.g. other-user/{repo_id.split('/')[1]}) or a token of "
                                "'hf-ches-user'")
    assert_no_token(error, "hf_other")

    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PublishError, match="no Hugging Face token: set HF_TOKEN, run `hf auth login`"):
        publish(pub, PublishOptions(repo_id))
    with pytest.raises(RepositoryNotFoundError):  # nothing was created by any of the above
        HfApi(token=hub_env.token).dataset_info(repo_id)


def test_unreachable_endpoint(hub_env, monkeypatch):
    import huggingface_hub.constants

    url = closed_port_url()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
    with pytest.raises(PublishError) as error:
        publish(publication("me/x"), PublishOptions("me/x", token="hf_secret_for_unreachable"))
    assert str(error.value).startswith(f"checking the token: cannot reach the Hub at {url} (")
    assert_no_token(error, "hf_secret_for_unreachable")


def test_dry_run_folder_must_be_new_empty_or_an_earlier_output(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not empty and holds no hf-ches output"):
        dry_run(tmp_path / "mine", publication("me/x"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        outputs.check(tmp_path / "file", "hf-ches filter")

    first = dry_run(tmp_path / "out", publication("me/x"))
    with pytest.raises(ValueError, match="holds an earlier `hf-ches filter` output .*pass --overwrite"):
        dry_run(tmp_path / "out", publication("me/x"))
    second = dry_run(tmp_path / "out", publication("me/x", ln_rule(threshold=100.0), CLEAN), overwrite=True)
    assert any(f.startswith("removed/") for f in first) and not any(f.startswith("removed/") for f in second)
    assert written(tmp_path / "out") == second
