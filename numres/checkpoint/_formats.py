"""The three containers torch has written checkpoints in, read without torch.

* zip (torch >= 1.6): ``<folder>/data.pkl`` plus one stored record ``<folder>/data/<key>`` per
  storage, persistent ids ``('storage', type, key, location, numel)``, and a ``byteorder``
  record (data in that order; little-endian when absent).
* legacy magic-number stream (torch 0.2-1.5, or ``_use_new_zipfile_serialization=False``):
  pickles of the magic number, protocol version (1001, checked as torch checks it) and
  sys_info, the object pickle with ids ``('storage', type, root_key, location, numel, view)``,
  the sorted key list, then for each key an int64 element count and the raw bytes. Storage
  data is little-endian from every writer; the count is little-endian, except from 0.2-0.3 on a
  big-endian machine (the machine's order).
* TAR (torch 0.1, the 2017 torchvision files such as ``resnet18-5c106cde.pth``): a PAX-format
  TAR with members ``sys_info``, ``pickle``, ``tensors`` and ``storages`` (in that order), each
  behind a PAX header (the writer added temporary files, whose float mtime needs one).
  sys_info says ``protocol_version=1000`` (not 1001) and the machine's byte order; torch's
  loader never reads it, numres takes only the byte order from it. ``storages``: a count, then
  per storage a pickled ``(key, location, storage type)`` (the first 0.1 releases: ``(key,
  type)``), an int64 count and the raw data, then a pickled list of storage views ``(key, root,
  offset, size)`` (absent from the first releases). ``tensors``: a count, then per tensor a
  pickled ``(key, storage key, tensor type)`` (first releases: ``(key, type, storage key)``)
  and its geometry: ndim as 4 bytes plus 4 bytes never read, sizes, strides and the offset as
  int64. Counts, geometry and data are in the writer's byte order. Keys are C pointers
  (Python 2 ints, pickled as text INT); the object pickle refers to tensors by ``str(key)``.
  Files saved from a GPU say ``cuda:N`` and ``torch.cuda.FloatTensor``.

Sources: torch 0.1-0.3 ``torch/serialization.py`` (``_save``, ``_add_to_tar``, ``load``) and
TH ``generic/serialization.cpp`` (``writeMetadataRaw``, ``writeFileRaw``), torch 2.x
``_legacy_load`` and ``readFileRaw``, CPython 2.7's pickler; the tests write their files with
ports of those writers (``tests/checkpoint/old_torch.py``, which cites each fact) and compare
with torch's own reading wherever torch still reads the file.

Each reader returns the unpickled object (with :class:`TensorRef` leaves) and a function that
turns a :class:`StorageRef` into a 1-D NumPy array over the file's bytes. Every count, size and
offset is checked against the bytes actually present before any array is made, and the work a
file can cause is bounded by its :class:`~._pickle_vm.Budget` (opcodes over all its pickles)
and by the container walks (at most eight TAR headers, PAX records of at most 64 KiB).
"""

import struct
import zipfile

import numpy as np

from ..errors import CheckpointError
from ._pickle_vm import Marker, Unpickler, preview
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
def read_zip(buf, source, budget):
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
            raise CheckpointError(f"unexpected persistent id {preview(pid, 80)}")
        _, type_global, key, location, numel = pid
        stype = storage_type(type_global, "persistent id")
        check_location(location, "persistent id")
        if type(key) is not str or type(numel) is not int or numel < 0:
            raise CheckpointError(f"malformed storage id {preview(pid, 80)}")
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
    obj, _ = _unpickle(buf, start, start + size, persistent_load, f"{source}: data.pkl",
                       budget)

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
            raise CheckpointError(f"{source}: zip member {preview(name, 80)} is outside {prefix}")
        if name in records:
            raise CheckpointError(f"{source}: zip member {preview(name, 80)} appears twice")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{source}: zip member {preview(name, 80)} is compressed; torch "
                                  "stores members uncompressed and numres will not inflate")
        if info.flag_bits & 0x1:
            raise CheckpointError(f"{source}: zip member {preview(name, 80)} is encrypted")
        at = info.header_offset
        header = bytes(buf[at:at + 30])
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{source}: bad local header for {preview(name, 80)}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        local_name = bytes(buf[at + 30:at + 30 + name_len])
        if local_name.decode("utf-8", "replace") != name and \
                local_name.decode("cp437", "replace") != name:
            raise CheckpointError(f"{source}: local and central names differ for "
                                  f"{preview(name, 80)}")
        start = at + 30 + name_len + extra_len
        if info.compress_size != info.file_size or start + info.file_size > len(buf):
            raise CheckpointError(f"{source}: zip member {preview(name, 80)} claims "
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
def read_legacy(buf, source, budget):
    """Read the pre-zip stream of pickles. Returns ``(object, resolve)``.

    Storage data is little-endian whatever machine wrote it: every writer of this format
    (torch 0.2 on) converted to little-endian in ``THPStorage_(writeFileRaw)``. The element
    count before each storage was written in the machine's order by the first of them and in
    little-endian later, so on a big-endian writer either order is accepted where it gives
    the count the pickle declared (it must, exactly).
    """
    pos = 0
    header = []
    for what in ("magic number", "protocol version", "sys_info"):
        value, pos = _unpickle(buf, pos, len(buf), None, f"{source}: {what}", budget,
                               allowed={})
        header.append(value)
    magic, protocol, sys_info = header
    if magic != LEGACY_MAGIC:
        raise CheckpointError(f"{source}: invalid magic number")
    if protocol != LEGACY_PROTOCOL:   # torch's loader checks this too
        raise CheckpointError(f"{source}: legacy protocol {preview(protocol, 20)}, expected 1001")
    writer_order = _sys_info_order(sys_info, source)

    roots = {}

    def persistent_load(pid):
        if type(pid) is not tuple or len(pid) != 6 or pid[0] != "storage":
            raise CheckpointError(f"unexpected persistent id {preview(pid, 80)}")
        _, type_global, key, location, numel, view = pid
        stype = storage_type(type_global, "persistent id")
        check_location(location, "persistent id")
        if type(key) is not str or type(numel) is not int or numel < 0:
            raise CheckpointError(f"malformed storage id {preview(pid, 80)}")
        root = roots.setdefault(key, StorageRef(key, stype, numel, location))
        if root.stype != stype or root.numel != numel:
            raise CheckpointError(f"storage {key} is described two different ways")
        if view is None:
            return root
        if type(view) is not tuple or len(view) != 3:
            raise CheckpointError(f"malformed storage view {preview(view, 80)}")
        view_key, offset, size = view
        check_int_tuple((offset, size), "storage view")
        if offset + size > numel:
            raise CheckpointError(f"storage view {preview(view_key, 40)} (elements {offset} to "
                                  f"{offset + size}) exceeds its root {key} of {numel}")
        return StorageRef(str(view_key), stype, size, location, view_of=(key, offset))

    obj, pos = _unpickle(buf, pos, len(buf), persistent_load, f"{source}: object pickle",
                         budget)
    keys, pos = _unpickle(buf, pos, len(buf), None, f"{source}: storage keys", budget,
                          allowed={})
    if type(keys) is not list or any(type(k) is not str for k in keys) \
            or len(set(keys)) != len(keys):
        raise CheckpointError(f"{source}: storage key list is malformed")
    if set(keys) != set(roots):
        unknown = sorted(set(keys) ^ set(roots))[:3]
        raise CheckpointError(f"{source}: storage key list does not match the storages the "
                              f"pickle uses (differing: {', '.join(unknown)})")
    offsets = {}
    counts = ("<", ">") if writer_order == ">" else ("<",)
    for key in keys:
        pos, offsets[key] = _raw_storage(buf, pos, len(buf), roots[key], counts, source)
    if pos != len(buf):
        raise CheckpointError(f"{source}: {len(buf) - pos} unexpected bytes after the storages")

    return obj, _resolver(buf, roots, offsets, "<")


def _resolver(buf, roots, data_at, order):
    """``resolve(ref)`` of the legacy and TAR formats: a storage's elements at its data
    offset (``data_at``, by key), a view's (``ref.view_of``) as a slice of its root's."""
    def resolve(ref):
        if ref.view_of is None:
            return _storage_array(buf, data_at[ref.key], ref.stype, ref.numel, order)
        root_key, offset = ref.view_of
        return resolve(roots[root_key])[offset:offset + ref.numel]
    return resolve


def _sys_info_order(sys_info, source):
    """The byte order of the machine that wrote the file.

    torch's loaders never check sys_info (torch 0.1 wrote ``protocol_version`` 1000, later
    versions 1001), so neither does numres beyond its type. A missing ``little_endian`` means
    little-endian, which is what torch's loaders assume."""
    if not isinstance(sys_info, dict):
        raise CheckpointError(f"{source}: sys_info is a {type(sys_info).__name__}, not a dict")
    little = sys_info.get("little_endian", True)
    if type(little) is not bool:
        raise CheckpointError(f"{source}: sys_info.little_endian is {preview(little, 20)}")
    return "<" if little else ">"


def _raw_storage(buf, pos, end, ref, orders, source):
    """Check one ``int64 count + bytes`` storage record; the count may be written in any of
    ``orders``. Returns (next pos, data offset)."""
    if pos + 8 > end:
        raise CheckpointError(f"{source}: truncated before storage {ref.key}")
    raw = bytes(buf[pos:pos + 8])
    counts = [struct.unpack(order + "q", raw)[0] for order in orders]
    if ref.numel not in counts:
        raise CheckpointError(f"{source}: storage {ref.key} holds {counts[0]} elements, the "
                              f"pickle says {ref.numel}")
    nbytes = ref.numel * ref.stype.dtype.itemsize
    if pos + 8 + nbytes > end:
        raise CheckpointError(f"{source}: storage {ref.key} needs {nbytes} bytes, only "
                              f"{end - pos - 8} remain (truncated file?)")
    return pos + 8 + nbytes, pos + 8


# -- TAR ---------------------------------------------------------------------------------------
def read_tar(buf, source, budget):
    """Read the torch 0.1 TAR format. Returns ``(object, resolve)``.

    Everything but the pickles is in the writing machine's byte order (0.1's writers wrote
    C ``long`` values and storage data as they were in memory), which sys_info records. torch's
    current loader ignores sys_info and assumes little-endian; numres follows sys_info.
    """
    members = _tar_members(buf, source, budget)
    start, end = members["sys_info"]
    sys_info, _ = _unpickle(buf, start, end, None, f"{source}: sys_info", budget, allowed={})
    order = _sys_info_order(sys_info, source)
    long_size = sys_info.get("type_sizes", {}).get("long", 8) \
        if isinstance(sys_info.get("type_sizes"), dict) else 8
    if long_size != 8:
        raise CheckpointError(f"{source}: written where a C long has {preview(long_size, 10)} "
                              "bytes; numres reads TAR files with 8-byte longs (torch 0.1's)")

    storages, data_at = _tar_storages(buf, *members["storages"], order, source, budget)
    tensors = _tar_tensors(buf, *members["tensors"], storages, order, source, budget)

    def persistent_load(pid):
        # Tensors are pickled as their key in the tensor table (str or int of id()).
        if type(pid) is tuple:
            raise CheckpointError(f"persistent id {preview(pid, 60)} refers to pickled module "
                                  "source")
        key = str(pid)
        if type(pid) not in (str, int) or key not in tensors:
            raise CheckpointError(f"persistent id {preview(pid, 40)} is not in the tensor table")
        return tensors[key]

    start, end = members["pickle"]
    obj, _ = _unpickle(buf, start, end, persistent_load, f"{source}: pickle", budget)

    return obj, _resolver(buf, storages, data_at, order)


TAR_BLOCK = 512
# A PAX header of a torch file holds one or two short records (mtime, maybe a long uname).
MAX_PAX_BYTES = 64 << 10
_TAR_KINDS = {b"1": "a hard link", b"2": "a symbolic link", b"3": "a character device",
              b"4": "a block device", b"5": "a directory", b"6": "a FIFO",
              b"7": "a contiguous file", b"g": "a global PAX header",
              b"L": "a GNU long-name record", b"K": "a GNU long-link record",
              b"S": "a GNU sparse file"}


def _tar_members(buf, source, budget):
    """Walk the TAR headers; return ``{name: (start, end)}`` for the four members.

    The headers are parsed here rather than by ``tarfile`` so that the work is bounded and
    anything but four regular members, each named once and lying inside the file, is refused:
    every header is a new one of the four members or a PAX header that must precede one, so
    the walk reads at most eight headers, and PAX records of at most ``MAX_PAX_BYTES``. (torch
    uses ``tarfile.getmember``, which picks the last of duplicate names, so a duplicate could
    make two readers see different weights.)
    """
    members, pax, pos = {}, None, 0
    while True:
        if pos + TAR_BLOCK > len(buf):
            raise CheckpointError(f"{source}: TAR archive ends inside a header at byte {pos} "
                                  "(truncated file?)")
        header = bytes(buf[pos:pos + TAR_BLOCK])
        if header == bytes(TAR_BLOCK):                  # end-of-archive marker
            break
        budget.headers += 1
        where = f"{source}: TAR header at byte {pos}"
        _check_tar_checksum(header, where)
        kind = header[156:157]
        name = _tar_name(header)
        size = _tar_number(header[124:136], "size", where)
        start = pos + TAR_BLOCK
        if kind == b"x":
            if pax is not None:
                raise CheckpointError(f"{where}: two PAX headers in a row")
            if size > MAX_PAX_BYTES:
                raise CheckpointError(f"{where}: PAX header of {size} bytes (numres reads at "
                                      f"most {MAX_PAX_BYTES})")
            if start + size > len(buf):
                raise CheckpointError(f"{where}: PAX header runs past the end of the file")
            pax = _pax_records(bytes(buf[start:start + size]), where)
            pos = start + _tar_padded(size)
            continue
        if pax:
            name = pax.get("path", name)
            if "size" in pax:
                size = _pax_size(pax["size"], where)
        pax = None
        if kind not in (b"0", b"\0"):
            what = _TAR_KINDS.get(kind, f"of unknown type {kind!r}")
            raise CheckpointError(f"{source}: TAR member {preview(name, 80)} is {what}, not a "
                                  "regular file")
        if name not in TAR_MEMBERS:
            raise CheckpointError(f"{source}: unexpected TAR member {preview(name, 80)}")
        if name in members:
            raise CheckpointError(f"{source}: TAR member {name} appears twice")
        if start + size > len(buf):
            raise CheckpointError(f"{source}: TAR member {name} ({size} bytes at byte {start}) "
                                  "runs past the end of the file")
        members[name] = (start, start + size)
        pos = start + _tar_padded(size)
    missing = [m for m in TAR_MEMBERS if m not in members]
    if missing:
        raise CheckpointError(f"{source}: TAR archive lacks member(s) {', '.join(missing)}")
    return members


def _tar_padded(size):
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def _check_tar_checksum(header, where):
    stored = _tar_number(header[148:156], "checksum", where)
    rest = header[:148] + b" " * 8 + header[156:]
    # POSIX sums unsigned bytes; some old writers summed signed chars. tarfile takes both.
    unsigned = sum(rest)
    signed = unsigned - 256 * sum(1 for b in rest if b > 127)
    if stored not in (unsigned, signed):
        raise CheckpointError(f"{where}: checksum mismatch (damaged or not a TAR header)")


def _tar_name(header):
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    if prefix:
        name = prefix + b"/" + name
    return name.decode("utf-8", "replace")


def _tar_number(field, what, where):
    if field[0] == 0x80:                      # base-256, for values the octal field can't hold
        return int.from_bytes(field[1:], "big")
    if field[0] == 0xFF:
        raise CheckpointError(f"{where}: negative {what}")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if text.strip(b"01234567"):
        raise CheckpointError(f"{where}: {what} field {field!r} is not an octal number")
    return int(text or b"0", 8)


def _pax_records(data, where):
    """Parse ``"<length> <key>=<value>\\n"`` records (POSIX pax extended header)."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 20)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise CheckpointError(f"{where}: malformed PAX record at offset {pos}")
        end = pos + int(digits)
        if end <= space or end > len(data) or data[end - 1] != 0x0A:
            raise CheckpointError(f"{where}: PAX record at offset {pos} has a wrong length")
        key, sep, value = data[space + 1:end - 1].partition(b"=")
        if not sep:
            raise CheckpointError(f"{where}: PAX record at offset {pos} has no '='")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos = end
    return records


def _pax_size(text, where):
    if not text.isdigit() or len(text) > 20:
        raise CheckpointError(f"{where}: PAX size {preview(text, 30)} is not a byte count")
    return int(text)


def _tar_storages(buf, pos, end, order, source, budget):
    """The ``storages`` member: a count, then per storage a pickled record followed by an
    int64 element count and the raw bytes, then (later 0.1 releases) a pickled list of views.

    Records are ``(key, location, storage type)`` (later 0.1 releases) or ``(key, storage
    type)`` (the first ones; those files have no location and no views)."""
    where = f"{source}: storages"
    count, pos = _unpickle(buf, pos, end, None, where, budget, allowed={})
    if type(count) is not int or count < 0:
        raise CheckpointError(f"{where}: storage count is {preview(count, 20)}")
    storages, data_at = {}, {}
    for _ in range(count):
        record, pos = _unpickle(buf, pos, end, None, where, budget)
        if type(record) is not tuple or len(record) not in (2, 3):
            raise CheckpointError(f"{where}: malformed storage record {preview(record, 80)}")
        key, location, type_global = record if len(record) == 3 else \
            (record[0], "cpu", record[1])
        key = _table_key(key, where)
        stype = storage_type(type_global, where)
        check_location(location, where)
        if pos + 8 > end:
            raise CheckpointError(f"{where}: truncated")
        (numel,) = struct.unpack(order + "q", bytes(buf[pos:pos + 8]))
        if numel < 0:
            raise CheckpointError(f"{where}: storage {key} has {numel} elements")
        if key in storages:
            raise CheckpointError(f"{where}: storage {key} appears twice")
        ref = StorageRef(key, stype, numel, location)
        pos, data_at[key] = _raw_storage(buf, pos, end, ref, (order,), where)
        storages[key] = ref
    if pos == end:                                 # the first 0.1 writers stored no views
        return storages, data_at
    views, pos = _unpickle(buf, pos, end, None, where, budget, allowed={})
    if type(views) is not list:
        raise CheckpointError(f"{where}: storage views are not a list")
    for view in views:
        if type(view) not in (tuple, list) or len(view) != 4:
            raise CheckpointError(f"{where}: malformed storage view {preview(view, 80)}")
        target, root, offset, numel = view
        target, root = _table_key(target, where), _table_key(root, where)
        check_int_tuple((offset, numel), "storage view")
        if target in storages:
            raise CheckpointError(f"{where}: storage view {target} reuses a storage key")
        if root in storages and storages[root].view_of is not None:
            # torch 0.1 saved a view's root in its place; chains would only cost recursion.
            raise CheckpointError(f"{where}: storage view {target} is a view of view {root}")
        if root not in storages or offset + numel > storages[root].numel:
            raise CheckpointError(f"{where}: storage view {target} (elements {offset} to "
                                  f"{offset + numel}) exceeds root {root}")
        base = storages[root]
        storages[target] = StorageRef(target, base.stype, numel, base.location, (root, offset))
    if pos != end:
        raise CheckpointError(f"{where}: {end - pos} unexpected bytes after the storage views")
    return storages, data_at


def _tar_tensors(buf, pos, end, storages, order, source, budget):
    """The ``tensors`` member: a count, then per tensor a pickled record and its geometry.

    Records are ``(key, storage key, tensor type)`` (later 0.1 releases) or ``(key, tensor
    type, storage key)`` (the first ones). The geometry is what ``writeMetadataRaw`` wrote:
    the int ndim written with ``sizeof(long)`` (4 bytes of ndim, then 4 bytes of whatever
    followed it in memory, never read), then ndim sizes, ndim strides and the storage offset
    as int64."""
    where = f"{source}: tensors"
    count, pos = _unpickle(buf, pos, end, None, where, budget, allowed={})
    if type(count) is not int or count < 0:
        raise CheckpointError(f"{where}: tensor count is {preview(count, 20)}")
    tensors = {}
    for _ in range(count):
        record, pos = _unpickle(buf, pos, end, None, where, budget)
        if type(record) is not tuple or len(record) != 3:
            raise CheckpointError(f"{where}: malformed tensor record {preview(record, 80)}")
        key, storage_key, tensor_type = record
        if isinstance(storage_key, Marker):          # the first 0.1 writers' order
            storage_key, tensor_type = tensor_type, storage_key
        if not isinstance(tensor_type, Marker) or not tensor_type.name.endswith("Tensor"):
            raise CheckpointError(f"{where}: expected a torch tensor type, got "
                                  f"{preview(tensor_type, 60)}")
        key = _table_key(key, where)
        if storage_key is None:
            raise CheckpointError(f"{where}: tensor {key} has no storage (an empty torch 0.1 "
                                  "tensor; torch cannot load it either)")
        storage_key = _table_key(storage_key, where)
        if storage_key not in storages:
            raise CheckpointError(f"{where}: tensor {key} uses unknown storage {storage_key}")
        if key in tensors:
            raise CheckpointError(f"{where}: tensor {key} appears twice")
        if pos + 8 > end:
            raise CheckpointError(f"{where}: truncated")
        (ndim,) = struct.unpack(order + "i", bytes(buf[pos:pos + 4]))
        if not 0 <= ndim <= 32:
            raise CheckpointError(f"{where}: tensor {key} has {ndim} dimensions")
        pos += 8
        nbytes = 8 * (2 * ndim + 1)
        if pos + nbytes > end:
            raise CheckpointError(f"{where}: truncated")
        values = struct.unpack(f"{order}{2 * ndim + 1}q", bytes(buf[pos:pos + nbytes]))
        pos += nbytes
        shape = check_int_tuple(values[:ndim], "size")
        stride = check_int_tuple(values[ndim:2 * ndim], "stride")
        offset = check_int_tuple(values[2 * ndim:], "storage offset")[0]
        tensors[key] = TensorRef(storages[storage_key], offset, shape, stride)
    if pos != end:
        raise CheckpointError(f"{where}: {end - pos} unexpected bytes after the tensors")
    return tensors


def _table_key(key, where):
    if type(key) not in (str, int):
        raise CheckpointError(f"{where}: table key {preview(key, 40)} is not a str or int")
    return str(key)


def _unpickle(buf, start, end, persistent_load, source, budget, allowed=ALLOWED):
    # A pickle must end within MAX_PICKLE_BYTES; with the file's opcode budget this bounds
    # both the time and the memory a hostile file can cost.
    end = min(end, start + MAX_PICKLE_BYTES)
    return Unpickler(buf, start, end, allowed, persistent_load, source, budget).load()
