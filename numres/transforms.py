"""Image preprocessing that matches torchvision's ``weights.transforms()``.

``ImageClassification`` does what torchvision's preset of the same name does on tensors:
resize the shorter side (256 for V1 weights, 232 for V2) with antialiased bilinear
interpolation, center-crop 224, scale to [0, 1], normalise with the ImageNet mean/std, and
return channels-first float32. The resize is separable: each output pixel is a normalised
triangle-filter average whose support widens with the downscale factor (PIL's and torch's
"antialias" algorithm). uint8 images are rounded back to uint8 once, after both passes, as
torch's tensor path does. Measured on the two photos scikit-learn ships (427x640): 99.95% of
resized pixels equal torchvision's, the rest differ by one grey level.

``interpolation="bicubic"`` (what timm's weights on the Hugging Face Hub mostly use) is Pillow's
antialiased bicubic: the cubic convolution kernel with a = -0.5, its support (2 pixels) widened
by the downscale factor. timm resizes PIL images, so uint8 images follow Pillow's arithmetic
too: 22-bit fixed-point weights and rounding to 8 bits after each pass, which gives Pillow's
pixels exactly. :meth:`ImageClassification.from_timm_config` turns a timm ``pretrained_cfg``
into the matching preset.

Arrays need only NumPy; decoding image files needs Pillow (``pip install numres[image]``).
"""

import functools
import math
import os

import numpy as np

from . import imagenet

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def load_image(path):
    """Decode an image file to an (H, W, 3) uint8 RGB array (needs Pillow).

    Raises:
        ImportError: Pillow is not installed (with the install hint).
        FileNotFoundError: no such file.
        ValueError: the file is not an image Pillow can read.
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ImportError("decoding image files needs Pillow: pip install numres[image]") \
            from None
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None


INTERPOLATIONS = ("bilinear", "bicubic")


def _triangle(x):
    return np.maximum(0.0, 1.0 - np.abs(x))


def _cubic(x, a=-0.5):
    # Pillow's bicubic_filter (Keys' cubic convolution), term for term.
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


# interpolation -> (filter support at scale 1, filter)
_FILTERS = {"bilinear": (1.0, _triangle), "bicubic": (2.0, _cubic)}


@functools.lru_cache(maxsize=64)
def _resize_taps(in_size, out_size, interpolation="bilinear"):
    """Antialiased resampling along one axis, as (index, weight) taps.

    Returns ``(idx, w)``, both (out, taps): output ``i`` is ``sum_t w[i, t] * in[idx[i, t]]``.
    Rows with fewer taps are padded with weight 0.
    """
    base_support, kernel = _FILTERS[interpolation]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)         # the filter widens when shrinking
    support = base_support * filterscale
    rows = []
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        w = kernel((taps - center + 0.5) / filterscale)
        rows.append((taps, w / w.sum()))
    width = max(len(t) for t, _ in rows)
    idx = np.zeros((out_size, width), np.intp)
    weights = np.zeros((out_size, width), np.float64)
    for i, (taps, w) in enumerate(rows):
        idx[i, :len(taps)], weights[i, :len(taps)] = taps, w
    return idx, weights


def _resample(x, axis, out_size, interpolation="bilinear"):
    """Resample float64 or uint8 ``x`` along ``axis`` (0 or 1 of an HWC array) to
    ``out_size``; the result is float64."""
    idx, w = _resize_taps(x.shape[axis], out_size, interpolation)
    shape = [1, 1, 1]
    shape[axis] = out_size
    out = np.zeros(x.shape[:axis] + (out_size,) + x.shape[axis + 1:])
    for t in range(idx.shape[1]):        # one gather per tap: memory stays O(output)
        out += np.take(x, idx[:, t], axis=axis) * w[:, t].reshape(shape)
    return out


_PIL_PRECISION_BITS = 32 - 8 - 2          # Pillow's Resample.c


def _resample_pil8(x, axis, out_size, interpolation):
    """One pass of Pillow's 8-bit resampling: fixed-point weights, rounded to uint8."""
    idx, w = _resize_taps(x.shape[axis], out_size, interpolation)
    one = 1 << _PIL_PRECISION_BITS
    # C's (int) truncates toward zero; Pillow rounds the weights away from zero first.
    fixed = np.trunc(np.where(w < 0, w * one - 0.5, w * one + 0.5)).astype(np.int64)
    shape = [1, 1, 1]
    shape[axis] = out_size
    out = np.full(x.shape[:axis] + (out_size,) + x.shape[axis + 1:], one >> 1, np.int64)
    for t in range(idx.shape[1]):
        out += np.take(x, idx[:, t], axis=axis).astype(np.int64) * fixed[:, t].reshape(shape)
    return np.clip(out >> _PIL_PRECISION_BITS, 0, 255).astype(np.uint8)


def resize(image, size, interpolation="bilinear"):
    """Resize so the shorter side is ``size`` (the longer keeps the aspect ratio, floored).

    Args:
        image: (H, W, C) uint8 or float array.
        size: target length of the shorter side, or ``(height, width)``.
        interpolation: ``"bilinear"`` (torchvision's antialiased tensor resize) or
            ``"bicubic"`` (Pillow's; on uint8 images, Pillow's 8-bit arithmetic too).

    Returns:
        the resized array, same dtype.

    Raises:
        ValueError: an interpolation other than those two.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got "
                         f"{interpolation!r}")
    h, w = image.shape[:2]
    if isinstance(size, int):
        short, long_ = (h, w) if h <= w else (w, h)
        new_short, new_long = size, int(size * long_ / short)
        out_h, out_w = (new_short, new_long) if h <= w else (new_long, new_short)
    else:
        out_h, out_w = size
    if image.dtype == np.uint8 and interpolation == "bicubic":
        # Pillow (timm's reference) rounds to 8 bits between the passes, horizontal first.
        x = image
        if out_w != w:
            x = _resample_pil8(x, 1, out_w, interpolation)
        if out_h != h:
            x = _resample_pil8(x, 0, out_h, interpolation)
        return x
    # uint8 pixels are gathered as they are and widened tap by tap (exactly): converting a
    # 4000x3000 photo to float64 first costs 290 MB and most of the time.
    x = image if image.dtype == np.uint8 else image.astype(np.float64)
    if out_w != w:
        x = _resample(x, 1, out_w, interpolation)   # (H, out_w, C)
    if out_h != h:
        x = _resample(x, 0, out_h, interpolation)   # (out_h, out_w, C)
    if image.dtype == np.uint8:
        # torch's uint8 path keeps full precision between the passes and rounds once.
        return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)
    return x.astype(image.dtype)


def center_crop(image, size):
    """Crop the central ``size`` x ``size`` (or (h, w)) region, as torchvision rounds it."""
    ch, cw = (size, size) if isinstance(size, int) else size
    h, w = image.shape[:2]
    if ch > h or cw > w:
        raise ValueError(f"cannot crop {ch}x{cw} from an image of {h}x{w}")
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return image[top:top + ch, left:left + cw]


def _as_rgb_array(image):
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if hasattr(image, "convert") and hasattr(image, "size"):     # a PIL image
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
    if arr.dtype != np.uint8 and arr.dtype.kind != "f":
        raise TypeError(f"expected uint8 (0-255) or float (0-1) pixels, got {arr.dtype}")
    return arr[:, :, :3]


class ImageClassification:
    """torchvision's ImageNet evaluation preset, in NumPy.

    Args:
        crop_size: side of the square crop (224).
        resize_size: shorter side after resizing (256 for V1 weights, 232 for V2), or
            ``(height, width)`` to resize to exactly that (timm's ``crop_mode="squash"``).
        mean, std: per-channel normalisation (ImageNet's by default).
        interpolation: ``"bilinear"`` (torchvision's presets) or ``"bicubic"`` (most timm
            weights; Pillow's arithmetic, see :func:`resize`).

    Raises:
        ValueError: an unknown interpolation.

    Example:
        >>> t = numres.ResNet50_Weights.DEFAULT.transforms()
        >>> x = t(["cat.jpg", "dog.png"])          # (2, 3, 224, 224) float32
        >>> x1 = t(rgb_uint8_array)               # (3, 224, 224)
    """

    def __init__(self, crop_size=224, resize_size=256, mean=imagenet.MEAN, std=imagenet.STD,
                 interpolation="bilinear"):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got "
                             f"{interpolation!r}")
        self.crop_size, self.resize_size = crop_size, resize_size
        self.interpolation = interpolation
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    @classmethod
    def from_timm_config(cls, pretrained_cfg, use_test_size=False):
        """The preset timm's ``transforms_imagenet_eval`` builds from a ``pretrained_cfg``.

        timm resizes the shorter side to ``floor(size / crop_pct)`` and center-crops ``size``
        (``crop_mode="center"``), or resizes both sides to it (``"squash"``). Missing keys take
        timm's defaults (224, crop_pct 0.875, bicubic, ImageNet mean/std).

        Args:
            pretrained_cfg: the ``pretrained_cfg`` mapping of a timm ``config.json``.
            use_test_size: use ``test_input_size``/``test_crop_pct`` where given (timm's
                ``use_test_size=True``) instead of ``input_size``/``crop_pct``.

        Returns:
            :class:`ImageClassification`.

        Raises:
            ValueError: what numres does not reproduce: a non-square input size,
                ``crop_mode="border"``, an interpolation other than bilinear/bicubic, or
                channels other than 3.

        Example:
            >>> cfg = {"input_size": [3, 224, 224], "crop_pct": 0.95, "interpolation": "bicubic"}
            >>> ImageClassification.from_timm_config(cfg).resize_size
            235
        """
        cfg = pretrained_cfg
        size_key, pct_key = ("input_size", "crop_pct")
        if use_test_size and cfg.get("test_input_size"):
            size_key = "test_input_size"
        if use_test_size and cfg.get("test_crop_pct"):
            pct_key = "test_crop_pct"
        input_size = cfg.get(size_key) or (3, 224, 224)
        if (not isinstance(input_size, (list, tuple)) or len(input_size) != 3
                or not all(isinstance(v, int) and v > 0 for v in input_size)):
            raise ValueError(f"timm {size_key} must be [channels, height, width], got "
                             f"{input_size!r:.80}")
        channels, height, width = input_size
        if channels != 3:
            raise ValueError(f"timm {size_key} {list(input_size)} has {channels} channels; "
                             "numres models take RGB (3)")
        if height != width:
            raise ValueError(f"timm {size_key} {list(input_size)} is not square; numres's "
                             "preset crops squares (timm's ResizeKeepRatio is not reproduced)")
        crop_pct = cfg.get(pct_key) or 0.875
        if not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 4:
            raise ValueError(f"timm {pct_key} must be a number in (0, 4], got {crop_pct!r:.40}")
        mode = cfg.get("crop_mode") or "center"
        scale = math.floor(height / crop_pct)
        if mode == "center":
            resize_size = scale
        elif mode == "squash":
            resize_size = (scale, scale)
        else:
            raise ValueError(f"timm crop_mode {mode!r:.40} is not supported (numres does "
                             "'center' and 'squash')")
        interpolation = cfg.get("interpolation") or "bicubic"
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"timm interpolation {interpolation!r:.40} is not supported; "
                             f"numres does {', '.join(INTERPOLATIONS)}")
        return cls(crop_size=height, resize_size=resize_size,
                   mean=tuple(cfg.get("mean") or imagenet.MEAN),
                   std=tuple(cfg.get("std") or imagenet.STD), interpolation=interpolation)

    def __call__(self, images):
        """One image (path, PIL image or HWC array) -> (3, h, w); a list -> (N, 3, h, w)."""
        if isinstance(images, (list, tuple)):
            return np.stack([self(img) for img in images]) if images else \
                np.zeros((0, 3, self.crop_size, self.crop_size), np.float32)
        arr = _as_rgb_array(images)
        arr = center_crop(resize(arr, self.resize_size, self.interpolation), self.crop_size)
        x = arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0)
        x = (x - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(2, 0, 1))   # (H, W, 3) -> (3, H, W)

    def __repr__(self):
        return (f"ImageClassification(crop_size={self.crop_size}, "
                f"resize_size={self.resize_size}, mean={self.mean.tolist()}, "
                f"std={self.std.tolist()}, interpolation={self.interpolation}, "
                "antialias=True)")


def preprocess(images, weights=None, resize_size=256, crop_size=224):
    """Shortcut: ``ImageClassification`` for ``weights`` (a Weights, enum member, or None).

    Returns (N, 3, crop, crop) float32 for a list, (3, crop, crop) for one image.
    """
    if weights is not None:
        return getattr(weights, "value", weights).transforms()(images)
    return ImageClassification(crop_size, resize_size)(images)
