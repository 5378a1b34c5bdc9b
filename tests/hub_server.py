"""A stand-in for the Hugging Face Hub on 127.0.0.1 (a threading http.server on port 0), serving
the endpoints huggingface_hub calls to resolve, list, read headers of and download model repos:

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: model info (``sha``,
  ``siblings``): ``model_info`` / ``repo_info``;
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the file listing ``snapshot_download`` reads;
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{file}``, with ``Range: bytes=a-b`` (206): the file's
  metadata (``X-Repo-Commit``, ``ETag``, ``Content-Length``), its bytes, and the safetensors
  header reads of ``parse_safetensors_file_metadata``.

Errors carry huggingface_hub's ``X-Error-Code`` (RepoNotFound, RevisionNotFound, GatedRepo,
EntryNotFound). Every request is logged (method, path, Range header) for the tests' asserts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

WEIGHTS = re.compile(r"\.(safetensors|bin)$")


@dataclass
class Repo:
    refs: dict[str, str] = field(default_factory=dict)  # branch / tag → commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    gated: bool = False


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # unquoted, without the query
    range: str | None

    @property
    def file(self) -> str | None:
        """The repo file of a resolve request (None for API calls)."""
        m = re.match(r"^/.+?/resolve/[^/]+/(.+)$", self.path)
        return m[1] if m else None

    @property
    def weight_download(self) -> bool:
        """A GET of a weight file's bytes beyond the header reads (a Range from byte 0 or 8 of at
        most 100 kB is huggingface_hub's safetensors header read)."""
        if self.method != "GET" or self.file is None or not WEIGHTS.search(self.file):
            return False
        if self.range is None:
            return True
        m = re.match(r"bytes=(\d+)-(\d*)", self.range)
        return not (m and int(m[1]) in (0, 8) and m[2] and int(m[2]) <= 100_008)


class FakeHub:
    """``with FakeHub() as hub: hub.add("org/name", folder)``; ``hub.url`` for HF_ENDPOINT."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.log: list[Request] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def add(self, repo_id: str, folder: Path, *, revision: str = "main",
            gated: bool = False) -> str:
        """Serve the files of ``folder`` as ``repo_id`` at ``revision``; the commit sha."""
        files = {str(p.relative_to(folder)): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        h = hashlib.sha1(repo_id.encode())
        for name, data in files.items():
            h.update(name.encode() + hashlib.sha256(data).digest())
        sha = h.hexdigest()
        repo = self.repos.setdefault(repo_id, Repo())
        repo.commits[sha] = files
        repo.refs[revision] = sha
        repo.gated = gated
        return sha

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    def requests(self) -> list[Request]:
        with self._lock:
            return list(self.log)

    def weight_downloads(self) -> list[str]:
        return [r.path for r in self.requests() if r.weight_download]

    def record(self, req: Request) -> None:
        with self._lock:
            self.log.append(req)

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    # -- routing ------------------------------------------------------------------------------
    def _serve(self, body: bool) -> None:
        raw = urlsplit(self.path).path
        self.fake.record(Request(self.command, unquote(raw), self.headers.get("Range")))
        if raw.startswith("/api/models/"):
            self._api(raw[len("/api/models/"):], body)
        elif "/resolve/" in raw:
            repo_id, rest = raw.lstrip("/").split("/resolve/", 1)
            rev, _, fname = rest.partition("/")
            self._file(unquote(repo_id), unquote(rev), unquote(fname), body)
        else:
            self._error(404, "RepoNotFound", "not an endpoint of this fake hub", body)

    def _lookup(self, repo_id: str, rev: str, body: bool) -> tuple[str, dict[str, bytes]] | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", body)
            return None
        if repo.gated and "authorization" not in {k.lower() for k in self.headers}:
            self._error(401, "GatedRepo", "Access to model is restricted. You must have "
                                          "access to it and be authenticated.", body)
            return None
        sha = repo.refs.get(rev, rev if rev in repo.commits else None)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", body)
            return None
        return sha, repo.commits[sha]

    def _api(self, rest: str, body: bool) -> None:
        marker = next((m for m in ("/revision/", "/tree/") if m in rest), None)
        if marker is None:
            repo_id, kind, rev, sub = rest, "info", "main", ""
        else:
            repo_id, tail = rest.split(marker, 1)
            kind = "info" if marker == "/revision/" else "tree"
            rev, _, sub = tail.partition("/")
        found = self._lookup(unquote(repo_id), unquote(rev), body)
        if found is None:
            return
        sha, files = found
        repo_id = unquote(repo_id)
        if kind == "info":
            data: Any = {"_id": sha[:24], "id": repo_id, "modelId": repo_id, "sha": sha,
                         "private": False, "gated": False, "disabled": False, "tags": [],
                         "downloads": 0, "likes": 0,
                         "lastModified": "2024-01-01T00:00:00.000Z",
                         "siblings": [{"rfilename": f} for f in files]}
        else:
            prefix = unquote(sub).strip("/")
            data = [{"type": "file", "path": f, "size": len(b),
                     "oid": hashlib.sha1(b).hexdigest()}
                    for f, b in files.items() if not prefix or f.startswith(prefix + "/")]
        self._send(200, json.dumps(data).encode(), body, {"Content-Type": "application/json"})

    def _file(self, repo_id: str, rev: str, fname: str, body: bool) -> None:
        found = self._lookup(repo_id, rev, body)
        if found is None:
            return
        sha, files = found
        if fname not in files:
            self._error(404, "EntryNotFound", f"{fname} does not exist", body,
                        {"X-Repo-Commit": sha})
            return
        data = files[fname]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        rng = self.headers.get("Range")
        m = re.match(r"bytes=(\d+)-(\d*)$", rng or "")
        if m and body:
            start = int(m[1])
            stop = min(len(data) - 1, int(m[2])) if m[2] else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{stop}/{len(data)}"
            self._send(206, data[start:stop + 1], body, headers)
            return
        self._send(200, data, body, headers)

    def _error(self, status: int, code: str, message: str, body: bool,
               extra: dict[str, str] | None = None) -> None:
        payload = json.dumps({"error": message}).encode()
        self._send(status, payload, body, {"X-Error-Code": code, "X-Error-Message": message,
                                           "Content-Type": "application/json", **(extra or {})})

    def _send(self, status: int, payload: bytes, body: bool, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)


@contextlib.contextmanager
def serve_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """A running FakeHub with HF_ENDPOINT pointed at it, HF_HOME in ``tmp_path`` and online
    mode (the test session defaults to HF_HUB_OFFLINE=1); stopped at the end."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        offline(monkeypatch, False)
        yield hub


def offline(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    """HF_HUB_OFFLINE as a new process would see it (huggingface_hub reads it at import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if on else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", on)
