"""A small in-memory server speaking the part of the Hugging Face Hub HTTP protocol that
huggingface_hub 2.x uses for create_repo / upload_folder / model_info / hf_hub_download /
snapshot_download. For tests only: no LFS (preupload answers "regular" for every file).

    server = HubServer(); server.start(); ...; server.stop()
    server.auth = "ok" | "401" | "403"     # fail every request with that status when not "ok"
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)"
                  r"(?:/(?P<action>revision|preupload|commit|tree|discussions)(?:/(?P<rev>[^/]+))?(?P<rest>/.*)?)?$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d+)$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    def __init__(self, private: bool):
        self.private = private
        self.commits: dict[str, dict[str, bytes]] = {}   # sha -> {path: content}
        self.refs: dict[str, str] = {}                    # branch / refs/pr/N -> sha
        self._commit("initial commit", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                     "main")

    def _commit(self, message: str, files: dict[str, bytes], ref: str) -> str:
        sha = hashlib.sha1(f"{message}{len(self.commits)}{sorted(files)}".encode()
                           + b"".join(files[k] for k in sorted(files))).hexdigest()
        self.commits[sha] = files
        self.refs[ref] = sha
        return sha

    def resolve(self, rev: str) -> str | None:
        if rev in self.refs:
            return self.refs[rev]
        return rev if rev in self.commits else None


class HubServer:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.auth = "ok"
        self.requests: list[tuple[str, str]] = []   # (method, path) log, for assertions
        self.bytes_served: dict[str, int] = {}       # file path -> body bytes sent (ranges included)
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(rev)]


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

    # ------------------------------------------------------------------ replies
    def _reply(self, status: int, body: bytes = b"", headers: dict | None = None, *, head: bool = False,
               ctype: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Date", formatdate(usegmt=True))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers=None, head=False):
        self._reply(status, json.dumps(obj).encode(), headers, head=head)

    def _error(self, status: int, code: str | None, message: str, head=False):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers, head=head)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    # ------------------------------------------------------------------ dispatch
    def _handle(self, method: str):
        parts = urlsplit(self.path)
        path, query = parts.path, parse_qs(parts.query)  # groups are unquoted after matching
        hub = self.hub
        with hub.lock:
            hub.requests.append((method, path))
        head = method == "HEAD"
        if hub.auth == "401":
            return self._error(401, None, "Invalid credentials in Authorization header", head=head)
        if hub.auth == "403":
            return self._error(403, None, "You don't have the rights to access this repository", head=head)
        body = self._body() if method == "POST" else b""
        with hub.lock:
            if method == "POST" and path == "/api/repos/create":
                return self._create(json.loads(body or b"{}"))
            if method == "POST" and path == "/api/validate-yaml":
                return self._json(200, {"warnings": []})
            if method in ("GET", "HEAD") and path in ("/api/whoami-v2", "/api/whoami"):
                return self._json(200, {"name": "user", "type": "user", "orgs": [],
                                        "auth": {"accessToken": {"role": "write"}}}, head=head)
            m = _API.match(path)
            if m:
                return self._api(method, {k: v and unquote(v) for k, v in m.groupdict().items()}, query, body)
            m = _RESOLVE.match(path)
            if m and method in ("GET", "HEAD"):
                return self._resolve({k: unquote(v) for k, v in m.groupdict().items()}, head)
            return self._error(404, None, f"no route {method} {path}", head=head)

    do_GET = lambda self: self._handle("GET")          # noqa: E731
    do_HEAD = lambda self: self._handle("HEAD")        # noqa: E731
    do_POST = lambda self: self._handle("POST")        # noqa: E731

    # ------------------------------------------------------------------ routes
    def _create(self, payload):
        name, org = payload.get("name"), payload.get("organization") or "user"
        repo_id = f"{org}/{name}"
        if repo_id in self.hub.repos:
            return self._json(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"},
                              {"X-Error-Message": "You already created this model repo"})
        self.hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
        return self._json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _repo_or_404(self, repo_id, head=False):
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head=head)
        return repo

    def _api(self, method, m, query, body):
        repo_id, action, rev = m["repo"], m["action"], m["rev"]
        head = method == "HEAD"
        repo = self._repo_or_404(repo_id, head)
        if repo is None:
            return None
        if action is None or action == "revision":
            sha = repo.resolve(rev or "main")
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
            files = repo.commits[sha]
            return self._json(200, {
                "id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                "siblings": [{"rfilename": p, "size": len(d), "blobId": _git_blob_sha(d)}
                             for p, d in sorted(files.items())],
                "tags": [], "downloads": 0, "likes": 0}, head=head)
        if action == "tree" and method == "GET":
            sha = repo.resolve(rev)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return self._json(200, [{"type": "file", "path": p, "size": len(d), "oid": _git_blob_sha(d)}
                                    for p, d in sorted(repo.commits[sha].items())])
        if action == "preupload" and method == "POST":
            sha = repo.resolve(rev)
            current = repo.commits[sha] if sha else {}
            files = json.loads(body)["files"]
            return self._json(200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": _git_blob_sha(current[f["path"]]) if f["path"] in current else None} for f in files]})
        if action == "commit" and method == "POST":
            return self._commit(repo_id, repo, rev, query, body)
        if action == "discussions" and method == "POST" and rev is None:  # open a pull request
            n = 1 + sum(r.startswith("refs/pr/") for r in repo.refs)
            repo.refs[f"refs/pr/{n}"] = repo.refs["main"]
            repo.titles = {**getattr(repo, "titles", {}), n: json.loads(body).get("title", "")}
            return self._json(200, {"num": n})
        if action == "discussions" and method == "GET" and rev and rev.isdigit() and f"refs/pr/{rev}" in repo.refs:
            return self._json(200, {
                "title": getattr(repo, "titles", {}).get(int(rev), ""), "num": int(rev), "author": {"name": "user"},
                "createdAt": "2026-01-01T00:00:00.000Z", "status": "open", "isPullRequest": True,
                "repo": {"name": repo_id, "type": "model"}, "events": [], "filesWithConflicts": [],
                "changes": {"base": "refs/heads/main"}})
        return self._error(404, None, f"no route {method} {self.path}", head=head)

    def _commit(self, repo_id, repo, rev, query, body):
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        create_pr = query.get("create_pr") == ["1"]
        base = repo.resolve(rev)
        if base is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        files = dict(repo.commits[base])
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {k: v for k, v in files.items() if not k.startswith(prefix)}
            elif key == "lfsFile":
                return self._error(400, None, "this test server accepts regular uploads only (no LFS)")
        ref = rev
        pr_url = None
        if create_pr:
            n = 1 + sum(r.startswith("refs/pr/") for r in repo.refs)
            ref = f"refs/pr/{n}"
            pr_url = f"{self.hub.url}/{repo_id}/discussions/{n}"
        sha = repo._commit(header.get("summary", ""), files, ref)
        return self._json(200, {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                                "pullRequestUrl": pr_url, "success": True})

    def _resolve(self, m, head):
        repo = self._repo_or_404(m["repo"], head)
        if repo is None:
            return None
        sha = repo.resolve(m["rev"])
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {m['rev']}", head=head)
        data = repo.commits[sha].get(m["path"])
        if data is None:
            return self._error(404, "EntryNotFound", f"{m['path']} does not exist on {m['rev']}", head=head)
        etag = f'"{_git_blob_sha(data)}"'
        headers = {"X-Repo-Commit": sha, "ETag": etag, "Accept-Ranges": "bytes"}
        status, rng = 200, _RANGE.match(self.headers.get("Range") or "")
        if rng:  # "bytes=a-b": the Hub client reads safetensors headers this way
            a, b = int(rng[1]), min(int(rng[2]), len(data) - 1)
            headers["Content-Range"] = f"bytes {a}-{b}/{len(data)}"
            status, data = 206, data[a:b + 1]
        if not head:
            key = f"{m['repo']}/{m['path']}"
            self.hub.bytes_served[key] = self.hub.bytes_served.get(key, 0) + len(data)
        return self._reply(status, data, headers, head=head, ctype="application/octet-stream")
