"""From logits to answers, and from arguments to files: what the CLI and users share.

Running files through a model is :mod:`numres.pipeline`'s job."""

import glob
import os

import numpy as np

from . import imagenet
from .transforms import IMAGE_EXTENSIONS


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
        categories = imagenet.categories() if n_classes == 1000 else \
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
