"""``weights="hf-hub:..."`` against a local server laid out like the Hugging Face Hub.

No real Hub file is read, and nothing leaves 127.0.0.1: the repos below are made by the tests,
with timm's repo names (``timm/resnet50.a1_in1k``), file names (``config.json``,
``model.safetensors``, ``pytorch_model.bin``), parameter names (torchvision's, which timm keeps
for these architectures) and ``config.json`` layout (``architecture``, ``num_classes``,
``pretrained_cfg`` as timm's ``_rcfg`` defines it for the ``a1_in1k`` weights). The weights
are numres models' own, written with the reference ``safetensors`` writer.

Both download paths run: ``huggingface_hub`` (when installed) and plain ``requests``.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

import numres
from numres import CheckpointError, DownloadError
from numres.hub import HubWeights, hf
from numres.models.builders import ARCHS
from numres.models.resnet import ResNet
from numres.transforms import ImageClassification

from .hub_server import HubServer, git_blob_id

st_numpy = pytest.importorskip("safetensors.numpy", reason="safetensors (the reference writer "
                               "of the test repos) is not installed")

# timm's pretrained_cfg for resnet*.a1_in1k (timm/models/resnet.py: _rcfg over _cfg), as
# timm's push_to_hf_hub writes it into config.json.
A1_CFG = {
    "tag": "a1_in1k", "custom_load": False, "input_size": [3, 224, 224],
    "test_input_size": [3, 288, 288], "fixed_input_size": False, "interpolation": "bicubic",
    "crop_pct": 0.95, "test_crop_pct": 1.0, "crop_mode": "center",
    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_classes": 1000,
    "pool_size": [7, 7], "first_conv": "conv1", "classifier": "fc",
    "origin_url": "https://github.com/huggingface/pytorch-image-models",
    "paper_ids": "arXiv:2110.00476",
}
PATHS = ["huggingface_hub", "requests"]


def timm_config(arch, num_classes=1000, **extra):
    num_features = 512 if arch in ("resnet18", "resnet34") else 2048
    return {"architecture": arch, "num_classes": num_classes, "num_features": num_features,
            "pretrained_cfg": {**A1_CFG, "num_classes": num_classes}, **extra}


def timm_state_dict(model):
    """A numres model's weights under timm's names (torchvision's), plus the batch-norm
    counters timm's state dicts carry (int64 scalars)."""
    state = dict(model.state_dict())
    for name in list(state):
        if name.endswith("running_var"):
            state[name[:-len("running_var")] + "num_batches_tracked"] = np.array(7, np.int64)
    return state


def publish(server, repo_id, arch, state, config=None, weights_name="model.safetensors",
            revision="main"):
    config = config or timm_config(arch)
    if weights_name.endswith(".safetensors"):
        blob = st_numpy.save(state, metadata={"format": "pt"})
    else:
        blob = _pth_bytes(state)
    return server.add_repo(repo_id, {"config.json": json.dumps(config, indent=2).encode(),
                                     weights_name: blob}, revision)


def _pth_bytes(state):
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        numres.save_pth(state, Path(tmp) / "x.pth")
        return (Path(tmp) / "x.pth").read_bytes()


@pytest.fixture(autouse=True)
def hub_env(tmp_path, monkeypatch):
    """A private Hugging Face home; no endpoint, token or offline setting from outside."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                 "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    try:
        import huggingface_hub.constants as constants
    except ImportError:
        return
    # huggingface_hub reads its token file's location once, at import: keep it in tmp_path.
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH",
                        str(tmp_path / "hf-home" / "stored_tokens"), raising=False)


@pytest.fixture
def server(monkeypatch):
    with HubServer() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        yield hub


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Which library downloads: huggingface_hub, or requests with huggingface_hub ignored."""
    if request.param == "huggingface_hub":
        pytest.importorskip("huggingface_hub", reason="huggingface_hub is not installed")
    monkeypatch.setattr(hf, "USE_HUGGINGFACE_HUB", request.param == "huggingface_hub")
    return request.param


@pytest.fixture(scope="module")
def resnet50():
    return numres.resnet50(backend="numpy")


def repo_folder(repo_id):
    return Path(os.environ["HF_HOME"]) / "hub" / ("models--" + repo_id.replace("/", "--"))


def assert_same_weights(model, state):
    loaded = model.state_dict()
    for name, value in state.items():
        if name.endswith("num_batches_tracked"):
            continue
        assert loaded[name].dtype == np.float32, name
        assert loaded[name].tobytes() == value.astype(np.float32).tobytes(), name


# -- spec ---------------------------------------------------------------------------------
def test_spec_parsing():
    assert hf.parse_spec("hf-hub:timm/resnet50.a1_in1k") == ("timm/resnet50.a1_in1k", "main")
    assert hf.parse_spec("hf_hub:timm/resnet50.a1_in1k@v1.0") == ("timm/resnet50.a1_in1k",
                                                                  "v1.0")
    assert hf.parse_spec("hf-hub:gpt2@refs/pr/1") == ("gpt2", "refs/pr/1")
    for bad in ("hf-hub:", "hf-hub:a/b/c", "hf-hub:../x", "hf-hub:a--b/c", "hf-hub:a/b@../x",
                "hf-hub:a/b@/x", "hf-hub:a b/c", "timm/resnet50"):
        with pytest.raises(ValueError):
            hf.parse_spec(bad)
    with pytest.raises(ValueError, match="not a Hub repo id"):
        numres.resnet18(weights="hf-hub:a/b/c")


# -- loading -------------------------------------------------------------------------------
def test_resnet50_a1_in1k(server, path, resnet50):
    state = timm_state_dict(resnet50)
    commit = publish(server, "timm/resnet50.a1_in1k", "resnet50", state)
    model = numres.resnet50(weights="hf-hub:timm/resnet50.a1_in1k", backend="numpy")
    assert_same_weights(model, state)
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    np.testing.assert_array_equal(model(x), resnet50(x))

    weights = model.weights
    assert isinstance(weights, HubWeights) and isinstance(weights, numres.Weights)
    assert (weights.repo_id, weights.revision, weights.config_arch) == (
        "timm/resnet50.a1_in1k", "main", "resnet50")
    assert weights.categories == numres.hub.imagenet_categories()
    assert weights.url == f"{server.endpoint}/timm/resnet50.a1_in1k/resolve/main/" \
                          "model.safetensors"
    t = weights.transforms()
    assert (t.crop_size, t.resize_size, t.interpolation) == (224, 235, "bicubic")
    t = weights.transforms(use_test_size=True)
    assert (t.crop_size, t.resize_size) == (288, 288)

    # What was asked, as huggingface_hub asks it: the token never goes to the CDN.
    assert server.paths("hub") == [
        "/timm/resnet50.a1_in1k/resolve/main/config.json",
        "/timm/resnet50.a1_in1k/resolve/main/config.json",
        "/timm/resnet50.a1_in1k/resolve/main/model.safetensors"]
    assert [m for s, m, _, _ in server.requests if s == "hub"] == ["HEAD", "GET", "HEAD"]
    blob_sha = hashlib.sha256(st_numpy.save(state, metadata={"format": "pt"})).hexdigest()
    assert [p.split("?")[0] for p in server.paths("cdn")] == [f"/lfs/{blob_sha}"]

    # The Hub's cache layout.
    folder = repo_folder("timm/resnet50.a1_in1k")
    assert (folder / "refs" / "main").read_text() == commit
    snapshot = folder / "snapshots" / commit
    config_id = git_blob_id(server.repos["timm/resnet50.a1_in1k"]["commits"][commit]
                            ["config.json"])
    for name, blob in (("config.json", config_id), ("model.safetensors", blob_sha)):
        assert (snapshot / name).is_symlink()
        assert os.readlink(snapshot / name) == f"../../blobs/{blob}"
    assert hashlib.sha256((folder / "blobs" / blob_sha).read_bytes()).hexdigest() == blob_sha

    # A second load, and from_hub, ask nothing.
    before = len(server.requests)
    again = numres.from_hub("hf-hub:timm/resnet50.a1_in1k", backend="numpy")
    assert again.arch == "resnet50" and isinstance(again.weights, HubWeights)
    assert_same_weights(again, state)
    assert len(server.requests) == before


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_architecture(server, arch, monkeypatch):
    """timm publishes all ten under the same names (e.g. timm/wide_resnet101_2.tv2_in1k)."""
    block, layers, groups, width = ARCHS[arch]
    # Shapes from the architecture; float16 bit patterns keep the files small and every
    # tensor distinct (finite values: exponents 12..27).
    shapes = ResNet(block, layers, groups=groups, width_per_group=width,
                    backend="numpy").state_dict()
    state = {}
    for i, (name, value) in enumerate(shapes.items()):
        bits = (np.arange(value.size, dtype=np.uint16) & 0x3FF) | ((12 + i % 16) << 10)
        state[name] = bits.view(np.float16).reshape(value.shape)
    repo_id = f"timm/{arch}.tv_in1k"
    publish(server, repo_id, arch, state, timm_config(arch))
    monkeypatch.setattr(hf, "USE_HUGGINGFACE_HUB", False)
    model = numres.build(arch, weights=f"hf-hub:{repo_id}", backend="numpy")
    assert model.arch == arch and model.weights.repo_id == repo_id
    assert_same_weights(model, state)


def test_pytorch_model_bin_when_there_is_no_safetensors(server, path):
    model = numres.resnet18(backend="numpy")
    state = timm_state_dict(model)
    # timm's older single-level config.json, with torchvision's preprocessing.
    legacy = {"architecture": "resnet18", "num_classes": 1000, "input_size": [3, 224, 224],
              "interpolation": "bilinear", "crop_pct": 0.875, "mean": A1_CFG["mean"],
              "std": A1_CFG["std"], "first_conv": "conv1", "classifier": "fc"}
    publish(server, "timm/resnet18.tv_in1k", "resnet18", state, legacy,
            weights_name="pytorch_model.bin")
    loaded = numres.resnet18(weights="hf-hub:timm/resnet18.tv_in1k", backend="numpy")
    assert_same_weights(loaded, state)
    t = loaded.weights.transforms()
    assert (t.crop_size, t.resize_size, t.interpolation) == (224, 256, "bilinear")
    assert "/timm/resnet18.tv_in1k/resolve/main/model.safetensors" in server.paths("hub")
    before = len(server.requests)
    numres.resnet18(weights="hf-hub:timm/resnet18.tv_in1k", backend="numpy")
    assert len(server.requests) == before


def test_other_num_classes_keeps_the_backbone(server, resnet50):
    state = timm_state_dict(resnet50)
    publish(server, "timm/resnet50.a1_in1k", "resnet50", state)
    model = numres.resnet50(weights="hf-hub:timm/resnet50.a1_in1k", num_classes=5,
                            backend="numpy")
    assert model.fc.params["weight"].shape == (5, 2048)
    np.testing.assert_array_equal(model.layer4[2].conv3.params["weight"],
                                  state["layer4.2.conv3.weight"])


def test_labels_from_the_config(server):
    model = numres.resnet18(num_classes=3, backend="numpy")
    config = timm_config("resnet18", num_classes=3, label_names=["n0", "n1", "n2"],
                         label_descriptions=["cat", "dog", "bird"])
    publish(server, "someone/resnet18.pets", "resnet18", model.state_dict(), config)
    loaded = numres.from_hub("hf-hub:someone/resnet18.pets", backend="numpy")
    assert loaded.fc.params["weight"].shape == (3, 512)
    assert loaded.weights.categories == ("cat", "dog", "bird")


# -- what does not fit ----------------------------------------------------------------------
def test_config_of_another_architecture(server):
    state = timm_state_dict(numres.resnet18(backend="numpy"))
    publish(server, "timm/resnet18.a1_in1k", "resnet18", state)
    with pytest.raises(CheckpointError) as info:
        numres.resnet50(weights="hf-hub:timm/resnet18.a1_in1k", backend="numpy")
    message = str(info.value)
    assert "hf-hub:timm/resnet18.a1_in1k" in message and "architecture 'resnet18'" in message
    assert "does not fit numres's resnet50" in message
    assert "missing keys: " in message and "layer1.0.conv3.weight" in message
    assert "fc.weight: checkpoint (1000, 512), model (1000, 2048)" in message


def test_deep_stem_keys_are_listed(server, resnet50):
    """timm's resnet50d: a three-conv stem (conv1.0/.3/.6) and avg-pool downsampling."""
    state = {}
    for name, value in timm_state_dict(resnet50).items():
        if name == "conv1.weight":
            for i, shape in ((0, (32, 3, 3, 3)), (3, (32, 32, 3, 3)), (6, (64, 32, 3, 3))):
                state[f"conv1.{i}.weight"] = np.zeros(shape, np.float32)
            continue
        state[name.replace("downsample.1.", "downsample.2.")
              .replace("downsample.0.", "downsample.1.")] = value
    publish(server, "timm/resnet50d.a1_in1k", "resnet50d", state, timm_config("resnet50d"))
    with pytest.raises(CheckpointError) as info:
        numres.resnet50(weights="hf-hub:timm/resnet50d.a1_in1k", backend="numpy")
    message = str(info.value)
    assert "hf-hub:timm/resnet50d.a1_in1k" in message and "'resnet50d'" in message
    assert "unexpected keys: " in message and "conv1.0.weight" in message
    assert "layer1.0.downsample.2.running_var" in message
    assert "missing keys: conv1.weight" in message
    with pytest.raises(CheckpointError, match="names architecture 'resnet50d', which numres "
                                              "does not build"):
        numres.from_hub("hf-hub:timm/resnet50d.a1_in1k")


def test_config_and_classifier_disagree(server):
    state = timm_state_dict(numres.resnet18(backend="numpy"))
    publish(server, "timm/resnet18.odd", "resnet18", state, timm_config("resnet18", 10))
    with pytest.raises(CheckpointError, match=r"num_classes 10\) does not fit .* fc.weight: "
                                              r"checkpoint \(1000, 512\), model \(10, 512\)"):
        numres.resnet18(weights="hf-hub:timm/resnet18.odd", num_classes=10, backend="numpy")


# -- cache, offline, token --------------------------------------------------------------------
def test_offline_without_cache(server, path, monkeypatch):
    publish(server, "timm/resnet18.a1_in1k", "resnet18", numres.resnet18(backend="numpy")
            .state_dict())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError) as info:
        numres.resnet18(weights="hf-hub:timm/resnet18.a1_in1k")
    message = str(info.value)
    assert "hf-hub:timm/resnet18.a1_in1k" in message and "config.json" in message
    assert "HF_HUB_OFFLINE" in message and str(repo_folder("timm/resnet18.a1_in1k")) in message
    assert f"{server.endpoint}/timm/resnet18.a1_in1k/resolve/main/config.json" in message
    assert server.requests == []


def test_offline_with_a_warm_cache(server, path, monkeypatch):
    state = timm_state_dict(numres.resnet18(backend="numpy"))
    publish(server, "timm/resnet18.a1_in1k", "resnet18", state)
    numres.resnet18(weights="hf-hub:timm/resnet18.a1_in1k", backend="numpy")
    server.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")     # nothing there either
    model = numres.from_hub("hf-hub:timm/resnet18.a1_in1k", backend="numpy")
    assert_same_weights(model, state)
    assert server.requests == []


def test_without_huggingface_hub_installed(server, monkeypatch):
    """As where huggingface_hub is not installed: importing it fails, requests does it all."""
    import sys
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)     # import raises ImportError
    state = timm_state_dict(numres.resnet18(backend="numpy"))
    publish(server, "timm/resnet18.a1_in1k", "resnet18", state)
    assert hf.USE_HUGGINGFACE_HUB and hf._huggingface_hub() is None
    model = numres.resnet18(weights="hf-hub:timm/resnet18.a1_in1k", backend="numpy")
    assert_same_weights(model, state)
    assert len(server.paths("cdn")) == 1


def test_cache_is_shared_with_huggingface_hub(server, monkeypatch):
    """Files numres fetched with requests are found by huggingface_hub, offline."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    publish(server, "timm/resnet18.a1_in1k", "resnet18", numres.resnet18(backend="numpy")
            .state_dict())
    monkeypatch.setattr(hf, "USE_HUGGINGFACE_HUB", False)
    numres.resnet18(weights="hf-hub:timm/resnet18.a1_in1k", backend="numpy")
    for name in ("config.json", "model.safetensors"):
        found = huggingface_hub.hf_hub_download(
            "timm/resnet18.a1_in1k", name, cache_dir=str(hf.hub_cache()), local_files_only=True)
        assert Path(found).read_bytes() == \
            (hf.hub_file("timm/resnet18.a1_in1k", name)).read_bytes()


def test_pinned_commit_and_other_branches(server, path):
    model = numres.resnet18(backend="numpy")
    first = publish(server, "timm/resnet18.a1_in1k", "resnet18", model.state_dict())
    other = timm_state_dict(numres.resnet18(backend="numpy"))
    second = publish(server, "timm/resnet18.a1_in1k", "resnet18", other, revision="v2")
    loaded = numres.resnet18(weights="hf-hub:timm/resnet18.a1_in1k@v2", backend="numpy")
    assert_same_weights(loaded, other)
    assert (repo_folder("timm/resnet18.a1_in1k") / "refs" / "v2").read_text() == second
    pinned = numres.resnet18(weights=f"hf-hub:timm/resnet18.a1_in1k@{first}", backend="numpy")
    assert_same_weights(pinned, model.state_dict())
    assert not (repo_folder("timm/resnet18.a1_in1k") / "refs" / first).exists()
    before = len(server.requests)
    numres.resnet18(weights=f"hf-hub:timm/resnet18.a1_in1k@{first}", backend="numpy")
    assert len(server.requests) == before


def test_token_goes_to_the_hub_only(server, path, monkeypatch):
    state = timm_state_dict(numres.resnet18(backend="numpy"))
    publish(server, "me/private-resnet18", "resnet18", state)
    server.private["me/private-resnet18"] = "hf_secret"
    with pytest.raises(DownloadError, match="hf-hub:me/private-resnet18.*HF_TOKEN|"
                                            "hf-hub:me/private-resnet18.*private"):
        numres.resnet18(weights="hf-hub:me/private-resnet18")
    server.requests.clear()
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    model = numres.resnet18(weights="hf-hub:me/private-resnet18", backend="numpy")
    assert_same_weights(model, state)
    hub_auth = {auth for s, _, _, auth in server.requests if s == "hub"}
    cdn_auth = {auth for s, _, _, auth in server.requests if s == "cdn"}
    assert hub_auth == {"Bearer hf_secret"} and cdn_auth == {None}


# -- failures ----------------------------------------------------------------------------------
def test_corrupted_download_is_caught_and_removed(server, path):
    state = numres.resnet18(backend="numpy").state_dict()
    publish(server, "timm/resnet18.a1_in1k", "resnet18", state)
    sha = next(iter(server.lfs))
    server.corrupt.add(sha)
    with pytest.raises(DownloadError, match="hf-hub:timm/resnet18.a1_in1k.*(mismatch)"):
        numres.resnet18(weights="hf-hub:timm/resnet18.a1_in1k")
    folder = repo_folder("timm/resnet18.a1_in1k")
    assert not (folder / "blobs" / sha).exists()
    assert not list(folder.glob("snapshots/*/model.safetensors"))


def test_missing_repo_revision_and_files(server, path):
    with pytest.raises(DownloadError, match="hf-hub:timm/nothing.*config.json.*not found"):
        numres.resnet18(weights="hf-hub:timm/nothing")
    publish(server, "timm/resnet18.a1_in1k", "resnet18",
            numres.resnet18(backend="numpy").state_dict())
    with pytest.raises(DownloadError, match="no (such )?revision"):
        numres.resnet18(weights="hf-hub:timm/resnet18.a1_in1k@v9")
    server.add_repo("timm/no-weights", {"config.json": json.dumps(timm_config("resnet18"))
                                        .encode()})
    with pytest.raises(DownloadError, match=r"hf-hub:timm/no-weights: no weights file "
                                            r"\(model.safetensors or pytorch_model.bin\)"):
        numres.resnet18(weights="hf-hub:timm/no-weights")
    server.add_repo("timm/no-config", {"model.safetensors": st_numpy.save({"w": np.zeros(1)})})
    with pytest.raises(DownloadError, match="config.json.*timm's repos"):
        numres.resnet18(weights="hf-hub:timm/no-config")


def test_hostile_server_headers(server, monkeypatch):
    """Names the server gives become cache paths: anything but a plain name is refused."""
    monkeypatch.setattr(hf, "USE_HUGGINGFACE_HUB", False)
    publish(server, "timm/resnet18.a1_in1k", "resnet18",
            numres.resnet18(backend="numpy").state_dict())
    home = Path(os.environ["HF_HOME"])
    for commit, etag in (("../../../../escape", '"abc"'), ("a" * 40, '"../../../escape"'),
                         ("a" * 40, '"/tmp/escape"'), ("a" * 40, None)):
        def evil(handler, method, commit=commit, etag=etag):
            headers = {"X-Repo-Commit": commit, **({"ETag": etag} if etag else {})}
            handler.answer(200, headers, b"{}" if method == "GET" else None, 2)
        server.override["hub"] = evil
        with pytest.raises(DownloadError, match="X-Repo-Commit/ETag"):
            hf.hub_file("timm/resnet18.a1_in1k", "config.json")
    assert not list(home.parent.glob("**/escape"))


def test_oversized_config_is_not_read(server, monkeypatch):
    monkeypatch.setattr(hf, "USE_HUGGINGFACE_HUB", False)
    server.add_repo("timm/huge", {"config.json": b"{" + b" " * (hf.MAX_CONFIG_BYTES + 10) + b"}"})
    with pytest.raises(DownloadError, match="more than 1048576 bytes"):
        numres.resnet18(weights="hf-hub:timm/huge")


# -- preprocessing from pretrained_cfg ---------------------------------------------------------
def test_timm_configs_to_transforms():
    t = ImageClassification.from_timm_config(A1_CFG)
    assert (t.crop_size, t.resize_size, t.interpolation) == (224, 235, "bicubic")
    np.testing.assert_allclose(t.std, A1_CFG["std"])
    tv = ImageClassification.from_timm_config({"input_size": [3, 224, 224], "crop_pct": 0.875,
                                               "interpolation": "bilinear"})
    assert (tv.crop_size, tv.resize_size, tv.interpolation) == (224, 256, "bilinear")
    squash = ImageClassification.from_timm_config({**A1_CFG, "crop_mode": "squash"})
    assert squash.resize_size == (235, 235)
    assert ImageClassification.from_timm_config({}).resize_size == 256     # timm's defaults
    for bad, match in (({"input_size": [3, 224, 256]}, "not square"),
                       ({"crop_mode": "border"}, "crop_mode"),
                       ({"interpolation": "lanczos"}, "interpolation"),
                       ({"input_size": [1, 224, 224]}, "channels"),
                       ({"crop_pct": -1}, "crop_pct")):
        with pytest.raises(ValueError, match=match):
            ImageClassification.from_timm_config({**A1_CFG, **bad})
