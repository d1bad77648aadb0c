"""A stand-in for huggingface.co on 127.0.0.1: the Hub's URL layout, headers and redirects.

Nothing here is a real Hub file: repos are built by the tests (timm's repo and file names,
weights from numres models), and every request goes to two loopback servers.

* ``hub`` (the endpoint): ``HEAD``/``GET /{org}/{name}/resolve/{revision}/{file}``. A regular
  file (``config.json``) is answered in place with ``ETag`` = its git blob id; an LFS file
  (``*.safetensors``, ``*.bin``) gets a ``302`` to the CDN with ``X-Linked-Etag`` = its sha256
  and ``X-Linked-Size``. Every answer carries ``X-Repo-Commit``. Errors carry the Hub's
  ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``); a private
  repo wants ``Authorization: Bearer <token>`` (401 otherwise).
* ``cdn`` (another port, so another origin, as the Hub's CDN is): ``GET /lfs/<sha256>``.

``requests`` records ``(server, method, path, authorization)`` for every request;
``override[server]``, a function ``(handler, method)``, replaces a server's answers.
"""

import hashlib
import http.server
import re
import socketserver
import threading
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".pth")
_RESOLVE = re.compile(r"^/(?P<repo>.+?)/resolve/(?P<revision>[^/]+)/(?P<file>.+)$")


def git_blob_id(data):
    """What the Hub's ETag is for a regular file: git's object id."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer:
    """Two loopback servers laid out like the Hub and its CDN. Use as a context manager."""

    def __init__(self):
        self.repos = {}          # repo_id -> {"refs": {revision: commit}, "commits": {...}}
        self.private = {}        # repo_id -> token it wants
        self.lfs = {}            # sha256 -> bytes
        self.corrupt = set()     # sha256s the CDN serves damaged
        self.requests = []
        self.override = {}
        self._lock = threading.Lock()
        self.hub = self._serve("hub", self._hub)
        self.cdn = self._serve("cdn", self._cdn)

    # -- content ------------------------------------------------------------------------
    def add_repo(self, repo_id, files, revision="main"):
        """Publish ``files`` (name -> bytes) as a new commit on ``revision``; returns it."""
        commit = hashlib.sha1(repr((repo_id, revision, sorted(
            (name, hashlib.sha256(data).hexdigest()) for name, data in files.items()))
        ).encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}})
        repo["refs"][revision] = commit
        repo["commits"][commit] = dict(files)
        for name, data in files.items():
            if name.endswith(LFS_SUFFIXES):
                self.lfs[hashlib.sha256(data).hexdigest()] = data
        return commit

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.hub.server_address[1]}"

    def paths(self, server=None, method=None):
        """The paths requested (of one server / method)."""
        return [p for s, m, p, _ in self.requests
                if (server is None or s == server) and (method is None or m == method)]

    # -- handlers -----------------------------------------------------------------------
    def _hub(self, handler, method):
        match = _RESOLVE.match(urlparse(handler.path).path)
        if not match:
            return handler.answer(404, {"X-Error-Code": "RepoNotFound"})
        repo_id, revision = unquote(match["repo"]), unquote(match["revision"])
        filename = unquote(match["file"])
        repo = self.repos.get(repo_id)
        token = self.private.get(repo_id)
        if repo is None or (token and handler.headers.get("Authorization") != f"Bearer {token}"):
            # The Hub answers 401 for a repo it does not show to this caller.
            return handler.answer(401 if token else 404, {"X-Error-Code": "RepoNotFound"})
        commit = repo["refs"].get(revision, revision if revision in repo["commits"] else None)
        if commit is None:
            return handler.answer(404, {"X-Error-Code": "RevisionNotFound"})
        data = repo["commits"][commit].get(filename)
        headers = {"X-Repo-Commit": commit}
        if data is None:
            return handler.answer(404, {**headers, "X-Error-Code": "EntryNotFound"})
        if filename.endswith(LFS_SUFFIXES):
            sha = hashlib.sha256(data).hexdigest()
            port = self.cdn.server_address[1]
            headers.update({"Location": f"http://127.0.0.1:{port}/lfs/{sha}?X-Amz-Signature=x",
                            "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                            "ETag": f'W/"{git_blob_id(data)[:20]}"'})
            return handler.answer(302, headers)
        headers["ETag"] = f'"{git_blob_id(data)}"'
        return handler.answer(200, headers, data if method == "GET" else None, len(data))

    def _cdn(self, handler, method):
        sha = urlparse(handler.path).path.rsplit("/", 1)[-1]
        data = self.lfs.get(sha)
        if data is None:
            return handler.answer(404, {})
        if sha in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return handler.answer(200, {"ETag": f'"{sha}"'}, data if method == "GET" else None,
                              len(data))

    def _serve(self, name, route):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self._route("GET")

            def do_HEAD(self):
                self._route("HEAD")

            def _route(self, method):
                with server._lock:
                    server.requests.append((name, method, self.path,
                                            self.headers.get("Authorization")))
                (server.override.get(name) or route)(self, method)

            def answer(self, status, headers, body=None, length=None):
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(length if length is not None
                                                       else len(body or b"")))
                self.end_headers()
                if body:
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        httpd = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
        return httpd

    def close(self):
        for httpd in (self.hub, self.cdn):
            httpd.shutdown()
            httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
