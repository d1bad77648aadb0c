"""The reference backend: plain NumPy, NCHW, written to be read.

Convolution is im2col + one matrix product per group. The im2col loop runs over the kh*kw
kernel offsets only; each offset copies one strided slice of the padded input, so Python
does kh*kw iterations however large the image is. Every other backend is tested against this
one.
"""

from dataclasses import dataclass

import numpy as np

from ._base import Backend, compose_conv_pool, conv_output_size, nbytes


@dataclass
class Conv:
    weight: np.ndarray      # (G, O/G, I/G * kh * kw), rows match im2col's column order
    bias: np.ndarray        # (O,) or None
    kernel_size: int
    stride: int
    padding: int
    groups: int


@dataclass
class BatchNorm:
    mean: np.ndarray
    var: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    eps: float


@dataclass
class Linear:
    weight_t: np.ndarray    # (in, out)
    bias: np.ndarray        # (out,)


def im2col(x, kernel_size, stride, padding, pad_value=0.0):
    """Unfold sliding windows of an NCHW array.

    Args:
        x: (N, C, H, W) array.
        kernel_size, stride, padding: square window geometry.
        pad_value: value of the padding (``-inf`` for max pooling).

    Returns:
        (N, C, kh, kw, out_h, out_w) array: ``col[n, c, i, j, y, x]`` is the input pixel under
        kernel offset (i, j) of output position (y, x).
    """
    n, c, h, w = x.shape
    k, s, p = kernel_size, stride, padding
    out_h, out_w = conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)
    padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=pad_value)
    col = np.empty((n, c, k, k, out_h, out_w), x.dtype)
    for i in range(k):
        for j in range(k):
            col[:, :, i, j] = padded[:, :, i:i + s * out_h:s, j:j + s * out_w:s]
    return col


def _epilogue(y, relu, residual):
    if residual is not None:
        y += residual
    if relu:
        np.maximum(y, 0, out=y)
    return y


class NumpyBackend(Backend):
    """Reference implementation of :class:`~numres.backends._base.Backend` in NumPy."""

    name = "numpy"
    # The unfolded batch norm keeps views of the arrays it is given.
    copies_weights = False

    def from_nchw(self, x):
        return np.ascontiguousarray(x, np.float32)

    def to_nchw(self, act):
        return act.copy()

    def prepare_conv(self, weight, bias, stride, padding, groups):
        o, ig, kh, kw = weight.shape
        # (G, O/G, I/G * kh * kw): one matrix per group
        w = np.ascontiguousarray(weight, np.float32).reshape(groups, o // groups, ig * kh * kw)
        b = None if bias is None else np.asarray(bias, np.float32)
        return Conv(w, b, kh, stride, padding, groups)

    def prepare_batch_norm(self, mean, var, weight, bias, eps):
        return BatchNorm(*(np.asarray(a, np.float32) for a in (mean, var, weight, bias)), eps)

    def prepare_linear(self, weight, bias):
        return Linear(np.ascontiguousarray(weight.T, np.float32), np.asarray(bias, np.float32))

    def conv2d(self, x, conv, relu=False, residual=None):
        n, c = x.shape[:2]
        g, k = conv.groups, conv.kernel_size
        col = im2col(x, k, conv.stride, conv.padding)
        out_h, out_w = col.shape[4:]
        # (N, G, I/G * kh * kw, out_h * out_w): kernel offsets next to their channel
        col = col.reshape(n, g, (c // g) * k * k, out_h * out_w)
        y = np.matmul(conv.weight[None], col)         # (N, G, O/G, out_h * out_w)
        y = y.reshape(n, -1, out_h, out_w)            # (N, O, out_h, out_w)
        if conv.bias is not None:
            y += conv.bias[:, None, None]
        return _epilogue(y, relu, residual)

    def batch_norm(self, x, bn, relu=False, residual=None):
        y = (x - bn.mean[:, None, None]) / np.sqrt(bn.var[:, None, None] + bn.eps)
        y = y * bn.weight[:, None, None] + bn.bias[:, None, None]
        return _epilogue(y.astype(np.float32, copy=False), relu, residual)

    def max_pool2d(self, x, kernel_size, stride, padding):
        col = im2col(x, kernel_size, stride, padding, pad_value=-np.inf)
        return col.max(axis=(2, 3))                   # (N, C, out_h, out_w)

    def global_avg_pool(self, x):
        return x.mean(axis=(2, 3), dtype=np.float32)  # (N, C)

    def linear(self, x, fc):
        return x @ fc.weight_t + fc.bias

    # -- memory ----------------------------------------------------------------------------
    def memory_events(self, op):
        """Every array here comes from malloc and is freed when its last reference goes; the
        sequence is the code's own (checked with tracemalloc: within 0.4% per layer)."""
        if op.kind == "input":
            return [("alloc", "out", 0)]     # from_nchw: the validated input itself
        if op.kind in ("conv", "max_pool"):
            n, c, h, w = op.x
            _, _, oh, ow = op.y
            k, p = op.kernel, op.padding
            # im2col: the padded copy and the (N, C, kh, kw, oh, ow) windows, then the GEMM
            # (or max) output while the windows are still alive
            return [("alloc", "padded", nbytes((n, c, h + 2 * p, w + 2 * p))),
                    ("alloc", "col", nbytes((n, c, k, k, oh, ow))),
                    ("free", "padded"),
                    ("alloc", "out", nbytes(op.y)),
                    ("free", "col")]
        if op.kind == "conv_pool":
            return compose_conv_pool(self, op)
        if op.kind == "batch_norm":
            # (x - mean) / std, then * weight + bias: at most three temporaries at once
            size = nbytes(op.x)
            return [("alloc", "centred", size), ("alloc", "scaled", size),
                    ("free", "centred"), ("alloc", "weighted", size), ("alloc", "out", size),
                    ("free", "weighted"), ("free", "scaled")]
        if op.kind == "linear":
            return [("alloc", "product", nbytes(op.y)), ("alloc", "out", nbytes(op.y)),
                    ("free", "product")]
        if op.kind == "output":
            return []                         # to_numpy hands out the arrays themselves
        return [("alloc", "out", nbytes(op.y))]   # avg_pool, to_nchw
