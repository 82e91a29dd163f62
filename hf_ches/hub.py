"""Publish a CHES selection to the Hub as one dataset repo with three configs, or write the same files locally.

A `Publication` is built offline from the selection: the data of each config (see `hf_ches.card.CONFIGS`), the
number of parquet shards of each split (so the dry run and the push name the same files), the card, the score
histogram and the run's parameters. `publish` then:

1. `check_target` (which the pipeline also calls before any work): the token (``whoami``: 401 → bad token,
   read-only → refused), the namespace (the user's or one of their orgs; a bare repo id goes to the user's), and
   what the repo holds (a publication of another source is refused without ``overwrite``); then it creates the repo
   if needed;
2. pushes each config with ``DatasetDict.push_to_hub`` (one commit each; ``push_to_hub`` deletes the config's stale
   shards and writes the config's ``configs``/``dataset_info`` into the README, keeping the rest of it);
3. reads back the ``dataset_info`` that ``push_to_hub`` measured, renders the card with it (so pushing the card last
   does not drop it, the trap of TRL's dataset scripts), and commits README, plot and run JSON together, deleting
   the shards of configs that this run no longer publishes.

Steps 1 (the repo), 2 and 3 (the commits) are `push_repo`, the one push of hf-ches: the ranking-accuracy report
pushes with it too. With ``create_pr=True`` the first commit that changes something opens a pull request and the
later ones go to it (nothing changed at all: no pull request). Errors are `PublishError`\\ s that say what failed
and never contain the token. `Publication.local_files` is the dry run (written by `hf_ches.outputs.write`),
exactly the files the push adds, at the same paths (the Hub's own ``.gitattributes`` aside), and the README without
the ``dataset_info`` block that only the push measures.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from datasets import Dataset, DatasetDict
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, DatasetCard, HfApi, get_token
from huggingface_hub.errors import (
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from tqdm.auto import tqdm

from hf_ches.card import (
    CONFIGS,
    PLOT_PATH,
    RUN_JSON_PATH,
    RunInfo,
    card_bytes,
    config_data_dir,
    config_datasets,
    histogram_bytes,
    render_card,
    run_json_bytes,
)
from hf_ches.filtering import Selection
from hf_ches.runner import progress_bars_off

logger = logging.getLogger(__name__)

README = "README.md"
DEFAULT_COMMIT_MESSAGE = "Publish CHES-filtered preference pairs (hf-ches)"
MAX_SHARD_BYTES = 500 * 1024 * 1024  # datasets' default max_shard_size
_NETWORK_LIBRARIES = ("httpx", "httpx2", "httpcore", "requests", "urllib3")


class PublishError(RuntimeError):
    """A publish step failed; the message says which and why, and never contains the token."""


@dataclass(frozen=True)
class PublishOptions:
    """Where and how to push. ``token``: default ``HF_TOKEN`` or the saved login (``hf auth login``).

    ``private`` makes a new repo private; pushing with it to an existing *public* repo is refused rather than
    publishing what was meant to stay private. Without it an existing repo keeps its visibility.
    """

    repo_id: str
    private: bool = False
    revision: str | None = None  # branch to push to (created if missing); default main
    create_pr: bool = False  # open one pull request with all the commits instead of pushing to the branch
    token: str | None = field(default=None, repr=False)
    commit_message: str = DEFAULT_COMMIT_MESSAGE
    overwrite: bool = False  # replace a publication of another source dataset (otherwise refused)


@dataclass(frozen=True)
class Publication:
    """Everything a push writes, built offline; ``card()`` renders the README (with ``dataset_info`` once known)."""

    repo_id: str
    info: RunInfo
    selections: dict[str, Selection]
    configs: dict[str, dict[str, Dataset]]
    num_shards: dict[str, dict[str, int]]
    files: dict[str, bytes]  # extra files: PLOT_PATH, RUN_JSON_PATH
    examples: int = 5

    def card(self, dataset_info: list | None = None, local: bool = False) -> DatasetCard:
        return render_card(self.repo_id, self.info, self.selections, dataset_info, self.examples, local)

    def shard_paths(self) -> list[str]:
        """Repo paths of every parquet shard, named as ``push_to_hub`` names them."""
        return [f"{config_data_dir(config)}/{split}-{i:05d}-of-{n:05d}.parquet"
                for config, splits in self.num_shards.items() for split, n in splits.items() for i in range(n)]

    def paths(self) -> list[str]:
        """Every file the push adds, sorted (the repo's ``.gitattributes``, made by the Hub, aside)."""
        return sorted([README, *self.files, *self.shard_paths()])

    def local_files(self) -> dict[str, bytes | Dataset]:
        """What the dry run writes, by repo path: each parquet shard (as ``push_to_hub`` cuts it), the card
        without the ``dataset_info`` only a push measures, and the extra files."""
        shards = {f"{config_data_dir(config)}/{split}-{i:05d}-of-{n:05d}.parquet":
                  self.configs[config][split].shard(num_shards=n, index=i, contiguous=True)
                  for config, splits in self.num_shards.items() for split, n in splits.items() for i in range(n)}
        return shards | {README: card_bytes(self.card(local=True)), **self.files}


@dataclass(frozen=True)
class PublishResult:
    repo_id: str
    revision: str  # the branch or ``refs/pr/N`` the files landed on
    commit_url: str
    pr_url: str | None
    files: list[str]


def num_shards(dataset: Dataset, max_shard_bytes: int = MAX_SHARD_BYTES) -> int:
    """Parquet shards for ``dataset``: its in-memory size over ``max_shard_bytes``, at least 1.

    >>> num_shards(Dataset.from_dict({"x": list(range(1000))}), max_shard_bytes=3000)
    3
    """
    table_rows = max(dataset.data.num_rows, 1)
    nbytes = dataset.data.nbytes * len(dataset) / table_rows  # a selected view holds len(dataset) of the table rows
    return max(1, math.ceil(nbytes / max_shard_bytes))


def build_publication(repo_id: str, info: RunInfo, selections: dict[str, Selection], examples: int = 5,
                      max_shard_bytes: int = MAX_SHARD_BYTES) -> Publication:
    """Assemble what to publish from a selection (offline; renders the histogram and the run JSON)."""
    configs = config_datasets(selections)
    return Publication(
        repo_id=repo_id, info=info, selections=selections, configs=configs,
        num_shards={config: {split: num_shards(ds, max_shard_bytes) for split, ds in splits.items()}
                    for config, splits in configs.items()},
        files={PLOT_PATH: histogram_bytes(selections, info.rule), RUN_JSON_PATH: run_json_bytes(info, selections)},
        examples=examples,
    )


@contextmanager
def quiet_writes() -> Iterator[None]:
    """While shards are written or pushed, only hf-ches' own progress bar shows: datasets' per-file bars ("Creating
    parquet from Arrow format", "Uploading the dataset shards"), huggingface_hub's per-file upload bars and
    datasets' warning "Setting num_proc from 1 back to 1", given for every one-shard split, are off. Everything is
    restored afterwards, so a caller's own settings stand."""
    from huggingface_hub.utils import disable_progress_bars as hub_bars_off

    datasets_logger = logging.getLogger("datasets")
    level = datasets_logger.level
    datasets_logger.setLevel(logging.ERROR)
    try:
        with progress_bars_off(), hub_bars_off():
            yield
    finally:
        datasets_logger.setLevel(level)


# ---- push ---------------------------------------------------------------------------------------------------------
def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "hf_***") if token else text


def _is_network_error(error: BaseException) -> bool:
    library = type(error).__module__.split(".")[0]
    return isinstance(error, (ConnectionError, TimeoutError)) or library in _NETWORK_LIBRARIES


@contextmanager
def _step(what: str, repo_id: str, endpoint: str, token: str) -> Iterator[None]:
    """Turn the Hub errors of one publish step into a `PublishError` that names the step and hides the token."""
    try:
        yield
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        server = error.server_message or str(error).splitlines()[0]
        namespace = repo_id.split("/")[0] if "/" in repo_id else "your namespace"
        hints = {401: f"the Hub at {endpoint} refused the token (401). Check HF_TOKEN, `hf auth login` or --token",
                 403: f"the token has no write access to {namespace!r} (403). Use a write token of that user or org",
                 404: f"not found (404) at {endpoint}"}
        message = f"{what}: {hints.get(status, f'HTTP {status}')}: {server}"
        raise PublishError(_redact(message, token)) from None
    except OfflineModeIsEnabled:
        raise PublishError(f"{what}: HF_HUB_OFFLINE is set; unset it to push to {endpoint}") from None
    except Exception as error:
        if not _is_network_error(error):
            raise
        message = f"{what}: cannot reach the Hub at {endpoint} ({type(error).__name__}: {error})"
        raise PublishError(_redact(message, token)) from None


def check_repo(repo_id: str, repo_type: str = "dataset", revision: str | None = None, token: str | None = None) -> None:
    """Before any work: ``repo_id`` (a ``repo_type``, ``"dataset"`` or ``"model"``) exists on the Hub at
    ``revision``. One request, no retries; raises a one-line ValueError that names what is missing, or says that
    the Hub cannot be reached and how to work from the local cache instead. With ``HF_HUB_OFFLINE`` set, nothing
    is asked (the load then reads the cache)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError

    if constants.is_offline_mode():
        return
    api = HfApi(token=token)
    try:
        api.repo_info(repo_id, repo_type=repo_type, revision=revision)
    except HFValidationError:
        raise ValueError(f"{repo_type} {repo_id!r}: not a local file or folder, nor a Hub id (namespace/name)"
                         ) from None
    except RevisionNotFoundError:
        raise ValueError(f"{repo_type} {repo_id!r}: the Hub at {api.endpoint} has no revision {revision!r}; pass an "
                         "existing branch, tag or commit") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{repo_type} {repo_id!r}: no such local file or folder, and no such {repo_type} on the Hub "
                         f"at {api.endpoint} (or it is private: pass a token that can read it)") from None
    except Exception as error:
        if not _is_network_error(error):
            raise
        raise ValueError(f"{repo_type} {repo_id!r}: cannot reach the Hub at {api.endpoint} ({type(error).__name__}); "
                         "to work offline from the local cache, set HF_HUB_OFFLINE=1") from None


def _dataset_info(api: HfApi, repo_id: str, revision: str, configs: list[str]) -> list:
    """The ``dataset_info`` entries that ``push_to_hub`` wrote into the repo's README for ``configs``."""
    path = api.hf_hub_download(repo_id, README, repo_type="dataset", revision=revision)
    found = DatasetCard.load(path).data.to_dict().get("dataset_info") or []
    found = [found] if isinstance(found, dict) else found
    return [entry for entry in found if entry.get("config_name", "default") in configs]


def run_source(record: dict) -> tuple[str, str | None]:
    """The (dataset, config) a CHES publication was made from, read from its ``ches/run.json``.

    >>> run_source({"source": {"dataset": "org/prefs", "config": None, "revision": "abc"}})
    ('org/prefs', None)
    """
    return record["source"]["dataset"], record["source"]["config"]


def check_target(repo_id: str, token: str | None, source: tuple[str, str | None], *, record_path: str = RUN_JSON_PATH,
                 record_source: Callable[[dict], tuple] = run_source, overwrite: bool = False,
                 revision: str | None = None) -> str:
    """Before any work, check where a push will go and return the full repo id.

    Who the token belongs to (``whoami``: no token, 401 and read-only tokens are refused); a bare ``repo_id`` goes
    to that user's namespace; the namespace must be the user's or one of their orgs; and an existing repo must hold
    nothing, or a record (``record_path``, JSON) of the same ``source`` as ``record_source`` reads it. Anything else
    is refused, saying what the repo holds, unless ``overwrite``. Raises `PublishError`.
    """
    token = token or get_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN, run `hf auth login`, or pass --token")
    api = HfApi(token=token)
    with _step("checking the token", repo_id, api.endpoint, token):
        who = api.whoami()
    user = who.get("name")
    if who.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise PublishError(f"the token of {user!r} is read-only; pushing needs a write token")
    repo_id = repo_id if "/" in repo_id else f"{user}/{repo_id}"
    namespace, writable = repo_id.split("/")[0], [user, *(org.get("name") for org in who.get("orgs") or [])]
    if namespace not in writable:
        raise PublishError(f"--repo_id {repo_id}: the token of {user!r} can write only to {writable}; use a repo "
                           f"there (e.g. {user}/{repo_id.split('/')[1]}) or a token of {namespace!r}")
    with _step(f"reading what {repo_id} holds", repo_id, api.endpoint, token):
        held = None if overwrite else _held_elsewhere(api, repo_id, revision, record_path, record_source, source)
    if held:
        raise PublishError(f"--repo_id {repo_id} already holds {held}; pass --overwrite to replace it, or choose "
                           "another --repo_id")
    return repo_id


def _held_elsewhere(api: HfApi, repo_id: str, revision: str | None, record_path: str,
                    record_source: Callable[[dict], tuple], source: tuple) -> str | None:
    """What ``repo_id`` holds that a push of ``source`` would replace, or None (no repo, empty, or the same source).
    A branch that does not exist yet starts from main, so main is what it holds then."""
    try:
        files = api.list_repo_files(repo_id, repo_type="dataset", revision=revision)
    except RepositoryNotFoundError:
        return None
    except RevisionNotFoundError:
        revision, files = None, api.list_repo_files(repo_id, repo_type="dataset")
    if record_path not in files:
        others = [f for f in files if f not in (".gitattributes", README)]
        return f"{len(others)} files and no {record_path} (not this kind of publication)" if others else None
    path = api.hf_hub_download(repo_id, record_path, repo_type="dataset", revision=revision)
    found = tuple(record_source(json.loads(Path(path).read_text(encoding="utf-8"))))
    if found == tuple(source):
        return None
    config = f" (config {found[1]!r})" if found[1] else ""
    return f"a publication of {found[0]!r}{config} ({record_path}), not of {source[0]!r}"


def publish(publication: Publication, options: PublishOptions) -> PublishResult:
    """Push ``publication`` to ``options.repo_id`` (see the module docstring); re-running updates the repo."""
    source = (publication.info.source_dataset, publication.info.source_config)
    repo_id = check_target(options.repo_id, options.token, source, overwrite=options.overwrite,
                           revision=options.revision)

    def card_commit(api: HfApi, repo_id: str, revision: str) -> list[CommitOperationAdd | CommitOperationDelete]:
        """README (with the ``dataset_info`` the config pushes measured), plot and run JSON; the shards of configs
        this run no longer publishes are deleted."""
        card = publication.card(_dataset_info(api, repo_id, revision, list(publication.configs)))
        expected = set(publication.paths())
        stale = [path for path in api.list_repo_files(repo_id, repo_type="dataset", revision=revision)
                 if path.split("/")[0] in {config_data_dir(c) for c in CONFIGS} and path not in expected]
        return [CommitOperationAdd(README, card_bytes(card)),
                *(CommitOperationAdd(path, content) for path, content in publication.files.items()),
                *(CommitOperationDelete(path) for path in stale)]

    pushed = push_repo(replace(options, repo_id=repo_id), publication.configs, card_commit, what="the card",
                       files=publication.paths(), num_shards=publication.num_shards)
    logger.info("Published %s to %s (%s)", ", ".join(publication.configs), pushed.repo_id, pushed.commit_url)
    return pushed


def push_repo(options: PublishOptions, configs: Mapping[str, Mapping[str, Dataset]],
              last_commit: Callable[[HfApi, str, str], list], *, what: str, files: list[str],
              num_shards: Mapping[str, Mapping[str, int]] | None = None) -> PublishResult:
    """The one push of hf-ches (publications and ranking-accuracy reports): create the dataset repo, push each of
    ``configs`` with ``DatasetDict.push_to_hub`` (one commit each), then commit ``last_commit(api, repo_id,
    revision)``'s operations (``what`` names them in errors).

    Every Hub error becomes a `PublishError` naming the step, without the token (`_step`). ``options.private``
    makes a new repo private and refuses an existing public one; with ``options.create_pr`` the first commit that
    changes something opens a pull request and the later ones go to it. ``files``: what the result lists.
    """
    token = options.token or get_token()
    api = HfApi(token=token)
    repo_id = options.repo_id

    def step(what: str):
        return _step(what, repo_id, api.endpoint, token)

    with step(f"creating the dataset repo {repo_id}"):
        repo_id = api.create_repo(repo_id, repo_type="dataset", private=options.private, exist_ok=True).repo_id
        if options.private and not api.dataset_info(repo_id).private:
            raise PublishError(f"{repo_id} already exists and is public, but private=True was asked: make it private "
                               "on the Hub first, or push without --private")
    revision, pr_url = options.revision or "main", None
    pr_pending = options.create_pr  # until a commit opens the PR (a push that changes nothing opens none)
    for config, splits in tqdm(configs.items(), desc="Publishing configs", unit="config", disable=len(configs) < 2):
        with step(f"pushing the {config!r} config to {repo_id}@{revision}"), quiet_writes():
            info = DatasetDict(splits).push_to_hub(
                repo_id, config_name=config, token=token, revision=revision, create_pr=pr_pending,
                num_shards=dict(num_shards[config]) if num_shards else None,
                commit_message=f"{options.commit_message} ({config} config)")
        if pr_pending and info.pr_revision:
            revision, pr_url, pr_pending = info.pr_revision, info.pr_url, False
    with step(f"updating {what} of {repo_id}@{revision}"):
        commit = api.create_commit(repo_id, last_commit(api, repo_id, revision), commit_message=options.commit_message,
                                   repo_type="dataset", revision=revision, create_pr=pr_pending)
    if pr_pending and commit.pr_revision:
        revision, pr_url = commit.pr_revision, commit.pr_url
    return PublishResult(repo_id=repo_id, revision=revision, commit_url=commit.commit_url, pr_url=pr_url,
                         files=files)
