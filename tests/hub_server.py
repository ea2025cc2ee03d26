"""A Hugging Face Hub look-alike for tests: serves local folders as model repos over plain HTTP.

It speaks the routes huggingface_hub's client uses to find and download model files, with the
headers the client reads (``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``/``X-Linked-Size``,
``X-Error-Code``), records every request, and can cut a download short once to exercise resuming.
No xet headers are ever sent, so the client always downloads over plain HTTP.

A request is logged just before its answer is sent, never after: once a client has its answer,
the log already holds the request, so a test may read ``requests`` right after a download returns
(logging after the last byte left would race the client, and a slow server thread would miss it).

    with HubServer() as server:
        server.add_repo("org/tiny", folder)
        point_hub_client_at(monkeypatch, server.url)
        hf_hub_download("org/tiny", "config.json")
        assert server.downloaded_files() == ["config.json"]
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import re
import socket
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)

__all__ = ["HubServer", "RecordedRequest", "point_hub_client_at", "set_hub_offline"]

#: Files the Hub stores with git-lfs: their ETag is the content's sha256.
LFS_SUFFIXES = frozenset(
    {
        ".safetensors",
        ".bin",
        ".h5",
        ".msgpack",
        ".onnx",
        ".pt",
        ".pth",
        ".ckpt",
        ".gguf",
        ".npz",
        ".pkl",
        ".ot",
    }
)
LFS_MIN_SIZE = 10 * 2**20  # anything this large is LFS whatever its name

_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"  # "name" or "org/name"; two segments are tried first
_RESOLVE_RE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_INFO_RE = re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")
_TREE_RE = re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?$")
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server answered (logged just before the answer left).

    ``path`` is the raw URL path (quoted, no query string). ``interrupted``: the answer was not all
    sent, because ``fail_next_download`` cut it on purpose or the client went away mid-answer.
    """

    method: str
    path: str
    status: int
    range: str | None = None
    authorization: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None  # the repo file, for /resolve/ requests
    interrupted: bool = False


@dataclass(frozen=True)
class RepoFile:
    data: bytes
    lfs: bool
    git_sha1: str
    sha256: str

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_sha1

    @classmethod
    def from_bytes(cls, name: str, data: bytes) -> RepoFile:
        git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        lfs = Path(name).suffix in LFS_SUFFIXES or len(data) >= LFS_MIN_SIZE
        return cls(data, lfs, git, hashlib.sha256(data).hexdigest())


@dataclass
class RepoRevision:
    commit_sha: str
    files: dict[str, RepoFile]
    last_modified: str


@dataclass
class Repo:
    repo_id: str
    gated: bool = False
    revisions: dict[str, RepoRevision] = field(default_factory=dict)  # branch names and commit shas


class _Abort(Exception):
    """An error answer: status, X-Error-Code, message, extra headers."""

    def __init__(
        self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class HubServer:
    """A threaded Hub-compatible server on ``127.0.0.1`` (a free port); see the module docstring.

    ``token`` is the only token that opens gated repos (``Authorization: Bearer <token>``).
    """

    def __init__(self, *, token: str = "hf_test_token", host: str = "127.0.0.1", port: int = 0) -> None:
        self.token = token
        self._repos: dict[str, Repo] = {}
        self._requests: list[tuple[int, RecordedRequest]] = []  # (arrival number, request)
        self._arrivals = itertools.count()
        self._faults: dict[tuple[str | None, str], int] = {}
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Self:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="hub-server",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut open keep-alive connections (clients see the Hub vanish)."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- content ----------------------------------------------------------------------------------
    def add_repo(
        self,
        repo_id: str,
        folder: str | Path,
        *,
        revision: str = "main",
        gated: bool = False,
        commit_sha: str | None = None,
    ) -> str:
        """Publish every file under ``folder`` as ``repo_id`` at branch ``revision``; return the commit sha.

        Files are read now (later edits of the folder do not show). Call again with another
        ``revision`` to add a branch; the commit sha resolves too. ``gated=True`` gates the repo.
        """
        folder = Path(folder)
        files = {
            p.relative_to(folder).as_posix(): RepoFile.from_bytes(p.name, p.read_bytes())
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }
        if commit_sha is None:
            digest = hashlib.sha1(f"{repo_id}@{revision}".encode())
            for name, f in files.items():
                digest.update(f"{name}:{f.git_sha1}\n".encode())
            commit_sha = digest.hexdigest()
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        rev = RepoRevision(commit_sha, files, stamp)
        with self._lock:
            repo = self._repos.setdefault(repo_id, Repo(repo_id))
            repo.gated = repo.gated or gated
            repo.revisions[revision] = rev
            repo.revisions[commit_sha] = rev
        return commit_sha

    def file(self, repo_id: str, filename: str, *, revision: str = "main") -> RepoFile:
        """The served file (bytes and hashes), to compare downloads against."""
        return self._repos[repo_id].revisions[revision].files[filename]

    # -- request log and faults -------------------------------------------------------------------
    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return [r for _, r in sorted(self._requests, key=lambda item: item[0])]

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def downloaded_files(self, repo_id: str | None = None) -> list[str]:
        """Repo files whose bytes were sent (GET /resolve/ answered 200 or 206), in request order."""
        return [
            r.filename
            for r in self.requests
            if r.method == "GET"
            and r.filename is not None
            and r.status in (200, 206)
            and (repo_id is None or r.repo_id == repo_id)
        ]

    def fail_next_download(self, path: str, *, after_bytes: int, repo_id: str | None = None) -> None:
        """Cut the connection after ``after_bytes`` body bytes on the next GET of repo file ``path``."""
        with self._lock:
            self._faults[(repo_id, path)] = after_bytes

    def _take_fault(self, repo_id: str, path: str) -> int | None:
        with self._lock:
            for key in ((repo_id, path), (None, path)):
                if key in self._faults:
                    return self._faults.pop(key)
        return None

    def _arrival(self) -> int:
        with self._lock:
            return next(self._arrivals)

    def _record(self, arrival: int, request: RecordedRequest) -> None:
        with self._lock:  # logged as the answer leaves, listed in arrival order
            self._requests.append((arrival, request))

    def _mark_interrupted(self, arrival: int) -> None:
        """The answer to request ``arrival``, already logged, could not be sent in full."""
        with self._lock:
            for i, (number, request) in enumerate(self._requests):
                if number == arrival:
                    self._requests[i] = (number, dataclasses.replace(request, interrupted=True))

    # -- lookups used by the handler --------------------------------------------------------------
    def _repo(self, repo_id: str, authorization: str | None) -> Repo:
        with self._lock:
            repo = self._repos.get(repo_id)
        if repo is None:
            # Like the Hub: 401 for anonymous callers (the repo could be private), 404 otherwise.
            raise _Abort(404 if authorization else 401, "RepoNotFound", "Repository not found")
        return repo

    @staticmethod
    def _revision(repo: Repo, revision: str) -> RepoRevision:
        rev = repo.revisions.get(revision)
        if rev is None:
            raise _Abort(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return rev

    def _check_gate(self, repo: Repo, authorization: str | None) -> None:
        if repo.gated and authorization != f"Bearer {self.token}":
            raise _Abort(
                403 if authorization else 401,
                "GatedRepo",
                f"Access to model {repo.repo_id} is restricted. You must have access to it and be "
                "authenticated to access it. Please log in.",
            )


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "TinyHub/1.0"

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("hub-server: " + format, *args)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    # -- plumbing ---------------------------------------------------------------------------------
    def _dispatch(self, *, head: bool) -> None:
        self._arrival_number = self.hub._arrival()
        self._logged = False
        split = urlsplit(self.path)
        auth = self.headers.get("Authorization")
        rng = self.headers.get("Range")
        self._entry = RecordedRequest(self.command, split.path, 500, rng, auth)  # what _send logs
        try:
            if m := _RESOLVE_RE.match(split.path):
                repo_id, revision, filename = m["repo"], unquote(m["rev"]), unquote(m["file"])
                self._entry = dataclasses.replace(self._entry, repo_id=repo_id, revision=revision, filename=filename)
                self._resolve(
                    repo_id=repo_id, revision=revision, filename=filename, head=head, range_header=rng, auth=auth
                )
            elif not head and (m := _TREE_RE.match(split.path)):
                revision = unquote(m["rev"])
                self._entry = dataclasses.replace(self._entry, repo_id=m["repo"], revision=revision)
                query = parse_qs(split.query)
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                path = unquote(m["path"]).strip("/") if m["path"] else ""
                self._tree(m["repo"], revision, path, recursive=recursive, auth=auth)
            elif not head and (m := _INFO_RE.match(split.path)):
                pinned = unquote(m["rev"]) if m["rev"] else None
                self._entry = dataclasses.replace(self._entry, repo_id=m["repo"], revision=pinned)
                blobs = parse_qs(split.query).get("blobs", ["false"])[0].lower() in ("1", "true")
                self._info(m["repo"], pinned, blobs=blobs, auth=auth)
            else:
                raise _Abort(404, None, f"Sorry, we can't find the page you are looking for: {split.path}")
        except _Abort as err:
            self._send_error(err, head=head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            if self._logged:
                self.hub._mark_interrupted(self._arrival_number)
        finally:
            if not self._logged:  # failed before answering (a bug in a route): logged as a 500
                self._log(500, interrupted=False)

    def _log(self, status: int, *, interrupted: bool) -> None:
        self._logged = True
        request = dataclasses.replace(self._entry, status=status, interrupted=interrupted)
        self.hub._record(self._arrival_number, request)

    def _send(
        self, status: int, headers: dict[str, str], body: bytes, *, head: bool = False, cut: int | None = None
    ) -> None:
        """Answer with ``status``, ``headers`` and ``body`` (not sent for HEAD); ``cut``: stop after that
        many body bytes and close the connection. The request is logged first (see the module docstring).
        """
        interrupted = not head and cut is not None and cut < len(body)
        self._log(status, interrupted=interrupted)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        if not interrupted:
            self.wfile.write(body)
            return
        self.wfile.write(body[:cut])
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send_error(self, err: _Abort, *, head: bool) -> None:
        headers = {"X-Error-Code": err.code} if err.code else {}
        headers |= {"X-Error-Message": err.message, **err.headers, "Content-Type": "application/json"}
        self._send(err.status, headers, json.dumps({"error": err.message}).encode(), head=head)

    def _send_json(self, payload: Any) -> None:
        self._send(200, {"Content-Type": "application/json"}, json.dumps(payload).encode())

    # -- routes -----------------------------------------------------------------------------------
    def _info(self, repo_id: str, revision: str | None, *, blobs: bool, auth: str | None) -> None:
        repo = self.hub._repo(repo_id, auth)
        rev = self.hub._revision(repo, revision or "main")
        siblings = []
        for name, f in rev.files.items():
            entry: dict[str, Any] = {"rfilename": name}
            if blobs:
                entry.update(size=f.size, blobId=f.git_sha1)
                if f.lfs:
                    entry["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
            siblings.append(entry)
        self._send_json(
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0] if "/" in repo_id else None,
                "sha": rev.commit_sha,
                "lastModified": rev.last_modified,
                "createdAt": rev.last_modified,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "library_name": "transformers",
                "siblings": siblings,
            }
        )

    def _tree(self, repo_id: str, revision: str, path: str, *, recursive: bool, auth: str | None) -> None:
        repo = self.hub._repo(repo_id, auth)
        rev = self.hub._revision(repo, revision)
        prefix = f"{path}/" if path else ""
        under = {name: f for name, f in rev.files.items() if name.startswith(prefix)}
        if path and not under:
            raise _Abort(
                404,
                "EntryNotFound",
                f"{path} does not exist on {revision}",
                {"X-Repo-Commit": rev.commit_sha},
            )
        folders: set[str] = set()
        entries: list[dict[str, Any]] = []
        for name, f in under.items():
            rest = name[len(prefix) :].split("/")
            for depth in range(1, len(rest)):  # folders on the way to this file
                if depth > 1 and not recursive:
                    break
                folders.add(prefix + "/".join(rest[:depth]))
            if len(rest) > 1 and not recursive:
                continue
            entry: dict[str, Any] = {"type": "file", "oid": f.git_sha1, "size": f.size, "path": name}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
            entries.append(entry)
        entries += [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(folders)
        ]
        self._send_json(sorted(entries, key=lambda e: e["path"]))

    def _resolve(
        self,
        *,
        repo_id: str,
        revision: str,
        filename: str,
        head: bool,
        range_header: str | None,
        auth: str | None,
    ) -> None:
        repo = self.hub._repo(repo_id, auth)
        rev = self.hub._revision(repo, revision)
        self.hub._check_gate(repo, auth)
        f = rev.files.get(filename)
        if f is None:
            raise _Abort(
                404,
                "EntryNotFound",
                f"{filename} does not exist on {revision}",
                {"X-Repo-Commit": rev.commit_sha},
            )
        start, end = 0, f.size - 1
        status = 200
        if range_header and not head:
            m = _RANGE_RE.match(range_header)
            if m and (m[1] or m[2]):
                if m[1]:
                    start = int(m[1])
                    end = min(int(m[2]), f.size - 1) if m[2] else f.size - 1
                else:  # suffix range: the last N bytes
                    start = max(f.size - int(m[2]), 0)
                if start >= f.size or start > end:
                    raise _Abort(
                        416,
                        None,
                        f"Range {range_header} not satisfiable for {f.size} bytes",
                        {"Content-Range": f"bytes */{f.size}"},
                    )
                status = 206
        headers = {"X-Repo-Commit": rev.commit_sha, "ETag": f'"{f.etag}"'}
        if f.lfs:
            headers |= {"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)}
        headers |= {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        cut = None if head else self.hub._take_fault(repo_id, filename)
        self._send(status, headers, f.data[start : end + 1], head=head, cut=cut)


# -- pointing huggingface_hub (and the libraries that copied its settings) at a server -------------
def point_hub_client_at(monkeypatch: Any, url: str) -> None:
    """Make huggingface_hub (and transformers/diffusers) talk to ``url`` for the rest of the test.

    ``HF_ENDPOINT`` is read once, when ``huggingface_hub.constants`` is imported, so the captured
    values are patched too: ``ENDPOINT`` and ``HUGGINGFACE_CO_URL_TEMPLATE`` (what ``hf_hub_url``
    formats), and the module-level ``HfApi`` instance behind ``huggingface_hub.model_info`` & co.
    Xet is disabled so downloads use plain HTTP. Pooled connections are dropped.
    """
    from huggingface_hub import close_session, constants, hf_api

    url = url.rstrip("/")
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_api.api, "endpoint", url)
    module = sys.modules.get("diffusers.utils.constants")
    if module is not None and hasattr(module, "HUGGINGFACE_CO_RESOLVE_ENDPOINT"):
        monkeypatch.setattr(module, "HUGGINGFACE_CO_RESOLVE_ENDPOINT", url)
    close_session()


_OFFLINE_COPIES = (
    "diffusers.utils.hub_utils",
    "diffusers.loaders.lora_base",
    "diffusers.models.attention_dispatch",
)


def set_hub_offline(monkeypatch: Any, offline: bool = True) -> None:
    """Turn huggingface_hub's offline mode on or off for the rest of the test (env var + captured copies)."""
    from huggingface_hub import constants

    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    for name in _OFFLINE_COPIES:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "HF_HUB_OFFLINE"):
            monkeypatch.setattr(module, "HF_HUB_OFFLINE", offline)
