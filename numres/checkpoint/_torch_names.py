"""The few torch names a state dict may mention, mapped to numres's inert stand-ins.

This is the allowlist. A name that is not built here cannot be resolved by the pickle
interpreter, so it cannot be used, whatever the file says.
"""

from dataclasses import dataclass

import numpy as np

from ..errors import CheckpointError
from ._pickle_vm import KEY_TYPES, Constructor, Marker, StateDict, preview

# torch storage/tensor type prefix -> NumPy dtype. bfloat16 has no NumPy dtype: it is read
# as its 16-bit pattern and widened to float32 (exact) when the tensor is built.
_DTYPES = {
    "Float": np.dtype("<f4"), "Double": np.dtype("<f8"), "Half": np.dtype("<f2"),
    "BFloat16": np.dtype("<u2"), "Long": np.dtype("<i8"), "Int": np.dtype("<i4"),
    "Short": np.dtype("<i2"), "Char": np.dtype("<i1"), "Byte": np.dtype("<u1"),
    "Bool": np.dtype("?"),
}
BFLOAT16 = "BFloat16"


@dataclass(frozen=True)
class StorageType:
    """What ``torch.FloatStorage`` (etc.) stands for: an element type, nothing callable."""

    name: str
    dtype: np.dtype


@dataclass(eq=False)
class StorageRef:
    """A storage named by a persistent id; its bytes are located by the container format.

    ``view_of`` is ``(root_key, element_offset)`` for the legacy formats' storage views.
    """

    key: str
    stype: StorageType
    numel: int
    location: str = "cpu"
    view_of: tuple = None


@dataclass(eq=False)
class TensorRef:
    """A tensor as the pickle describes it: a strided window onto a storage."""

    storage: StorageRef
    offset: int
    shape: tuple
    stride: tuple


def _is_int(x):
    return type(x) is int


def check_int_tuple(value, what):
    """Return ``value`` as a tuple of non-negative ints, or raise naming ``what``."""
    if type(value) not in (tuple, list) or not all(_is_int(v) for v in value):
        raise CheckpointError(f"tensor {what} must be a tuple of ints, got {preview(value, 80)}")
    if any(v < 0 for v in value):
        raise CheckpointError(f"tensor {what} {tuple(value)} has a negative entry")
    if len(value) > 32:
        raise CheckpointError(f"tensor has {len(value)} dimensions (at most 32 are accepted)")
    return tuple(value)


def _tensor_ref(storage, offset, size, stride):
    if not isinstance(storage, StorageRef):
        raise CheckpointError(f"tensor storage must come from a persistent id, got "
                              f"{type(storage).__name__}")
    if not _is_int(offset) or offset < 0:
        raise CheckpointError(f"tensor storage offset must be an int >= 0, got "
                              f"{preview(offset, 40)}")
    size = check_int_tuple(size, "size")
    stride = check_int_tuple(stride, "stride")
    if len(size) != len(stride):
        raise CheckpointError(f"tensor size {size} and stride {stride} differ in length")
    return TensorRef(storage, offset, size, stride)


def _check_hooks(hooks):
    # torch pickles an empty OrderedDict of backward hooks; hooks would be code, so any
    # content is refused.
    if hooks is not None and (not isinstance(hooks, dict) or hooks):
        raise CheckpointError("tensor carries backward hooks")


def _rebuild_tensor(storage, offset, size, stride):
    return _tensor_ref(storage, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    _check_hooks(backward_hooks)
    return _tensor_ref(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, TensorRef):
        raise CheckpointError("Parameter wraps something that is not a tensor")
    _check_hooks(backward_hooks)
    return data


def _ordered_dict(items=()):
    # Python 3 pickles OrderedDict() and adds items with SETITEMS; Python 2 passed a list of
    # [key, value] pairs as the argument.
    out = StateDict()
    for pair in items:
        if type(pair) not in (list, tuple) or len(pair) != 2:
            raise CheckpointError("OrderedDict item is not a (key, value) pair")
        key, value = pair
        if type(key) not in KEY_TYPES:     # never hash a tuple from a file (see KEY_TYPES)
            raise CheckpointError(f"OrderedDict key of type {type(key).__name__}")
        out[key] = value
    return out


def _build_allowlist():
    allowed = {
        ("collections", "OrderedDict"): Constructor("collections", "OrderedDict", _ordered_dict),
    }
    for fn in (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_parameter):
        allowed["torch._utils", fn.__name__] = Constructor("torch._utils", fn.__name__, fn)
    for prefix, dtype in _DTYPES.items():
        # Files saved from a GPU name torch.cuda types; the bytes are the same.
        for module in ("torch", "torch.cuda"):
            stype = StorageType(prefix, dtype)
            allowed[module, prefix + "Storage"] = Marker(module, prefix + "Storage", stype)
            # The old TAR format records each tensor's original type; it is only a label.
            allowed[module, prefix + "Tensor"] = Marker(module, prefix + "Tensor", stype)
    return allowed


ALLOWED = _build_allowlist()


def storage_type(value, where):
    """The :class:`StorageType` a pickled storage-type global stands for."""
    if not isinstance(value, Marker) or not isinstance(value.payload, StorageType) \
            or not value.name.endswith("Storage"):
        raise CheckpointError(f"{where}: expected a torch storage type, got {preview(value, 60)}")
    return value.payload


def check_location(location, where):
    """Storages must live on 'cpu' or 'cuda[:N]' (where they were saved from)."""
    if type(location) is not str or not (
            location == "cpu" or location == "cuda"
            or (location.startswith("cuda:") and location[5:].isdigit())):
        raise CheckpointError(f"{where}: unexpected storage location {preview(location, 40)}")
    return location
