"""bfloat16 pairs: the operands of ``NumbaBackend(precision="bfloat16")``.

AVX512_BF16's ``vdpbf16ps`` multiplies two vectors of bf16 *pairs* and adds both products
of each lane to a float32 sum: twice the multiply-adds of a float32 FMA per instruction. So
in bfloat16 mode the weights of a convolution are packed once as pairs adjacent along the
reduction (:func:`pack`), and the activation it reads is converted to pairs of adjacent
channels (:func:`to_pairs`, or while padding: ``padding.pad_input``). A grouped convolution
pairs channels within each group (groups of an even number of channels; on the lanes kernel
also whole vectors of pairs: C a multiple of 2 vl). Sums, bias, residual and ReLU stay
float32, and so does every activation between layers: only the multiply rounds its operands,
to bfloat16 (8 bits of mantissa, float32's range).

The multiply treats bf16 denormals (below 1.2e-38) as zero, as ``vdpbf16ps`` does; rounding
here keeps them (as torch does): the products lost are at most ~1e-38 times the other
operand, nothing beside the sums of a network's layers.

A pair is one uint32: the even channel's bf16 in the low half, the odd one's in the high
half (little-endian memory: the two bf16 values in channel order). An NHWC activation of C
channels becomes (N, H, W, C / 2) pairs, so every kernel that walks channels walks pairs the
same way, in 32-bit units: im2col, the padded copy, the direct kernel's row strides.
"""

import numpy as np
from llvmlite import binding as llvm_binding
from numba import types
from numba.extending import overload

from .kernels import JIT, helper, kernel


def supported():
    """Whether the CPU Numba compiles for multiplies bf16 pairs (AVX512_BF16): the host's,
    or the one ``NUMBA_CPU_NAME``/``NUMBA_CPU_FEATURES`` name (features must list it)."""
    from numba import config
    if config.CPU_FEATURES:
        return "+avx512bf16" in config.CPU_FEATURES.split(",")
    if config.CPU_NAME and config.CPU_NAME != "host":
        return False          # a named CPU (e.g. "generic" for portable caches): unknown
    try:
        return bool(llvm_binding.get_host_cpu_features().get("avx512bf16"))
    except RuntimeError:
        return False


def round_bf16(x):
    """float32 array -> uint16 bf16 bits, rounded to nearest even (as torch's
    ``.to(torch.bfloat16)``); NaN stays NaN (quiet), infinities stay infinite."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (u >> 16) | np.uint32(0x40), rounded).astype(np.uint16)


def widen(bits):
    """uint16 bf16 bits -> the float32 values they stand for (exact)."""
    return (np.asarray(bits, np.uint32) << 16).view(np.float32)


def pack(matrix):
    """(..., K, N) float32 weights -> (..., ceil(K / 2), N) uint32 pairs along K (an odd K
    gets a zero last row): pair ``[..., p, j]`` holds rows ``2p`` (low half) and ``2p + 1``
    (high half)."""
    *lead, k, n = matrix.shape
    bits = np.zeros((*lead, k + k % 2, n), np.uint32)
    bits[..., :k, :] = round_bf16(matrix)
    # (..., K, N) -> (..., K/2, 2, N): the two rows of each pair
    two = bits.reshape(*lead, -1, 2, n)
    return np.ascontiguousarray(two[..., 0, :] | (two[..., 1, :] << 16))


def unpack(pairs, k):
    """Inverse of :func:`pack` (values rounded to bf16): (..., K/2, N) -> (..., k, N)."""
    *lead, half, n = pairs.shape
    # (..., K/2, N) -> (..., K/2, 2, N) -> (..., K, N)
    two = np.stack([pairs & 0xFFFF, pairs >> 16], axis=-2)
    return widen(two.reshape(*lead, 2 * half, n)[..., :k, :])


def store_row(dst, src):
    """``dst[:] = src`` on 1-D rows inside a kernel: a copy where both hold the same type;
    float32 ``src`` into uint32 ``dst``: as bf16 pairs (``dst`` half as long)."""
    dst[:] = src


@overload(store_row, jit_options=JIT, inline="always")
def _store_row(dst, src):
    if dst.dtype == src.dtype:
        def copy(dst, src):
            dst[:] = src
        return copy

    def convert(dst, src):
        bits = src.view(np.uint32)
        for j in range(dst.size):
            dst[j] = _bf16(bits[2 * j]) | (_bf16(bits[2 * j + 1]) << np.uint32(16))
    return convert


@helper
def _bf16(u):
    """float32 bits -> bf16 bits in the low half (see :func:`round_bf16`)."""
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return (u >> 16) | 0x40
    return (u + 0x7FFF + ((u >> 16) & 1)) >> 16


def ratio(a):
    """Floats per element of ``a`` inside a kernel: 1 (float32), 2 (uint32 pairs)."""
    return 1


@overload(ratio, jit_options=JIT, inline="always")
def _ratio(a):
    two = a.dtype == types.uint32
    return (lambda a: 2) if two else (lambda a: 1)


def block_rows(x2, a, b0, rows, in_place):
    """The A rows of a GEMM block inside a kernel, and whether they are ``a`` (to fill):
    ``x2[b0:b0 + rows]`` itself where ``in_place`` and ``a`` holds the same type; else
    ``a[:rows]`` (bf16 pairs of float32 ``x2``: converted into ``a``, never read in place)."""
    return a[:rows], True


@overload(block_rows, jit_options=JIT, inline="always")
def _block_rows(x2, a, b0, rows, in_place):
    if x2.dtype == a.dtype:
        def either(x2, a, b0, rows, in_place):
            if in_place:
                return x2[b0:b0 + rows], False
            return a[:rows], True
        return either

    def scratch(x2, a, b0, rows, in_place):
        return a[:rows], True
    return scratch


@kernel
def to_pairs(r0, r1, x, out):
    """Rows [r0, r1) of (R, C) float32 ``x`` as (R, C / 2) bf16 pairs in ``out``."""
    for r in range(r0, r1):
        store_row(out[r], x[r])


def converted(be, x):
    """NHWC float32 ``x`` as (N, H, W, C / 2) pairs in a workspace buffer (one step of the
    pass)."""
    n, h, w, c = x.shape
    out = be.workspace.get((n, h, w, c // 2), np.uint32)
    # (N, H, W, C) -> (N*H*W, C) rows
    be.step(be.rows, n * h * w, x.size, to_pairs, x.reshape(-1, c), out.reshape(-1, c // 2))
    return out


def events(x):
    """The converted copy's allocation (freed by the caller's ``("free", "pairs")``)."""
    n, h, w, c = x
    return [("alloc", "pairs", 4 * n * h * w * (c // 2))]
