"""Run numres over a Dask array, on a cluster (``pip install numres[dask]``).

The batch axis is split into chunks; each task runs one chunk through a model that its
worker process builds once and keeps (a per-process cache keyed by the model's arguments).
Tasks carry only those arguments, never weights, so the task graph stays small however large
the model is. Weights given as a tag or URL are fetched into each worker's cache
(``NUMRES_HOME``); a path must be readable by every worker.

:func:`from_files` starts from image files instead: the workers decode them, and a file that
cannot be read is reported in its row rather than failing the job.

Example:
    >>> import dask.array as da, numres.dask
    >>> x = da.from_zarr("images.zarr")               # (N, 3, 224, 224) float32
    >>> emb = numres.dask.features(x, arch="resnet50", weights="DEFAULT")
    >>> emb.compute()                                   # (N, 2048)
    >>> numres.dask.from_files("photos/*.jpg").to_zarr("features.zarr")
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


# -- from image files ------------------------------------------------------------------------
class FileResults:
    """What :func:`from_files` returns: lazy rows and per-file errors, one task per partition.

    Attributes:
        paths: the files, in row order.
        values: ``dask.array`` (N, D) float32; rows of skipped files are NaN.
        errors: ``dask.array`` (N,) of str; ``""`` for good files, else why the file was
            skipped.
    """

    def __init__(self, paths, values, errors, parts, chunk):
        self.paths, self.values, self.errors = paths, values, errors
        self._parts, self._chunk = parts, chunk

    def compute(self):
        """``(values, errors)`` as NumPy arrays (one pass over the files)."""
        import dask
        return dask.compute(self.values, self.errors)

    def to_zarr(self, path):
        """Write ``values``, ``errors`` and ``paths`` into a zarr group at ``path``, each
        worker writing its own partitions (``pip install zarr``; ``path`` must be reachable
        from the workers). Returns ``(good rows, skipped files)``."""
        import dask
        import zarr

        n, width = self.values.shape
        chunk = max(1, self._chunk)
        group = zarr.open_group(path, mode="w")
        group.create_array("values", shape=(n, width), dtype="float32", chunks=(chunk, width),
                           fill_value=float("nan"))
        group.create_array("errors", shape=(n,), dtype=str, chunks=(chunk,))
        group.create_array("paths", shape=(n,), dtype=str, chunks=(chunk,))
        group["paths"][:] = np.array(self.paths, dtype=object)
        writes = [dask.delayed(_write_part)(part, path, start)
                  for part, start in zip(self._parts, range(0, n, chunk))]
        skipped = sum(dask.compute(*writes))
        return n - skipped, skipped


def _write_part(result, path, start):
    import zarr

    values, errors = result
    group = zarr.open_group(path, mode="r+")
    # Partitions line up with the zarr chunks, so concurrent writers never share a chunk.
    group["values"][start:start + len(values)] = values
    group["errors"][start:start + len(errors)] = errors
    return int(sum(1 for e in errors if e))


def from_files(files, arch="resnet50", weights="DEFAULT", output="features", backend="auto",
               num_classes=1000, files_per_task=256, batch_size=16, draft=False):
    """Run image files through numres on a Dask cluster: decoding happens on the workers, a
    file that cannot be read is reported in its row (it never fails the job).

    Each task takes ``files_per_task`` files; its worker builds the model once and runs it
    with the worker's share of the host's cores (the host's cores divided by the threads of
    all Dask workers on that host), so numres's threads never oversubscribe the machine.

    Args:
        files: a list of image paths, or a glob pattern / folder (expanded here, on the
            client); the paths must be readable by the workers.
        arch, weights, backend, num_classes: as for :func:`numres.build`.
        output: ``"features"`` (N, 512 or 2048) or ``"logits"`` (N, num_classes).
        files_per_task: files per task (and per zarr chunk in :meth:`FileResults.to_zarr`).
        batch_size: images per forward pass inside a task.
        draft: reduced-size JPEG decoding (see :func:`numres.pipeline.read_image`).

    Returns:
        :class:`FileResults` (lazy).

    Example:
        >>> res = numres.dask.from_files("photos/**/*.jpg", arch="resnet50")
        >>> values, errors = res.compute()          # or res.to_zarr("features.zarr")
    """
    import dask
    import dask.array as da

    from .predict import find_images

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    if output not in ("logits", "features"):
        raise ValueError(f"output must be 'logits' or 'features', got {output!r}")
    paths = find_images([files]) if isinstance(files, str) else [str(f) for f in files]
    if not paths:
        raise ValueError(f"no image files in {files!r}")
    width = num_classes if output == "logits" else 512 * ARCHS[arch][0].expansion
    parts, values, errors = [], [], []
    for start in range(0, len(paths), files_per_task):
        chunk = paths[start:start + files_per_task]
        part = dask.delayed(_run_files, pure=True)(
            chunk, arch, weights, backend, num_classes, output, batch_size, draft)
        parts.append(part)
        values.append(da.from_delayed(part[0], (len(chunk), width), np.float32))
        errors.append(da.from_delayed(part[1], (len(chunk),), object))
    return FileResults(paths, da.concatenate(values), da.concatenate(errors), parts,
                       files_per_task)


def _run_files(paths, arch, weights, backend, num_classes, output, batch_size, draft):
    from .pipeline import iter_results

    model = _file_model(arch, weights, backend, num_classes, _worker_threads())
    width = num_classes if output == "logits" else model.num_features
    values = np.full((len(paths), width), np.nan, np.float32)
    errors = np.full(len(paths), "", dtype=object)
    for item in iter_results(model, paths, output=output, batch_size=batch_size,
                             decode_threads=1, draft=draft):
        if item.ok:
            values[item.index] = item.value
        else:
            errors[item.index] = item.reason
    return values, errors


@functools.lru_cache(maxsize=4)
def _file_model(arch, weights, backend, num_classes, threads):
    from .backends import get_backend

    chosen = get_backend(backend)
    if threads and chosen.name == "numba":
        chosen = chosen.with_threads(threads)      # keeps its precision and tuning
    return build(arch, weights=weights, backend=chosen, num_classes=num_classes,
                 progress=False)


def _worker_threads():
    """This worker's share of its host's cores, or None outside a Dask worker."""
    try:
        from distributed import get_worker
        worker = get_worker()
    except (ImportError, ValueError):
        return None
    return _host_share(worker.address, worker.state.nthreads)


@functools.lru_cache(maxsize=1)
def _host_share(address, own_threads):
    from distributed import get_client

    from .backends import available_cores

    host = address.rsplit(":", 1)[0]
    try:
        workers = get_client().scheduler_info(n_workers=-1)["workers"]
        threads = sum(w["nthreads"] for a, w in workers.items() if a.rsplit(":", 1)[0] == host)
    except Exception:          # an older scheduler API: assume this worker is alone
        threads = own_threads
    # The nanny sets OMP_NUM_THREADS=1 in workers; the host's cores are what counts here.
    cores = available_cores()
    return max(1, cores // max(1, threads))
