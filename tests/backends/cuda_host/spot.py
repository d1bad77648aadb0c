"""Kernels on tensors of more than 2^31 elements, checked sparsely on the CPU.

    python -m tests.backends.cuda_host.spot FAMILY     # exit 0: checked, 77: cannot run here

Tensors live in sparse memory: an anonymous private mapping with MAP_NORESERVE, so the
gigabytes are reserved address space, and only the pages a check touches are ever allocated
(reads of untouched pages see zeros). Each check launches the kernel with the CuPy backend's
real grid (``kernels.launch_grid``) but runs only a few of its blocks whole (the first, a
middle and the last), whose grid-stride rounds reach past 2^31; it seeds exactly the inputs
those blocks read, with values that identify their position, and compares every element they
write with the definition (index arithmetic in NumPy int64). A kernel whose indexing
overflowed 32 bits reads elsewhere (zeros: a mismatch) or outside the mapping (a crash: the
reason this runs in a child process).

Values are small multiples of 1/8 (or 1/64 products), so every sum is exact in float32 and
the one rounding to the kernel's type is the same as NumPy's cast of the exact value.
"""

import math
import mmap
import sys

import numpy as np

from numres.backends.cupy import kernels

from . import Unavailable, program

LIMIT = 2 ** 31
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)      # Linux's value
CTYPES = {"float": np.float32, "__half": np.float16}


class Sparse:
    """A NumPy array over reserved, not yet allocated, memory."""

    def __init__(self, shape, dtype):
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        self.map = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                             | MAP_NORESERVE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.array = np.frombuffer(self.map, dtype).reshape(shape)
        self.flat = self.array.reshape(-1)


def value(index):
    """The seed at flat position ``index``: a multiple of 1/8 in [-32, 32) that depends on
    it (exact in half precision)."""
    return ((np.asarray(index, np.int64) % 509) - 254) / 8.0


def covered(total, vec=1):
    """Flat indices written by the checked blocks of a launch over ``total`` runs of
    ``vec`` elements: blocks 0, the middle one and the last one, all their rounds."""
    grid = kernels.launch_grid(total)[0]
    stride = grid * kernels.BLOCK
    picked = sorted({0, grid // 2, grid - 1})
    units = []
    for block in picked:
        first = block * kernels.BLOCK + np.arange(kernels.BLOCK, dtype=np.int64)
        rounds = np.arange(-(-total // stride), dtype=np.int64)
        u = (first[:, None] + rounds[None, :] * stride).reshape(-1)
        units.append(u[u < total])
    units = np.concatenate(units)
    elements = (units[:, None] * vec + np.arange(vec, dtype=np.int64)[None, :]).reshape(-1)
    return grid, picked, elements


def run_blocks(kernel, total, args, picked):
    grid = kernels.launch_grid(total)
    for block in picked:
        kernel(grid, (kernels.BLOCK,), *args, first_block=block, blocks=1)


def check(name, got, expected, indices):
    bad = np.flatnonzero(got != expected)
    if bad.size:
        i = bad[0]
        raise AssertionError(f"{name}: element {indices[i]} is {got[i]}, expected "
                             f"{expected[i]} ({bad.size} of {got.size} wrong)")
    if indices.max() < LIMIT:
        raise AssertionError(f"{name}: no checked index reached 2^31")
    print(f"{name}: checked {got.size} elements up to index {indices.max()}")


def layout(ctype):
    dtype = CTYPES[ctype]
    n, c, h, w = 14300, 3, 224, 224
    total = n * c * h * w
    # nchw_to_nhwc: element i of the output is (b, y, x, ci)
    src_t = Sparse((total,), np.float32)
    out_t = Sparse((total,), dtype)
    _, picked, i = covered(total)
    ci, pix = i % c, i // c
    x, rest = pix % w, pix // w
    y, b = rest % h, rest // h
    src = ((b * c + ci) * h + y) * w + x
    src_t.flat[src] = value(src)
    run_blocks(program(ctype).kernel(f"nchw_to_nhwc<{ctype}>"), total,
               (src_t.array, out_t.array, n, c, h, w), picked)
    check(f"nchw_to_nhwc<{ctype}>", out_t.flat[i], value(src).astype(dtype), i)
    # nhwc_to_nchw: element i of the output is (b, ci, y, x)
    src_t = Sparse((total,), dtype)
    out_t = Sparse((total,), np.float32)
    x, rest = i % w, i // w
    y, rest = rest % h, rest // h
    ci, b = rest % c, rest // c
    src = ((b * h + y) * w + x) * c + ci
    src_t.flat[src] = value(src)
    run_blocks(program(ctype).kernel(f"nhwc_to_nchw<{ctype}>"), total,
               (src_t.array, out_t.array, n, c, h, w), picked)
    check(f"nhwc_to_nchw<{ctype}>", out_t.flat[i], value(src).astype(np.float32), i)


def im2col(ctype):
    dtype = CTYPES[ctype]
    # a 3x3 layer (vectorised runs) and the stem (7x7/2 on 3 channels, K padded 147 -> 152)
    for n, c, hw, k, s, p in ((1200, 64, 56, 3, 1, 1), (1130, 3, 224, 7, 2, 3)):
        oh = (hw + 2 * p - k) // s + 1
        row_len = kernels.padded_k(k * k * c)
        vec = kernels.im2col_vec(ctype, c)
        total = n * oh * oh * row_len
        x = Sparse((n * hw * hw * c,), dtype)
        cols = Sparse((total,), dtype)
        _, picked, e = covered(total // vec, vec)
        m, j = e // row_len, e % row_len
        tap, ci = j // c, j % c
        ky, kx = tap // k, tap % k
        b, pix = m // (oh * oh), m % (oh * oh)
        iy, ix = (pix // oh) * s - p + ky, (pix % oh) * s - p + kx
        inside = (j < k * k * c) & (iy >= 0) & (iy < hw) & (ix >= 0) & (ix < hw)
        src = ((b * hw + iy) * hw + ix) * c + ci
        x.flat[src[inside]] = value(src[inside])
        expected = np.where(inside, value(src), 0.0).astype(dtype)
        run_blocks(program(ctype).kernel(f"im2col_nhwc<{ctype}, {vec}>"), total // vec,
                   (x.array, cols.array, n, hw, hw, c, k, s, p, oh, oh, row_len), picked)
        check(f"im2col_nhwc<{ctype}, {vec}> c={c} k={k}", cols.flat[e], expected, e)


def conv_grouped(ctype):
    dtype = CTYPES[ctype]
    n, hw, c, o, g, k, s, p = 2700, 56, 256, 256, 32, 3, 1, 1
    cg, og = c // g, o // g
    total = n * hw * hw * o
    x = Sparse((total,), dtype)
    res = Sparse((total,), dtype)
    out = Sparse((total,), dtype)
    rng = np.random.default_rng(0)
    weight = (rng.integers(-6, 7, (k * k * cg, o)) / 8).astype(dtype)
    bias = (rng.integers(-8, 9, o) / 8).astype(dtype)
    _, picked, i = covered(total)
    m, oc = i // o, i % o
    b, pix = m // (hw * hw), m % (hw * hw)
    oy, ox = pix // hw, pix % hw
    expected = bias[oc].astype(np.float64) + value(i + 3)
    res.flat[i] = value(i + 3)
    for ky in range(k):
        for kx in range(k):
            iy, ix = oy * s - p + ky, ox * s - p + kx
            inside = (iy >= 0) & (iy < hw) & (ix >= 0) & (ix < hw)
            for ci in range(cg):
                src = ((b * hw + iy) * hw + ix) * c + (oc // og) * cg + ci
                x.flat[src[inside]] = value(src[inside])
                wv = weight[(ky * k + kx) * cg + ci, oc].astype(np.float64)
                expected = expected + np.where(inside, value(src) * wv, 0.0)
    run_blocks(program(ctype).kernel(f"conv_grouped_nhwc<{ctype}>"), total,
               (x.array, weight, bias, res.array, 1, out.array, n, hw, hw, c, k, s, p, hw,
                hw, o, g, 1), picked)
    check(f"conv_grouped_nhwc<{ctype}>", out.flat[i],
          np.maximum(expected, 0).astype(dtype), i)


def bias_act(ctype):
    dtype = CTYPES[ctype]
    m, o = 2_200_000, 1000
    total = m * o
    y, res = Sparse((total,), dtype), Sparse((total,), dtype)
    bias = (np.arange(o) % 17 / 8 - 1).astype(dtype)
    _, picked, i = covered(total)
    y.flat[i], res.flat[i] = value(i), value(i + 11)
    expected = np.maximum(value(i) + bias[i % o].astype(np.float64) + value(i + 11), 0)
    run_blocks(program(ctype).kernel(f"bias_act<{ctype}>"), total,
               (y.array, bias, res.array, 1, m, o, 1), picked)
    check(f"bias_act<{ctype}>", y.flat[i], expected.astype(dtype), i)


def batch_norm(ctype):
    dtype = CTYPES[ctype]
    m, c = 8_400_000, 256
    total = m * c
    x, res, out = Sparse((total,), dtype), Sparse((total,), dtype), Sparse((total,), dtype)
    scale = (2.0 ** (np.arange(c) % 3 - 1)).astype(np.float32)       # exact products
    shift = (np.arange(c) % 9 / 8 - 0.5).astype(np.float32)
    _, picked, i = covered(total)
    x.flat[i], res.flat[i] = value(i), value(i + 5)
    ch = i % c
    expected = value(i) * scale[ch] + shift[ch] + value(i + 5)
    run_blocks(program(ctype).kernel(f"batch_norm<{ctype}>"), total,
               (x.array, scale, shift, res.array, 1, out.array, m, c, 0), picked)
    check(f"batch_norm<{ctype}>", out.flat[i], expected.astype(dtype), i)


def max_pool(ctype):
    dtype = CTYPES[ctype]
    n, hw, c, k, s, p = 10800, 112, 64, 3, 2, 1
    oh = (hw + 2 * p - k) // s + 1
    total = n * oh * oh * c
    x, out = Sparse((n * hw * hw * c,), dtype), Sparse((total,), dtype)
    _, picked, i = covered(total)
    ci, rest = i % c, i // c
    ox, rest = rest % oh, rest // oh
    oy, b = rest % oh, rest // oh
    expected = np.full(i.shape, -np.inf)
    for ky in range(k):
        for kx in range(k):
            iy, ix = oy * s - p + ky, ox * s - p + kx
            inside = (iy >= 0) & (iy < hw) & (ix >= 0) & (ix < hw)
            src = ((b * hw + iy) * hw + ix) * c + ci
            x.flat[src[inside]] = value(src[inside])
            expected = np.where(inside, np.maximum(expected, value(src)), expected)
    run_blocks(program(ctype).kernel(f"max_pool_nhwc<{ctype}>"), total,
               (x.array, out.array, n, hw, hw, c, k, s, p, oh, oh), picked)
    check(f"max_pool_nhwc<{ctype}>", out.flat[i], expected.astype(dtype), i)


def avg_pool(ctype):
    dtype = CTYPES[ctype]
    n, hw, c = 1_048_600, 4, 2048
    total = n * c
    x, out = Sparse((total * hw,), dtype), Sparse((total,), dtype)
    _, picked, i = covered(total)
    ci, b = i % c, i // c
    expected = np.zeros(i.shape)
    for j in range(hw):
        src = (b * hw + j) * c + ci
        x.flat[src] = value(src)
        expected += value(src)
    run_blocks(program(ctype).kernel(f"global_avg_pool_nhwc<{ctype}>"), total,
               (x.array, out.array, n, hw, c), picked)
    check(f"global_avg_pool_nhwc<{ctype}>", out.flat[i], (expected / hw).astype(dtype), i)


FAMILIES = {"layout": layout, "im2col": im2col, "conv_grouped": conv_grouped,
            "bias_act": bias_act, "batch_norm": batch_norm, "max_pool": max_pool,
            "avg_pool": avg_pool}


def main(argv):
    (family,) = argv
    for ctype in ("float", "__half"):
        try:
            program(ctype)
        except Unavailable as exc:
            if ctype == "float":
                print(f"cannot run here: {exc}")
                return 77
            print(f"__half skipped: {exc}")
            continue
        try:
            FAMILIES[family](ctype)
        except OSError as exc:                       # mmap refused (strict overcommit)
            print(f"cannot reserve sparse memory here: {exc}")
            return 77
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
