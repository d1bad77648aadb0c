"""Shared fixtures: torch/torchvision as the reference, the backend matrix, a loopback server."""

import http.server
import socketserver
import sys
import threading
import types

import numpy as np
import pytest

import numres


def import_torchvision():
    """(torch, torchvision) or skip with the reason."""
    torch = pytest.importorskip("torch", reason="torch is not installed (reference checks)")
    # torchvision's PyPI wheel is a CUDA build: beside CPU torch its meta registrations fail
    # to import ("operator torchvision::nms does not exist"); the models do not need them.
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    torchvision = pytest.importorskip("torchvision",
                                      reason="torchvision is not installed (reference models)")
    return torch, torchvision


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

    ``modes[path]``: ``"truncate"`` sends the full Content-Length but half the body.
    Paths not in ``files`` are 404. ``requests`` records the paths asked for.
    """

    def __init__(self):
        self.files, self.modes, self.requests = {}, {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.modes.get(self.path) == "truncate":
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def file_server():
    server = FileServer()
    yield server
    server.close()
