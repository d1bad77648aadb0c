"""pytest plugin (``-p tests.backends.cupy_standin.no_numba``): Numba cannot be imported, as
on a machine without it. Used to check that the CUDA tests collect there."""

import sys

sys.modules["numba"] = None           # import numba -> ImportError
