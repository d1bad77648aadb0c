"""Write a state dict as a torch zip checkpoint that ``torch.load`` reads, without torch.

The pickle is emitted opcode by opcode (protocol 2, as torch writes it), so writing needs no
torch classes: a tensor is ``torch._utils._rebuild_tensor_v2`` over a persistent storage id,
and each storage is one stored (uncompressed) zip record ``<name>/data/<key>``.
"""

import os
import struct
import tempfile
import zipfile

import numpy as np

from ..errors import CheckpointError

_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
                  np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage",
                  np.dtype(np.int32): "IntStorage", np.dtype(np.int16): "ShortStorage",
                  np.dtype(np.int8): "CharStorage", np.dtype(np.uint8): "ByteStorage",
                  np.dtype(np.bool_): "BoolStorage"}


class _Pickle:
    """Just enough of a protocol-2 pickle writer for a state dict."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")

    def op(self, code):
        self.out += code

    def string(self, text):
        data = text.encode("utf-8")
        self.out += b"X" + struct.pack("<I", len(data)) + data

    def integer(self, value):
        if 0 <= value < 256:
            self.out += b"K" + bytes([value])
        elif -2 ** 31 <= value < 2 ** 31:
            self.out += b"J" + struct.pack("<i", value)
        else:
            data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(data)]) + data

    def global_(self, module, name):
        self.out += f"c{module}\n{name}\n".encode()

    def int_tuple(self, values):
        self.op(b"(")
        for v in values:
            self.integer(int(v))
        self.op(b"t")


def save_pth(state_dict, file):
    """Save ``{name: array}`` as a torch zip checkpoint (``torch.load`` reads it).

    Args:
        state_dict: mapping of names to NumPy arrays (float32/64/16, int, uint8, bool).
        file: destination path; written to a temporary file and renamed into place.

    Example:
        >>> numres.save_pth(model.state_dict(), "finetuned.pth")
    """
    path = os.fspath(file)
    archive = os.path.splitext(os.path.basename(path))[0] or "archive"
    p = _Pickle()
    p.global_("collections", "OrderedDict")
    p.op(b")R(")
    records = []
    for key, value in state_dict.items():
        array = np.array(value, copy=None, order="C")    # keeps 0-d arrays 0-d
        if array.dtype.newbyteorder("=") not in _STORAGE_NAMES:
            raise CheckpointError(f"cannot save {key!r}: dtype {array.dtype} has no torch "
                                  "storage type")
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        p.string(key)
        p.global_("torch._utils", "_rebuild_tensor_v2")
        p.op(b"((")
        p.string("storage")
        p.global_("torch", _STORAGE_NAMES[array.dtype.newbyteorder("=")])
        p.string(str(len(records)))
        p.string("cpu")
        p.integer(array.size)
        p.op(b"tQ")                                      # persistent id
        p.integer(0)                                     # storage offset
        p.int_tuple(array.shape)
        p.int_tuple(np.array(array.strides, int) // max(array.itemsize, 1))
        p.op(b"\x89")                                    # requires_grad=False
        p.global_("collections", "OrderedDict")
        p.op(b")Rt")                                     # empty backward hooks, args tuple
        p.op(b"R")
        records.append(array)
    p.op(b"u.")
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".numres-", suffix=".partial")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
            z.writestr(f"{archive}/data.pkl", bytes(p.out))
            z.writestr(f"{archive}/byteorder", "little")
            for i, array in enumerate(records):
                z.writestr(f"{archive}/data/{i}", array.tobytes())
            z.writestr(f"{archive}/version", "3\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
