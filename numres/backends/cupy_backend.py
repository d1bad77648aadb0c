"""CUDA backend on CuPy (see issue: hand-written kernels in kernels/, cuBLAS GEMMs)."""

from ..errors import BackendUnavailable

try:
    import cupy  # noqa: F401
except ImportError as exc:
    raise BackendUnavailable(
        "the 'cupy' backend needs CuPy and an NVIDIA GPU: pip install numres[cuda] "
        "(or the cupy-cudaXXx wheel matching your CUDA driver)") from exc
