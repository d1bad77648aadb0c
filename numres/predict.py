"""From logits to answers, and from files to batches: what the CLI and users share."""

import glob
import os
import sys
import time

import numpy as np

from .hub.registry import imagenet_categories
from .transforms import IMAGE_EXTENSIONS, ImageClassification, load_image


def softmax(logits):
    """Row-wise softmax in float64 (stable), returned as float32."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def decode(logits, k=5, categories=None):
    """Top-k labels and probabilities for each row of ``logits``.

    Args:
        logits: (N, C) array.
        k: how many classes per image.
        categories: C names; default ImageNet's when C == 1000, else ``"class <i>"``.

    Returns:
        list (one per image) of ``[(label, probability, index), ...]``, best first.

    Example:
        >>> numres.decode(model(x), k=3)[0]
        [('tabby', 0.61, 281), ('tiger cat', 0.22, 282), ('Egyptian cat', 0.11, 285)]
    """
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"expected logits of shape (N, C), got {logits.shape}")
    n_classes = logits.shape[1]
    if categories is None:
        categories = imagenet_categories() if n_classes == 1000 else \
            [f"class {i}" for i in range(n_classes)]
    if len(categories) != n_classes:
        raise ValueError(f"{len(categories)} category names for {n_classes} classes")
    probs = softmax(logits)
    k = min(k, n_classes)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(categories[j], float(p[j]), int(j)) for j in row] for row, p in zip(top, probs)]


def find_images(patterns):
    """Expand files, directories (recursively, image extensions) and glob patterns, in order.

    Raises:
        FileNotFoundError: a name that is neither a file, a folder nor a matching pattern.
    """
    found = []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        if os.path.isdir(pattern):
            for root, _, files in sorted(os.walk(pattern)):
                found.extend(os.path.join(root, f) for f in sorted(files)
                             if f.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(pattern):
            found.append(pattern)
        elif glob.has_magic(pattern) and glob.glob(pattern, recursive=True):
            found.extend(sorted(p for p in glob.glob(pattern, recursive=True)
                                if os.path.isfile(p)))
        else:
            raise FileNotFoundError(f"no such file or directory: {pattern}")
    return found


class Progress:
    """``[####    ] 120/400 images`` on stderr, only when stderr is a terminal."""

    def __init__(self, total, what="images", enabled=True):
        self.total, self.what = total, what
        self.enabled = enabled and total > 1 and sys.stderr.isatty()
        self.last = 0.0

    def update(self, done):
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.1 or done == self.total):
            self.last = now
            bar = "#" * int(30 * done / self.total)
            sys.stderr.write(f"\r[{bar:<30}] {done}/{self.total} {self.what}")
            if done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def run_files(model, files, transform=None, batch_size=16, method="__call__", progress=True):
    """Decode, preprocess and run ``files`` through ``model`` in batches.

    Args:
        model: a numres model. transform: preprocessing (default: the model's weights', else
            the V1 ImageNet preset). method: ``"__call__"`` (logits) or ``"features"``.

    Returns:
        (N, D) float32 array, rows in the order of ``files``.
    """
    if transform is None:
        transform = model.weights.transforms() if model.weights else ImageClassification()
    bar = Progress(len(files), enabled=progress)
    outputs = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        batch = np.stack([transform(load_image(f)) for f in chunk])
        outputs.append(getattr(model, method)(batch))
        bar.update(start + len(chunk))
    if not outputs:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(outputs)
