"""Find the CUDA sources of ``kernels/``: installed as ``numres.kernels``, or in a checkout.

An installed numres (wheel, sdist or editable) maps the top-level ``kernels/`` folder to the
``numres.kernels`` package; a checkout used without installing has it next to ``numres/``.
"""

import functools
from importlib import resources
from pathlib import Path

SOURCES = ("layout.cu", "im2col.cu", "epilogue.cu", "pool.cu")
# Every kernel, each instantiated for float and __half at the end of its file.
KERNELS = ("nchw_to_nhwc", "nhwc_to_nchw", "im2col_nhwc", "bias_act", "bias_act_grouped",
           "batch_norm", "max_pool_nhwc", "global_avg_pool_nhwc")


@functools.lru_cache(maxsize=1)
def kernel_dir():
    """The folder holding the ``.cu``/``.cuh`` files."""
    try:
        folder = Path(str(resources.files("numres.kernels")))
        if (folder / SOURCES[0]).is_file():
            return folder
    except ModuleNotFoundError:
        pass
    folder = Path(__file__).resolve().parents[1] / "kernels"
    if not (folder / SOURCES[0]).is_file():
        raise FileNotFoundError(f"numres's CUDA sources are missing (looked in {folder})")
    return folder


def kernel_source(name):
    """The text of one kernel file, e.g. ``kernel_source("im2col.cu")``."""
    return (kernel_dir() / name).read_text(encoding="utf-8")
