"""Shared fixtures: torch/torchvision as the reference, the backend matrix, a loopback server."""

import http.server
import os
import socketserver
import threading

import numpy as np
import pytest

# Tests of the Numba backend test its kernels: on a machine whose Numba cache is empty they
# compile in the process, not in the background behind NumPy (that has its own test:
# tests/backends/test_background_compile.py).
os.environ.setdefault("NUMRES_BACKGROUND_COMPILE", "0")

import numres  # noqa: E402

from . import torch_import  # noqa: E402


def import_torchvision():
    """(torch, torchvision) or skip with the reason."""
    try:
        return torch_import.import_torchvision()
    except ImportError as exc:
        pytest.skip(f"torch/torchvision unusable (reference checks): {exc}")


@pytest.fixture(scope="session")
def tv():
    return import_torchvision()


CPU_BACKENDS = [b for b in numres.available_backends() if b != "cupy"]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """Every CPU backend available here; tests compare each with the NumPy oracle."""
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    # No test may read or write the user's real caches, or reach a mirror set outside.
    monkeypatch.setenv("NUMRES_HOME", str(tmp_path / "numres-home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("NUMRES_WEIGHTS_URL", raising=False)


class FileServer:
    """HTTP server on 127.0.0.1 serving ``files`` (path -> bytes) with failure modes.

    ``modes[path]`` is a string or a tuple whose first item names the mode:

    * ``"truncate"``: the full Content-Length, half the body, then the connection closes.
    * ``"stall"``: the full Content-Length, half the body, then nothing for ``stall_s``.
    * ``("trickle", nbytes, delay_s)``: the body in pieces of ``nbytes`` every ``delay_s``.
    * ``("fail", n, status, retry_after)``: the first ``n`` requests get ``status`` (with a
      ``Retry-After: retry_after`` header unless it is None), later ones the file.
    * ``"no-length"``: no Content-Length; the body ends when the connection closes.
    * ``("too-long", extra)``: announces the body's length, sends ``extra`` more bytes.
    * ``"keep-open"``: the whole body, then the connection stays open for ``stall_s``
      (a server ignoring "Connection: close").

    ``redirects[path] = (status, location)`` answers ``path`` with a redirect. Other paths
    not in ``files`` are 404. ``requests`` records the paths asked for, in order, ``headers``
    their headers. Every wait ends after at most ``stall_s`` or as soon as the server closes,
    whichever is first.
    """

    def __init__(self):
        self.files, self.modes, self.redirects, self.requests = {}, {}, {}, []
        self.headers = []  # the request headers, one dict per request
        self.stall_s = 10.0
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with server._lock:
                    server.requests.append(self.path)
                    server.headers.append(dict(self.headers))
                    served = server.requests.count(self.path)
                try:
                    self._respond(served)
                except OSError:
                    pass  # the client gave up (a timeout under test): nothing to tell it

            def _respond(self, served):
                if self.path in server.redirects:
                    status, location = server.redirects[self.path]
                    self.send_response(status)
                    self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                mode = server.modes.get(self.path, ("plain",))
                mode = (mode,) if isinstance(mode, str) else tuple(mode)
                if mode[0] == "fail" and served <= mode[1]:
                    self.send_response(mode[2])
                    if mode[3] is not None:
                        self.send_header("Retry-After", str(mode[3]))
                    self.send_header("Content-Length", "4")
                    self.end_headers()
                    self.wfile.write(b"busy")
                    return
                self.send_response(200)
                if mode[0] != "no-length":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode[0] in ("truncate", "stall"):
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    if mode[0] == "stall":
                        server.stopping.wait(server.stall_s)
                    self.connection.shutdown(2)  # SHUT_RDWR: the body ends here
                elif mode[0] == "trickle":
                    for start in range(0, len(body), mode[1]):
                        self.wfile.write(body[start:start + mode[1]])
                        self.wfile.flush()
                        if server.stopping.wait(mode[2]):
                            return
                elif mode[0] == "too-long":
                    self.wfile.write(body + bytes(mode[1]))
                else:
                    self.wfile.write(body)
                    if mode[0] == "keep-open":
                        self.wfile.flush()
                        server.stopping.wait(server.stall_s)

            def log_message(self, *args):
                pass

        self.httpd = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        # A short poll interval: shutdown() waits up to one interval (0.5 s by default).
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,),
                                       daemon=True)
        self.thread.start()

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self):
        self.stopping.set()  # ends every wait in the handlers at once
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def file_server():
    server = FileServer()
    yield server
    server.close()
