"""Every builder equals torchvision's model: same checkpoint, same input, same logits."""

import numpy as np
import pytest

import numres
from numres import CheckpointError
from numres.models.builders import ARCHS

BIG = {"resnet101", "resnet152", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2",
       "wide_resnet101_2"}


def close(ours, theirs, what):
    """Within 1e-4 x max(1, max |reference|), the project's float32 tolerance."""
    tol = 1e-4 * max(1.0, float(np.abs(theirs).max()))
    err = float(np.abs(ours - theirs).max())
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


def randomize_batch_norm(torch, model, seed):
    """Non-trivial statistics, so that folding batch norm is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
                m.num_batches_tracked.fill_(17)
    return model.eval()


@pytest.fixture(scope="module")
def reference(tv, tmp_path_factory):
    """arch -> (zip path, legacy path, input, torch logits, torch features), built lazily."""
    torch, torchvision = tv
    cache = {}
    folder = tmp_path_factory.mktemp("ckpt")

    def get(arch):
        if arch not in cache:
            torch.manual_seed(0)
            model = randomize_batch_norm(torch, getattr(torchvision.models, arch)(), 1)
            zip_path, legacy_path = folder / f"{arch}.pth", folder / f"{arch}-legacy.pth"
            torch.save(model.state_dict(), zip_path)
            torch.save(model.state_dict(), legacy_path, _use_new_zipfile_serialization=False)
            x = np.random.default_rng(2).standard_normal((2, 3, 48, 40)).astype(np.float32)
            with torch.no_grad():
                xt = torch.from_numpy(x)
                logits = model(xt).numpy()
                feats = torch.flatten(model.avgpool(torch.nn.Sequential(
                    *list(model.children())[:-2])(xt)), 1).numpy()
            cache[arch] = (zip_path, legacy_path, x, logits, feats)
            del model
        return cache[arch]
    return get


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in BIG else a
                                  for a in ARCHS])
def test_builder_matches_torchvision(reference, backend, arch):
    zip_path, legacy_path, x, logits, feats = reference(arch)
    model = numres.build(arch, weights=str(zip_path), backend=backend)
    close(model(x), logits, f"{arch} logits")
    close(model.features(x), feats, f"{arch} features")
    assert model.features(x).shape == (2, 512 if arch in ("resnet18", "resnet34") else 2048)


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) for a in ARCHS])
def test_builder_matches_torchvision_at_224_batch_8_on_numba(tv, reference, arch):
    """The default case the benchmarks time: there the Numba backend takes other paths
    (Winograd, direct, panel-split and grouped kernels, 8-image tiles) than at 48x40."""
    pytest.importorskip("numba", reason="Numba is not installed")
    torch, torchvision = tv
    zip_path = reference(arch)[0]
    tmodel = getattr(torchvision.models, arch)()
    tmodel.load_state_dict(torch.load(zip_path, weights_only=True))
    x = np.random.default_rng(3).standard_normal((8, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        logits = tmodel.eval()(torch.from_numpy(x)).numpy()
    del tmodel
    model = numres.build(arch, weights=str(zip_path), backend="numba")
    close(model(x), logits, f"{arch} logits at 224 px, batch 8")
    close(model(x), logits, f"{arch} logits at 224 px, batch 8, replayed")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_legacy_format_gives_the_same_model(reference, arch):
    zip_path, legacy_path, x, logits, _ = reference(arch)
    a = numres.build(arch, weights=legacy_path, backend="numpy")
    b = numres.build(arch, weights=zip_path, backend="numpy")
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, b.state_dict()[k])
    close(a(x), logits, "legacy-format logits")


@pytest.mark.parametrize("size", [(224, 224), (97, 131), (64, 64), (33, 32), (1, 1)])
def test_any_input_size_torchvision_accepts(tv, reference, backend, size):
    torch, _ = tv
    zip_path, *_ = reference("resnet18")
    model = numres.build("resnet18", weights=zip_path, backend=backend)
    import torchvision
    tm = torchvision.models.resnet18()
    tm.load_state_dict(torch.load(zip_path))
    x = np.random.default_rng(3).standard_normal((1, 3) + size).astype(np.float32)
    with torch.no_grad():
        expected = tm.eval()(torch.from_numpy(x)).numpy()
    close(model(x), expected, f"resnet18 at {size}")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_folded_batch_norm_equals_unfolded(reference, backend, arch):
    zip_path, _, x, logits, _ = reference(arch)
    folded = numres.build(arch, weights=zip_path, backend=backend, fold_bn=True)
    unfolded = numres.build(arch, weights=zip_path, backend=backend, fold_bn=False)
    close(unfolded(x), logits, "unfolded")
    close(folded(x), unfolded(x), "folded vs unfolded")


def test_state_dict_names_and_shapes_are_torchvision(tv):
    torch, torchvision = tv
    for arch in ("resnet18", "resnext50_32x4d", "wide_resnet50_2"):
        theirs = {k: tuple(v.shape) for k, v in
                  getattr(torchvision.models, arch)().state_dict().items()
                  if not k.endswith("num_batches_tracked")}
        ours = {k: v.shape for k, v in numres.build(arch, backend="numpy").state_dict().items()}
        assert ours == theirs
        assert numres.build(arch, backend="numpy").num_parameters() == \
            numres.get_weights(arch, "IMAGENET1K_V1").num_params


def test_load_state_dict_errors_name_every_key():
    model = numres.resnet18(backend="numpy")
    sd = dict(model.state_dict())
    sd.pop("layer1.0.conv1.weight")
    sd["extra.weight"] = np.zeros(1, np.float32)
    sd["fc.weight"] = np.zeros((10, 512), np.float32)
    with pytest.raises(CheckpointError) as info:
        model.load_state_dict(sd)
    message = str(info.value)
    assert "missing keys: layer1.0.conv1.weight" in message
    assert "unexpected keys: extra.weight" in message
    assert "fc.weight: checkpoint (10, 512), model (1000, 512)" in message
    sd["fc.weight"] = np.zeros((1000, 512), np.float32)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert missing == ["layer1.0.conv1.weight"] and unexpected == ["extra.weight"]
    with pytest.raises(CheckpointError, match="floating-point.*conv1.weight"):
        model.load_state_dict({**model.state_dict(),
                               "conv1.weight": np.zeros((64, 3, 7, 7), np.int64)})


def test_num_batches_tracked_is_accepted_and_ignored():
    model = numres.resnet18(backend="numpy")
    sd = {**model.state_dict(), "bn1.num_batches_tracked": np.array(5)}
    assert model.load_state_dict(sd) == ([], [])
    assert "bn1.num_batches_tracked" not in model.state_dict()


def test_checkpoint_for_another_architecture(reference):
    zip_path, *_ = reference("resnet18")
    with pytest.raises(CheckpointError, match="missing keys: .*conv3"):
        numres.build("resnet50", weights=zip_path, backend="numpy")


def test_input_errors():
    model = numres.resnet18(num_classes=4, backend="numpy")
    ok = np.zeros((1, 3, 16, 16), np.float32)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\), got \(3, 16, 16\).*batch axis"):
        model(ok[0])
    with pytest.raises(ValueError, match="3 input channels.*channels last"):
        model(np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(TypeError, match="uint8.*normalised"):
        model(np.zeros((1, 3, 16, 16), np.uint8))
    with pytest.raises(TypeError, match="complex"):
        model(np.zeros((1, 3, 16, 16), np.complex64))
    with pytest.raises(TypeError, match="str"):
        model("image.jpg")
    with pytest.raises(ValueError, match="empty"):
        model(np.zeros((0, 3, 16, 16), np.float32))
    out64 = model(ok.astype(np.float64))
    assert out64.dtype == np.float32 and out64.shape == (1, 4)
    np.testing.assert_array_equal(out64, model(ok))


def test_bad_builder_arguments():
    with pytest.raises(ValueError, match="unknown backend 'tpu'; choose one of auto, cupy"):
        numres.resnet18(backend="tpu")
    with pytest.raises(ValueError, match="num_classes"):
        numres.resnet18(num_classes=0)
    with pytest.raises(ValueError, match="unknown architecture 'resnet19'"):
        numres.build("resnet19")


def test_numpy_in_numpy_out_and_backend_switch(reference):
    zip_path, _, x, logits, _ = reference("resnet18")
    model = numres.build("resnet18", weights=zip_path, backend="numpy")
    out = model(x)
    assert type(out) is np.ndarray and out.dtype == np.float32
    for name in numres.available_backends():
        if name != "cupy":
            close(model.to(name)(x), logits, f"after to({name})")


def test_model_releases_checkpoint_pages_after_preparing(tmp_path, monkeypatch):
    """Built from a file, the model hands the file's pages back once the backend holds its
    own copies of the weights (the builders set ``after_prepare``; the model knows no files)."""
    released = []
    monkeypatch.setattr("numres.models.builders.release_pages",
                        lambda arrays: released.append(len(list(arrays))))
    path = tmp_path / "r18.pth"
    numres.save_pth(numres.resnet18(num_classes=3, backend="numpy").state_dict(), path)
    backend = "numba" if "numba" in numres.available_backends() else "numpy"
    model = numres.resnet18(weights=str(path), num_classes=3, backend=backend)
    model(np.zeros((1, 3, 32, 32), np.float32))
    assert released == [len(model.state_dict())]
    unfolded = numres.resnet18(weights=str(path), num_classes=3, backend="numpy", fold_bn=False)
    unfolded(np.zeros((1, 3, 32, 32), np.float32))      # keeps views of the file's arrays
    random = numres.resnet18(num_classes=3, backend=backend)
    random(np.zeros((1, 3, 32, 32), np.float32))
    assert released == [len(model.state_dict())] and random.after_prepare is None


def test_precision_is_checked_before_anything_is_built():
    with pytest.raises(ValueError, match="precision must be one of"):
        numres.resnet18(precision="float16")
    with pytest.raises(ValueError, match="runs on the numba backend"):
        numres.resnet18(backend="numpy", precision="bfloat16")
    with pytest.raises(ValueError, match="computes in float32"):
        numres.resnet18(backend=numres.get_backend("numpy"), precision="bfloat16")


def test_precision_bfloat16_builds_on_a_bf16_numba_backend(reference):
    """``precision="bfloat16"`` on a builder: the Numba backend in bf16 (``backend="auto"``
    or ``"numba"``), logits close to torch's but not float32-exact."""
    numba = pytest.importorskip("numres.backends.numba", reason="Numba is not installed")
    from numres.backends.numba import pairs, tile
    if not (tile.AVAILABLE and pairs.supported()):
        pytest.skip("this CPU has no AVX512_BF16 (vdpbf16ps)")
    zip_path, _, x, logits, _ = reference("resnet18")
    model = numres.resnet18(weights=str(zip_path), backend="numba", precision="bfloat16")
    assert model.backend.name == "numba" and model.backend.precision == "bfloat16"
    err = np.abs(model(x) - logits).max() / np.abs(logits).max()
    assert 1e-5 < err < 0.02
    passed = numba.NumbaBackend(precision="bfloat16")
    assert numres.resnet18(backend=passed, precision="bfloat16").backend is passed
    with pytest.raises(ValueError, match="computes in float32"):
        numres.resnet18(backend=numba.NumbaBackend(), precision="bfloat16")
