"""Read safetensors files (Hugging Face's tensor format) into NumPy arrays, checking every field.

Layout (``huggingface/safetensors``, ``safetensors/src/tensor.rs``): an 8-byte little-endian
header length ``N``, ``N`` bytes of UTF-8 JSON, then the byte buffer. The JSON maps each tensor
name to ``{"dtype": "F32", "shape": [64, 3, 7, 7], "data_offsets": [begin, end]}``, offsets
relative to the buffer; the optional ``__metadata__`` maps strings to strings. The writer pads
the header with spaces to a multiple of 8 bytes and orders tensors by descending alignment, so
every tensor starts aligned and arrays can be views of the file.

What the reference reader refuses is refused here too: a header past the file, JSON that is
not an object of such entries, unknown dtypes, shapes of anything but non-negative integers,
``end - begin`` other than ``prod(shape) * itemsize``, offsets that (sorted) leave a gap or
overlap, and bytes after the last tensor. Stricter than the reference: duplicate JSON keys
(serde keeps the last silently; an ambiguous file is refused), NaN/Infinity literals, and a
header over :data:`MAX_HEADER_BYTES` or with more than :data:`MAX_HEADER_VALUES` JSON values,
because parsed JSON takes ~25x its size in Python objects and a refusal must stay small.
Unknown fields inside a tensor entry are ignored, as the reference does.
"""

import json
import math
import struct

import numpy as np

from ..errors import CheckpointError
from ._pickle_vm import preview

# The reference refuses headers over 100 MB; a ResNet-152 header is ~60 kB. Parsing JSON costs
# ~25x its size in Python objects, so numres keeps its cap where a refusal stays small.
MAX_HEADER_BYTES = 16 << 20
# Bounds the objects json.loads can build (each value is at most one comma or bracket): about
# 25,000 tensors, 30x the largest ResNet.
MAX_HEADER_VALUES = 1 << 18
MAX_DIMS = 32

# safetensors dtype -> (NumPy dtype of the stored bytes, the name torch gives the element type,
# as Checkpoint.dtypes reports it for .pth files too). BF16 is read as its 16-bit pattern and
# widened to float32 (exactly), as the .pth path does.
DTYPES = {
    "BOOL": (np.dtype("?"), "Bool"), "U8": (np.dtype("u1"), "Byte"),
    "I8": (np.dtype("i1"), "Char"), "I16": (np.dtype("<i2"), "Short"),
    "U16": (np.dtype("<u2"), "UInt16"), "F16": (np.dtype("<f2"), "Half"),
    "BF16": (np.dtype("<u2"), "BFloat16"), "I32": (np.dtype("<i4"), "Int"),
    "U32": (np.dtype("<u4"), "UInt32"), "F32": (np.dtype("<f4"), "Float"),
    "F64": (np.dtype("<f8"), "Double"), "I64": (np.dtype("<i8"), "Long"),
    "U64": (np.dtype("<u8"), "UInt64"), "C64": (np.dtype("<c8"), "ComplexFloat"),
}
# Known to the format but without a NumPy counterpart. Widening 8-bit floats without the scales
# quantised checkpoints keep beside them would give a silently wrong model, so they are refused.
UNSUPPORTED = {"F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F6_E2M3",
               "F6_E3M2", "F4"}


def is_safetensors(buf):
    """True when the bytes start like a safetensors file: a header length, then ``{``.

    The reference writer always starts the JSON with ``{``; no torch container can: a zip
    starts ``PK``, a pickle ``\\x80``, and a TAR member name ``sys_info`` fills bytes 0-7.
    """
    return len(buf) >= 9 and bytes(buf[8:9]) == b"{"


def read_safetensors(buf, source):
    """Parse and check a safetensors file held in ``buf`` (bytes, memoryview or mmap).

    Returns:
        ``(state_dict, dtypes, metadata)``: name -> array (views of ``buf`` where aligned),
        name -> torch's element-type name, and the ``__metadata__`` mapping (or ``{}``).

    Raises:
        CheckpointError: anything the format does not allow; the message names ``source``.
    """
    size = len(buf)
    if size < 8:
        raise CheckpointError(f"{source}: {size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", bytes(buf[:8]))
    if 8 + n > size:
        raise CheckpointError(f"{source}: safetensors header length {n} runs past the end of "
                              f"the file ({size} bytes)")
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{source}: safetensors header of {n} bytes is over numres's "
                              f"limit of {MAX_HEADER_BYTES} (a ResNet's is under 100 kB)")
    entries, metadata = _parse_header(bytes(buf[8:8 + n]), source)
    data_start, data_size = 8 + n, size - 8 - n
    _check_layout(entries, data_size, source)
    state_dict, dtypes = {}, {}
    for name, (dtype_name, shape, begin, _) in entries.items():
        state_dict[name] = _array(buf, data_start + begin, dtype_name, shape)
        dtypes[name] = DTYPES[dtype_name][1]
    return state_dict, dtypes, metadata


def _parse_header(raw, source):
    values = raw.count(b",") + raw.count(b"{") + raw.count(b"[") + 1
    if values > MAX_HEADER_VALUES:
        raise CheckpointError(f"{source}: safetensors header holds up to {values} JSON values, "
                              f"over numres's limit of {MAX_HEADER_VALUES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{source}: safetensors header is not UTF-8 ({exc})") from None
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except _Duplicate as exc:
        raise CheckpointError(f"{source}: safetensors header repeats the key "
                              f"{preview(exc.key, 80)}; the file is ambiguous") from None
    except (ValueError, RecursionError) as exc:     # JSONDecodeError is a ValueError
        raise CheckpointError(f"{source}: safetensors header is not valid JSON "
                              f"({str(exc):.200})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{source}: safetensors header must be a JSON object, found "
                              f"{type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{source}: safetensors __metadata__ must map strings to strings, "
                              f"got {preview(metadata, 80)}")
    entries = {name: _entry(name, info, source) for name, info in header.items()}
    return entries, metadata


def _entry(name, info, source):
    where = f"{source}: tensor {preview(name, 100)}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: entry must be an object with dtype, shape and "
                              f"data_offsets, got {type(info).__name__}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise CheckpointError(f"{where}: entry has no {key!r}")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if isinstance(dtype_name, str) and dtype_name in UNSUPPORTED:
        raise CheckpointError(f"{where}: dtype {dtype_name} (a sub-16-bit float) is not "
                              f"supported; numres reads {', '.join(DTYPES)}")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {preview(dtype_name, 40)}; safetensors "
                              f"names are {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of integers, got "
                              f"{preview(shape, 80)}")
    if any(d < 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shape} has a negative dimension")
    if len(shape) > MAX_DIMS:
        raise CheckpointError(f"{where}: {len(shape)} dimensions (at most {MAX_DIMS})")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets must be [begin, end], two integers >= 0, "
                              f"got {preview(offsets, 80)}")
    begin, end = offsets
    if begin > end:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
    nbytes = math.prod(shape) * DTYPES[dtype_name][0].itemsize
    if end - begin != nbytes:
        raise CheckpointError(f"{where}: {dtype_name} {shape} needs {nbytes} bytes, "
                              f"data_offsets [{begin}, {end}] hold {end - begin}")
    return dtype_name, tuple(shape), begin, end


def _check_layout(entries, data_size, source):
    """Sorted by offset, tensors must tile the buffer exactly, as the reference requires."""
    expected = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2:]):
        if begin != expected:
            what = "overlaps the tensor before it" if begin < expected else "leaves a gap"
            raise CheckpointError(f"{source}: tensor {preview(name, 100)} at data_offsets "
                                  f"[{begin}, {end}] {what} (expected it to begin at {expected})")
        expected = end
    if expected != data_size:
        if expected > data_size:
            raise CheckpointError(f"{source}: tensors need {expected} bytes of data, the file "
                                  f"holds {data_size} after the header (truncated?)")
        raise CheckpointError(f"{source}: {data_size - expected} bytes after the last tensor; "
                              "safetensors files end with their last tensor")


def _array(buf, offset, dtype_name, shape):
    dtype = DTYPES[dtype_name][0]
    count = math.prod(shape)
    if count == 0:
        data = np.empty(shape, dtype)
    else:
        data = np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(shape)
        if not data.flags.aligned:
            # Only files not written by the reference writer (or bytes objects at an odd
            # address) get here; backends expect aligned arrays, so this one is copied.
            data = data.copy()
    if dtype_name == "BF16":
        # bfloat16 is the upper half of a float32: widening is exact.
        data = (data.astype(np.uint32) << 16).view(np.float32)
    elif not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    return data


class _Duplicate(ValueError):
    def __init__(self, key):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs):
    result = dict(pairs)
    if len(result) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise _Duplicate(key)
            seen.add(key)
    return result


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")
