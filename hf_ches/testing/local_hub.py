"""Start the loopback Hub (``hf_ches.testing.hub_server``) and point huggingface_hub and datasets at it.

The server runs in a subprocess (its own module, stdlib only); this module is the side that starts it, waits for it
and sets the clients' endpoint, token, Xet switch and caches. The tests' fixtures, the README test and
``hf-ches demo`` use it, and so can anyone testing their own pipeline against a Hub they can push to, offline.

>>> import json, urllib.request
>>> with LocalHub() as hub:
...     auth = {"Authorization": f"Bearer {hub.token}"}
...     whoami = urllib.request.Request(f"{hub.endpoint}/api/whoami-v2", headers=auth)
...     json.load(urllib.request.build_opener(urllib.request.ProxyHandler({})).open(whoami))["name"]
'hf-ches-user'
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Mapping

from hf_ches.testing import hub_server

DEFAULT_USER = "hf-ches-user"


def client_settings(endpoint: str, token: str, hf_home: str | Path) -> tuple[dict[str, str], list[tuple]]:
    """What points huggingface_hub and datasets at ``endpoint``: environment variables and module attributes.

    Both libraries read their settings when first imported, so besides the environment (for subprocesses and later
    imports) the module attributes read at call time are patched (``tests/plugins/hub.py`` says why each is needed):
    the endpoint and download URL template, the shared ``HfApi`` behind module-level functions, Xet off (this
    server has no Xet; pushes hang with it), offline mode off, and caches, saved login and agent-harness registry
    under ``hf_home`` so nothing leaks into ``~/.cache/huggingface``. Returns ``(env, [(object, name, value)])``.
    """
    import datasets.config
    import huggingface_hub.constants as hub_constants
    import huggingface_hub.hf_api

    hf_home = Path(hf_home)
    hub_cache, datasets_cache = hf_home / "hub", hf_home / "datasets"
    env = {"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": token, "HF_HOME": str(hf_home),
           "HF_HUB_CACHE": str(hub_cache), "HF_DATASETS_CACHE": str(datasets_cache), "HF_HUB_OFFLINE": "0",
           "HF_DATASETS_OFFLINE": "0", "NO_PROXY": "127.0.0.1,localhost"}
    attrs = [(hub_constants, name, value) for name, value in {
        "ENDPOINT": endpoint, "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True, "HF_HUB_OFFLINE": False, "HF_HUB_CACHE": str(hub_cache),
        "HF_TOKEN_PATH": str(hf_home / "token"), "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
    }.items()]
    attrs.append((huggingface_hub.hf_api.api, "endpoint", endpoint))
    attrs += [(datasets.config, name, value) for name, value in {
        "HF_ENDPOINT": endpoint, "HUB_DATASETS_URL": endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HF_HUB_OFFLINE": False, "HF_DATASETS_CACHE": datasets_cache,
        "DOWNLOADED_DATASETS_PATH": datasets_cache / "downloads",
        "EXTRACTED_DATASETS_PATH": datasets_cache / "downloads" / "extracted",
    }.items()]
    return env, attrs


@contextlib.contextmanager
def clients_pointed_at(endpoint: str, token: str, hf_home: str | Path) -> Iterator[None]:
    """Point huggingface_hub and datasets at ``endpoint`` (see :func:`client_settings`) for the ``with`` block."""
    env, attrs = client_settings(endpoint, token, hf_home)
    saved_env = {name: os.environ.get(name) for name in env}
    saved_attrs = [(obj, name, getattr(obj, name)) for obj, name, _ in attrs]
    os.environ.update(env)
    for obj, name, value in attrs:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in saved_attrs:
            setattr(obj, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class LocalHub:
    """Run a ``hub_server.HubServer`` in a subprocess on a free loopback port for the ``with`` block.

    ``endpoint`` is its URL and ``token`` a write token for ``user`` (random per hub). ``tokens`` adds more:
    token -> ``USER[,ORG...][:read]``. ``data_dir`` defaults to a temporary folder removed on exit. The server's
    stderr (unknown routes, tracebacks, and every request when ``verbose``) goes to this process's stderr.
    """

    def __init__(self, data_dir: str | Path | None = None, user: str = DEFAULT_USER, orgs: tuple[str, ...] = (),
                 tokens: Mapping[str, str] | None = None, startup_timeout: float = 30.0, verbose: bool = False):
        self.user, self.token = user, f"hf_{secrets.token_hex(16)}"
        self._specs = {self.token: ",".join((user, *orgs)), **(tokens or {})}
        self._given_dir, self._tmp = data_dir, None
        self.startup_timeout, self.verbose = startup_timeout, verbose
        self.endpoint = ""
        self.data_dir: Path | None = None
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "LocalHub":
        if self._given_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="hf-ches-hub-")
        self.data_dir = Path(self._given_dir or self._tmp.name)  # type: ignore[union-attr]
        token_args = [arg for token, spec in self._specs.items() for arg in ("--token", f"{token}={spec}")]
        # Run the server's file by path, not `-m hf_ches.testing.hub_server`: that would import hf_ches.testing
        # (torch and transformers, slow), and a plain `python file.py` would put its folder first on sys.path.
        bootstrap = "import runpy, sys; runpy.run_path(sys.argv.pop(1), run_name='__main__')"
        self.process = process = subprocess.Popen(
            [sys.executable, "-c", bootstrap, str(Path(hub_server.__file__).resolve()), "--port", "0",
             "--exit-with-stdin", "--data-dir", str(self.data_dir), *token_args,
             *(["--verbose"] if self.verbose else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            self.endpoint = process.stdout.readline().strip()  # type: ignore[union-attr]
            self._wait_healthy(process)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_healthy(self, process: subprocess.Popen) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes via a proxy
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if not self.endpoint.startswith("http://") or process.poll() is not None:
                raise RuntimeError(f"hf_ches.testing.hub_server did not start (exit code {process.poll()}, first line "
                                   f"{self.endpoint!r}); see its stderr above")
            try:
                with opener.open(f"{self.endpoint}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"hf_ches.testing.hub_server at {self.endpoint} not healthy after "
                                   f"{self.startup_timeout}s")
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process.stdin.close()  # type: ignore[union-attr]
            self.process.stdout.close()  # type: ignore[union-attr]
            self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
