"""Preprocessing equals torchvision's weights.transforms() (tensor path) to one grey level."""

import os
from pathlib import Path

import numpy as np
import pytest

import numres
from numres.transforms import ImageClassification, center_crop, load_image, resize

STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


def photos():
    """Real photos a package ships: scikit-learn's china.jpg and flower.jpg (427x640)."""
    sklearn = pytest.importorskip("sklearn", reason="scikit-learn (ships the test photos) "
                                  "is not installed")
    folder = Path(sklearn.__file__).parent / "datasets" / "images"
    return [folder / "china.jpg", folder / "flower.jpg"]


def synthetic(h, w, seed):
    """Smooth gradients plus noise and a hard edge: exercises every filter weight."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 / max(w - 1, 1)), (yy * 255 / max(h - 1, 1)),
                    np.where(xx > w // 3, 200, 30)], axis=2)
    return np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8)


def torchvision_preset(tv, tag):
    torch, torchvision = tv
    return torch, torchvision.models.ResNet50_Weights[tag].transforms()


def grey_levels(ours, theirs):
    """Difference of two normalised CHW images in 0-255 grey levels."""
    return np.abs(ours - theirs) * STD * 255


@pytest.mark.parametrize("tag", ["IMAGENET1K_V1", "IMAGENET1K_V2"])
def test_matches_torchvision_on_real_photos(tv, tag):
    torch, preset = torchvision_preset(tv, tag)
    ours_t = getattr(numres.ResNet50_Weights, tag).transforms()
    for path in photos():
        arr = load_image(path)
        theirs = preset(torch.from_numpy(arr.copy()).permute(2, 0, 1)).numpy()
        ours = ours_t(arr)
        assert ours.shape == theirs.shape == (3, 224, 224) and ours.dtype == np.float32
        diff = grey_levels(ours, theirs)
        # Measured: 99.93-100% of values identical, the rest one level apart.
        assert diff.max() <= 1.0 + 1e-3
        assert (diff > 0.5).mean() < 0.005


@pytest.mark.parametrize("shape", [(300, 500), (500, 300), (256, 256), (100, 150), (231, 999)])
def test_matches_torchvision_on_any_aspect(tv, shape):
    torch, preset = torchvision_preset(tv, "IMAGENET1K_V1")
    arr = synthetic(*shape, seed=sum(shape))
    theirs = preset(torch.from_numpy(arr).permute(2, 0, 1)).numpy()
    diff = grey_levels(numres.preprocess(arr), theirs)
    assert diff.max() <= 1.0 + 1e-3 and (diff > 0.5).mean() < 0.01


def test_float_images_follow_the_float_path(tv):
    torch, torchvision = tv
    import torchvision.transforms.functional as F
    arr = synthetic(180, 260, 1).astype(np.float32) / 255
    theirs = F.resize(torch.from_numpy(arr).permute(2, 0, 1), [128], antialias=True)
    ours = resize(arr, 128)
    np.testing.assert_allclose(ours, theirs.permute(1, 2, 0).numpy(), atol=2e-6)


def test_inputs_paths_pil_gray_rgba(tmp_path):
    from PIL import Image
    arr = synthetic(120, 90, 3)
    Image.fromarray(arr).save(tmp_path / "a.png")
    t = ImageClassification(crop_size=64, resize_size=80)
    ref = t(arr)
    np.testing.assert_array_equal(t(tmp_path / "a.png"), ref)
    np.testing.assert_array_equal(t(str(tmp_path / "a.png")), ref)
    np.testing.assert_array_equal(t(Image.open(tmp_path / "a.png")), ref)
    rgba = np.concatenate([arr, np.full(arr.shape[:2] + (1,), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(t(rgba), ref)
    gray = t(arr[:, :, 0])
    np.testing.assert_allclose(gray[0] * 0.229 + 0.485, gray[1] * 0.224 + 0.456, atol=1e-6)
    batch = t([arr, tmp_path / "a.png"])
    assert batch.shape == (2, 3, 64, 64)


def test_transform_errors(tmp_path):
    t = ImageClassification()
    with pytest.raises(ValueError, match="RGB image, got shape"):
        t(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(TypeError, match="uint8 .* or float"):
        t(np.zeros((4, 4, 3), np.int64))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        t(tmp_path / "missing.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not really a jpeg")
    with pytest.raises(ValueError, match="cannot read image .*bad.jpg"):
        t(tmp_path / "bad.jpg")
    with pytest.raises(ValueError, match="cannot crop 224x224 from an image of 10x10"):
        center_crop(np.zeros((10, 10, 3)), 224)


def test_weights_carry_their_transforms():
    v1 = numres.ResNet50_Weights.IMAGENET1K_V1.transforms()
    v2 = numres.ResNet50_Weights.IMAGENET1K_V2.transforms()
    assert (v1.resize_size, v1.crop_size) == (256, 224)
    assert (v2.resize_size, v2.crop_size) == (232, 224)
    assert "antialias=True" in repr(v1)


def _official(name):
    for root in (os.environ.get("TORCH_HOME_REAL", "~/.cache/torch") + "/hub/checkpoints",
                 "~/.cache/numres/checkpoints"):
        path = Path(os.path.expanduser(root)) / name
        if path.is_file():
            return path
    pytest.skip(f"official weights {name} are not on this machine (no internet here to "
                "download them); the top-1 comparison needs them")


def test_top1_agrees_with_torchvision_preprocessing(tv):
    """With the official weights, numres's preprocessing gives torchvision's top-1."""
    torch, torchvision = tv
    path = _official("resnet50-0676ba61.pth")
    model = numres.resnet50(weights=path)
    preset = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()
    for photo in photos():
        arr = load_image(photo)
        ours = model(numres.preprocess(arr)[None])
        theirs = model(preset(torch.from_numpy(arr.copy()).permute(2, 0, 1)).numpy()[None])
        assert ours.argmax() == theirs.argmax()


# -- bicubic (timm's weights) -------------------------------------------------------------------
def _old_bilinear_taps(in_size, out_size):
    """_resize_taps as it was before bicubic joined it: the bilinear path must not move."""
    scale = in_size / out_size
    support = max(scale, 1.0)
    rows = []
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        w = np.maximum(0.0, 1.0 - np.abs((taps - center + 0.5) / support))
        rows.append((taps, w / w.sum()))
    return rows


@pytest.mark.parametrize("in_size,out_size", [(640, 256), (427, 232), (100, 300), (7, 3)])
def test_bilinear_taps_are_unchanged(in_size, out_size):
    from numres.transforms import _resize_taps
    idx, w = _resize_taps(in_size, out_size)
    for i, (taps, weights) in enumerate(_old_bilinear_taps(in_size, out_size)):
        assert idx[i, :len(taps)].tolist() == taps.tolist()
        assert w[i, :len(taps)].tobytes() == weights.tobytes()
        assert not w[i, len(taps):].any()


def test_bicubic_equals_pillow():
    """uint8 bicubic is Pillow's arithmetic; measured: every pixel equal (max difference 0)."""
    from PIL import Image
    images = [load_image(p) for p in photos()] + [synthetic(231, 999, 5), synthetic(61, 47, 6)]
    for arr in images:
        pil = Image.fromarray(arr)
        h, w = arr.shape[:2]
        for out_h, out_w in ((235, 352), (224, 224), (h * 2, w + 3), (h, w // 3), (9, 13)):
            theirs = np.asarray(pil.resize((out_w, out_h), Image.BICUBIC))
            ours = resize(arr, (out_h, out_w), "bicubic")
            assert ours.dtype == np.uint8
            np.testing.assert_array_equal(ours, theirs)


def test_bicubic_float_path(tv):
    torch, _ = tv
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode
    arr = synthetic(180, 260, 1).astype(np.float32) / 255
    theirs = F.resize(torch.from_numpy(arr).permute(2, 0, 1), [128],
                      interpolation=InterpolationMode.BICUBIC, antialias=True)
    # Measured 9e-6: torch accumulates in float32, numres in float64.
    np.testing.assert_allclose(resize(arr, 128, "bicubic"), theirs.permute(1, 2, 0).numpy(),
                               atol=5e-5)


def test_timm_eval_preset_equals_timms_pipeline(tv):
    """timm's transforms_imagenet_eval for resnet50.a1_in1k (input 224, crop_pct 0.95,
    bicubic) is torchvision's Resize(235)/CenterCrop(224)/ToTensor/Normalize on PIL images."""
    _, torchvision = tv
    from PIL import Image
    T = torchvision.transforms
    cfg = {"input_size": [3, 224, 224], "crop_pct": 0.95, "interpolation": "bicubic",
           "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    ours = ImageClassification.from_timm_config(cfg)
    theirs = T.Compose([T.Resize(235, interpolation=T.InterpolationMode.BICUBIC),
                        T.CenterCrop(224), T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])])
    assert "interpolation=bicubic" in repr(ours)
    for path in photos():
        img = Image.open(path).convert("RGB")
        np.testing.assert_array_equal(ours(img), theirs(img).numpy())


def test_unknown_interpolation():
    with pytest.raises(ValueError, match="bilinear, bicubic"):
        ImageClassification(interpolation="nearest")
    with pytest.raises(ValueError, match="bilinear, bicubic"):
        resize(np.zeros((4, 4, 3), np.uint8), 2, "lanczos")
