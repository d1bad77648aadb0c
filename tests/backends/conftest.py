"""Fixtures of the backend tests: the CuPy stand-in (``cupy_standin/``) and ``cuda``, the CUDA
backend on the real GPU where there is one, else on the stand-in."""

import functools

import pytest

from . import cuda_host
from . import cupy_standin as standin


@functools.lru_cache(maxsize=1)
def real_cupy_has_a_gpu():
    """True when the real CuPy imports and sees a CUDA device: then the stand-in is never
    installed, and the CUDA tests run on the real thing. (CuPy itself imports without a GPU:
    CI installs it, and uses the stand-in.)"""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - not installed, no driver, driver too old
        return False


@pytest.fixture
def cupy_standin(monkeypatch):
    """The CuPy stand-in in ``sys.modules`` and numres's CUDA backend imported against it.

    Yields the :class:`cupy_standin.Installed`; a test fails if it leaves a violation
    recorded (set ``installed.expected_violations`` to the number it provokes on purpose).
    """
    if real_cupy_has_a_gpu():
        pytest.skip("the real CuPy has a GPU here: the stand-in is never used")
    try:
        cuda_host.program("float")
    except cuda_host.Unavailable as exc:
        pytest.skip(str(exc))
    installed = standin.install(monkeypatch)
    from numres import backends as registry
    monkeypatch.setattr(registry, "_instances",
                        {k: v for k, v in registry._instances.items() if k != "cupy"})
    monkeypatch.setattr(registry, "_failures",
                        {k: v for k, v in registry._failures.items() if k != "cupy"})
    from numres.backends.cupy import backend, blas
    monkeypatch.setattr(blas, "open_cublaslt", lambda major: installed.cublaslt)
    installed.backend_module = backend
    installed.expected_violations = 0
    yield installed
    found = installed.device.violations
    assert len(found) == installed.expected_violations, "\n".join(found)


class CudaTarget:
    """numres's CUDA backend where the tests run: on the real GPU (``standin`` is None) or
    on the CuPy stand-in."""

    def __init__(self, cupy, standin=None):
        self.cupy, self.standin = cupy, standin

    def backend(self, **options):
        from numres.backends import get_backend
        return get_backend("cupy", **options)

    def has_half(self):
        if self.standin is None:
            return True
        try:
            cuda_host.program("__half")
            return True
        except cuda_host.Unavailable:
            return False

    def require_half(self):
        if not self.has_half():
            pytest.skip("the __half kernels do not build for the host (no cuda_fp16.h)")


@pytest.fixture
def cuda(request):
    """The CUDA backend on the real GPU where there is one, else on the stand-in."""
    if real_cupy_has_a_gpu():
        import cupy
        return CudaTarget(cupy)
    installed = request.getfixturevalue("cupy_standin")
    return CudaTarget(installed.cupy, installed)
