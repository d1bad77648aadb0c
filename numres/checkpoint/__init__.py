"""Read PyTorch checkpoints (``.pth``) into NumPy arrays without torch, and without running code.

All three formats torch has written are read, recognised by their bytes: zip, the legacy
magic-number stream and the 2017 TAR format. See ``_formats.py`` for the layouts and
``_pickle_vm.py`` for why no pickle from a file ever reaches Python's own unpickler.
safetensors files (Hugging Face's format) are recognised by their bytes as well and read by
``_safetensors.py``.
"""

import mmap
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from ..errors import CheckpointError
from . import _formats
from ._pickle_vm import Budget, preview
from ._safetensors import is_safetensors, read_safetensors
from ._torch_names import BFLOAT16, TensorRef
from ._writer import save_pth

__all__ = ["Budget", "Checkpoint", "load_pth", "read_checkpoint", "release_pages", "save_pth"]

_READERS = {"zip": _formats.read_zip, "legacy": _formats.read_legacy, "tar": _formats.read_tar}
FORMAT_NAMES = {"zip": "zip (torch >= 1.6)", "legacy": "legacy magic-number (torch 0.2-1.5)",
                "tar": "TAR (torch 0.1, 2017-era files)",
                "safetensors": "safetensors (Hugging Face)"}


@dataclass
class Checkpoint:
    """A checkpoint as read from disk.

    Attributes:
        format: ``"zip"``, ``"legacy"``, ``"tar"`` or ``"safetensors"``.
        state_dict: name -> array, in file order.
        source: the file name (or ``"<bytes>"``).
        dtypes: name -> the torch element type it was stored as (``"Float"``, ``"BFloat16"``...;
            a safetensors ``F32``, ``BF16``... is reported by the same names).
        metadata: a safetensors file's ``__metadata__`` (strings); empty for ``.pth`` files.
    """

    format: str
    state_dict: dict
    source: str
    dtypes: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


def load_pth(file):
    """Load a PyTorch state dict as NumPy arrays; torch is never imported.

    Reads ``.pth``/``.pt`` files (every format torch has written) and ``.safetensors`` files,
    told apart by their bytes, never by the file name.

    Args:
        file: path of a ``.pth``/``.pt``/``.safetensors`` file, or its bytes.

    Returns:
        dict mapping parameter names (torch's ``state_dict`` keys) to ``np.ndarray``. Contiguous
        tensors are views of a private memory map of the file (no copy); bfloat16 is widened to
        float32.

    Raises:
        CheckpointError: the file is not a checkpoint, is damaged, or asks for anything beyond
            plain tensors (any other global, code, TorchScript).
        FileNotFoundError: no such file.

    Example:
        >>> sd = numres.load_pth("resnet18-f37072fd.pth")
        >>> sd["conv1.weight"].shape
        (64, 3, 7, 7)
    """
    return read_checkpoint(file).state_dict


def read_checkpoint(file, budget=None):
    """Like :func:`load_pth`, but returns a :class:`Checkpoint` with the format too.

    Args:
        file: path or bytes, as for :func:`load_pth`.
        budget: a :class:`Budget` bounding the work the file may cause (opcodes over all its
            pickles, container headers); afterwards it reports what was done. Default: the
            library's limits (``Budget()``).
    """
    budget = Budget() if budget is None else budget
    buf, source = _open(file)
    if is_safetensors(buf):
        state_dict, dtypes, metadata = read_safetensors(buf, source)
        return Checkpoint("safetensors", state_dict, source, dtypes, metadata)
    fmt = _formats.detect(buf)
    obj, resolve = _READERS[fmt](buf, source, budget)
    tensors = _state_dict_refs(obj, source)
    state_dict, dtypes, arrays = {}, {}, {}
    for name, ref in tensors.items():
        state_dict[name] = _materialize(ref, resolve, arrays, f"{source}: tensor {name!r}")
        dtypes[name] = ref.storage.stype.name
    return Checkpoint(fmt, state_dict, source, dtypes)


def _open(file):
    if isinstance(file, (bytes, bytearray, memoryview)):
        if len(file) == 0:
            raise CheckpointError("<bytes>: empty input")
        return memoryview(file), "<bytes>"
    path = os.fspath(file)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise CheckpointError(f"{path}: file is empty")
        # Copy-on-write: arrays are views of the file (read once, by the page cache) and the
        # caller may still modify them without touching the file.
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return buf, os.path.basename(path)


def _state_dict_refs(obj, source):
    """Find the mapping of names to tensors; training checkpoints nest it one level down."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a state dict (mapping of names to tensors), "
                              f"found a {type(obj).__name__}")
    if not any(isinstance(v, TensorRef) for v in obj.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                return _state_dict_refs(obj[key], source)
    for name, value in obj.items():
        if type(name) is not str:
            raise CheckpointError(f"{source}: state dict key {preview(name, 40)} is not a string")
        if not isinstance(value, TensorRef):
            raise CheckpointError(f"{source}: entry {name!r} is a {type(value).__name__}, "
                                  "not a tensor")
    return obj


def _materialize(ref, resolve, arrays, where):
    """Turn a TensorRef into an array, checking every index it can reach is in its storage."""
    storage = ref.storage
    if id(storage) not in arrays:
        arrays[id(storage)] = resolve(storage)
    flat = arrays[id(storage)]
    shape, stride, offset = ref.shape, ref.stride, ref.offset
    if 0 in shape:
        data = np.empty(shape, flat.dtype)
    else:
        last = offset + sum((n - 1) * s for n, s in zip(shape, stride))
        if last >= flat.size:
            raise CheckpointError(f"{where}: shape {shape} stride {stride} offset {offset} "
                                  f"reaches element {last}, storage holds {flat.size}")
        data = np.lib.stride_tricks.as_strided(
            flat[offset:], shape, tuple(s * flat.itemsize for s in stride), writeable=True)
        if not data.flags.c_contiguous:
            # Transposed or expanded views (shared storages) become ordinary arrays.
            data = np.ascontiguousarray(data)
    if storage.stype.name == BFLOAT16:
        # bfloat16 is the upper half of a float32: widening is exact.
        data = (data.astype(np.uint32) << 16).view(np.float32)
    elif not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    return data


# Linux's MADV_PAGEOUT (kernel 5.4+); Python before 3.12 may not name it.
_MADV_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21 if sys.platform.startswith("linux") else None)


def release_pages(arrays):
    """Let the OS reclaim the memory of the checkpoint files behind ``arrays``.

    :func:`load_pth` maps the file; the arrays are views of it. Once a model has made its
    own prepared copy of the weights (folded, packed, on a device), the file's pages only
    add to the process's memory (100 MB for ResNet-50). ``MADV_PAGEOUT`` reclaims them
    without changing what the arrays hold: unmodified pages are read back from the file
    when next touched, and pages a caller modified are kept (or swapped), never dropped.
    Does nothing where the OS lacks it.

    Returns:
        how many mappings were released.
    """
    if _MADV_PAGEOUT is None:
        return 0
    maps = {}
    for array in arrays:
        base = array
        while getattr(base, "base", None) is not None:    # views, as_strided's holders
            base = base.base
        if isinstance(base, memoryview):
            base = base.obj
        if isinstance(base, mmap.mmap):
            maps[id(base)] = base
    released = 0
    for mapping in maps.values():
        try:
            mapping.madvise(_MADV_PAGEOUT)
            released += 1
        except (OSError, ValueError):   # an older kernel, or a closed mapping
            pass
    return released
