"""The CUDA backend on CuPy (``backend="cupy"``).

* :mod:`.backend`: :class:`~.backend.CupyBackend`, the ops (importing it needs CuPy and a GPU);
* :mod:`.kernels`: the CUDA C sources of ``kernels/`` and their compiled modules;
* :mod:`.blas`: numres's own cuBLASLt handle, called through ctypes;
* :mod:`.graphs`: CUDA-graph capture and replay of whole forward passes.

Importing this package imports nothing from CuPy: the kernel finder works everywhere (the
tests compile the same kernel text for the CPU).
"""
