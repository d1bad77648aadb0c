"""Ports of the checkpoint writers of old torch releases, to make test files as they made them.

numres's reader must not be tested only with files written from numres's own reading of the
formats. These writers follow the historical code step by step instead (read through the
project's search tool; each fact below names its source), with pickles as Python 2's cPickle
wrote them:

torch 0.1 ``torch/serialization.py`` ``_save`` (TAR):
* ``tarfile.open(fileobj=f, mode='w:', format=tarfile.PAX_FORMAT)``; members added in the order
  sys_info, pickle, tensors, storages by ``_add_to_tar``: the member is written to a
  ``NamedTemporaryFile`` and added with ``tar.add(tmp.name, arcname=name)``, so each header
  carries the temporary file's mode (0600), owner and a float mtime, which the PAX writer
  stores in a PAX extended header before every member.
* sys_info = ``dict(protocol_version=1000, little_endian=sys.byteorder == 'little',
  type_sizes=dict(short=2, int=4, long=8))``. torch's TAR loader never reads it.
* The object pickle: ``persistent_id`` returns ``str(obj._cdata)`` for tensors (and
  storages); ``_cdata`` is the C pointer, a Python 2 ``int`` above 2**31.
* later 0.1 releases (with ``location_tag``): ``tensors`` = count, then per tensor
  ``(key, storage._cdata, type(tensor))`` and ``tensor._write_metadata(f)``; ``storages`` =
  count, per storage ``(key, location_tag(storage), normalize_storage_type(type(storage)))``
  (location ``'cuda:N'`` for GPU storages; the type normalised to ``torch.FloatStorage``, while
  the tensor type stays ``torch.cuda.FloatTensor``) and ``storage._write_file(f)``, then the
  list of storage views ``(view._cdata, root._cdata, offset, size)``; a view's root is saved in
  its place.
* the first 0.1 releases: tensor records ``(key, type(tensor), storage._cdata)``, storage
  records ``(key, type(storage))``, no views list.

torch 0.1 TH ``generic/serialization.cpp``:
* ``THPTensor_(writeMetadataRaw)``: ``write(fd, &self->nDimension, sizeof(long))`` (an int
  written as 8 bytes: ndim, then 4 bytes of the struct's padding), sizes, strides and the
  storage offset as ``long``, all in the machine's byte order.
* ``THPStorage_(writeFileRaw)``: ``write(fd, &self->size, sizeof(long))`` then the raw data
  in the machine's byte order; CUDA storages are first copied to the host.

torch 0.2-0.3 ``_save`` (legacy magic-number stream; ``_legacy_save`` in torch 2.x is the same
layout): magic number, protocol version 1001 and sys_info (``protocol_version=1001``) pickled
one after the other, then the object pickle whose storages are persistent ids
``('storage', normalize_storage_type(type(obj)), str(root._cdata), location, root.size(),
view_metadata)`` with ``view_metadata = (str(obj._cdata), offset, obj.size())`` for views,
then ``sorted`` storage keys, then each root storage's ``_write_file``. That release's
``writeFileRaw`` writes ``int64_t size`` in the machine's order and the data converted to
little-endian (``THP_encodeInt32Buffer(..., THP_LITTLE_ENDIAN, ...)``); torch 2.x's reader
decodes both as little-endian. Tensors pickle through ``Tensor.__reduce__`` as
``torch._utils._rebuild_tensor(storage, storage_offset, tuple(size), stride)`` (v1, before
0.4's ``_rebuild_tensor_v2``); ``state_dict`` is an ``OrderedDict`` without ``_metadata``
(0.4 added it, with ``num_batches_tracked``).

CPython 2.7 ``Lib/pickle.py``/``Modules/cPickle.c``, protocol 2 (what ``torch.save``
passed): ``str`` is SHORT_BINSTRING (BINSTRING from 256 bytes); ``int`` is BININT1 / BININT2 /
BININT, and outside the signed 32-bit range the text opcode INT (``"I%d\\n"``); ``long`` is
LONG1; ``bool`` NEWTRUE/NEWFALSE; str, unicode, tuples, lists, dicts and globals are memoised
(BINPUT, LONG_BINPUT from index 256) and repeats fetched with BINGET; lists and dicts are
EMPTY_LIST/EMPTY_DICT, memoised, then items in batches of 1000 (MARK ... APPENDS/SETITEMS, or
APPEND/SETITEM for a batch of one); tuples of up to 3 items use TUPLE1-3 (MARK ... TUPLE
beyond), memoised after their items; a ``__reduce__`` result is func, args, REDUCE, then
memoised. Python 2.7's ``OrderedDict.__reduce__`` returns
``(OrderedDict, ([[key, value], ...],))``.
"""

import os
import struct
import sys
import tarfile
import tempfile

import numpy as np

STORAGE_TYPES = {np.dtype(np.float32): "Float", np.dtype(np.float64): "Double",
                 np.dtype(np.float16): "Half", np.dtype(np.int64): "Long",
                 np.dtype(np.int32): "Int", np.dtype(np.uint8): "Byte"}


# -- Python 2 cPickle, protocol 2 -----------------------------------------------------------
class Global:
    """A class or function as pickle names it: ``GLOBAL module\\nname\\n``."""

    def __init__(self, module, name):
        self.module, self.name = module, name


class Reduce:
    """An object pickled through ``__reduce__``: ``func(*args)``."""

    def __init__(self, func, args):
        self.func, self.args = func, args


class Long(int):
    """A Python 2 ``long`` (pickled with LONG1), as opposed to a machine-word ``int``."""


def ordered_dict(items):
    """What Python 2.7 pickled for an ``OrderedDict`` without instance attributes."""
    return Reduce(Global("collections", "OrderedDict"), ([[k, v] for k, v in items],))


class Py2Pickler:
    """Emit what CPython 2.7's cPickle emitted at protocol 2 for the objects above.

    Python ``str`` stands for a Python 2 ``str`` (bytes of text). ``persistent_id`` is called
    for every object, as cPickle did; a non-None result is pickled in its place, then
    BINPERSID."""

    def __init__(self, persistent_id=None):
        self.out = bytearray(b"\x80\x02")
        self.memo = {}
        self.keep = []               # memoised objects stay alive, so their ids stay unique
        self.persistent_id = persistent_id or (lambda obj: None)

    def dump(self, obj):
        self.save(obj)
        self.out += b"."
        return bytes(self.out)

    def _memoize(self, obj):
        index = len(self.memo)
        self.memo[id(obj)] = index
        self.keep.append(obj)
        self.out += b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index)

    def _get(self, obj):
        index = self.memo[id(obj)]
        self.out += b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)

    def save(self, obj):
        pid = self.persistent_id(obj)
        if pid is not None:
            self.save(pid)
            self.out += b"Q"
            return
        if obj is None:
            self.out += b"N"
        elif obj is True or obj is False:
            self.out += b"\x88" if obj else b"\x89"
        elif isinstance(obj, Long):
            data = int(obj).to_bytes((obj.bit_length() + 8) // 8, "little", signed=True) \
                if obj else b""
            self.out += b"\x8a" + bytes([len(data)]) + data
        elif isinstance(obj, int):
            self._save_int(obj)
        elif id(obj) in self.memo:
            self._get(obj)
        elif isinstance(obj, str):
            data = obj.encode("latin-1")
            self.out += (b"U" + bytes([len(data)]) if len(data) < 256
                         else b"T" + struct.pack("<i", len(data))) + data
            self._memoize(obj)
        elif isinstance(obj, Global):
            self.out += f"c{obj.module}\n{obj.name}\n".encode()
            self._memoize(obj)
        elif isinstance(obj, tuple):
            self._save_tuple(obj)
        elif isinstance(obj, list):
            self.out += b"]"
            self._memoize(obj)
            self._batches(obj, b"a", b"e", lambda item: self.save(item))
        elif isinstance(obj, dict):
            self.out += b"}"
            self._memoize(obj)
            self._batches(list(obj.items()), b"s", b"u",
                          lambda kv: (self.save(kv[0]), self.save(kv[1])))
        elif isinstance(obj, Reduce):
            self.save(obj.func)
            self.save(obj.args)
            self.out += b"R"
            self._memoize(obj)
        else:
            raise TypeError(f"cannot pickle {type(obj).__name__} the Python 2 way")

    def _save_int(self, value):
        if 0 <= value <= 0xFF:
            self.out += b"K" + bytes([value])
        elif 0 <= value <= 0xFFFF:
            self.out += b"M" + struct.pack("<H", value)
        elif -2 ** 31 <= value < 2 ** 31:
            self.out += b"J" + struct.pack("<i", value)
        else:                        # cPickle's save_int: "%ld\n" after INT
            self.out += b"I" + str(value).encode() + b"\n"

    def _save_tuple(self, obj):
        if not obj:
            self.out += b")"
            return
        if len(obj) <= 3:
            for item in obj:
                self.save(item)
            self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}[len(obj)]
        else:
            self.out += b"("
            for item in obj:
                self.save(item)
            self.out += b"t"
        self._memoize(obj)

    def _batches(self, items, one, many, save_item):
        for start in range(0, len(items), 1000):
            batch = items[start:start + 1000]
            if len(batch) > 1:
                self.out += b"("
                for item in batch:
                    save_item(item)
                self.out += many
            else:
                save_item(batch[0])
                self.out += one


def dump(obj, persistent_id=None):
    return Py2Pickler(persistent_id).dump(obj)


# -- torch 0.1 objects ------------------------------------------------------------------------
_next_cdata = [0x55D3C8A00000]


def _cdata():
    # C pointers of a 64-bit process: Python 2 ints far above 2**31 (pickled as text INT).
    _next_cdata[0] += 0x1A40
    return _next_cdata[0]


class Storage:
    """A torch 0.1 storage: a 1-D array on a device, or a view of another storage."""

    def __init__(self, data, device="cpu", root=None, offset=0):
        self.data = np.ascontiguousarray(data).reshape(-1)
        self.device = device         # "cpu" or "cuda:N"
        self.root, self.offset = root, offset
        self._cdata = _cdata()

    def view(self, offset, size):
        """``storage[offset:offset + size]`` as old torch made it: a storage sharing memory."""
        return Storage(self.data[offset:offset + size], self.device, self, offset)

    def root_storage(self):
        """``Storage._root_storage()``: the root and this storage's offset into it."""
        node, offset = self, 0
        while node.root is not None:
            node, offset = node.root, offset + node.offset
        return node, offset

    def type_name(self):
        return STORAGE_TYPES[self.data.dtype] + "Storage"

    def type_global(self, normalize=True):
        """``type(storage)``, or ``normalize_storage_type`` of it (always module torch)."""
        cuda = self.device.startswith("cuda") and not normalize
        return Global("torch.cuda" if cuda else "torch", self.type_name())


class Tensor:
    """A torch 0.1 tensor: a strided window onto a storage."""

    def __init__(self, storage, shape, stride=None, offset=0):
        self.storage, self.shape, self.offset = storage, tuple(shape), offset
        if stride is None:
            stride = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        self.stride = tuple(stride)
        self._cdata = _cdata()

    @classmethod
    def of(cls, array, device="cpu"):
        """A fresh contiguous tensor holding ``array``."""
        array = np.asarray(array)
        return cls(Storage(array, device), array.shape)

    def type_global(self):
        module = "torch.cuda" if self.storage.device.startswith("cuda") else "torch"
        return Global(module, STORAGE_TYPES[self.storage.data.dtype] + "Tensor")


def _native(byteorder, dtype):
    return np.dtype(dtype).newbyteorder(byteorder)


def _long(byteorder, *values):
    return struct.pack(f"{byteorder}{len(values)}q", *values)


def _sys_info(protocol_version, byteorder):
    # A dict literal in Python 2 pickles in hash order; any order reads the same.
    return {"protocol_version": protocol_version, "little_endian": byteorder == "<",
            "type_sizes": {"short": 2, "int": 4, "long": 8}}


# -- torch 0.1: TAR ---------------------------------------------------------------------------
def save_tar(obj, path, byteorder="<", early=False, padding=b"\x00" * 4):
    """``torch.save(obj, path)`` as torch 0.1 did it on a machine of ``byteorder``.

    Args:
        obj: the object to save; ``Tensor`` leaves (use :func:`ordered_dict` for a state dict).
        byteorder: ``"<"`` or ``">"``: the saving machine's.
        early: the first 0.1 releases' records (no locations, no storage views).
        padding: the 4 bytes ``writeMetadataRaw`` wrote after ndim (struct padding).
    """
    tensors, storages = {}, {}

    def persistent_id(item):
        if isinstance(item, Tensor):
            tensors[item._cdata] = item
            return str(item._cdata)
        if isinstance(item, Storage):
            storages[item._cdata] = item
            return str(item._cdata)
        return None

    def write_sys_info(f):
        f.write(dump(_sys_info(1000, byteorder)))

    def write_pickle(f):
        f.write(dump(obj, persistent_id))

    def write_tensors(f):
        f.write(dump(len(tensors)))
        for key, tensor in tensors.items():
            storage = tensor.storage
            storages[storage._cdata] = storage
            record = (key, tensor.type_global(), storage._cdata) if early else \
                (key, storage._cdata, tensor.type_global())
            f.write(dump(record))
            ndim = struct.pack(byteorder + "i", len(tensor.shape)) + padding
            f.write(ndim + _long(byteorder, *tensor.shape, *tensor.stride, tensor.offset))

    def write_storages(f):
        views = []
        if not early:
            roots = {}
            for key, storage in list(storages.items()):
                root, offset = storage.root_storage()
                if root is not storage:
                    roots[root._cdata] = root
                    views.append((storage._cdata, root._cdata, offset, storage.data.size))
            for view in views:
                del storages[view[0]]
            storages.update(roots)
        f.write(dump(len(storages)))
        for key, storage in storages.items():
            record = (key, storage.type_global()) if early else \
                (key, storage.device, storage.type_global(normalize=True))
            f.write(dump(record))
            f.write(_long(byteorder, storage.data.size))
            f.write(storage.data.astype(_native(byteorder, storage.data.dtype)).tobytes())
        if not early:
            f.write(dump(views))

    with open(path, "wb") as f, \
            tarfile.open(fileobj=f, mode="w:", format=tarfile.PAX_FORMAT) as tar:
        # The members' writers fill the tables in this order: the pickle finds the tensors,
        # the tensors add their storages.
        for name, write in (("sys_info", write_sys_info), ("pickle", write_pickle),
                            ("tensors", write_tensors), ("storages", write_storages)):
            _add_to_tar(write, tar, name)


def _add_to_tar(write, tar, name):
    tmp = tempfile.NamedTemporaryFile(delete=False)
    try:
        write(tmp)
        tmp.close()
        tar.add(tmp.name, arcname=name)
    finally:
        tmp.close()
        os.remove(tmp.name)


# -- torch 0.2-0.3: the legacy magic-number stream --------------------------------------------
MAGIC_NUMBER = Long(0x1950A86A20F9469CFC6C)


def save_legacy(obj, path, byteorder="<", count_order=None):
    """``torch.save(obj, path)`` as torch 0.2-0.3 did it under Python 2.

    Args:
        obj: the object; ``Tensor`` leaves pickle as ``_rebuild_tensor`` (v1).
        byteorder: the saving machine's (recorded in sys_info; storage data is little-endian
            whatever it is).
        count_order: byte order of each storage's int64 element count: the machine's in 0.2-0.3
            (the default), little-endian in later releases.
    """
    count_order = count_order or byteorder
    storages = {}

    def persistent_id(item):
        if isinstance(item, Tensor):
            # Tensor.__reduce__: the reduction is pickled in the tensor's place.
            return None
        if isinstance(item, Storage):
            root, offset = item.root_storage()
            root_key = str(root._cdata)
            storages[root_key] = root
            view = (str(item._cdata), offset, item.data.size) if root is not item else None
            return ("storage", item.type_global(normalize=True), root_key, item.device,
                    root.data.size, view)
        return None

    def reduce_tensors(item):
        if isinstance(item, Tensor):
            return Reduce(Global("torch._utils", "_rebuild_tensor"),
                          (item.storage, item.offset, item.shape, item.stride))
        if isinstance(item, Reduce):
            return Reduce(item.func, reduce_tensors(item.args))
        if isinstance(item, tuple):
            return tuple(reduce_tensors(x) for x in item)
        if isinstance(item, list):
            return [reduce_tensors(x) for x in item]
        if isinstance(item, dict):
            return {k: reduce_tensors(v) for k, v in item.items()}
        return item

    out = bytearray()
    out += dump(MAGIC_NUMBER)
    out += dump(1001)
    out += dump(_sys_info(1001, byteorder))
    out += dump(reduce_tensors(obj), persistent_id)
    keys = sorted(storages)
    out += dump(keys)
    for key in keys:
        data = storages[key].data
        out += _long(count_order, data.size)
        out += data.astype(data.dtype.newbyteorder("<")).tobytes()
    with open(path, "wb") as f:
        f.write(out)


def native_byteorder():
    return "<" if sys.byteorder == "little" else ">"
