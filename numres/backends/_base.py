"""The backend boundary: the handful of array operations a ResNet needs.

Models call only these methods. A backend chooses its own activation layout and array type
(NumPy NCHW, NumPy NHWC, CuPy ...); activations are opaque to the model between calls.
Weights arrive as float32 NumPy arrays once, through the ``prepare_*`` methods, and the
backend keeps them in whatever form suits it.
"""

import abc

import numpy as np


class Backend(abc.ABC):
    """Interface every backend implements. See :mod:`numres.backends.numpy_backend`."""

    #: Name used in ``backend=`` arguments.
    name = "base"

    # -- data movement ---------------------------------------------------------------------
    @abc.abstractmethod
    def from_nchw(self, x):
        """Take a validated float32 (N, C, H, W) array (NumPy, or the backend's own array
        type) and return the backend's activation."""

    @abc.abstractmethod
    def to_nchw(self, act):
        """Return an activation as a new (N, C, H, W) array of the backend's array type."""

    def to_device(self, x):
        """Move a validated float32 NCHW input to where the backend computes (default: as is)."""
        return x

    def to_numpy(self, array):
        """Return a backend array (any shape) as a NumPy array."""
        return np.asarray(array)

    def owns(self, x):
        """True when ``x`` is the backend's own device array type (results then stay there)."""
        return False

    # -- weights ---------------------------------------------------------------------------
    @abc.abstractmethod
    def prepare_conv(self, weight, bias, stride, padding, groups):
        """Take weights (O, I/groups, kh, kw) and optional bias (O,) once, at load time."""

    @abc.abstractmethod
    def prepare_batch_norm(self, mean, var, weight, bias, eps):
        """Take batch-norm statistics for the unfolded (reference) path."""

    @abc.abstractmethod
    def prepare_linear(self, weight, bias):
        """Take a fully connected layer: ``weight`` (out, in), ``bias`` (out,)."""

    # -- operations ------------------------------------------------------------------------
    @abc.abstractmethod
    def conv2d(self, x, conv, relu=False, residual=None):
        """``relu(conv(x) + bias + residual)``; the epilogue is fused where the backend can."""

    @abc.abstractmethod
    def batch_norm(self, x, bn, relu=False, residual=None):
        """``relu(batch_norm(x) + residual)`` for the unfolded path."""

    @abc.abstractmethod
    def max_pool2d(self, x, kernel_size, stride, padding):
        """Max pooling, floor output size, padding never chosen (as torch's -inf padding)."""

    def conv2d_max_pool(self, x, conv, relu, kernel_size, stride, padding):
        """``max_pool2d(conv2d(x, conv, relu=relu), ...)`` (ResNet's stem); backends may fuse
        the two so the convolution's full output is never stored."""
        return self.max_pool2d(self.conv2d(x, conv, relu=relu), kernel_size, stride, padding)

    @abc.abstractmethod
    def global_avg_pool(self, x):
        """Adaptive average pooling to 1x1, flattened: returns (N, C)."""

    @abc.abstractmethod
    def linear(self, x, fc):
        """``x @ weight.T + bias`` on an (N, in) array."""

    def execute(self, cache, key, fn, x):
        """Run a whole forward pass ``fn(x)``. Device backends may capture and replay it
        (``cache`` is a dict that lives as long as the model's prepared weights)."""
        return fn(x)

    def synchronize(self):
        """Wait for queued device work (a no-op on the CPU)."""


def conv_output_size(size, kernel, stride, padding):
    """Floor-mode output length, as torch computes it."""
    return (size + 2 * padding - kernel) // stride + 1
