"""Fixtures for talking to the loopback Hub (``hf_ches.testing.hub_server``) with the real huggingface_hub and datasets.

``hub_server`` (session): one ``LocalHub`` subprocess per test process, so one per xdist worker.
``hub_env`` (function): points huggingface_hub and datasets at it, with its write token and fresh caches under
``tmp_path``, and yields a ``HubEnv``. Name repos with ``hub_env.repo_id("stem")``: the server lives for the whole
session, so names must not collide between tests.

Both libraries read their settings when first imported, and by then (collection) it is too late for environment
variables, so ``hub_env`` patches the module attributes read at call time, as listed by
``hf_ches.testing.local_hub.client_settings`` (which the demo uses too). Each one below was checked by removing it
and rerunning tests/test_hub_server.py:
- ``huggingface_hub.constants.ENDPOINT``: the default endpoint of ``HfApi``, ``hf_hub_download``, ``HfFileSystem``;
  ``HUGGINGFACE_CO_URL_TEMPLATE``: the download URL of ``hf_hub_download`` (loads hang without either);
- ``huggingface_hub.hf_api.api.endpoint``: the shared ``HfApi`` behind module-level functions such as
  ``upload_file`` (``DatasetCard.push_to_hub`` fails without it);
- ``huggingface_hub.constants.HF_HUB_DISABLE_XET``: otherwise uploads go through Xet, which this server lacks
  (``push_to_hub`` hangs without it);
- ``datasets.config.HF_ENDPOINT`` (``push_to_hub``/``load_dataset`` pass it explicitly) and ``HUB_DATASETS_URL``
  (rewrites Image/Audio file URLs that start with it);
- ``HF_HUB_OFFLINE`` in both libraries: a run with ``HF_HUB_OFFLINE=1`` in the environment may still use the
  loopback Hub (pushes fail without it);
- the caches (``huggingface_hub.constants.HF_HUB_CACHE``, ``datasets.config.HF_DATASETS_CACHE`` and the download
  paths derived from it), the saved-login path ``HF_TOKEN_PATH`` and ``AGENT_HARNESSES_PATH`` (a registry
  huggingface_hub fetches from the endpoint and keeps for a day): not needed for the round trips to pass, but
  without them tests would share (and leak into) ``~/.cache/huggingface``; checked with a throwaway ``HOME``.
The environment variables are set as well, for subprocesses and for libraries imported later.
"""

from __future__ import annotations

import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from hf_ches.testing.local_hub import LocalHub, client_settings


@dataclass(frozen=True)
class HubEnv:
    """The hub a test talks to: its URL, a write token for ``user``, and the test's HF_HOME."""

    endpoint: str
    token: str
    user: str
    hf_home: Path

    def repo_id(self, stem: str) -> str:
        """A repo id in the user's namespace that no other test of the session uses."""
        return f"{self.user}/{stem}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    """A running loopback Hub for the session. Tokens: ``hub_server.token`` writes as ``hf-ches-user``;
    ``"hf_other"`` writes as ``other-user``; ``"hf_reader"`` only reads, as ``hf-ches-user``."""
    tokens = {"hf_other": "other-user", "hf_reader": "hf-ches-user:read"}
    with LocalHub(data_dir=tmp_path_factory.mktemp("hub-data"), tokens=tokens) as hub:
        yield hub


@pytest.fixture
def hub_env(hub_server: LocalHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubEnv:
    """Point huggingface_hub and datasets at ``hub_server`` with its write token, Xet off and caches in tmp_path."""
    hf_home = tmp_path / "hf_home"
    env, attrs = client_settings(hub_server.endpoint, hub_server.token, hf_home)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for obj, name, value in attrs:
        monkeypatch.setattr(obj, name, value)
    return HubEnv(hub_server.endpoint, hub_server.token, hub_server.user, hf_home)


def assert_no_token(error: pytest.ExceptionInfo, token: str) -> None:
    """Neither the error nor any exception chained to it (what a traceback prints) holds the token."""
    exception: BaseException | None = error.value
    while exception is not None:
        assert token not in "".join(traceback.format_exception_only(exception)) and token not in repr(exception)
        exception = exception.__cause__ or exception.__context__
