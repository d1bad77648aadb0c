"""The CUDA kernels: their sources (``kernels/``), the program text, the compiled modules.

An installed numres (wheel, sdist or editable) maps the top-level ``kernels/`` folder to the
``numres.kernels`` package; a checkout used without installing has it next to ``numres/``.

The program text is what CuPy compiles: the ``.cu`` files in :data:`SOURCES` order with
``common.cuh`` pasted in place of their ``#include "common.cuh"``. CuPy's compile cache is
keyed on the text and the options, not on included files, so an edited header must change the
text. The tests compile the very same text for the CPU (``tests/backends/cuda_host``).
"""

import functools
import os
import re
import threading
from importlib import resources
from pathlib import Path

import numpy as np

SOURCES = ("layout.cu", "im2col.cu", "conv_grouped.cu", "epilogue.cu", "pool.cu")
HEADER = "common.cuh"
#: C++ element type of each dtype the kernels are instantiated for.
CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float16): "__half"}
#: Channels one im2col thread moves when C allows it (16 bytes of either type).
IM2COL_VEC = {"float": 4, "__half": 8}
#: Threads per block of every launch, and the most blocks a launch uses: each kernel loops
#: over its elements with a grid-stride loop, so any size runs on a bounded grid.
BLOCK = 256
MAX_BLOCKS = 1 << 20
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"common\.cuh"[ \t]*$', re.M)


def name_expressions(ctype):
    """Every kernel of the program for element type ``ctype``, as NVRTC looks them up.

    Each is instantiated explicitly at the end of its ``.cu`` file (``template __global__ void
    name<args>(...)``); the backend asks for exactly these strings.
    """
    simple = ("nchw_to_nhwc", "nhwc_to_nchw", "conv_grouped_nhwc", "bias_act", "batch_norm",
              "max_pool_nhwc", "global_avg_pool_nhwc")
    return tuple(f"{name}<{ctype}>" for name in simple) + (
        f"im2col_nhwc<{ctype}, 1>", f"im2col_nhwc<{ctype}, {IM2COL_VEC[ctype]}>")


def launch_grid(total):
    """The grid of a launch over ``total`` elements (or runs): ``(blocks,)``."""
    return (int(min(max(-(-int(total) // BLOCK), 1), MAX_BLOCKS)),)


def padded_k(k):
    """A GEMM's reduction length ``k`` rounded up to a multiple of 8: the im2col row length,
    so that half-precision GEMMs get an 8-aligned leading dimension (tensor cores)."""
    return -(-int(k) // 8) * 8


def im2col_vec(ctype, channels):
    """Channels per im2col thread: 16 bytes' worth when ``channels`` allows, else 1."""
    vec = IM2COL_VEC[ctype]
    return vec if channels % vec == 0 else 1


def compile_options(ctype):
    """The preprocessor options of ``ctype``'s build: the float32 build leaves out everything
    half-precision, so it never needs ``cuda_fp16.h``; the half build names where that
    header is (NVRTC has no CUDA headers of its own)."""
    if ctype == "float":
        return ("-DNUMRES_NO_HALF",)
    return tuple(f"-I{folder}" for folder in half_include_dirs())


def cuda_files(name, wheel_dirs, toolkit_dir):
    """The existing copies of the CUDA file ``name``: under each ``nvidia`` wheel root in
    ``wheel_dirs`` (e.g. ``cu13/include``), then under ``$CUDA_PATH``, ``$CUDA_HOME`` and
    ``/usr/local/cuda`` in ``toolkit_dir`` (e.g. ``include``, ``lib64``)."""
    candidates = []
    try:
        import nvidia
        candidates += [Path(root) / sub / name for root in nvidia.__path__ for sub in wheel_dirs]
    except ImportError:
        pass
    toolkits = [os.environ.get(v) for v in ("CUDA_PATH", "CUDA_HOME")] + ["/usr/local/cuda"]
    candidates += [Path(root) / toolkit_dir / name for root in toolkits if root]
    return [p for p in candidates if p.is_file()]


@functools.lru_cache(maxsize=1)
def half_include_dirs():
    """Folders holding ``cuda_fp16.h`` (the CUDA 13 wheel's, then a toolkit's)."""
    return tuple(str(p.parent) for p in cuda_files("cuda_fp16.h", ("cu13/include",), "include"))


@functools.lru_cache(maxsize=1)
def kernel_dir():
    """The folder holding the ``.cu``/``.cuh`` files.

    Raises:
        FileNotFoundError: neither the installed ``numres.kernels`` nor a checkout's
            ``kernels/`` folder holds them.
    """
    try:
        folder = Path(str(resources.files("numres.kernels")))
        if (folder / SOURCES[0]).is_file():
            return folder
    except ModuleNotFoundError:
        pass
    folder = Path(__file__).resolve().parents[3] / "kernels"
    if not (folder / SOURCES[0]).is_file():
        raise FileNotFoundError(f"numres's CUDA sources are missing (looked in {folder})")
    return folder


def kernel_source(name):
    """The text of one kernel file, e.g. ``kernel_source("im2col.cu")``."""
    return (kernel_dir() / name).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def program_source():
    """The whole program as CuPy compiles it: ``common.cuh`` once, then every ``.cu`` file
    with its ``#include "common.cuh"`` removed (the header is already there)."""
    header = kernel_source(HEADER)
    # A pasted "#pragma once" would sit in the main file, where compilers warn about it.
    header = re.sub(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*\n", "", header, flags=re.M)
    parts = [f"// ---- {HEADER}\n{header}"]
    for name in SOURCES:
        text = kernel_source(name)
        if not _INCLUDE.search(text):
            raise ValueError(f"{name} does not include {HEADER}")
        pasted = _INCLUDE.sub(f"// ({HEADER}: above)", text)
        parts.append(f"// ---- {name}\n{pasted}")
    return "\n".join(parts)


class KernelCache:
    """Compiled kernels, one module per (device, element type), one function object per
    kernel: a launch looks its kernel up in a dict, nothing is compiled or created per call.

    Args:
        cupy: the ``cupy`` module (passed in: this file imports without CuPy).
    """

    def __init__(self, cupy):
        self._cupy = cupy
        self._functions = {}
        self._lock = threading.Lock()   # two threads' first launches compile once

    def get(self, name, ctype):
        """The kernel ``name`` (e.g. ``"im2col_nhwc<__half, 8>"``) on the current device."""
        device = self._cupy.cuda.runtime.getDevice()
        function = self._functions.get((device, name))
        if function is None:
            with self._lock:
                if (device, name) not in self._functions:
                    module = self._cupy.RawModule(
                        code=program_source(), options=("-std=c++17",) + compile_options(ctype),
                        name_expressions=name_expressions(ctype))
                    for expr in name_expressions(ctype):
                        self._functions[(device, expr)] = module.get_function(expr)
            function = self._functions[(device, name)]
        return function
