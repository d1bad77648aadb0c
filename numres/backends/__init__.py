"""Backends: ``get_backend(name)`` imports a backend only when it is asked for.

``"numpy"`` always works (``numpy_backend.py``, the reference). ``"numba"`` needs Numba (the
``numba/`` package: everything in it is Numba-only), ``"cupy"`` needs CuPy and a CUDA device
(the ``cupy/`` package). ``"auto"`` (or the ``NUMRES_BACKEND`` environment variable) picks the
fastest that runs here. ``_base.py`` is the boundary every backend implements and the facts
they share, ``_workspace.py`` the buffer pool of the Numba and CuPy backends; the names other
packages use are exported here.
"""

import importlib
import os
import threading

from ..errors import BackendUnavailable
from ._base import (PRECISIONS, Backend, PassOp, available_cores, batch_norm_affine,
                    conv_output_size, conv_weight_matrix, copy_tree, default_threads, nbytes)

__all__ = ["BACKEND_NAMES", "PRECISIONS", "Backend", "PassOp", "available_backends",
           "available_cores", "batch_norm_affine", "conv_output_size", "conv_weight_matrix",
           "copy_tree", "default_threads", "get_backend", "nbytes", "with_precision"]

# name -> (module, class); tried in this order by "auto" (fastest first)
_REGISTRY = {
    "cupy": (".cupy.backend", "CupyBackend"),
    "numba": (".numba", "NumbaBackend"),
    "numpy": (".numpy_backend", "NumpyBackend"),
}
BACKEND_NAMES = tuple(_REGISTRY)
_instances = {}
_failures = {}
_lock = threading.Lock()


def get_backend(name="auto", **options):
    """Return the backend called ``name``: a shared instance, or a new one with ``options``.

    Args:
        name: ``"auto"``, ``"numpy"``, ``"numba"``, ``"cupy"``, or a :class:`Backend` instance.
        **options: constructor options, e.g. ``get_backend("cupy", dtype="float16")`` or
            ``get_backend("numba", threads=1)``.

    Raises:
        ValueError: unknown name.
        BackendUnavailable: the backend cannot run here; the message says how to install it.

    Example:
        >>> get_backend("numpy").name
        'numpy'
    """
    if isinstance(name, Backend):
        return name
    if not isinstance(name, str):
        raise TypeError(f"backend must be a name or a Backend, got {type(name).__name__}")
    if name == "auto":
        name = os.environ.get("NUMRES_BACKEND", "auto") or "auto"
        if name == "auto":
            for candidate in _REGISTRY:
                try:
                    return _load(candidate)
                except BackendUnavailable:
                    continue
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of "
                         f"{', '.join(('auto',) + BACKEND_NAMES)}")
    shared = _load(name)
    return type(shared)(**options) if options else shared


def available_backends():
    """Names of the backends that can run on this machine, fastest first."""
    names = []
    for name in _REGISTRY:
        try:
            _load(name)
            names.append(name)
        except BackendUnavailable:
            pass
    return names


def _load(name):
    with _lock:
        if name in _instances:
            return _instances[name]
        if name in _failures:
            raise BackendUnavailable(_failures[name])
        module_name, class_name = _REGISTRY[name]
        try:
            module = importlib.import_module(module_name, __name__)
            instance = getattr(module, class_name)()
        except BackendUnavailable as exc:
            _failures[name] = str(exc)
            raise
        _instances[name] = instance
        return instance


def with_precision(backend, precision):
    """``backend`` (a name or a Backend) as one that computes in ``precision``: itself for
    float32; for bfloat16 a Numba backend in bf16 (``"auto"`` and ``"numba"`` give one, a
    passed Backend must already compute in it).

    Raises:
        ValueError: an unknown precision, or one the backend does not compute in.
        BackendUnavailable: bfloat16 without Numba, or on a CPU without AVX512_BF16.

    Example:
        >>> with_precision("numpy", "float32")
        'numpy'
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "float32":
        return backend
    if isinstance(backend, Backend):
        have = getattr(backend, "precision", "float32")
        if have != precision:
            raise ValueError(f"precision={precision!r}, but the {backend.name} backend passed "
                             f"computes in {have}: pass get_backend('numba', "
                             f"precision={precision!r}), or only one")
        return backend
    if backend not in ("auto", "numba"):
        raise ValueError(f"precision={precision!r} runs on the numba backend (CPUs with "
                         f"AVX512_BF16), not backend={backend!r}")
    return get_backend("numba", precision=precision)
