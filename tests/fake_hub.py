"""An in-memory Hugging Face Hub for tests: the endpoints `create_repo`, `upload_folder` and `snapshot_download`
call, mounted under huggingface_hub's HTTP client so that no request leaves the process."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from urllib.parse import unquote

try:
    import httpx2
except ImportError:  # huggingface_hub 1.x, as in recipes/check_lowest_dependencies.sh
    import httpx as httpx2
import yaml
from huggingface_hub import set_client_factory
from huggingface_hub.utils._http import default_client_factory


class FakeHub:
    """The Hub endpoints that `create_repo`, `upload_folder` and `snapshot_download` call, kept in memory.

    Mounted as an httpx2 `MockTransport` under huggingface_hub's HTTP client, so no request leaves the process.
    Uploads are answered with the "regular" mode: files come base64-encoded in the commit payload.
    """

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.commits: list[list[dict]] = []
        self.unexpected: list[str] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = unquote(request.url.path)
        self.requests.append((request.method, path))
        api = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/(revision|tree|preupload|commit)/([^/]+)(/.*)?", path)
        resolve = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if request.method == "POST" and path == "/api/repos/create":
            return self._create(request)
        if path == "/api/agent-harnesses":  # huggingface_hub's best-effort user-agent lookup: it copes with a 404
            return httpx2.Response(404)
        if request.method == "POST" and path == "/api/validate-yaml":  # the Hub checks a card's metadata on upload
            body = json.loads(request.content)
            assert body["repoType"] == "dataset" and "hf_freezecache" in yaml.safe_load(
                body["content"].split("---\n")[1]
            )
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if api and api.group(1) not in self.repos:
            return httpx2.Response(
                404, headers={"X-Error-Code": "RepoNotFound"}, json={"error": "Repository not found"}
            )
        if api and (request.method, api.group(2)) == ("GET", "revision"):
            sha, files = self._revision(api.group(1), api.group(3))
            return httpx2.Response(
                200, json={"id": api.group(1), "sha": sha, "siblings": [{"rfilename": f} for f in files]}
            )
        if api and (request.method, api.group(2)) == ("GET", "tree"):
            _, files = self._revision(api.group(1), api.group(3))
            entries = [{"type": "file", "path": p, "size": len(b), "oid": _git_oid(b)} for p, b in files.items()]
            return httpx2.Response(200, json=entries)
        if api and (request.method, api.group(2)) == ("POST", "preupload"):
            _, files = self._revision(api.group(1), api.group(3))
            answers = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": _git_oid(files[f["path"]]) if f["path"] in files else None,
                }
                for f in json.loads(request.content)["files"]
            ]
            return httpx2.Response(200, json={"files": answers})
        if api and (request.method, api.group(2)) == ("POST", "commit"):
            return self._commit(api.group(1), api.group(3), request)
        if resolve and resolve.group(1) in self.repos and request.method in ("HEAD", "GET"):
            sha, files = self._revision(resolve.group(1), resolve.group(2))
            content = files[resolve.group(3)]
            headers = {"X-Repo-Commit": sha, "ETag": f'"{_git_oid(content)}"', "Content-Length": str(len(content))}
            return httpx2.Response(200, headers=headers, content=content if request.method == "GET" else b"")
        self.unexpected.append(f"{request.method} {path}")
        return httpx2.Response(400, json={"error": f"FakeHub does not serve {request.method} {path}"})

    def _create(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        repo_id = f"{body['organization']}/{body['name']}"
        url = f"https://huggingface.co/datasets/{repo_id}"
        if repo_id in self.repos:
            return httpx2.Response(409, json={"error": "You already created this dataset repo", "url": url})
        assert body["type"] == "dataset" and request.headers["authorization"] == "Bearer hf_fake_token"
        gitattributes = {".gitattributes": b"*.parquet filter=lfs diff=lfs merge=lfs -text\n"}
        # huggingface_hub 2 sends `visibility`, 1.x a `private` flag.
        visibility = body.get("visibility") or {True: "private", False: "public"}.get(body.get("private"))
        self.repos[repo_id] = {"visibility": visibility, "history": [(_sha("init"), gitattributes)]}
        return httpx2.Response(200, json={"url": url, "name": repo_id})

    def _revision(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]]:
        history = self.repos[repo_id]["history"]
        return history[-1] if revision == "main" else (revision, dict(history)[revision])

    def _commit(self, repo_id: str, revision: str, request: httpx2.Request) -> httpx2.Response:
        assert revision == "main"
        lines = [json.loads(line) for line in request.content.splitlines()]
        self.commits.append(lines)
        parent, files = self._revision(repo_id, revision)
        files = dict(files)
        for line in lines:
            if line["key"] == "file":
                assert line["value"]["encoding"] == "base64"
                files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            elif line["key"] == "deletedFile":
                del files[line["value"]["path"]]
            elif line["key"] != "header":
                return httpx2.Response(400, json={"error": f"FakeHub cannot commit {line['key']}"})
        sha = _sha(parent + request.content.decode())
        self.repos[repo_id]["history"].append((sha, files))
        url = f"https://huggingface.co/datasets/{repo_id}/commit/{sha}"
        return httpx2.Response(200, json={"commitUrl": url, "commitOid": sha, "pullRequestUrl": None})

    def files(self, repo_id: str) -> dict[str, bytes]:
        return {p: b for p, b in self.repos[repo_id]["history"][-1][1].items() if p != ".gitattributes"}


def install(fake: FakeHub) -> None:
    """Routes huggingface_hub's requests to `fake` (`restore()` undoes it)."""
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(fake), follow_redirects=True))


def restore() -> None:
    set_client_factory(default_client_factory)


def _git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()
