"""Real round trips with huggingface_hub and datasets against the loopback Hub (hf_ches/testing/hub_server.py),
over HTTP."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import threading
import urllib.error
import urllib.request

import datasets
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    DatasetCard,
    HfApi,
    hf_hub_download,
)
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from PIL import Image

from hf_ches.testing.hub_server import HubServer, parse_token_spec


def pairs(n: int, tag: str = "") -> datasets.Dataset:
    return datasets.Dataset.from_dict({
        "prompt": [f"question {i}{tag}" for i in range(n)],
        "chosen": [f"good answer {i}" for i in range(n)],
        "rejected": [f"bad answer {i}" for i in range(n)],
        "ches": [float(i) / 2 for i in range(n)],
    })


def rows(dataset_dict: datasets.DatasetDict) -> dict[str, dict[str, list]]:
    return {split: dataset_dict[split].to_dict() for split in dataset_dict}


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (3, 2), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_push_two_configs_and_card_then_load_each(hub_env):
    repo_id = hub_env.repo_id("prefs")
    kept = datasets.DatasetDict({"train": pairs(4), "test": pairs(2, "t")})
    removed = datasets.DatasetDict({"train": pairs(3, "r")})
    kept.push_to_hub(repo_id)
    removed.push_to_hub(repo_id, config_name="removed")

    card = DatasetCard.load(repo_id, repo_type="dataset")
    card.text = "# Cleaned preference pairs\n\nFiltered by CHES.\n"
    card.push_to_hub(repo_id, repo_type="dataset")

    assert rows(datasets.load_dataset(repo_id)) == rows(kept)
    assert rows(datasets.load_dataset(repo_id, "removed")) == rows(removed)
    readme = open(hf_hub_download(repo_id, "README.md", repo_type="dataset")).read()
    assert "Filtered by CHES." in readme and "config_name: removed" in readme
    files = HfApi().list_repo_files(repo_id, repo_type="dataset")
    assert any(f.startswith("data/train-") for f in files) and any(f.startswith("removed/train-") for f in files)


def test_upload_png_then_download_and_list(hub_env):
    api = HfApi()
    repo_id = api.create_repo(hub_env.repo_id("files"), repo_type="dataset").repo_id
    image = png_bytes()
    api.upload_file(path_or_fileobj=image, path_in_repo="plots/ches.png", repo_id=repo_id, repo_type="dataset")

    path = hf_hub_download(repo_id, "plots/ches.png", repo_type="dataset")
    assert open(path, "rb").read() == image
    (entry,) = [e for e in api.list_repo_tree(repo_id, "plots", repo_type="dataset")]
    assert entry.path == "plots/ches.png" and entry.size == len(image) and entry.lfs is not None
    info = api.dataset_info(repo_id)
    assert info.id == repo_id and len(info.sha) == 40
    assert {s.rfilename for s in info.siblings} == {".gitattributes", "plots/ches.png"}


def test_model_repo_round_trip(hub_env):
    api = HfApi()
    repo_id = api.create_repo(hub_env.repo_id("model")).repo_id  # model URLs carry no type prefix
    api.upload_file(path_or_fileobj=b'{"hidden_size": 64}', path_in_repo="config.json", repo_id=repo_id)

    assert json.load(open(hf_hub_download(repo_id, "config.json"))) == {"hidden_size": 64}
    assert api.model_info(repo_id).id == repo_id and api.file_exists(repo_id, "config.json")
    assert not api.file_exists(repo_id, "missing.json")


def test_create_commit_adds_and_deletes_in_one_commit(hub_env):
    api = HfApi()
    repo_id = api.create_repo(hub_env.repo_id("commit"), repo_type="dataset").repo_id
    first = api.create_commit(repo_id, repo_type="dataset", commit_message="add three", operations=[
        CommitOperationAdd("a.txt", b"alpha"), CommitOperationAdd("dir/b.json", b"{}"),
        CommitOperationAdd("dir/c.bin", bytes(range(256)))])
    second = api.create_commit(repo_id, repo_type="dataset", commit_message="swap", operations=[
        CommitOperationDelete("a.txt"), CommitOperationDelete("dir/", is_folder=True),
        CommitOperationAdd("d.txt", b"delta")])

    assert first.oid != second.oid and len(second.oid) == 40
    assert sorted(api.list_repo_files(repo_id, repo_type="dataset")) == [".gitattributes", "d.txt"]
    assert sorted(api.list_repo_files(repo_id, repo_type="dataset", revision=first.oid)) == [
        ".gitattributes", "a.txt", "dir/b.json", "dir/c.bin"]
    assert [c.title for c in api.list_repo_commits(repo_id, repo_type="dataset")] == [
        "swap", "add three", "initial commit"]
    with pytest.raises(HfHubHTTPError) as missing:
        api.delete_file("nope.txt", repo_id, repo_type="dataset")
    assert missing.value.response.status_code == 404


def test_private_repo_needs_the_token(hub_env):
    repo_id = hub_env.repo_id("private")
    pairs(2).push_to_hub(repo_id, private=True)

    with pytest.raises(datasets.exceptions.DatasetNotFoundError):  # before any load fills the cache
        datasets.load_dataset(repo_id, token=False)
    with pytest.raises(RepositoryNotFoundError) as anonymous:
        HfApi(token=False).dataset_info(repo_id)
    assert anonymous.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as stranger:
        HfApi(token="hf_other").dataset_info(repo_id)
    assert stranger.value.response.status_code == 404
    assert HfApi().dataset_info(repo_id).private is True
    assert datasets.load_dataset(repo_id, split="train").to_dict() == pairs(2).to_dict()


def test_bad_token_is_refused_without_echoing_it(hub_env):
    bad = "hf_not_a_real_token_123456"
    with pytest.raises(HfHubHTTPError) as error:
        HfApi(token=bad).whoami()
    assert error.value.response.status_code == 401
    assert error.value.response.headers["X-Error-Message"] == "Invalid credentials in Authorization header"
    assert bad not in str(error.value) and bad not in repr(error.value)
    with pytest.raises(HfHubHTTPError) as push_error:
        pairs(2).push_to_hub(hub_env.repo_id("bad-token"), token=bad)
    assert push_error.value.response.status_code == 401 and bad not in str(push_error.value)
    assert HfApi().whoami()["name"] == hub_env.user


def test_writing_outside_your_namespace_is_forbidden(hub_env):
    repo_id = HfApi().create_repo(hub_env.repo_id("mine"), repo_type="dataset").repo_id
    for token in ("hf_other", "hf_reader"):  # another user; the owner's read-only token
        with pytest.raises(HfHubHTTPError) as error:
            HfApi(token=token).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id,
                                           repo_type="dataset")
        assert error.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as error:
        HfApi(token="hf_other").create_repo(hub_env.repo_id("theirs"), repo_type="dataset")
    assert error.value.response.status_code == 403


def test_create_repo_exist_ok_and_conflict(hub_env):
    api = HfApi()
    repo_id = hub_env.repo_id("twice")
    url = api.create_repo(repo_id, repo_type="dataset")
    assert api.create_repo(repo_id, repo_type="dataset", exist_ok=True) == url
    with pytest.raises(HfHubHTTPError) as error:
        api.create_repo(repo_id, repo_type="dataset")
    assert error.value.response.status_code == 409


def test_pushing_again_replaces_the_data(hub_env):
    repo_id = hub_env.repo_id("update")
    pairs(5).push_to_hub(repo_id)
    first_sha = HfApi().dataset_info(repo_id).sha
    pairs(3, "v2").push_to_hub(repo_id)

    assert HfApi().dataset_info(repo_id).sha != first_sha
    assert datasets.load_dataset(repo_id, split="train").to_dict() == pairs(3, "v2").to_dict()
    shards = [f for f in HfApi().list_repo_files(repo_id, repo_type="dataset") if f.startswith("data/")]
    assert len(shards) == 1


def test_push_to_a_branch_and_as_a_pull_request(hub_env):
    api = HfApi()
    repo_id = hub_env.repo_id("revisions")
    pairs(2).push_to_hub(repo_id)
    pairs(3, "dev").push_to_hub(repo_id, revision="dev")
    pr = pairs(4, "pr").push_to_hub(repo_id, create_pr=True)

    assert pr.pr_revision == "refs/pr/1" and pr.pr_url.endswith("/discussions/1")
    load = lambda revision: datasets.load_dataset(repo_id, split="train", revision=revision).to_dict()  # noqa: E731
    assert load("main") == pairs(2).to_dict()
    assert load("dev") == pairs(3, "dev").to_dict()
    assert load("refs/pr/1") == pairs(4, "pr").to_dict()
    refs = api.list_repo_refs(repo_id, repo_type="dataset", include_pull_requests=True)
    assert {b.name for b in refs.branches} == {"main", "dev"} and [p.ref for p in refs.pull_requests] == ["refs/pr/1"]
    with pytest.raises(RevisionNotFoundError):
        api.dataset_info(repo_id, revision="no-such-branch")


def test_delete_repo(hub_env):
    api = HfApi()
    repo_id = api.create_repo(hub_env.repo_id("doomed"), repo_type="dataset").repo_id
    api.delete_repo(repo_id, repo_type="dataset")
    with pytest.raises(RepositoryNotFoundError):
        api.dataset_info(repo_id)
    api.delete_repo(repo_id, repo_type="dataset", missing_ok=True)


def test_lfs_upload_url_checks_the_content_and_is_single_use(hub_env):
    repo_id = HfApi().create_repo(hub_env.repo_id("lfs"), repo_type="dataset").repo_id
    content = b"shard bytes"
    oid = hashlib.sha256(content).hexdigest()
    connection = http.client.HTTPConnection(hub_env.endpoint.removeprefix("http://"), timeout=10)

    def call(method: str, url: str, body, **headers) -> tuple[int, bytes]:
        connection.request(method, url.removeprefix(hub_env.endpoint), body=body, headers=headers,
                           encode_chunked=not isinstance(body, bytes))
        response = connection.getresponse()
        return response.status, response.read()

    batch = json.dumps({"operation": "upload", "objects": [{"oid": oid, "size": len(content)}]}).encode()
    status, answer = call("POST", f"/datasets/{repo_id}.git/info/lfs/objects/batch", batch,
                          Authorization=f"Bearer {hub_env.token}")
    href = json.loads(answer)["objects"][0]["actions"]["upload"]["href"]
    assert status == 200 and hub_env.token not in href
    assert call("PUT", href, b"other bytes")[0] == 400  # sha256 mismatch; the URL stays valid
    assert call("PUT", href, iter([b"shard ", b"bytes"]))[0] == 200  # chunked, on the same kept-alive connection
    assert call("PUT", href, content)[0] == 403  # used up
    status, answer = call("POST", f"/datasets/{repo_id}.git/info/lfs/objects/batch", batch,
                          Authorization=f"Bearer {hub_env.token}")
    assert "actions" not in json.loads(answer)["objects"][0]  # already stored: nothing to upload


def test_unknown_route_is_logged_and_answered_404(tmp_path, capsys):
    server = HubServer(tmp_path, dict([parse_token_spec("hf_t=alice")]))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with pytest.raises(urllib.error.HTTPError) as error:
            opener.open(f"{server.url}/api/nothing-here?x=1", timeout=5)
        assert error.value.code == 404
        assert "no route for GET /api/nothing-here?x=1" in capsys.readouterr().err
        assert json.load(opener.open(f"{server.url}/health", timeout=5)) == {"status": "ok"}
    finally:
        server.shutdown()
        server.server_close()
