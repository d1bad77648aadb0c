"""The reference backend: plain NumPy, NCHW, written to be read.

Convolution is im2col + one matrix product per group. The im2col loop runs over the kh*kw
kernel offsets only; each offset copies one strided slice of the padded input, so Python
does kh*kw iterations however large the image is. Every other backend is tested against this
one.
"""

from dataclasses import dataclass

import numpy as np

from ._base import Backend, conv_output_size


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
