"""Build checkpoint files byte by byte, as torch (or an attacker) would write them.

``P`` assembles pickles opcode by opcode, so tests can write what no Python object would
pickle to: Python 2 strings, torch globals without torch, and hostile streams.
"""

import io
import struct
import tarfile
import warnings
import zipfile

import numpy as np

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


# -- the 2017 TAR format, from its description -----------------------------------------------
def _pickle_sys_info(little=True):
    p = P().proto().raw(b"}").mark()
    p.str("protocol_version").int(1001).str("little_endian").raw(b"\x88" if little else b"\x89")
    p.str("type_sizes").raw(b"}").mark().str("short").int(2).str("int").int(4)
    p.str("long").int(8).raw(b"u")
    return p.raw(b"u").stop().bytes


def make_tar(tensors, py2=True, views=(), storage_location="cpu"):
    """A torch 0.1 TAR checkpoint.

    Args:
        tensors: list of (name, storage key, storage ndarray (1-D), shape, stride, offset);
            several tensors may share one storage key.
        py2: write names as Python 2 strings and the OrderedDict as Python 2 did (a list of
            [key, value] pairs passed to the constructor).
        views: (target key, root key, offset, numel) storage views.
    """
    storages = {}
    for _, key, data, *_ in tensors:
        storages.setdefault(key, data)
    st = io.BytesIO()
    st.write(P().proto().int(len(storages) - len(views)).stop().bytes)
    view_targets = {v[0] for v in views}
    for key, data in storages.items():
        if key in view_targets:
            continue
        p = P().proto().mark().int(key).str(storage_location)
        p.glob("torch", TORCH_TYPES[data.dtype] + "Storage").tuple().stop()
        st.write(p.bytes)
        st.write(struct.pack("<q", data.size))
        st.write(np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<")).tobytes())
    p = P().proto().raw(b"]").mark()
    for target, root, offset, numel in views:
        p.mark().int(target).int(root).int(offset).int(numel).tuple()
    st.write(p.raw(b"e").stop().bytes)

    tt = io.BytesIO()
    tt.write(P().proto().int(len(tensors)).stop().bytes)
    for i, (_, key, data, shape, stride, offset) in enumerate(tensors):
        p = P().proto().mark().int(1000 + i).int(key)
        p.glob("torch", TORCH_TYPES[data.dtype] + "Tensor").tuple().stop()
        tt.write(p.bytes)
        tt.write(struct.pack("<i", len(shape)) + b"\0\0\0\0")
        tt.write(struct.pack(f"<{len(shape)}q", *shape))
        tt.write(struct.pack(f"<{len(stride)}q", *stride))
        tt.write(struct.pack("<q", offset))

    p = P().proto()
    if py2:
        p.glob("collections", "OrderedDict").raw(b"(]").mark()
        for i, (name, *_) in enumerate(tensors):
            p.raw(b"]").mark().str8(name).str8(str(1000 + i)).raw(b"Q").raw(b"e")
        p.raw(b"e").raw(b"tR")
    else:
        p.empty_ordered_dict().mark()
        for i, (name, *_) in enumerate(tensors):
            p.str(name).str(str(1000 + i)).raw(b"Q")
        p.raw(b"u")
    main = p.stop().bytes

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("sys_info", _pickle_sys_info()), ("pickle", main),
                           ("storages", st.getvalue()), ("tensors", tt.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()
