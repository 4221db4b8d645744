"""A small Hugging Face Hub on 127.0.0.1 for tests: real HTTP, the endpoints huggingface_hub uses.

It keeps model repos in memory (branches → commits → files) and implements what the real
client calls for create-repo, pre-upload, LFS batch/upload/verify, commit (NDJSON), revision
info, tree listing, refs, branch creation, YAML validation and file resolve (HEAD and GET with
``X-Repo-Commit``, ``ETag``/``X-Linked-Etag``, ``Content-Length``/``X-Linked-Size`` and byte
ranges). ``*.safetensors`` files are stored as LFS objects: their ETag is the sha256 of the
content and an upload is accepted only if the bytes hash to the announced oid; other files are
regular git blobs (ETag: git sha1). A commit is applied all at once or not at all.

Faults are injected with :meth:`FakeHub.inject` and recorded in :attr:`FakeHub.fault_log`:

* ``"500"`` — answer HTTP 500 (before doing anything).
* ``"drop"`` — GET resolve: announce the full length, send half the bytes, close the socket.
* ``"truncate"`` — GET resolve: a complete response that holds only half the file.
* ``"wrong_etag"`` — HEAD/GET resolve: an ETag (sha256) that is not the file's.
* ``"hangup"`` — read the request, then close the socket without answering.
* ``"corrupt"`` — LFS upload (PUT): one byte of the received body flipped (a damaged
  transfer); the server's sha256 check must refuse it.
* ``"reset"`` — read the request, then reset the connection (TCP RST) without answering.
* ``"slow"`` — answer correctly, after a delay (:attr:`FakeHub.slow_seconds`).

:meth:`FakeHub.random_faults` instead draws a fault (or none) for every request from an RNG
seeded by ``(seed, method, path, n-th such request)``, so a run is reproducible whatever the
order in which the client's threads send their requests.

Run it standalone (``python tests/fakehub.py``) to poke at it with ``HF_ENDPOINT``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import random
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["FakeHub", "git_sha1", "sha256"]

LFS_SUFFIXES = (".safetensors", ".bin", ".pt")
FAULT_KINDS = ("500", "drop", "truncate", "wrong_etag", "hangup", "corrupt", "reset", "slow")


def git_sha1(data: bytes) -> str:
    """Git blob id of ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


@dataclasses.dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]


@dataclasses.dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str]
    commits: dict[str, Commit]

    def resolve(self, rev: str) -> Commit | None:
        oid = self.branches.get(rev, rev)
        return self.commits.get(oid)


@dataclasses.dataclass
class Fault:
    kind: str
    method: str | None
    path_contains: str | None
    times: int


class FakeHub:
    """The server. Use as a context manager or call :meth:`start` / :meth:`stop`.

    Attributes:
        url: ``http://127.0.0.1:<port>`` once started.
        repos: ``repo_id → Repo``.
        lfs_objects: ``sha256 → bytes`` (uploaded LFS content).
        requests: ``(method, path)`` of every request, in order.
        fault_log: ``(kind, method, path)`` of every fault that fired.
    """

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.fault_log: list[tuple[str, str, str]] = []
        self._faults: list[Fault] = []
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0
        self._random: tuple[float, int, tuple[str, ...]] | None = None
        self._seen: dict[tuple[str, str], int] = {}
        self.slow_seconds: tuple[float, float] = (0.05, 0.4)
        self.url = ""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- faults ------------------------------------------------------------------------------

    def inject(self, kind: str, *, method: str | None = None, path_contains: str | None = None, times: int = 1) -> None:
        """Make the next ``times`` matching requests fail with ``kind`` (see the module doc)."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}")
        with self._lock:
            self._faults.append(Fault(kind, method, path_contains, times))

    def random_faults(self, *, rate: float, seed: int, kinds: tuple[str, ...] = FAULT_KINDS) -> None:
        """From now on, fail each request with probability ``rate`` (``rate=0`` turns it off).

        The fault is drawn among ``kinds`` that apply to the request (body faults only to file
        downloads, ``wrong_etag`` to HEAD/GET resolve, ``corrupt`` to LFS uploads; ``500``,
        ``hangup``, ``reset`` and ``slow`` to any request).
        """
        unknown = set(kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}")
        with self._lock:
            self._random = (rate, seed, tuple(kinds)) if rate > 0 else None
            self._seen = {}

    def _plan(self, method: str, path: str) -> tuple[str | None, random.Random | None]:
        """The fault the random policy picks for this request (None: none), and its RNG."""
        with self._lock:
            if self._random is None:
                return None, None
            rate, seed, kinds = self._random
            n = self._seen.get((method, path), 0)
            self._seen[(method, path)] = n + 1
        rng = random.Random(f"{seed}\0{method}\0{path}\0{n}")
        if rng.random() >= rate:
            return None, rng
        resolve = "/resolve/" in path
        applicable = [k for k in kinds if k in ("500", "hangup", "reset", "slow")
                      or (k in ("drop", "truncate") and resolve and method == "GET")
                      or (k == "wrong_etag" and resolve)
                      or (k == "corrupt" and method == "PUT" and path.startswith("/_lfs/"))]
        return (rng.choice(applicable) if applicable else None), rng

    def _take_fault(self, method: str, path: str, kinds: tuple[str, ...]) -> str | None:
        with self._lock:
            for fault in self._faults:
                if fault.kind not in kinds or fault.times <= 0:
                    continue
                if fault.method is not None and fault.method != method:
                    continue
                if fault.path_contains is not None and fault.path_contains not in path:
                    continue
                fault.times -= 1
                self.fault_log.append((fault.kind, method, path))
                return fault.kind
        return None

    def pending_faults(self) -> int:
        with self._lock:
            return sum(f.times for f in self._faults)

    # -- state -------------------------------------------------------------------------------

    def new_oid(self, *parts: str) -> str:
        with self._lock:
            self._counter += 1
            n = self._counter
        return hashlib.sha1("\0".join((*parts, str(n), str(time.time()))).encode()).hexdigest()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a revision (for assertions)."""
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None
        return dict(commit.files)


_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)"), "preupload"),
    ("POST", re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)"), "commit"),
    ("POST", re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>[^/]+)"), "create_branch"),
    ("GET", re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)"), "revision"),
    ("GET", re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)"), "model_info"),
    ("GET", re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"), "tree"),
    ("GET", re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/refs"), "refs"),
    ("POST", re.compile(r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch"), "lfs_batch"),
    ("PUT", re.compile(r"/_lfs/(?P<oid>[0-9a-f]{64})"), "lfs_put"),
    ("POST", re.compile(r"/_lfs/(?P<oid>[0-9a-f]{64})/verify"), "lfs_verify"),
    ("HEAD", re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
    ("GET", re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeHub

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    # -- plumbing ----------------------------------------------------------------------------

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers)

    def _hangup(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _reset(self) -> None:
        """Abort the connection: SO_LINGER 0 makes close() send a TCP RST."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def _fault(self, method: str, path: str, kinds: tuple[str, ...]) -> str | None:
        """This request's fault among ``kinds``: the random policy's pick, else an injected one."""
        if self.planned is not None:
            if self.planned not in kinds:
                return None
            kind, self.planned = self.planned, None
            with self.fake._lock:
                self.fake.fault_log.append((kind, method, path))
            return kind
        return self.fake._take_fault(method, path, kinds)

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        self.fake.requests.append((self.command, split.path))
        for method, pattern, name in _ROUTES:
            m = pattern.fullmatch(split.path)
            if m and method == self.command:
                break
        else:
            self._error(404, f"no route for {self.command} {split.path}")
            return
        body = self._body() if self.command in ("POST", "PUT") else b""
        self.planned, rng = self.fake._plan(self.command, split.path)
        fault = self._fault(self.command, split.path, ("500", "hangup", "reset", "slow"))
        if fault == "500":
            self._error(500, "injected internal error")
            return
        if fault == "hangup":
            self._hangup()
            return
        if fault == "reset":
            self._reset()
            return
        if fault == "slow":
            time.sleep((rng or random).uniform(*self.fake.slow_seconds))
        args = {k: unquote(v) if v is not None else None for k, v in m.groupdict().items()}
        getattr(self, f"_do_{name}")(body=body, **args)

    do_GET = do_POST = do_PUT = do_HEAD = _dispatch

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
            return None
        if repo.private and not self.headers.get("Authorization"):
            self._error(401, "Invalid credentials", "RepoNotFound")
            return None
        return repo

    def _commit(self, repo: Repo, rev: str) -> Commit | None:
        commit = repo.resolve(rev)
        if commit is None:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    # -- endpoints ---------------------------------------------------------------------------

    def _do_create_repo(self, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        name, org = payload.get("name"), payload.get("organization")
        if not name or not org:
            self._error(400, "name and organization are required (the fake hub has no users)")
            return
        repo_id = f"{org}/{name}"
        with self.fake._lock:
            if repo_id in self.fake.repos:
                exists = True
            else:
                exists = False
                root = Commit(self.fake.new_oid(repo_id), None, "initial commit",
                              {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
                private = payload.get("private") or payload.get("visibility") == "private"
                self.fake.repos[repo_id] = Repo(repo_id, bool(private), {"main": root.oid}, {root.oid: root})
        if exists:  # the real Hub also names the repo's URL in a 409
            self._json(409, {"error": "You already created this model repo", "url": f"{self.fake.url}/{repo_id}"},
                       {"X-Error-Message": "You already created this model repo"})
            return
        self._json(200, {"url": f"{self.fake.url}/{repo_id}", "name": repo_id})

    def _do_validate_yaml(self, body: bytes) -> None:
        self._json(200, {"errors": [], "warnings": []})

    def _do_preupload(self, body: bytes, repo: str, rev: str) -> None:
        r = self._repo(repo)
        if r is None:
            return
        commit = r.resolve(rev)
        files = []
        for f in json.loads(body).get("files", []):
            path = f["path"]
            old = commit.files.get(path) if commit else None
            oid = None if old is None else (sha256(old) if is_lfs(path) else git_sha1(old))
            files.append({"path": path, "uploadMode": "lfs" if is_lfs(path) else "regular",
                          "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": files, "commitOid": commit.oid if commit else None})

    def _do_lfs_batch(self, body: bytes, repo: str) -> None:
        if self._repo(repo) is None:
            return
        objects = []
        for obj in json.loads(body).get("objects", []):
            oid, size = obj["oid"], obj["size"]
            entry: dict[str, Any] = {"oid": oid, "size": size}
            if oid not in self.fake.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.fake.url}/_lfs/{oid}"},
                    "verify": {"href": f"{self.fake.url}/_lfs/{oid}/verify"},
                }
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects})

    def _do_lfs_put(self, body: bytes, oid: str) -> None:
        if body and self._fault("PUT", f"/_lfs/{oid}", ("corrupt",)):
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        if sha256(body) != oid:  # never store bytes under the wrong name
            self._error(400, f"content does not hash to {oid}")
            return
        self.fake.lfs_objects[oid] = body
        self._send(200)

    def _do_lfs_verify(self, body: bytes, oid: str) -> None:
        info = json.loads(body or b"{}")
        data = self.fake.lfs_objects.get(oid)
        if data is None or info.get("size", len(data)) != len(data):
            self._error(404, f"object {oid} not uploaded")
            return
        self._json(200, {})

    def _do_commit(self, body: bytes, repo: str, rev: str) -> None:
        r = self._repo(repo)
        if r is None:
            return
        if rev not in r.branches:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except ValueError:
            self._error(400, "malformed NDJSON")
            return
        if not lines or lines[0].get("key") != "header":
            self._error(400, "first line must be the header")
            return
        header = lines[0]["value"]
        changes: dict[str, bytes | None] = {}
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                try:
                    changes[value["path"]] = base64.b64decode(value["content"], validate=True)
                except (ValueError, KeyError):
                    self._error(400, f"bad base64 content for {value.get('path')}")
                    return
            elif key == "lfsFile":
                data = self.fake.lfs_objects.get(value.get("oid", ""))
                if data is None:
                    self._error(422, f"LFS object {value.get('oid')} for {value.get('path')} was not uploaded")
                    return
                changes[value["path"]] = data
            elif key == "deletedFile":
                changes[value["path"]] = None
            else:
                self._error(400, f"unsupported commit operation {key!r}")
                return
        with self.fake._lock:
            head = r.branches[rev]
            parent = header.get("parentCommit")
            if parent and parent != head:
                self._error(412, "A commit has happened since. Please refresh and try again.")
                return
            files = dict(r.commits[head].files)
            for path, data in changes.items():
                if data is None:
                    files.pop(path, None)
                else:
                    files[path] = data
            commit = Commit(self.fake.new_oid(repo, header.get("summary", "")), head, header.get("summary", ""), files)
            r.commits[commit.oid] = commit
            r.branches[rev] = commit.oid
        self._json(200, {"commitOid": commit.oid, "commitUrl": f"{self.fake.url}/{repo}/commit/{commit.oid}",
                         "pullRequestUrl": None})

    def _do_create_branch(self, body: bytes, repo: str, rev: str) -> None:
        r = self._repo(repo)
        if r is None:
            return
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        with self.fake._lock:
            if rev in r.branches:
                self._error(409, f"Reference already exists: refs/heads/{rev}")
                return
            commit = r.resolve(start)
            if commit is None:
                self._error(404, f"Invalid rev id: {start}", "RevisionNotFound")
                return
            r.branches[rev] = commit.oid
        self._json(200, {})

    def _do_revision(self, body: bytes, repo: str, rev: str) -> None:
        r = self._repo(repo)
        commit = r and self._commit(r, rev)
        if commit is None:
            return
        self._json(200, {"id": repo, "modelId": repo, "sha": commit.oid, "private": r.private,
                         "siblings": [{"rfilename": p} for p in sorted(commit.files)]})

    def _do_model_info(self, body: bytes, repo: str) -> None:
        self._do_revision(body, repo, "main")

    def _do_tree(self, body: bytes, repo: str, rev: str, path: str | None) -> None:
        r = self._repo(repo)
        commit = r and self._commit(r, rev)
        if commit is None:
            return
        prefix = (path or "").strip("/")
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries: list[dict[str, Any]] = []
        dirs: set[str] = set()
        for p in sorted(commit.files):
            if prefix and not p.startswith(prefix + "/"):
                continue
            rel = p[len(prefix) + 1:] if prefix else p
            parts = rel.split("/")
            for i in range(1, len(parts)):
                d = "/".join(filter(None, [prefix, *parts[:i]]))
                if d not in dirs and (recursive or i == 1):
                    dirs.add(d)
                    entries.append({"type": "directory", "oid": git_sha1(d.encode()), "size": 0, "path": d})
            if len(parts) > 1 and not recursive:
                continue
            data = commit.files[p]
            entry: dict[str, Any] = {"type": "file", "oid": git_sha1(data), "size": len(data), "path": p}
            if is_lfs(p):
                entry["lfs"] = {"oid": sha256(data), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        self._json(200, entries)

    def _do_refs(self, body: bytes, repo: str) -> None:
        r = self._repo(repo)
        if r is None:
            return
        self._json(200, {"branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": o}
                                      for n, o in sorted(r.branches.items())],
                         "tags": [], "converts": []})

    def _do_resolve(self, body: bytes, repo: str, rev: str, path: str) -> None:
        r = self._repo(repo)
        commit = r and self._commit(r, rev)
        if commit is None:
            return
        data = commit.files.get(path)
        if data is None:
            self._error(404, f"Entry not found: {path}", "EntryNotFound")
            return
        etag = sha256(data) if is_lfs(path) else git_sha1(data)
        if self._fault(self.command, f"/{repo}/resolve/{rev}/{path}", ("wrong_etag",)):
            etag = sha256(b"not the file" + data)
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if is_lfs(path):
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(len(data))
        if self.command == "HEAD":
            self._send(200, data, headers, content_type="application/octet-stream")
            return
        status, start = 200, 0
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if m:
            start = int(m.group(1))
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        payload = data[start:]
        fault = self._fault("GET", f"/{repo}/resolve/{rev}/{path}", ("drop", "truncate"))
        if fault == "truncate":
            self._send(status, payload[: len(payload) // 2], headers, content_type="application/octet-stream")
            return
        if fault == "drop":
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self._hangup()
            return
        self._send(status, payload, headers, content_type="application/octet-stream")


if __name__ == "__main__":  # pragma: no cover
    with FakeHub() as hub:
        print(f"fake hub at {hub.url} (HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1); Ctrl-C stops")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
