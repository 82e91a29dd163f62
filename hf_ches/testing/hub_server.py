"""A loopback Hugging Face Hub: enough of the Hub's HTTP protocol for huggingface_hub and datasets to push and load.

Why: tests and the offline demo publish datasets for real (``create_repo``, ``push_to_hub``, ``upload_file``,
``load_dataset``) with no internet, and no installable Hub server exists (``docs/hub-protocol.md`` §1).
This one is stdlib only and binds 127.0.0.1 only.

Storage under ``--data-dir``: ``blobs/<sha256>`` holds file contents, content-addressed and shared by all repos;
``repos/<type>/<namespace>/<name>/repo.json`` holds visibility and refs (branches, ``refs/pr/N``), and
``.../commits/<id>.json`` one manifest per commit (path -> sha256, size, lfs flag, git oid, last commit).

Clients must set ``HF_HUB_DISABLE_XET=1`` (before importing huggingface_hub) so LFS files take the plain git-LFS
batch + PUT path. Requests the server does not know are logged to stderr and answered 404.

The module holds the server process alone, so that ``LocalHub`` (``hf_ches.testing.local_hub``, which also points
the clients at it) can run it by path without importing torch. Command line (prints the bound URL on one line, then
serves until killed)::

    python -m hf_ches.testing.hub_server --port 0 --data-dir /tmp/hub --token hf_abc=alice,my-org --token hf_ro=bob:read
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import threading
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import parse_qs, unquote

HOST = "127.0.0.1"
# Files the Hub stores in LFS (as its default .gitattributes does); anything binary or >= 10 MiB goes there too.
# datasets needs parquet in LFS: it deletes each shard's temp file after the pre-upload, before the commit.
LFS_SUFFIXES = (".parquet", ".arrow", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".bin", ".pt", ".pth", ".ckpt",
                ".safetensors", ".gguf", ".onnx", ".h5", ".npy", ".npz", ".pkl", ".zip", ".gz", ".zst", ".tar",
                ".wav", ".mp3", ".mp4", ".pdf")
LFS_MIN_SIZE = 10 * 1024 * 1024
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


@dataclass(frozen=True)
class Account:
    """Who a token belongs to: a user with read (and, unless ``write`` is off) write access to its own namespace and
    the ``orgs`` listed."""

    name: str
    orgs: tuple[str, ...] = ()
    write: bool = True

    def can_read(self, namespace: str) -> bool:
        return namespace == self.name or namespace in self.orgs

    def can_write(self, namespace: str) -> bool:
        return self.write and self.can_read(namespace)


def parse_token_spec(spec: str) -> tuple[str, Account]:
    """Parse ``TOKEN=USER[,ORG...][:read]`` (the ``--token`` argument).

    >>> parse_token_spec("hf_x=alice,acme:read")
    ('hf_x', Account(name='alice', orgs=('acme',), write=False))
    """
    token, sep, rest = spec.partition("=")
    names, _, role = rest.partition(":")
    user, *orgs = names.split(",")
    if not sep or not token or not all(map(NAME_RE.fullmatch, [user, *orgs])) or role not in ("", "read", "write"):
        raise ValueError(f"--token: expected TOKEN=USER[,ORG...][:read|:write], got {spec!r}")
    return token, Account(user, tuple(orgs), write=role != "read")


def now_iso() -> str:
    """UTC time in the Hub's format (what ``huggingface_hub.utils.parse_datetime`` reads)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def git_oid(content: bytes) -> str:
    """git's blob id: sha1 of ``blob <size>\\0`` + content.

    >>> git_oid(b"hello\\n")
    'ce013625030ba8dba906f756967f9e9ca394464a'
    """
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def file_entry(sha256: str, size: int, lfs: bool, commit: str, content: bytes = b"") -> dict:
    """A manifest entry; the git oid of an LFS file is that of its pointer file, as on the Hub."""
    oid = git_oid(lfs_pointer(sha256, size) if lfs else content)
    return {"sha256": sha256, "size": size, "lfs": lfs, "oid": oid, "commit": commit}


def upload_mode(path: str, size: int, sample: bytes) -> str:
    """``"lfs"`` for known binary suffixes, big files and samples with NUL bytes, else ``"regular"``.

    >>> upload_mode("data/train-00000-of-00001.parquet", 10, b"PAR1"), upload_mode("README.md", 10, b"---")
    ('lfs', 'regular')
    """
    binary = path.lower().endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample
    return "lfs" if binary else "regular"


def is_true(flag: str | None) -> bool:
    """A boolean query or form flag as clients send it (``1``, ``true``, ``True``)."""
    return flag in ("1", "true", "True")


class HubError(Exception):
    """An HTTP error answer. ``message`` goes to ``X-Error-Message`` and ``code`` to ``X-Error-Code``, from which
    huggingface_hub picks its exception (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.body = headers or {}, body or {}


class HubStore:
    """Repos, commits and blobs on disk. Writers hold ``lock``; JSON files are replaced atomically, so readers
    don't need it."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.lock = threading.RLock()
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)

    def _dir(self, rtype: str, repo_id: str) -> Path:
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(NAME_RE.fullmatch(part) for part in parts):
            raise HubError(400, f"invalid repo id {repo_id!r}: expected namespace/name, letters, digits, '.-_'")
        return self.root / "repos" / rtype / repo_id

    @staticmethod
    def _write_json(path: Path, data: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)

    def repo(self, rtype: str, repo_id: str) -> dict | None:
        path = self._dir(rtype, repo_id) / "repo.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save_repo(self, rtype: str, repo_id: str, repo: dict) -> None:
        self._write_json(self._dir(rtype, repo_id) / "repo.json", repo)

    def create_repo(self, rtype: str, repo_id: str, private: bool) -> None:
        """A new repo whose first commit on ``main`` adds a ``.gitattributes`` for ``LFS_SUFFIXES``, as the Hub does."""
        repo = {"private": private, "createdAt": now_iso(), "refs": {}, "next_pr": 1}
        attributes = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()
        commit_id = secrets.token_hex(20)
        files = {".gitattributes": file_entry(self.put_blob(attributes), len(attributes), False, commit_id, attributes)}
        self.write_commit(rtype, repo_id, commit_id, None, files, "initial commit", "", "")
        repo["refs"]["main"] = commit_id
        self.save_repo(rtype, repo_id, repo)

    def delete_repo(self, rtype: str, repo_id: str) -> None:
        shutil.rmtree(self._dir(rtype, repo_id))

    def commit(self, rtype: str, repo_id: str, commit_id: str) -> dict | None:
        path = self._dir(rtype, repo_id) / "commits" / f"{commit_id}.json"
        return json.loads(path.read_text()) if re.fullmatch(r"[0-9a-f]{40}", commit_id) and path.is_file() else None

    def resolve(self, rtype: str, repo_id: str, repo: dict, revision: str) -> dict:
        """The commit a branch, ``refs/pr/N`` or commit id points to; 404 ``RevisionNotFound`` otherwise."""
        found = self.commit(rtype, repo_id, repo["refs"].get(revision, revision))
        if found is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return found

    def write_commit(self, rtype: str, repo_id: str, commit_id: str, parent: str | None, files: dict, title: str,
                     message: str, author: str) -> dict:
        """Store a commit manifest. Ids are random 40-hex strings, not git hashes: nothing here speaks git."""
        commit = {"id": commit_id, "parents": [parent] if parent else [], "title": title, "message": message,
                  "author": author, "date": now_iso(), "files": files}
        self._write_json(self._dir(rtype, repo_id) / "commits" / f"{commit['id']}.json", commit)
        return commit

    def blob_path(self, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise HubError(400, f"invalid LFS oid {sha256!r}: expected a sha256 in hex")
        return self.root / "blobs" / sha256

    def put_blob(self, content: bytes) -> str:
        sha256 = hashlib.sha256(content).hexdigest()
        if not self.blob_path(sha256).is_file():
            self.put_blob_stream(iter([content]), sha256)
        return sha256

    def put_blob_stream(self, chunks: Iterator[bytes], sha256: str) -> None:
        """Write a blob from chunks, checking that their sha256 is the one announced."""
        final, digest = self.blob_path(sha256), hashlib.sha256()
        tmp = final.with_name(f".{sha256}.{secrets.token_hex(4)}")
        with open(tmp, "wb") as out:
            for chunk in chunks:
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            tmp.unlink()
            raise HubError(400, f"content sha256 {digest.hexdigest()} does not match the upload's oid {sha256}")
        os.replace(tmp, final)


def listing(commit: dict, folder: str, recursive: bool, expand_commit: Any = None) -> list[dict]:
    """Tree entries under ``folder`` (direct children unless ``recursive``), as ``/tree`` and ``/paths-info`` give.

    >>> commit = {"id": "c" * 40, "files": {"a/b/c.txt": file_entry("0" * 64, 1, False, "c" * 40, b"x")}}
    >>> [(e["type"], e["path"]) for e in listing(commit, "", recursive=True)]
    [('directory', 'a'), ('directory', 'a/b'), ('file', 'a/b/c.txt')]
    >>> [e["path"] for e in listing(commit, "a", recursive=False)]
    ['a/b']
    """
    prefix = folder.strip("/") + "/" if folder.strip("/") else ""
    entries: dict[str, dict] = {}
    for path, entry in sorted(commit["files"].items()):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
            folder_path = prefix + "/".join(parts[:depth])
            oid = hashlib.sha1(f"{commit['id']}:{folder_path}".encode()).hexdigest()
            entries.setdefault(folder_path, {"type": "directory", "oid": oid, "size": 0, "path": folder_path})
        if recursive or len(parts) == 1:
            entries[path] = tree_file(path, entry, expand_commit)
    return list(entries.values())


def tree_file(path: str, entry: dict, expand_commit: Any = None) -> dict:
    """One file as the tree API shows it; ``expand_commit(id)`` loads a commit for ``lastCommit`` when expanding."""
    item: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
    if entry["lfs"]:
        item["lfs"] = {"oid": entry["sha256"], "size": entry["size"],
                       "pointerSize": len(lfs_pointer(entry["sha256"], entry["size"]))}
    if expand_commit is not None and (last := expand_commit(entry["commit"])) is not None:
        item["lastCommit"] = {"id": last["id"], "title": last["title"], "date": last["date"]}
    return item


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, stop)`` of a single ``Range: bytes=`` header, None for the whole file; 416 when unsatisfiable.

    >>> byte_range("bytes=2-5", 10), byte_range("bytes=7-", 10), byte_range("bytes=-3", 10), byte_range(None, 10)
    ((2, 6), (7, 10), (7, 10), None)
    """
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    start, stop = (max(size - int(last), 0), size) if not first else (int(first), min(int(last or size - 1) + 1, size))
    if start >= stop:
        raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
    return start, stop


REPO = r"/api/(?P<rtype>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)"
URL_REPO = r"/(?:(?P<rtype>dataset|space)s/)?(?P<repo>[^/]+/[^/]+?)"  # model repos have no type prefix in URLs
REV = r"(?P<rev>refs(?:/|%2F)(?:pr|convert)(?:/|%2F)[^/]+|[^/]+)"  # "refs/pr/1" may come quoted or not
ROUTES = [(method, re.compile(pattern), name) for method, pattern, name in [
    ("GET", r"/health", "health"),
    ("GET", r"/api/whoami-v2", "whoami"),
    ("GET", r"/api/agent-harnesses", "agent_harnesses"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("DELETE", r"/api/repos/delete", "delete_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"{REPO}(?:/revision/{REV})?", "repo_info"),
    ("GET", rf"{REPO}/tree/{REV}(?:/(?P<path>.*))?", "tree"),
    ("POST", rf"{REPO}/paths-info/{REV}", "paths_info"),
    ("GET", rf"{REPO}/refs", "refs"),
    ("GET", rf"{REPO}/commits/{REV}", "commits"),
    ("POST", rf"{REPO}/preupload/{REV}", "preupload"),
    ("POST", rf"{REPO}/commit/{REV}", "commit"),
    ("POST", rf"{REPO}/branch/(?P<branch>.+)", "create_branch"),
    ("POST", rf"{URL_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})/(?P<nonce>[0-9a-f]{32})", "lfs_upload"),
    ("GET", rf"{URL_REPO}/resolve/{REV}/(?P<path>.+)", "resolve"),
    ("HEAD", rf"{URL_REPO}/resolve/{REV}/(?P<path>.+)", "resolve"),
]]


class HubServer(ThreadingHTTPServer):
    """The HTTP server: a ``HubStore``, the token -> ``Account`` map, and the LFS upload grants handed out."""

    daemon_threads = True

    def __init__(self, data_dir: str | Path, accounts: Mapping[str, Account], port: int = 0, verbose: bool = False):
        super().__init__((HOST, port), HubHandler)
        self.store = HubStore(Path(data_dir))
        self.accounts = dict(accounts)
        self.upload_grants: dict[str, str] = {}  # nonce -> sha256 the presigned-like PUT URL may write
        self.verbose = verbose

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}"


class HubHandler(BaseHTTPRequestHandler):
    """Routes each request through ``ROUTES`` to a ``route_<name>`` method; errors are ``HubError``s."""

    protocol_version = "HTTP/1.1"  # keep-alive: every answer has a Content-Length and request bodies are drained
    disable_nagle_algorithm = True  # keep-alive answers otherwise wait for delayed ACKs (Nagle)
    server: HubServer
    account: Account | None  # who sent the request being handled; None for anonymous
    timeout = 300

    # ---- plumbing -------------------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Authenticate, find the route, run it; a ``HubError`` becomes its HTTP answer, anything else a 500."""
        method, (raw_path, _, query) = self.command, self.path.partition("?")
        self.query = {key: values[-1] for key, values in parse_qs(query).items()}
        self._body_started = self._responded = False
        try:
            self.account = self._authenticate()
            for route_method, pattern, name in ROUTES:
                if route_method == method and (match := pattern.fullmatch(raw_path)):
                    args = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    getattr(self, f"route_{name}")(**args)
                    return
            self.log_message("no route for %s %s", method, self.path)
            raise HubError(404, f"hf_ches.testing.hub_server has no route for {method} {raw_path}")
        except HubError as error:
            headers = {"X-Error-Message": error.message, **({"X-Error-Code": error.code} if error.code else {})}
            body = json.dumps({"error": error.message, **error.body}).encode()
            self._send(error.status, body, "application/json", {**headers, **error.headers})
        except Exception:  # a bug or a dropped client: show the traceback, answer 500 if still possible, hang up
            traceback.print_exc()
            self.close_connection = True
            if not self._responded:
                self._send(500, b'{"error": "internal error in hf_ches.testing.hub_server"}', "application/json", {})

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch  # other methods get http.server's 501

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"hub_server: {format % args}\n")

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        if self.server.verbose or (isinstance(code, int) and code >= 500):
            super().log_request(code, size)

    def _iter_body(self) -> Iterator[bytes]:
        """The request body in chunks (Content-Length or chunked encoding); readable once."""
        self._body_started = True
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                yield self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline().strip():
                pass  # trailers
            return
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                raise ConnectionError("client closed the connection mid-body")
            left -= len(chunk)
            yield chunk

    def _body(self) -> bytes:
        return b"".join(self._iter_body())

    def _json_body(self) -> dict:
        try:
            return json.loads(self._body() or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"request body is not JSON: {error}") from error

    def _start(self, status: int, content_type: str, length: int, headers: Mapping[str, str]) -> bool:
        """Send the status line and headers; True when a body should follow (not for HEAD)."""
        if not self._body_started:
            self._body()  # drain what the client sent, so the kept-alive connection stays in sync
        self._responded = True
        self.send_response(status)
        for key, value in {"Content-Type": content_type, "Content-Length": str(length), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        return self.command != "HEAD"

    def _send(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str]) -> None:
        if self._start(status, content_type, len(body), headers):
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200) -> None:
        self._send(status, json.dumps(data).encode(), "application/json", {})

    @property
    def _base(self) -> str:
        """This server's URL as the client sees it (for URLs the client follows: LFS uploads, commits, PRs)."""
        return f"http://{self.headers.get('Host') or f'{HOST}:{self.server.server_address[1]}'}"

    def _repo_url(self, rtype: str, repo_id: str) -> str:
        return f"{self._base}/{URL_PREFIXES[rtype]}{repo_id}"

    # ---- access rules ---------------------------------------------------------------------------------------------
    def _authenticate(self) -> Account | None:
        """The token's account; None for anonymous; 401 ``Invalid credentials`` for an unknown token, on every
        route, as the Hub does."""
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        account = self.server.accounts.get(auth.removeprefix("Bearer ").strip())
        if account is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return account

    def _need_writer(self, namespace: str) -> Account:
        account = self.account
        if account is None:
            raise HubError(401, "You must be authenticated to write to the Hub")
        if not account.can_write(namespace):
            raise HubError(403, f"You don't have the rights to write to {namespace!r} with this token"
                                f" (user {account.name!r}, {'write' if account.write else 'read'} access)")
        return account

    def _repo(self, rtype: str, repo: str, write: bool = False) -> dict:
        """The repo, as the Hub shows it: missing or hidden -> 401 (anonymous) / 404 (signed in); no write -> 403."""
        account, namespace = self.account, repo.split("/")[0]
        found = self.server.store.repo(rtype, repo)
        if found is None or (found["private"] and not (account and account.can_read(namespace))):
            raise HubError(401 if account is None else 404, "Repository not found", "RepoNotFound")
        if write:
            self._need_writer(namespace)
        return found

    # ---- account and repo management ------------------------------------------------------------------------------
    def route_health(self) -> None:
        self._json({"status": "ok"})

    def route_whoami(self) -> None:
        account = self.account
        if account is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        role = "write" if account.write else "read"
        self._json({"type": "user", "id": account.name, "name": account.name, "fullname": account.name,
                    "orgs": [{"type": "org", "name": org} for org in account.orgs],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "hf-ches", "role": role}}})

    def route_agent_harnesses(self) -> None:
        """The registry huggingface_hub fetches for its user agent; empty: no agent is ever detected."""
        self._json({"standardEnvVars": [], "harnesses": {}})

    def _repo_id_from_body(self, body: dict) -> tuple[str, str]:
        """``(type, "namespace/name")`` of a create/delete request; the namespace defaults to the token's user."""
        rtype, name = body.get("type") or "model", body.get("name") or ""
        namespace = body.get("organization") or (self.account.name if self.account else None)
        if namespace is None:
            raise HubError(401, "You must be authenticated to write to the Hub")
        if rtype not in URL_PREFIXES or not NAME_RE.fullmatch(name) or not NAME_RE.fullmatch(namespace):
            raise HubError(400, f"invalid repo: type {rtype!r}, namespace {namespace!r}, name {name!r}")
        return rtype, f"{namespace}/{name}"

    def route_create_repo(self) -> None:
        body = self._json_body()
        rtype, repo_id = self._repo_id_from_body(body)
        self._need_writer(repo_id.split("/")[0])
        url = self._repo_url(rtype, repo_id)
        with self.server.store.lock:
            if self.server.store.repo(rtype, repo_id) is not None:
                raise HubError(409, f"You already created this {rtype} repo", body={"url": url})  # exist_ok reads it
            private = body.get("private", body.get("visibility") == "private")
            self.server.store.create_repo(rtype, repo_id, bool(private))
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def route_delete_repo(self) -> None:
        rtype, repo_id = self._repo_id_from_body(self._json_body())
        with self.server.store.lock:
            self._repo(rtype, repo_id, write=True)
            self.server.store.delete_repo(rtype, repo_id)
        self._json({})

    def route_validate_yaml(self) -> None:
        self._json_body()
        self._json({"errors": [], "warnings": []})

    # ---- reading --------------------------------------------------------------------------------------------------
    def route_repo_info(self, rtype: str, repo: str, rev: str = "main") -> None:
        found = self._repo(rtype, repo)
        commit = self.server.store.resolve(rtype, repo, found, rev)
        siblings = [{"rfilename": path, "size": entry["size"], "blobId": entry["oid"],
                     **({"lfs": {**tree_file(path, entry)["lfs"], "sha256": entry["sha256"]}} if entry["lfs"] else {})}
                    for path, entry in sorted(commit["files"].items())]
        self._json({"id": repo, "_id": repo, "author": repo.split("/")[0], "sha": commit["id"],
                    "private": found["private"], "gated": False, "disabled": False, "downloads": 0, "likes": 0,
                    "tags": [], "createdAt": found["createdAt"], "lastModified": commit["date"],
                    "siblings": siblings})

    def _readable_commit(self, rtype: str, repo: str, rev: str, expand: bool) -> tuple[dict, Any]:
        """The commit at ``rev``, and a commit loader for ``lastCommit`` when the client asks to expand."""
        store = self.server.store
        commit = store.resolve(rtype, repo, self._repo(rtype, repo), rev)
        return commit, (lambda commit_id: store.commit(rtype, repo, commit_id)) if expand else None

    def route_tree(self, rtype: str, repo: str, rev: str, path: str = "") -> None:
        commit, expand = self._readable_commit(rtype, repo, rev, is_true(self.query.get("expand")))
        entries = listing(commit, path, is_true(self.query.get("recursive")), expand)
        if path.strip("/") and not entries:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")  # datasets probes data/, {config}/
        self._json(entries)

    def route_paths_info(self, rtype: str, repo: str, rev: str) -> None:
        form = parse_qs(self._body().decode())
        commit, expand = self._readable_commit(rtype, repo, rev, is_true(form.get("expand", [""])[-1]))
        infos = []
        for path in (p.strip("/") for p in form.get("paths", [])):
            if path in commit["files"]:
                infos.append(tree_file(path, commit["files"][path], expand))
            else:
                parent = [e for e in listing(commit, path.rpartition("/")[0], False) if e["path"] == path]
                infos.extend(parent)  # a folder, or nothing for a missing path (as the Hub does)
        self._json(infos)

    def route_refs(self, rtype: str, repo: str) -> None:
        refs = self._repo(rtype, repo)["refs"]
        branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": target}
                    for name, target in refs.items() if not name.startswith("refs/")]
        prs = [{"name": name, "ref": name, "targetCommit": target}
               for name, target in refs.items() if name.startswith("refs/pr/")]
        self._json({"branches": branches, "converts": [], "tags": [], "pullRequests": prs})

    def route_commits(self, rtype: str, repo: str, rev: str) -> None:
        store = self.server.store
        commit, history = store.resolve(rtype, repo, self._repo(rtype, repo), rev), []
        while commit is not None:
            authors = [{"user": commit["author"]}] if commit["author"] else []
            history.append({"id": commit["id"], "title": commit["title"], "message": commit["message"],
                            "authors": authors, "date": commit["date"]})
            commit = store.commit(rtype, repo, commit["parents"][0]) if commit["parents"] else None
        self._json(history)

    def route_resolve(self, repo: str, rev: str, path: str, rtype: str = "model") -> None:
        """A file's bytes with the headers hf_hub_download reads (X-Repo-Commit, ETag, X-Linked-*); Range -> 206."""
        commit = self.server.store.resolve(rtype, repo, self._repo(rtype, repo), rev)
        entry = commit["files"].get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit["id"]})
        size = entry["size"]
        etag = entry["sha256"] if entry["lfs"] else entry["oid"]
        headers = {"X-Repo-Commit": commit["id"], "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(size)})
        span = byte_range(self.headers.get("Range"), size)
        start, stop = span or (0, size)
        if span is not None:
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        if self._start(206 if span else 200, "application/octet-stream", stop - start, headers):
            with open(self.server.store.blob_path(entry["sha256"]), "rb") as blob:
                blob.seek(start)
                while start < stop and (chunk := blob.read(min(stop - start, 1 << 20))):
                    self.wfile.write(chunk)
                    start += len(chunk)

    # ---- writing --------------------------------------------------------------------------------------------------
    def route_create_branch(self, rtype: str, repo: str, branch: str) -> None:
        starting_point = self._json_body().get("startingPoint") or "main"
        if branch.startswith("refs/") or not re.fullmatch(r"[\w.-]+(/[\w.-]+)*", branch):
            raise HubError(400, f"Invalid branch name {branch!r}")
        with self.server.store.lock:
            found = self._repo(rtype, repo, write=True)
            if branch in found["refs"]:
                raise HubError(409, f"Reference {branch!r} already exists")
            found["refs"][branch] = self.server.store.resolve(rtype, repo, found, starting_point)["id"]
            self.server.store.save_repo(rtype, repo, found)
        self._json({})

    def route_preupload(self, rtype: str, repo: str, rev: str) -> None:
        """Upload modes for the files of a coming commit, and the oid of each one already there (unchanged files
        are then skipped by the client)."""
        files = self._json_body().get("files", [])
        commit = self.server.store.resolve(rtype, repo, self._repo(rtype, repo, write=True), rev)
        answers = []
        for item in files:
            mode = upload_mode(item["path"], int(item.get("size", 0)), base64.b64decode(item.get("sample", "")))
            old = commit["files"].get(item["path"])
            oid = None if old is None else (old["sha256"] if old["lfs"] else old["oid"])
            answers.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._json({"files": answers, "commitOid": commit["id"]})

    def route_lfs_batch(self, repo: str, rtype: str = "model") -> None:
        """git-LFS batch API (basic transfer): an upload URL per missing object; none for objects already stored."""
        body = self._json_body()
        self._repo(rtype, repo, write=True)
        if body.get("operation") != "upload":
            raise HubError(422, f"only the 'upload' LFS operation is served, got {body.get('operation')!r}")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            blob = self.server.store.blob_path(oid)
            if blob.is_file() and blob.stat().st_size == size:
                objects.append({"oid": oid, "size": size})
                continue
            nonce = secrets.token_hex(16)  # the PUT comes without auth, so its URL authorises itself
            self.server.upload_grants[nonce] = oid
            href = f"{self._base}/lfs-upload/{oid}/{nonce}"
            objects.append({"oid": oid, "size": size, "actions": {"upload": {"href": href}}})
        self._send(200, json.dumps({"transfer": "basic", "objects": objects, "hash_algo": "sha256"}).encode(),
                   "application/vnd.git-lfs+json", {})

    def route_lfs_upload(self, oid: str, nonce: str) -> None:
        if self.server.upload_grants.get(nonce) != oid:
            raise HubError(403, "this LFS upload URL is unknown or already used")
        self.server.store.put_blob_stream(self._iter_body(), oid)
        self.server.upload_grants.pop(nonce, None)
        self._send(200, b"", "text/plain", {})

    def route_commit(self, rtype: str, repo: str, rev: str) -> None:
        """Apply an NDJSON commit (header, file, lfsFile, deletedFile, deletedFolder) to a branch or a new PR."""
        try:
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise HubError(400, f"commit body is not NDJSON: {error}") from error
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if header is None or not header.get("summary"):
            raise HubError(400, "the commit has no header with a summary")
        store, create_pr = self.server.store, is_true(self.query.get("create_pr"))
        with store.lock:
            found = self._repo(rtype, repo, write=True)
            author = self._need_writer(repo.split("/")[0]).name
            if create_pr:
                base = store.resolve(rtype, repo, found, header.get("parentCommit") or rev)
                ref, pr_number = f"refs/pr/{found['next_pr']}", found["next_pr"]
                found["next_pr"] += 1
            else:
                if rev not in found["refs"]:
                    raise HubError(404, f"Invalid rev id: {rev} is not a branch", "RevisionNotFound")
                base, ref, pr_number = store.resolve(rtype, repo, found, rev), rev, None
                if header.get("parentCommit") not in (None, base["id"]):
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            commit_id = secrets.token_hex(20)
            files = self._apply(dict(base["files"]), lines, commit_id)
            store.write_commit(rtype, repo, commit_id, base["id"], files, header["summary"],
                               header.get("description", ""), author)
            found["refs"][ref] = commit_id
            store.save_repo(rtype, repo, found)
        repo_url = self._repo_url(rtype, repo)
        self._json({"success": True, "commitOid": commit_id, "commitUrl": f"{repo_url}/commit/{commit_id}",
                    "pullRequestUrl": f"{repo_url}/discussions/{pr_number}" if pr_number else None})

    def _apply(self, files: dict, lines: list[dict], commit_id: str) -> dict:
        """The manifest after the commit's operations; a missing file or LFS object -> 404 / 422."""
        store = self.server.store
        for line in lines:
            key, value = line["key"], line["value"]
            path = value.get("path", "").strip("/") if isinstance(value, dict) else ""
            if key == "file":
                content = base64.b64decode(value["content"])
                files[path] = file_entry(store.put_blob(content), len(content), False, commit_id, content)
            elif key == "lfsFile":
                blob = store.blob_path(value["oid"])
                if not blob.is_file():
                    raise HubError(422, f"LFS object {value['oid']} for {path!r} was never uploaded")
                files[path] = file_entry(value["oid"], blob.stat().st_size, True, commit_id)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path!r}", "EntryNotFound")
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(path + "/")]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path!r}", "EntryNotFound")
                for doomed_path in doomed:
                    del files[doomed_path]
            elif key != "header":
                raise HubError(400, f"unsupported commit operation {key!r}")
        return files


def main(argv: list[str] | None = None) -> None:
    """``python -m hf_ches.testing.hub_server``: print the bound URL on one line, then serve until killed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1; 0 picks a free one")
    parser.add_argument("--data-dir", required=True, help="where repos and blobs are kept (created if missing)")
    parser.add_argument("--token", action="append", default=[], metavar="TOKEN=USER[,ORG...][:read]",
                        help="a token and its account (repeatable); anonymous clients may read public repos")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    parser.add_argument("--exit-with-stdin", action="store_true",
                        help="exit when stdin closes, so a parent that dies (LocalHub's) leaves no server behind")
    args = parser.parse_args(argv)
    if args.exit_with_stdin:
        threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()
    server = HubServer(args.data_dir, dict(parse_token_spec(spec) for spec in args.token), args.port, args.verbose)
    print(server.url, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
