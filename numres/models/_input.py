"""Input checks shared by every model entry point: clear errors instead of deep tracebacks."""

import numpy as np


def check_input(x, backend, cast=True):
    """Validate a batch and return it as float32 (N, 3, H, W).

    Args:
        x: NumPy array (or array-like), or the backend's own device array.
        backend: the model's backend (device arrays of that backend are accepted as they are).
        cast: cast float16/float64 to float32 here; ``False`` leaves it to the caller
            (:func:`as_float32`), e.g. after a memory check, or chunk by chunk.

    Raises:
        TypeError: not an array, or an integer/bool/complex dtype (normalise images first).
        ValueError: wrong rank, channel count, or an empty batch.
    """
    if not backend.owns(x):
        if not hasattr(x, "__array__") and not isinstance(x, (list, tuple)):
            raise TypeError(f"expected a float32 array of shape (N, 3, H, W), got "
                            f"{type(x).__name__}")
        x = np.asarray(x)
    dtype = np.dtype(x.dtype)
    if dtype.kind in "iub":
        raise TypeError(f"expected float32 input, got {dtype}: integer images must be "
                        "normalised first, e.g. numres.preprocess(image) or "
                        "(x / 255 - mean) / std")
    if dtype.kind != "f":
        raise TypeError(f"expected float32 input, got {dtype}")
    if x.ndim != 4:
        hint = " (add a batch axis: x[None])" if x.ndim == 3 else ""
        raise ValueError(f"expected input of shape (N, 3, H, W), got {tuple(x.shape)}{hint}")
    if x.shape[1] != 3:
        hint = " (channels last? transpose to NCHW)" if x.shape[3] == 3 else ""
        raise ValueError(f"expected 3 input channels at axis 1, got shape "
                         f"{tuple(x.shape)}{hint}")
    if 0 in x.shape:
        raise ValueError(f"input has an empty dimension: shape {tuple(x.shape)}")
    return as_float32(x) if cast else x


def as_float32(x):
    """``x`` as float32 (a copy only when it is not): the weights are float32."""
    return x if x.dtype == np.float32 else x.astype(np.float32)
