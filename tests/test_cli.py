"""The numres command, run as a user runs it: in a subprocess."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import numres
from numres import cli
from numres.hub import registry


def run(*args, env=None, check_rc=0):
    full_env = {**os.environ, **(env or {})}
    done = subprocess.run([sys.executable, "-m", "numres", *args], capture_output=True,
                          text=True, env=full_env, timeout=300)
    assert done.returncode == check_rc, done.stderr
    return done


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder of images and a 3-class ResNet-18 checkpoint."""
    from PIL import Image
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    (root / "imgs" / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.jpg", "sub/c.png"]):
        arr = rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "imgs" / name)
    (root / "imgs" / "notes.txt").write_text("not an image")
    model = numres.resnet18(num_classes=3, backend="numpy")
    numres.save_pth(model.state_dict(), root / "r18.pth")
    return root


def test_predict_json_matches_the_library(workspace):
    out = run("predict", str(workspace / "imgs"), "--arch", "resnet18", "--weights",
              str(workspace / "r18.pth"), "--backend", "numpy", "--topk", "2", "--json").stdout
    results = json.loads(out)
    files = [r["file"] for r in results]
    assert [os.path.basename(f) for f in files] == ["a.png", "b.jpg", "c.png"]
    model = numres.build("resnet18", weights=workspace / "r18.pth", num_classes=3,
                         backend="numpy")
    expected = numres.decode(model(numres.preprocess(files)), k=2)
    for r, e in zip(results, expected):
        assert [t["label"] for t in r["top"]] == [lab for lab, _, _ in e]
        np.testing.assert_allclose([t["probability"] for t in r["top"]],
                                   [p for _, p, _ in e], atol=1e-5)


def test_precision_bfloat16(workspace):
    """``--precision bfloat16`` runs the Numba backend in bf16: the same top classes here
    (3 random classes, scores apart), and a clear error on another backend."""
    args = ("predict", str(workspace / "imgs"), "--arch", "resnet18", "--weights",
            str(workspace / "r18.pth"), "--json")
    done = run(*args, "--backend", "numpy", "--precision", "bfloat16", check_rc=1)
    one_line_error(done, "precision='bfloat16' runs on the numba backend", "numpy")
    pytest.importorskip("numres.backends.numba", reason="Numba is not installed")
    from numres.backends.numba import pairs, tile
    if not (tile.AVAILABLE and pairs.supported()):
        pytest.skip("this CPU has no AVX512_BF16 (vdpbf16ps)")
    bf16 = json.loads(run(*args, "--backend", "numba", "--precision", "bfloat16").stdout)
    fp32 = json.loads(run(*args, "--backend", "numba").stdout)
    assert len(bf16) == len(fp32) == 3
    for a, b in zip(bf16, fp32):
        assert a["top"][0]["label"] == b["top"][0]["label"]
        assert abs(a["top"][0]["probability"] - b["top"][0]["probability"]) < 0.02


def test_predict_text_and_globs(workspace):
    out = run("predict", str(workspace / "imgs" / "*.png"), "--arch", "resnet18",
              "--weights", str(workspace / "r18.pth"), "--backend", "numpy").stdout
    assert out.count("class ") == 3 and "a.png" in out and "c.png" not in out


def test_features_writes_embeddings_and_names(workspace, tmp_path):
    out = tmp_path / "feats.npy"
    msg = run("features", str(workspace / "imgs"), "--out", str(out), "--arch", "resnet18",
              "--weights", str(workspace / "r18.pth"), "--backend", "numpy",
              "--batch-size", "2").stdout
    feats = np.load(out)
    names = (tmp_path / "feats.files.txt").read_text().split()
    assert feats.shape == (3, 512) and len(names) == 3 and "3 x 512" in msg
    model = numres.build("resnet18", weights=workspace / "r18.pth", num_classes=3,
                         backend="numpy")
    np.testing.assert_allclose(feats, model.features(numres.preprocess(names)), rtol=1e-5,
                               atol=1e-6)


def test_inspect_names_format_and_architecture(workspace):
    out = run("inspect", str(workspace / "r18.pth")).stdout
    assert "zip (torch >= 1.6)" in out
    assert "fits:         resnet18 with num_classes=3" in out
    assert "11,178,051" in out         # resnet18 with a 3-class head
    info = json.loads(run("inspect", str(workspace / "r18.pth"), "--json").stdout)
    assert info["architectures"] == ["resnet18"] and info["tensors"] == 102
    assert info["tensor_list"][0] == {"name": "conv1.weight", "shape": [64, 3, 7, 7],
                                      "dtype": "Float"}


def one_line_error(done, *needles):
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("numres: error:"), done.stderr
    assert "Traceback" not in done.stderr
    for n in needles:
        assert n in lines[0]


def test_errors_are_one_line(workspace, tmp_path):
    one_line_error(run("predict", str(tmp_path / "nope.jpg"), check_rc=1), "nope.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    one_line_error(run("predict", str(tmp_path / "bad.jpg"), "--weights",
                       str(workspace / "r18.pth"), "--arch", "resnet18", "--on-error", "fail",
                       check_rc=1), "cannot identify image file", "bad.jpg")
    # Skipping (the default) with nothing left to compute is an error too.
    done = run("predict", str(tmp_path / "bad.jpg"), "--weights", str(workspace / "r18.pth"),
               "--arch", "resnet18", check_rc=1)
    assert done.stderr.strip().splitlines()[-1] == \
        "numres: error: none of the 1 files could be read (reasons above)"
    one_line_error(run("inspect", str(tmp_path / "bad.jpg"), check_rc=1), "not a PyTorch")
    done = run("predict", "x.jpg", "--arch", "resnet99", check_rc=2)
    assert "invalid choice: 'resnet99'" in done.stderr


def test_offline_download_is_one_line(workspace, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"NUMRES_WEIGHTS_URL": f"http://127.0.0.1:{port}/models",
           "NUMRES_HOME": str(tmp_path / "home"), "TORCH_HOME": str(tmp_path / "torch")}
    done = run("predict", str(workspace / "imgs" / "a.png"), "--arch", "resnet18", env=env,
               check_rc=1)
    one_line_error(done, "resnet18-f37072fd.pth", "place it at")
    one_line_error(run("fetch", "resnet50", "--weights", "V2", env=env, check_rc=1),
                   "resnet50-11ad3fa6.pth")


def test_fetch_into_the_cache(monkeypatch, file_server, capsys, tmp_path):
    import hashlib
    numres.save_pth(numres.resnet18(backend="numpy").state_dict(), tmp_path / "x.pth")
    data = (tmp_path / "x.pth").read_bytes()
    name = f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    weights = registry.Weights(**{**registry.REGISTRY["resnet18"]["IMAGENET1K_V1"].__dict__,
                                  "file_name": name})
    monkeypatch.setitem(registry.REGISTRY["resnet18"], "IMAGENET1K_V1", weights)
    file_server.files["/m/" + name] = data
    monkeypatch.setenv("NUMRES_WEIGHTS_URL", file_server.url("/m"))
    assert cli.main(["fetch", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert name in out and (numres.hub.cache_dir() / name).is_file()


def test_python_dash_m_and_version():
    assert run("--version").stdout.strip() == f"numres {numres.__version__}"


def test_warmup_compiles_every_kernel(capsys):
    from numres.backends.numba import kernels_cached
    assert cli.main(["warmup"]) == 0
    assert "CPU kernels ready" in capsys.readouterr().out
    assert kernels_cached()
