"""The Numba backend (``backend="numba"``): NHWC activations on numres's own CPU kernels.

Every module of this package needs Numba; importing it where Numba is missing raises
:class:`~numres.errors.BackendUnavailable`. Where a convolution is computed:
``paths.py`` chooses the path (:func:`~.paths.choose_path`, :class:`~.paths.ConvPath`) and
names the module that runs it (:data:`~.paths.RUNNERS`).

Modules: ``backend.py`` (the backend class), ``paths.py`` (path chooser and runner table),
``tuning.py`` (every threshold), ``tile.py`` (the declared register tile), ``microkernel.py``
(the GEMM microkernel's LLVM IR), one module per path (``gemm.py``, ``direct.py``,
``stem.py``, ``winograd.py``, ``grouped.py``, ``blas.py``), ``padding.py`` (the padded input
the direct paths read), ``kernels.py`` (compile options, the epilogue, pooling, layout and
batch-norm kernels), ``threads.py`` (numres's threads) and ``replay.py`` (recorded passes).
"""

from ...errors import BackendUnavailable

try:
    import numba  # noqa: F401  (every module here compiles with it)
except ImportError as exc:  # pragma: no cover - exercised where numba is absent
    raise BackendUnavailable("the 'numba' backend needs Numba: pip install numba") from exc

from .backend import NumbaBackend, kernels_cached, warmup  # noqa: E402
from .paths import ConvPath, choose_path  # noqa: E402
from .tuning import Tuning  # noqa: E402

__all__ = ["ConvPath", "NumbaBackend", "Tuning", "choose_path", "kernels_cached", "warmup"]
