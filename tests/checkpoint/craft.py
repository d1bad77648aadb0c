"""Build checkpoint files byte by byte, as torch (or an attacker) would write them.

``P`` assembles pickles opcode by opcode, so tests can write what no Python object would
pickle to: Python 2 strings, torch globals without torch, and hostile streams.
"""

import io
import struct
import time
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest

import numres
from numres import CheckpointError
from numres.checkpoint import Budget, read_checkpoint

TORCH_TYPES = {np.dtype(np.float32): "Float", np.dtype(np.float64): "Double",
               np.dtype(np.float16): "Half", np.dtype(np.int64): "Long",
               np.dtype(np.uint8): "Byte"}


class P:
    """A pickle assembler: ``P().proto().int(5).stop().bytes``."""

    def __init__(self):
        self.buf = bytearray()

    @property
    def bytes(self):
        return bytes(self.buf)

    def raw(self, data):
        self.buf += data
        return self

    def proto(self, v=2):
        return self.raw(b"\x80" + bytes([v]))

    def stop(self):
        return self.raw(b".")

    def mark(self):
        return self.raw(b"(")

    def tuple(self):
        return self.raw(b"t")

    def int(self, v):
        if 0 <= v < 256:
            return self.raw(b"K" + bytes([v]))
        if -2 ** 31 <= v < 2 ** 31:
            return self.raw(b"J" + struct.pack("<i", v))
        data = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
        return self.raw(b"\x8a" + bytes([len(data)]) + data)

    def str(self, s):
        data = s.encode()
        return self.raw(b"X" + struct.pack("<I", len(data)) + data)

    def str8(self, s):
        """A Python 2 ``str`` (SHORT_BINSTRING)."""
        data = s.encode()
        return self.raw(b"U" + bytes([len(data)]) + data)

    def glob(self, module, name):
        return self.raw(f"c{module}\n{name}\n".encode())

    def int_tuple(self, values):
        self.mark()
        for v in values:
            self.int(int(v))
        return self.tuple()

    def empty_ordered_dict(self):
        return self.glob("collections", "OrderedDict").raw(b")R")

    def tensor(self, pid_writer, shape, stride, offset=0):
        """``_rebuild_tensor_v2(<persistent id>, offset, shape, stride, False, OrderedDict())``."""
        self.glob("torch._utils", "_rebuild_tensor_v2").mark()
        pid_writer(self)
        self.raw(b"Q").int(offset).int_tuple(shape).int_tuple(stride).raw(b"\x89")
        self.empty_ordered_dict()
        return self.tuple().raw(b"R")


def zip_pid(key, numel, dtype="Float", location="cpu"):
    def write(p):
        p.mark().str("storage").glob("torch", f"{dtype}Storage").str(key).str(location)
        p.int(numel).tuple()
    return write


def state_dict_pickle(entries):
    """entries: list of (name, pid_writer, shape, stride, offset) -> data.pkl bytes."""
    p = P().proto().empty_ordered_dict().mark()
    for name, pid, shape, stride, offset in entries:
        p.str(name).tensor(pid, shape, stride, offset)
    return p.raw(b"u").stop().bytes


def make_zip(data_pkl, records, prefix="archive", compress=None, extra=()):
    """A torch-style zip: ``prefix/data.pkl``, ``prefix/data/<key>`` records, version."""
    out = io.BytesIO()
    mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w", mode) as z:
        warnings.simplefilter("ignore")  # duplicate names are one of the attacks
        z.writestr(f"{prefix}/data.pkl", data_pkl)
        z.writestr(f"{prefix}/byteorder", "little")
        for key, data in records.items():
            z.writestr(f"{prefix}/data/{key}", data)
        z.writestr(f"{prefix}/version", "3\n")
        for name, data in extra:
            z.writestr(name, data)
    return out.getvalue()


def simple_zip(arrays, prefix="archive"):
    """A valid zip checkpoint of contiguous arrays, written without torch."""
    entries, records = [], {}
    for i, (name, a) in enumerate(arrays.items()):
        a = np.ascontiguousarray(a)
        strides = [s // a.itemsize for s in a.strides]
        entries.append((name, zip_pid(str(i), a.size, TORCH_TYPES[a.dtype]), a.shape, strides,
                        0))
        records[str(i)] = a.tobytes()
    return make_zip(state_dict_pickle(entries), records, prefix)


def refused(data, match=None):
    """Load ``data``; assert it is refused after bounded work and without a large allocation.

    The work is counted by the reader's :class:`Budget`; memory is traced in a second load
    (tracing slows Python ~5x: the 3-million opcode flood took 0.7 s plain, 3.7-5.3 s traced).
    The time bound is 10x the slowest refusal seen here, for slow phases of a shared machine."""
    budget = Budget()
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=match) as info:
        read_checkpoint(data, budget=budget)
    assert time.perf_counter() - start < 30.0
    assert budget.ops <= budget.max_ops
    assert budget.bytes_read <= len(data)
    assert budget.headers <= 8                # four members, each behind one PAX header
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=match):
            numres.load_pth(data)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 100 << 20, f"refusing the file allocated {peak} bytes"
    return str(info.value)
