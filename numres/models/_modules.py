"""Parameter holders with torchvision's names, so torch ``state_dict`` keys map one to one.

A module here only stores NumPy arrays and knows its children; computing is done by the
model's forward through a backend. This keeps ``state_dict()``/``load_state_dict()`` exact and
framework-free.
"""

import numpy as np

from ..backends import batch_norm_affine
from ..errors import CheckpointError


class Module:
    """Base class: parameters in ``self.params`` (name -> array), children as attributes."""

    def __init__(self):
        self.params = {}

    def children(self):
        """Yield ``(name, module)`` for direct sub-modules, in definition order."""
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def named_modules(self, prefix=""):
        """Yield ``(dotted name, module)`` for this module and everything below it."""
        yield prefix, self
        for name, child in self.children():
            yield from child.named_modules(f"{prefix}{name}.")

    def state_dict(self):
        """Return ``{dotted name: array}`` with torchvision's key names (arrays are not copied)."""
        out = {}
        for prefix, module in self.named_modules():
            for name, value in module.params.items():
                out[prefix + name] = value
        return out

    def num_parameters(self):
        """Number of learnable parameters (BatchNorm running statistics excluded, as torch)."""
        return sum(value.size for prefix, module in self.named_modules()
                   for name, value in module.params.items()
                   if not name.startswith("running_"))

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        children = list(self.children())
        for name, child in children:
            text = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {text}")
        return lines[0] + (")" if not children else "\n" + "\n".join(lines[1:]) + "\n)")

    def extra_repr(self):
        return ""


class Sequential(Module):
    """Children named ``"0"``, ``"1"``, ... like ``torch.nn.Sequential``."""

    def __init__(self, *modules):
        super().__init__()
        self._items = list(modules)

    def children(self):
        for i, module in enumerate(self._items):
            yield str(i), module

    def __iter__(self):
        return iter(self._items)

    def __getitem__(self, i):
        return self._items[i]

    def __len__(self):
        return len(self._items)


class Conv2d(Module):
    """Convolution weights, ``weight`` of shape (out, in // groups, kh, kw)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by "
                             f"groups={groups}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.groups = groups
        self.params["weight"] = np.zeros(
            (out_channels, in_channels // groups, kernel_size, kernel_size), np.float32)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}")


class BatchNorm2d(Module):
    """Inference batch norm: ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``."""

    def __init__(self, channels, eps=1e-5):
        super().__init__()
        self.channels, self.eps = channels, eps
        self.params.update(
            weight=np.ones(channels, np.float32), bias=np.zeros(channels, np.float32),
            running_mean=np.zeros(channels, np.float32),
            running_var=np.ones(channels, np.float32))

    def scale_shift(self):
        """The affine form ``y = x * scale + shift`` (float64): see
        :func:`numres.backends.batch_norm_affine`."""
        p = self.params
        return batch_norm_affine(p["running_mean"], p["running_var"], p["weight"], p["bias"],
                                 self.eps)

    def extra_repr(self):
        return f"{self.channels}, eps={self.eps}"


class Linear(Module):
    """``y = x @ weight.T + bias`` with ``weight`` of shape (out, in)."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.params["weight"] = np.zeros((out_features, in_features), np.float32)
        self.params["bias"] = np.zeros(out_features, np.float32)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}"


# Buffers torch keeps that inference does not use; accepted in a state dict, never required.
IGNORED_SUFFIXES = ("num_batches_tracked",)


def state_dict_problems(shapes, state_dict, strict=True):
    """What keeps ``state_dict`` from loading into parameters of ``shapes``.

    Args:
        shapes: name -> shape of the parameters to fill.
        state_dict: name -> array; :data:`IGNORED_SUFFIXES` entries are ignored.
        strict: missing and unexpected keys are problems too.

    Returns:
        list of messages: shape mismatches, missing keys, unexpected keys, tensors that are
        not floating-point; empty when it fits.
    """
    given = {k: v for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIXES)}
    problems = []
    wrong = [f"{k}: checkpoint {tuple(np.shape(given[k]))}, model {tuple(shape)}"
             for k, shape in shapes.items()
             if k in given and tuple(np.shape(given[k])) != tuple(shape)]
    if wrong:
        problems.append("shape mismatch for " + "; ".join(wrong))
    missing = [k for k in shapes if k not in given]
    if strict and missing:
        problems.append("missing keys: " + ", ".join(missing))
    unexpected = [k for k in given if k not in shapes]
    if strict and unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    not_float = [k for k in shapes if k in given and not _is_float_array(given[k])]
    if not_float:
        problems.append("not floating-point: " + ", ".join(not_float))
    return problems


def load_state_dict(module, state_dict, strict=True):
    """Copy arrays from ``state_dict`` into ``module``'s parameters, checking names and shapes.

    Returns:
        ``(missing, unexpected)`` key lists (both empty when ``strict``).

    Raises:
        CheckpointError: a mismatch (:func:`state_dict_problems`), listing every offending
            key.
    """
    own = module.state_dict()
    problems = state_dict_problems({k: v.shape for k, v in own.items()}, state_dict, strict)
    if problems:
        raise CheckpointError("state dict does not fit the model: " + " | ".join(problems))
    given = {k: v for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIXES)}
    missing = [k for k in own if k not in given]
    unexpected = [k for k in given if k not in own]
    for prefix, sub in module.named_modules():
        for name in sub.params:
            if prefix + name in given:
                sub.params[name] = np.ascontiguousarray(given[prefix + name], np.float32)
    return missing, unexpected


def _is_float_array(value):
    return np.issubdtype(np.asarray(value).dtype, np.floating)
