"""The three containers torch has written checkpoints in, read without torch.

* zip (torch >= 1.6): ``<folder>/data.pkl`` plus one stored record ``<folder>/data/<key>`` per
  storage, persistent ids ``('storage', type, key, location, numel)``.
* legacy "magic number" stream (torch 0.4-1.5, or ``_use_new_zipfile_serialization=False``):
  pickles of the magic number, protocol version and sys_info, the object pickle with ids
  ``('storage', type, root_key, location, numel, view)``, the sorted key list, then for each key
  an int64 element count and the raw bytes.
* TAR (torch 0.1, the 2017 torchvision files): members ``sys_info``, ``storages`` (storage
  records, then storage views), ``tensors`` (tensor records) and ``pickle`` (the object, whose
  persistent ids are keys of the tensor table).

Each reader returns the unpickled object (with :class:`TensorRef` leaves) and a function that
turns a :class:`StorageRef` into a 1-D NumPy array over the file's bytes. Every count, size and
offset is checked against the bytes actually present before any array is made.
"""

import struct
import tarfile
import zipfile

import numpy as np

from ..errors import CheckpointError
from ._pickle_vm import Unpickler
from ._torch_names import (ALLOWED, StorageRef, TensorRef, check_int_tuple, check_location,
                           storage_type)

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
# data.pkl of a ResNet-152 state dict is ~100 kB; anything this large is not a state dict.
MAX_PICKLE_BYTES = 16 << 20
TAR_MEMBERS = ("sys_info", "pickle", "storages", "tensors")


def detect(buf):
    """Name the container format from the first bytes (never from the file name)."""
    head = bytes(buf[:512])
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head[:2] == b"\x80\x02":
        try:
            magic, _ = Unpickler(buf, 0, min(len(buf), 64), {}, None, "header").load()
        except CheckpointError:
            magic = None
        if magic == LEGACY_MAGIC:
            return "legacy"
    if head[:2] == b"PK":
        raise CheckpointError("zip file does not start with a local file header; torch "
                              "checkpoints always do (is it a polyglot or a damaged file?)")
    raise CheckpointError(f"not a PyTorch checkpoint: first bytes are {head[:8]!r}")


def _storage_array(buf, offset, stype, numel, byteorder):
    dtype = stype.dtype.newbyteorder(byteorder) if stype.dtype.itemsize > 1 else stype.dtype
    return np.frombuffer(buf, dtype=dtype, count=numel, offset=offset)


# -- zip -------------------------------------------------------------------------------------
def read_zip(buf, source):
    """Read a zip-format checkpoint. Returns ``(object, resolve)``."""
    try:
        archive = zipfile.ZipFile(_BufferFile(buf))
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error) as exc:
        raise CheckpointError(f"{source}: damaged zip archive ({exc})") from None
    prefix = infos[0].filename.split("/", 1)[0] + "/" if infos else ""
    for marker in ("constants.pkl", "code/", "model.json", ".data/version"):
        if any(info.filename.startswith(prefix + marker) for info in infos):
            raise CheckpointError(f"{source}: this is a TorchScript archive ({marker}); numres "
                                  "reads state dicts saved with torch.save only")
    records = _zip_records(buf, infos, source)
    if prefix + "data.pkl" not in records:
        raise CheckpointError(f"{source}: zip archive has no {prefix}data.pkl")
    byteorder = "<"
    if prefix + "byteorder" in records:
        start, size = records[prefix + "byteorder"]
        order = bytes(buf[start:start + size])
        if order not in (b"little", b"big"):
            raise CheckpointError(f"{source}: byteorder record says {order[:16]!r}")
        byteorder = "<" if order == b"little" else ">"

    storages = {}

    def persistent_load(pid):
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
            raise CheckpointError(f"unexpected persistent id {pid!r:.80}")
        _, type_global, key, location, numel = pid
        stype = storage_type(type_global, "persistent id")
        check_location(location, "persistent id")
        if type(key) is not str or type(numel) is not int or numel < 0:
            raise CheckpointError(f"malformed storage id {pid!r:.80}")
        name = prefix + "data/" + key
        if name not in records:
            raise CheckpointError(f"storage record {name} is missing from the archive")
        if key in storages:
            ref = storages[key]
            if ref.stype != stype or ref.numel != numel:
                raise CheckpointError(f"storage {key} is described two different ways")
            return ref
        nbytes = records[name][1]
        # The declared element count must match the record exactly (CVE-2026-24747).
        if numel * stype.dtype.itemsize != nbytes:
            raise CheckpointError(f"storage {key}: {numel} x {stype.name} needs "
                                  f"{numel * stype.dtype.itemsize} bytes, record has {nbytes}")
        storages[key] = ref = StorageRef(key, stype, numel, location)
        return ref

    start, size = records[prefix + "data.pkl"]
    obj, _ = _unpickle(buf, start, start + size, persistent_load, f"{source}: data.pkl")

    def resolve(ref):
        offset = records[prefix + "data/" + ref.key][0]
        return _storage_array(buf, offset, ref.stype, ref.numel, byteorder)

    return obj, resolve


def _zip_records(buf, infos, source):
    """Map member name -> (data offset, size), checking every header against the bytes."""
    if not infos:
        raise CheckpointError(f"{source}: empty zip archive")
    prefix = infos[0].filename.split("/", 1)[0] + "/"
    if "/" not in infos[0].filename:
        raise CheckpointError(f"{source}: zip members are not inside one folder")
    records, spans = {}, []
    for info in infos:
        name = info.filename
        if not name.startswith(prefix) or ".." in name.split("/") or name.startswith("/"):
            raise CheckpointError(f"{source}: zip member {name!r:.80} is outside {prefix}")
        if name in records:
            raise CheckpointError(f"{source}: zip member {name!r:.80} appears twice")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{source}: zip member {name!r:.80} is compressed; torch "
                                  "stores members uncompressed and numres will not inflate")
        if info.flag_bits & 0x1:
            raise CheckpointError(f"{source}: zip member {name!r:.80} is encrypted")
        at = info.header_offset
        header = bytes(buf[at:at + 30])
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{source}: bad local header for {name!r:.80}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        local_name = bytes(buf[at + 30:at + 30 + name_len])
        if local_name.decode("utf-8", "replace") != name and \
                local_name.decode("cp437", "replace") != name:
            raise CheckpointError(f"{source}: local and central names differ for {name!r:.80}")
        start = at + 30 + name_len + extra_len
        if info.compress_size != info.file_size or start + info.file_size > len(buf):
            raise CheckpointError(f"{source}: zip member {name!r:.80} claims "
                                  f"{info.file_size} bytes beyond the end of the file")
        records[name] = (start, info.file_size)
        spans.append((start, start + info.file_size, name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(f"{source}: zip members {first!r} and {second!r} overlap")
    return records


class _BufferFile:
    """A read-only file object over a buffer, so zipfile never copies the archive."""

    def __init__(self, buf):
        self.buf = buf
        self.pos = 0

    def seek(self, offset, whence=0):
        base = (0, self.pos, len(self.buf))[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self):
        return self.pos

    def read(self, n=-1):
        end = len(self.buf) if n is None or n < 0 else min(len(self.buf), self.pos + n)
        data = bytes(self.buf[self.pos:end])
        self.pos = max(self.pos, end)
        return data

    def seekable(self):
        return True


# -- legacy magic-number stream --------------------------------------------------------------
def read_legacy(buf, source):
    """Read the pre-zip stream of pickles. Returns ``(object, resolve)``."""
    pos = 0
    header = []
    for what in ("magic number", "protocol version", "sys_info"):
        value, pos = _unpickle(buf, pos, len(buf), None, f"{source}: {what}", allowed={})
        header.append(value)
    magic, protocol, sys_info = header
    if magic != LEGACY_MAGIC:
        raise CheckpointError(f"{source}: invalid magic number")
    if protocol != LEGACY_PROTOCOL:
        raise CheckpointError(f"{source}: legacy protocol {protocol!r:.20}, expected 1001")
    order = _sys_info_order(sys_info, source)

    roots = {}

    def persistent_load(pid):
        if type(pid) is not tuple or len(pid) != 6 or pid[0] != "storage":
            raise CheckpointError(f"unexpected persistent id {pid!r:.80}")
        _, type_global, key, location, numel, view = pid
        stype = storage_type(type_global, "persistent id")
        check_location(location, "persistent id")
        if type(key) is not str or type(numel) is not int or numel < 0:
            raise CheckpointError(f"malformed storage id {pid!r:.80}")
        root = roots.setdefault(key, StorageRef(key, stype, numel, location))
        if root.stype != stype or root.numel != numel:
            raise CheckpointError(f"storage {key} is described two different ways")
        if view is None:
            return root
        if type(view) is not tuple or len(view) != 3:
            raise CheckpointError(f"malformed storage view {view!r:.80}")
        view_key, offset, size = view
        check_int_tuple((offset, size), "storage view")
        if offset + size > numel:
            raise CheckpointError(f"storage view {view_key!r:.40} exceeds its root {key}")
        return StorageRef(str(view_key), stype, size, location, view_of=(key, offset))

    obj, pos = _unpickle(buf, pos, len(buf), persistent_load, f"{source}: object pickle")
    keys, pos = _unpickle(buf, pos, len(buf), None, f"{source}: storage keys", allowed={})
    if type(keys) is not list or any(type(k) is not str for k in keys) \
            or len(set(keys)) != len(keys):
        raise CheckpointError(f"{source}: storage key list is malformed")
    if set(keys) != set(roots):
        raise CheckpointError(f"{source}: storage key list does not match the storages used")
    offsets = {}
    for key in keys:
        ref = roots[key]
        pos, offsets[key] = _raw_storage(buf, pos, len(buf), ref, order, source)
    if pos != len(buf):
        raise CheckpointError(f"{source}: {len(buf) - pos} unexpected bytes after the storages")

    def resolve(ref):
        if ref.view_of is None:
            return _storage_array(buf, offsets[ref.key], ref.stype, ref.numel, order)
        root_key, offset = ref.view_of
        root = roots[root_key]
        return resolve(root)[offset:offset + ref.numel]

    return obj, resolve


def _sys_info_order(sys_info, source):
    if not isinstance(sys_info, dict) or sys_info.get("protocol_version") != LEGACY_PROTOCOL:
        raise CheckpointError(f"{source}: malformed sys_info record")
    little = sys_info.get("little_endian")
    if type(little) is not bool:
        raise CheckpointError(f"{source}: sys_info.little_endian is {little!r:.20}")
    return "<" if little else ">"


def _raw_storage(buf, pos, end, ref, order, source):
    """Check one ``int64 count + bytes`` storage record. Returns (next pos, data offset)."""
    if pos + 8 > end:
        raise CheckpointError(f"{source}: truncated before storage {ref.key}")
    (count,) = struct.unpack(order + "q", bytes(buf[pos:pos + 8]))
    nbytes = count * ref.stype.dtype.itemsize
    if count != ref.numel:
        raise CheckpointError(f"{source}: storage {ref.key} holds {count} elements, the "
                              f"pickle says {ref.numel}")
    if pos + 8 + nbytes > end:
        raise CheckpointError(f"{source}: storage {ref.key} needs {nbytes} bytes, only "
                              f"{end - pos - 8} remain (truncated file?)")
    return pos + 8 + nbytes, pos + 8


# -- TAR ---------------------------------------------------------------------------------------
def read_tar(buf, source):
    """Read the torch 0.1 TAR format. Returns ``(object, resolve)``."""
    members = _tar_members(buf, source)
    start, end = members["sys_info"]
    sys_info, _ = _unpickle(buf, start, end, None, f"{source}: sys_info", allowed={})
    order = _sys_info_order(sys_info, source)

    storages, data_at = _tar_storages(buf, *members["storages"], order, source)
    tensors = _tar_tensors(buf, *members["tensors"], storages, source)

    def persistent_load(pid):
        # Tensors are pickled as their key in the tensor table (str or int of id()).
        if type(pid) is tuple:
            raise CheckpointError(f"persistent id {pid!r:.60} refers to pickled module source")
        key = str(pid)
        if type(pid) not in (str, int) or key not in tensors:
            raise CheckpointError(f"persistent id {pid!r:.40} is not in the tensor table")
        return tensors[key]

    start, end = members["pickle"]
    obj, _ = _unpickle(buf, start, end, persistent_load, f"{source}: pickle")

    def resolve(ref):
        if ref.view_of is None:
            return _storage_array(buf, data_at[ref.key], ref.stype, ref.numel, order)
        root_key, offset = ref.view_of
        return resolve(storages[root_key])[offset:offset + ref.numel]

    return obj, resolve


def _tar_members(buf, source):
    try:
        with tarfile.open(fileobj=_BufferFile(buf), mode="r:") as archive:
            infos = archive.getmembers()
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{source}: damaged TAR archive ({exc})") from None
    members = {}
    for info in infos:
        if info.name not in TAR_MEMBERS or info.name in members:
            raise CheckpointError(f"{source}: unexpected TAR member {info.name!r:.80}")
        if not info.isreg():
            raise CheckpointError(f"{source}: TAR member {info.name} is not a regular file")
        if info.offset_data + info.size > len(buf):
            raise CheckpointError(f"{source}: TAR member {info.name} runs past the end")
        members[info.name] = (info.offset_data, info.offset_data + info.size)
    missing = [m for m in TAR_MEMBERS if m not in members]
    if missing:
        raise CheckpointError(f"{source}: TAR archive lacks member(s) {', '.join(missing)}")
    return members


def _tar_storages(buf, pos, end, order, source):
    where = f"{source}: storages"
    count, pos = _unpickle(buf, pos, end, None, where, allowed={})
    if type(count) is not int or count < 0:
        raise CheckpointError(f"{where}: storage count is {count!r:.20}")
    storages, data_at = {}, {}
    for _ in range(count):
        record, pos = _unpickle(buf, pos, end, None, where)
        if type(record) is not tuple or len(record) != 3:
            raise CheckpointError(f"{where}: malformed storage record {record!r:.80}")
        key, location, type_global = record
        key = _table_key(key, where)
        stype = storage_type(type_global, where)
        check_location(location, where)
        if pos + 8 > end:
            raise CheckpointError(f"{where}: truncated")
        (numel,) = struct.unpack(order + "q", bytes(buf[pos:pos + 8]))
        if numel < 0:
            raise CheckpointError(f"{where}: storage {key} has {numel} elements")
        ref = StorageRef(key, stype, numel, location)
        pos, data_at[key] = _raw_storage(buf, pos, end, ref, order, where)
        if key in storages:
            raise CheckpointError(f"{where}: storage {key} appears twice")
        storages[key] = ref
    views, pos = _unpickle(buf, pos, end, None, where, allowed={})
    if type(views) is not list:
        raise CheckpointError(f"{where}: storage views are not a list")
    for view in views:
        if type(view) not in (tuple, list) or len(view) != 4:
            raise CheckpointError(f"{where}: malformed storage view {view!r:.80}")
        target, root, offset, numel = view
        target, root = _table_key(target, where), _table_key(root, where)
        check_int_tuple((offset, numel), "storage view")
        if root not in storages or offset + numel > storages[root].numel:
            raise CheckpointError(f"{where}: storage view {target} exceeds root {root}")
        base = storages[root]
        storages[target] = StorageRef(target, base.stype, numel, base.location, (root, offset))
    return storages, data_at


def _tar_tensors(buf, pos, end, storages, source):
    where = f"{source}: tensors"
    count, pos = _unpickle(buf, pos, end, None, where, allowed={})
    if type(count) is not int or count < 0:
        raise CheckpointError(f"{where}: tensor count is {count!r:.20}")
    tensors = {}
    for _ in range(count):
        record, pos = _unpickle(buf, pos, end, None, where)
        if type(record) is not tuple or len(record) != 3:
            raise CheckpointError(f"{where}: malformed tensor record {record!r:.80}")
        key, storage_key = _table_key(record[0], where), _table_key(record[1], where)
        if storage_key not in storages:
            raise CheckpointError(f"{where}: tensor {key} uses unknown storage {storage_key}")
        if pos + 8 > end:
            raise CheckpointError(f"{where}: truncated")
        # int32 ndim then 4 padding bytes: the old writer treated ndim as 8 bytes.
        (ndim,) = struct.unpack("<i", bytes(buf[pos:pos + 4]))
        if not 0 <= ndim <= 32:
            raise CheckpointError(f"{where}: tensor {key} has {ndim} dimensions")
        pos += 8
        nbytes = 8 * (2 * ndim + 1)
        if pos + nbytes > end:
            raise CheckpointError(f"{where}: truncated")
        values = struct.unpack(f"<{2 * ndim + 1}q", bytes(buf[pos:pos + nbytes]))
        pos += nbytes
        shape = check_int_tuple(values[:ndim], "size")
        stride = check_int_tuple(values[ndim:2 * ndim], "stride")
        offset = check_int_tuple(values[2 * ndim:], "storage offset")[0]
        tensors[key] = TensorRef(storages[storage_key], offset, shape, stride)
    return tensors


def _table_key(key, where):
    if type(key) not in (str, int):
        raise CheckpointError(f"{where}: table key {key!r:.40} is not a str or int")
    return str(key)


def _unpickle(buf, start, end, persistent_load, source, allowed=ALLOWED):
    # A pickle must end within MAX_PICKLE_BYTES; with the interpreter's opcode budget this
    # bounds both the time and the memory a hostile file can cost.
    end = min(end, start + MAX_PICKLE_BYTES)
    return Unpickler(buf, start, end, allowed, persistent_load, source).load()
