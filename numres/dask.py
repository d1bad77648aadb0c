"""Run numres over a Dask array, on a cluster (``pip install numres[dask]``).

The batch axis is split into chunks; each task runs one chunk through a model that its
worker process builds once and keeps (a per-process cache keyed by the model's arguments).
Tasks carry only those arguments, never weights, so the task graph stays small however large
the model is. Weights given as a tag or URL are fetched into each worker's cache
(``NUMRES_HOME``); a path must be readable by every worker.

Example:
    >>> import dask.array as da, numres.dask
    >>> x = da.from_zarr("images.zarr")               # (N, 3, 224, 224) float32
    >>> emb = numres.dask.features(x, arch="resnet50", weights="DEFAULT")
    >>> emb.compute()                                   # (N, 2048)
"""

import functools

import numpy as np

from .models.builders import ARCHS, build


@functools.lru_cache(maxsize=4)
def _model(arch, weights, backend, num_classes):
    return build(arch, weights=weights, backend=backend, num_classes=num_classes,
                 progress=False)


def model_cache_info():
    """How often this process built (misses) or reused (hits) a model."""
    return _model.cache_info()


def _run(block, arch, weights, backend, num_classes, output):
    model = _model(arch, weights, backend, num_classes)
    if block.shape[0] == 0:
        width = num_classes if output == "logits" else model.num_features
        return np.zeros((0, width), np.float32)
    return model(block) if output == "logits" else model.features(block)


def predict(images, arch="resnet50", weights="DEFAULT", backend="auto", num_classes=1000,
            output="logits"):
    """Logits (or pooled features) for a Dask array of images.

    Args:
        images: ``dask.array`` of shape (N, 3, H, W), float32, chunked along N (other axes
            are merged into one chunk).
        arch, weights, backend, num_classes: as for :func:`numres.build`.
        output: ``"logits"`` -> (N, num_classes) or ``"features"`` -> (N, 512 or 2048).

    Returns:
        a lazy ``dask.array`` of float32, chunked like ``images`` along N.
    """
    import dask.array as da

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    if output not in ("logits", "features"):
        raise ValueError(f"output must be 'logits' or 'features', got {output!r}")
    if not isinstance(images, da.Array):
        raise TypeError(f"expected a dask array, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a dask array of shape (N, 3, H, W), got {images.shape}")
    width = num_classes if output == "logits" else \
        512 * ARCHS[arch][0].expansion
    images = images.rechunk({1: -1, 2: -1, 3: -1})
    return images.map_blocks(
        _run, arch, weights, backend, num_classes, output, dtype=np.float32,
        chunks=(images.chunks[0], (width,)), drop_axis=[2, 3],
        meta=np.empty((0, width), np.float32))


def features(images, arch="resnet50", weights="DEFAULT", backend="auto", num_classes=1000):
    """Pooled embeddings (N, 512 or 2048) for a Dask array; see :func:`predict`.

    ``num_classes`` only has to match a checkpoint file's head, which is loaded but unused.
    """
    return predict(images, arch, weights, backend, num_classes, output="features")
