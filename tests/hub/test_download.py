"""The real download code against a real HTTP server on 127.0.0.1."""

import hashlib
import socket
import tempfile
from pathlib import Path

import numpy as np
import pytest

import numres
from numres import DownloadError
from numres.hub import cache_dir, cached_file, registry


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
    folder = cache_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


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
    assert cache_contents() == []


def test_truncated_body_leaves_nothing(file_server):
    data = tiny_checkpoint() + bytes(100_000)
    name = named_file(data)
    file_server.files["/" + name] = data
    file_server.modes["/" + name] = "truncate"
    with pytest.raises(DownloadError, match=f"{name}"):
        cached_file(file_server.url("/" + name), progress=False)
    assert cache_contents() == []


def test_http_404(file_server):
    with pytest.raises(DownloadError) as info:
        cached_file(file_server.url("/resnet18-12345678.pth"), progress=False)
    message = str(info.value)
    assert "HTTP 404" in message and file_server.url("/resnet18-12345678.pth") in message
    assert "place it at" in message and str(cache_dir()) in message
    assert cache_contents() == []


def test_nothing_listening():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]          # closed again: nothing listens there
    url = f"http://127.0.0.1:{port}/resnet18-12345678.pth"
    with pytest.raises(DownloadError, match="offline") as info:
        cached_file(url, progress=False)
    assert url in str(info.value)
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
