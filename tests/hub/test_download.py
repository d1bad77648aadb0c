"""The real download code against a real HTTP server on 127.0.0.1."""

import hashlib
import importlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import numres
from numres import DownloadError
from numres.hub import cache_dir, cached_file, registry
from numres.hub.download import MAX_REDIRECTS, UnverifiedDownloadWarning

# The module (numres.hub re-exports its function download() under the same name).
download = importlib.import_module("numres.hub.download")

# Wall-clock bounds are wide on purpose: the machine running the tests may be slow or busy;
# each bound only has to tell "gave up on time" from "hung".
HUNG_S = 20.0


@pytest.fixture(autouse=True)
def waits(monkeypatch):
    """Retries back off 10 ms; the waits asked for are recorded (at most 10 ms slept each)."""
    asked = []

    def sleep(seconds):
        asked.append(seconds)
        time.sleep(min(seconds, 0.01))

    monkeypatch.setattr(download, "BACKOFF_S", 0.01)
    monkeypatch.setattr(download, "_sleep", sleep)
    return asked


def named_file(data, stem="resnet18"):
    """The official naming: ``<stem>-<first 8 hex of sha256>.pth``."""
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"


def tiny_checkpoint():
    return _checkpoint_bytes({"w": np.arange(10, dtype=np.float32)})


def _checkpoint_bytes(state):
    with tempfile.TemporaryDirectory() as tmp:
        numres.save_pth(state, Path(tmp) / "x.pth")
        return (Path(tmp) / "x.pth").read_bytes()


def cache_contents():
    """Every entry of the cache folder, hidden ones (temporary and lock files) included."""
    folder = cache_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def big_checkpoint():
    return tiny_checkpoint() + bytes(200_000)  # a valid file with a tail: many reads


def fails(url, **options):
    """The DownloadError message of ``cached_file(url)`` and the seconds it took."""
    start = time.monotonic()
    with pytest.raises(DownloadError) as info:
        cached_file(url, progress=False, **options)
    return str(info.value), time.monotonic() - start


def test_good_file_is_verified_cached_and_not_fetched_twice(file_server):
    data = tiny_checkpoint()
    name = named_file(data)
    file_server.files["/models/" + name] = data
    path = cached_file(file_server.url("/models/" + name), progress=False)
    assert path.read_bytes() == data and path.parent == cache_dir()
    assert cache_contents() == [name]
    again = cached_file(file_server.url("/models/" + name), progress=False)
    assert again == path
    assert file_server.requests == ["/models/" + name]


def test_wrong_hash_leaves_nothing(file_server):
    data = tiny_checkpoint()
    name = "resnet18-00000000.pth"
    file_server.files["/" + name] = data
    with pytest.raises(DownloadError) as info:
        cached_file(file_server.url("/" + name), progress=False)
    message = str(info.value)
    assert "expected sha256 starting 00000000" in message
    assert hashlib.sha256(data).hexdigest() in message
    assert "truncated" not in message and "announced" not in message  # the length was right
    assert file_server.requests == ["/" + name]          # a hash mismatch is not retried
    assert cache_contents() == []


def test_truncated_body_leaves_nothing(file_server):
    data = tiny_checkpoint() + bytes(100_000)
    name = named_file(data)
    file_server.files["/" + name] = data
    file_server.modes["/" + name] = "truncate"
    with pytest.raises(DownloadError, match=f"{name}") as info:
        cached_file(file_server.url("/" + name), progress=False)
    assert f"truncated: got {len(data) // 2} of {len(data)} bytes" in str(info.value)
    assert "after 3 attempts" in str(info.value)
    assert file_server.requests == ["/" + name] * 3
    assert cache_contents() == []


def test_http_404(file_server):
    with pytest.raises(DownloadError) as info:
        cached_file(file_server.url("/resnet18-12345678.pth"), progress=False)
    message = str(info.value)
    assert "HTTP 404" in message and file_server.url("/resnet18-12345678.pth") in message
    assert "place it at" in message and str(cache_dir()) in message
    assert file_server.requests == ["/resnet18-12345678.pth"]   # 4xx is not retried
    assert cache_contents() == []


def test_nothing_listening():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]          # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/resnet18-12345678.pth"
    with pytest.raises(DownloadError, match="offline") as info:
        cached_file(url, progress=False)
    assert url in str(info.value) and "attempts" not in str(info.value)  # not retried
    assert cache_contents() == []


def test_torch_hub_cache_is_reused(tmp_path, monkeypatch, file_server):
    data = tiny_checkpoint()
    name = named_file(data)
    hub = tmp_path / "torch-home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / name).write_bytes(data)
    assert cached_file(file_server.url("/" + name), progress=False) == hub / name
    assert file_server.requests == []


def test_pretrained_builder_downloads_through_the_mirror(monkeypatch, file_server):
    model = numres.resnet18(backend="numpy")
    data = _checkpoint_bytes(model.state_dict())
    # The registry's real file name carries the official hash, which this file cannot have:
    # point the registry entry at a file named after its own hash, as an air-gapped mirror
    # of a re-saved copy would be.
    name = named_file(data)
    weights = registry.Weights(**{**registry.REGISTRY["resnet18"]["IMAGENET1K_V1"].__dict__,
                                  "file_name": name})
    monkeypatch.setitem(registry.REGISTRY["resnet18"], "IMAGENET1K_V1", weights)
    file_server.files["/mirror/" + name] = data
    monkeypatch.setenv("NUMRES_WEIGHTS_URL", file_server.url("/mirror"))
    loaded = numres.resnet18(pretrained=True, backend="numpy")
    assert loaded.weights is weights
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[k], v)
    assert file_server.requests == ["/mirror/" + name]


def test_url_weights_are_verified(file_server):
    model = numres.resnet18(num_classes=3, backend="numpy")
    data = _checkpoint_bytes(model.state_dict())
    good = named_file(data, "custom")
    file_server.files["/" + good] = data
    file_server.files["/custom-ffffffff.pth"] = data
    loaded = numres.resnet18(weights=file_server.url("/" + good), num_classes=3,
                             backend="numpy")
    np.testing.assert_array_equal(loaded.fc.params["weight"], model.fc.params["weight"])
    with pytest.raises(DownloadError, match="hash mismatch"):
        numres.resnet18(weights=file_server.url("/custom-ffffffff.pth"), num_classes=3)


def test_progress_bar_only_on_a_terminal(file_server, capsys, monkeypatch):
    data = tiny_checkpoint()
    name = named_file(data)
    file_server.files["/" + name] = data
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    cached_file(file_server.url("/" + name), progress=True)
    err = capsys.readouterr().err
    assert f"Downloading {name}" in err and "100%" in err


def test_request_headers(file_server):
    # identity: Content-Length counts the stored bytes; close: nothing may follow the body.
    file_server.files["/f.pth"] = b"x"
    download.download(file_server.url("/f.pth"), cache_dir() / "f.pth", progress=False,
                      headers={"Authorization": "Bearer t"})
    sent = file_server.headers[0]
    assert sent["Accept-Encoding"] == "identity" and sent["Connection"] == "close"
    assert sent["Authorization"] == "Bearer t" and sent["User-Agent"] == "numres"


# --- faults: timeouts -----------------------------------------------------------------------

def test_stall_mid_body_is_a_read_timeout_retried_then_reported(file_server):
    data = tiny_checkpoint()    # small: its first half surely arrives within the read timeout
    name = named_file(data)
    file_server.files["/" + name] = data
    file_server.modes["/" + name] = "stall"     # half the body, then silence for 10 s
    message, took = fails(file_server.url("/" + name), read_timeout=0.5, attempts=2)
    assert f"stalled: no data for 0.5 s after {len(data) // 2} of {len(data)} bytes" in message
    assert "after 2 attempts" in message and file_server.url("/" + name) in message
    assert "offline" in message and "place it at" in message
    assert took < HUNG_S
    assert file_server.requests == ["/" + name] * 2
    assert cache_contents() == []


def test_trickle_hits_the_total_time_limit_from_the_environment(file_server, monkeypatch):
    data = big_checkpoint()
    name = named_file(data)
    file_server.files["/" + name] = data
    file_server.modes["/" + name] = ("trickle", 1000, 0.02)     # would take 4 s
    monkeypatch.setenv("NUMRES_DOWNLOAD_TIMEOUT", "0.5")
    message, took = fails(file_server.url("/" + name))
    assert re.search(rf"exceeded the total time limit of 0.5 s after \d+ of {len(data)} bytes",
                     message) and "NUMRES_DOWNLOAD_TIMEOUT" in message
    assert took < HUNG_S
    assert file_server.requests == ["/" + name]      # the time limit is not retried
    assert cache_contents() == []


def test_total_time_limit_cuts_a_stall_shorter_than_the_read_timeout(file_server):
    data = tiny_checkpoint()
    name = named_file(data)
    file_server.files["/" + name] = data
    file_server.modes["/" + name] = "stall"     # the server closes after 10 s
    message, took = fails(file_server.url("/" + name), read_timeout=30, total_timeout=0.5)
    assert f"exceeded the total time limit of 0.5 s after {len(data) // 2} of" in message
    assert took < 8.0
    assert file_server.requests == ["/" + name] and cache_contents() == []


@pytest.mark.parametrize("value", ["soon", "0", "-3", "nan"])
def test_bad_total_time_setting_is_named(file_server, monkeypatch, value):
    monkeypatch.setenv("NUMRES_DOWNLOAD_TIMEOUT", value)
    message, _ = fails(file_server.url("/resnet18-12345678.pth"))
    assert "NUMRES_DOWNLOAD_TIMEOUT" in message and repr(value) in message
    assert file_server.requests == []


def test_server_ignoring_connection_close_does_not_cost_the_read_timeout(file_server):
    # The whole body, then the connection stays open for 10 s. numres reads past the
    # announced length to see any excess, and waits END_GRACE_S (1 s) there, not the read
    # timeout (30 s here).
    data = tiny_checkpoint()
    name = named_file(data)
    file_server.files["/" + name] = data
    file_server.modes["/" + name] = "keep-open"
    start = time.monotonic()
    path = cached_file(file_server.url("/" + name), progress=False, read_timeout=30)
    assert time.monotonic() - start < 8.0
    assert path.read_bytes() == data and cache_contents() == [name]


# --- faults: retries ------------------------------------------------------------------------

def test_503_twice_then_success(file_server, waits):
    data = tiny_checkpoint()
    name = named_file(data)
    file_server.files["/" + name] = data
    file_server.modes["/" + name] = ("fail", 2, 503, None)
    path = cached_file(file_server.url("/" + name), progress=False)
    assert path.read_bytes() == data and cache_contents() == [name]
    assert file_server.requests == ["/" + name] * 3
    assert waits == [0.01, 0.02]                # exponential backoff from BACKOFF_S


def test_retry_after_is_honoured(file_server, waits):
    data = tiny_checkpoint()
    name = named_file(data)
    file_server.files["/" + name] = data
    file_server.modes["/" + name] = ("fail", 1, 429, 3)
    assert cached_file(file_server.url("/" + name), progress=False).read_bytes() == data
    assert waits == [3.0] and file_server.requests == ["/" + name] * 2


def test_retry_after_beyond_the_cap_ends_the_download(file_server, waits):
    name = named_file(b"x")
    file_server.files["/" + name] = b"x"
    file_server.modes["/" + name] = ("fail", 1, 503, 3600)
    message, _ = fails(file_server.url("/" + name))
    assert "HTTP 503" in message and "retry after 3600 s" in message
    assert waits == [] and file_server.requests == ["/" + name]
    assert cache_contents() == []


def test_persistent_5xx_reports_the_attempts(file_server):
    name = named_file(b"x")
    file_server.files["/" + name] = b"x"
    file_server.modes["/" + name] = ("fail", 99, 500, None)
    message, _ = fails(file_server.url("/" + name))
    assert "failed after 3 attempts: HTTP 500" in message and "offline" in message
    assert file_server.requests == ["/" + name] * 3
    assert cache_contents() == []


# --- faults: lengths, redirects -------------------------------------------------------------

def test_no_content_length_shows_mb_and_checks_the_hash(file_server, capsys, monkeypatch):
    data = big_checkpoint()
    name = named_file(data)
    for path in ("/" + name, "/resnet18-00000000.pth"):
        file_server.files[path] = data
        file_server.modes[path] = "no-length"
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    path = cached_file(file_server.url("/" + name), progress=True)
    assert path.read_bytes() == data
    err = capsys.readouterr().err
    assert f"Downloading {name}: 0.2 MB" in err and "%" not in err
    with pytest.raises(DownloadError, match="hash mismatch"):
        cached_file(file_server.url("/resnet18-00000000.pth"), progress=False)
    assert cache_contents() == [name]


def test_body_longer_than_announced_is_refused(file_server):
    # The announced part hashes right: only the length check can refuse this.
    data = big_checkpoint()
    name = named_file(data)
    file_server.files["/" + name] = data
    file_server.modes["/" + name] = ("too-long", 1000)
    message, _ = fails(file_server.url("/" + name))
    assert f"the server sent more than the {len(data)} bytes it announced" in message
    assert "hash" not in message
    assert file_server.requests == ["/" + name]      # a faulty server is not retried
    assert cache_contents() == []


def test_short_body_fails_on_length_without_a_hash(file_server):
    data = big_checkpoint()
    file_server.files["/model.pth"] = data           # no hash in the name: length only
    file_server.modes["/model.pth"] = "truncate"
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # no "unverified" warning for a failure
        message, _ = fails(file_server.url("/model.pth"))
    assert f"truncated: got {len(data) // 2} of {len(data)} bytes" in message
    assert cache_contents() == []


def test_redirect_chain_is_stored_under_the_original_name(file_server):
    data = tiny_checkpoint()
    name = named_file(data)
    file_server.redirects["/a/" + name] = (301, "/b/" + name)
    file_server.redirects["/b/" + name] = (302, file_server.url("/c/blob"))
    file_server.redirects["/c/blob"] = (307, "/objects/7f3a")
    file_server.files["/objects/7f3a"] = data
    path = cached_file(file_server.url("/a/" + name), progress=False)
    assert path.name == name and path.read_bytes() == data
    assert file_server.requests == ["/a/" + name, "/b/" + name, "/c/blob", "/objects/7f3a"]
    assert cache_contents() == [name]


def test_redirect_loop_is_a_clear_error(file_server):
    name = named_file(b"x")
    file_server.redirects["/x/" + name] = (302, "/y/" + name)
    file_server.redirects["/y/" + name] = (301, "/x/" + name)
    message, _ = fails(file_server.url("/x/" + name))
    assert f"more than {MAX_REDIRECTS} redirects" in message and "loop" in message
    assert len(file_server.requests) == MAX_REDIRECTS + 1     # one try, not retried
    assert cache_contents() == []


# --- un-hashed names ------------------------------------------------------------------------

def test_unhashed_url_is_stored_with_a_warning(file_server):
    data = tiny_checkpoint()
    file_server.files["/finetuned/model.pth"] = data
    with pytest.warns(UnverifiedDownloadWarning, match="is not verified") as record:
        path = cached_file(file_server.url("/finetuned/model.pth"), progress=False)
    text = str(record[0].message)
    assert "no sha256 prefix" in text and "<stem>-<first 8 or more hex digits" in text
    assert path.read_bytes() == data and cache_contents() == ["model.pth"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # a cache hit says nothing more
        assert cached_file(file_server.url("/finetuned/model.pth"), progress=False) == path
    assert file_server.requests == ["/finetuned/model.pth"]


# --- atomicity and concurrency --------------------------------------------------------------

CHILD = r"""
import os, sys, time
from numres.hub import cached_file
url, go = sys.argv[1], sys.argv[2]
print("ready", flush=True)
give_up = time.monotonic() + 60
while not os.path.exists(go) and time.monotonic() < give_up:
    time.sleep(0.002)
start = time.monotonic()
path = cached_file(url, progress=False)
print(path, start, time.monotonic(), flush=True)
"""


def test_two_processes_download_once(file_server, tmp_path):
    data = big_checkpoint()
    name = named_file(data)
    file_server.files["/" + name] = data
    file_server.modes["/" + name] = ("trickle", 4096, 0.02)     # about 1 s: they overlap
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(Path(numres.__file__).parents[1])}
    children = [subprocess.Popen([sys.executable, "-c", CHILD, file_server.url("/" + name),
                                  str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env) for _ in range(2)]
    try:
        for child in children:
            assert child.stdout.readline().strip() == "ready"
        go.touch()                                   # both start at once
        results = [child.communicate(timeout=60) for child in children]
    finally:
        for child in children:
            child.kill()
            child.wait()
    assert [child.returncode for child in children] == [0, 0], results
    lines = [out.split() for out, _ in results]
    assert {line[0] for line in lines} == {str(cache_dir() / name)}
    starts, ends = [float(line[1]) for line in lines], [float(line[2]) for line in lines]
    assert max(starts) < min(ends)                   # the calls overlapped in time
    assert file_server.requests == ["/" + name]      # the second waited and reused the file
    assert cache_contents() == [name]                # no lock or temporary file left
    assert (cache_dir() / name).read_bytes() == data


def test_without_locks_two_downloads_leave_one_good_file(file_server, monkeypatch):
    # Where fcntl is missing (Windows) both download; os.replace is atomic, so the name
    # always holds a whole verified file, whichever rename comes last.
    monkeypatch.setattr(download, "fcntl", None)
    data = big_checkpoint()
    name = named_file(data)
    file_server.files["/" + name] = data
    file_server.modes["/" + name] = ("trickle", 20_000, 0.02)
    dst, errors = cache_dir() / name, []

    def fetch():
        try:
            download.download(file_server.url("/" + name), dst, name[9:17], progress=False)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HUNG_S)
    assert errors == [] and file_server.requests == ["/" + name] * 2
    assert cache_contents() == [name] and dst.read_bytes() == data


def test_waiting_for_another_download_is_bounded(file_server):
    data = tiny_checkpoint()
    name = named_file(data)
    file_server.files["/" + name] = data
    dst = cache_dir() / name
    dst.parent.mkdir(parents=True)
    with download._locked(dst, time.monotonic() + 60, progress=False):   # "another process"
        message, took = fails(file_server.url("/" + name), total_timeout=0.3)
    assert "another process downloading" in message and took < HUNG_S
    assert file_server.requests == [] and cache_contents() == []


def test_partial_file_of_a_killed_download_is_removed(file_server):
    data = tiny_checkpoint()
    name = named_file(data)
    file_server.files["/" + name] = data
    cache_dir().mkdir(parents=True)
    (cache_dir() / f".{name}.k1ll3d_x.partial").write_bytes(b"half")
    (cache_dir() / f".{name}x.abcdefgh.partial").write_bytes(b"another file's")
    cached_file(file_server.url("/" + name), progress=False)
    assert cache_contents() == [f".{name}x.abcdefgh.partial", name]
