"""The zero-padded copy of an input that the direct kernels read (paths ``DIRECT``, ``STEM``,
``GROUPED_LANES``, ``GROUPED_DIRECT``).

A direct kernel reads a whole tile of output pixels' windows from the image with one row
stride, so the padding must be there in memory: ``pad`` pixels around the image, a row
width that is a multiple of the stride, and extra rows below it, into which the unused rows
of the last tile read without leaving the buffer (:func:`padded_rows`).
"""

import numpy as np

from .._base import nbytes
from .kernels import kernel
from .pairs import store_row


def padded_rows(h, w, k, stride, pad, tile_rows):
    """Rows and row width of the zero-padded input read with tiles of ``tile_rows`` output
    pixels: the width is a multiple of the stride, and extra rows let the last tile's unused
    rows read past the image without leaving the buffer."""
    wp = -(-(w + 2 * pad) // stride) * stride
    extra = -(-((tile_rows - 1) * stride + k) // wp) + 1
    return h + 2 * pad + extra, wp


@kernel
def pad_input(r0, r1, x, pad, xp):
    """xp[n, pad + iy, pad + ix, :] = x[n, iy, ix, :], zero elsewhere, for rows [r0, r1) of
    the padded (N, Hp, Wp, C) buffer (row index n * Hp + iy); a uint32 ``xp`` (N, Hp, Wp,
    C / 2) gets bf16 pairs (``pairs.py``)."""
    n_img, h, w, c_in = x.shape
    _, hp, wp, c = xp.shape
    src = x.reshape(n_img * h, w * c_in)       # (image rows, W*C): 1-D row copies vectorise
    dst = xp.reshape(n_img * hp, wp * c)
    for r in range(r0, r1):
        n, iy = r // hp, r % hp - pad
        row = dst[r]
        if iy < 0 or iy >= h:
            row[:] = 0
            continue
        row[:pad * c] = 0
        store_row(row[pad * c:(pad + w) * c], src[n * h + iy])
        row[(pad + w) * c:] = 0


def padded(be, x, conv, tile_rows):
    """``x`` zero-padded for a direct kernel with tiles of ``tile_rows`` pixels, in a
    workspace buffer (one step of the pass); as bf16 pairs for a convolution with pairs
    weights (``conv.pairs``)."""
    n, h, w, c = x.shape
    hp, wp = padded_rows(h, w, conv.kernel_size, conv.stride, conv.padding, tile_rows)
    if conv.pairs:
        xp = be.workspace.get((n, hp, wp, c // 2), np.uint32)
    else:
        xp = be.workspace.get((n, hp, wp, c))
    be.step(be.rows, n * hp, xp.size, pad_input, x, conv.padding, xp)
    return xp


def events(x, conv, tile_rows):
    """The padded copy's allocation (freed by the caller's ``("free", "padded")``)."""
    n, h, w, c = x
    hp, wp = padded_rows(h, w, conv.kernel_size, conv.stride, conv.padding, tile_rows)
    return [("alloc", "padded", nbytes((n, hp, wp, c // 2 if conv.pairs else c)))]
