"""Hostile and damaged files: every one is a CheckpointError after bounded work and memory, and
nothing from the file ever runs.

The guarantee is the work the reader does, which a slow machine cannot change: opcodes run
(over all pickles of a file), bytes the pickle interpreter reads, container headers parsed,
and peak memory. Wall-clock time is checked too, with a wide margin only.
"""

import io
import pickle
import struct
import tarfile
import zipfile

import numpy as np
import pytest

import numres
from numres import CheckpointError
from numres.checkpoint import Budget, read_checkpoint

from . import craft, old_torch
from .craft import P, make_zip, refused, state_dict_pickle, zip_pid
from .old_torch import Global, Storage, Tensor


def zip_with_pickle(pkl, records=None):
    return make_zip(pkl, records or {})


class Evil:
    """Pickles to ``os.system(<cmd>)`` like every published exploit."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        import os
        return os.system, (self.cmd,)


def test_code_execution_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"w": Evil(f"touch {marker}")}, protocol=2)
    message = refused(zip_with_pickle(payload), match="refusing global")
    assert "system" in message
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [
    ("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"),
    ("builtins", "__import__"), ("__builtin__", "eval"), ("subprocess", "Popen"),
    ("importlib", "import_module"), ("operator", "attrgetter"), ("pydoc", "locate"),
    ("numpy", "load"), ("torch", "load"), ("torch._utils", "_rebuild_from_type_v2"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDictX"),
    ("torch.cuda.FloatStorage", "x"), ("os.path", "join"),
])
def test_any_global_outside_the_allowlist(module, name):
    pkl = P().proto().glob(module, name).str("x").raw(b"\x85R").stop().bytes
    assert f"{module}.{name}" in refused(zip_with_pickle(pkl), match="refusing global")


def test_stack_global_is_checked_too():
    pkl = P().proto().str("os").str("system").raw(b"\x93").str("id").raw(b"\x85R").stop()
    refused(zip_with_pickle(pkl.bytes), match="refusing global 'os.system'")


@pytest.mark.parametrize("opcode,name", [
    (b"i", "INST"), (b"o", "OBJ"), (b"\x81", "NEWOBJ"), (b"\x92", "NEWOBJ_EX"),
    (b"\x82", "EXT1"), (b"\x83", "EXT2"), (b"\x84", "EXT4"), (b"P", "PERSID"),
    (b"\x90", "ADDITEMS"), (b"\x91", "FROZENSET"), (b"\x97", "NEXT_BUFFER"),
])
def test_object_building_opcodes_are_refused(opcode, name):
    pkl = P().proto().mark().raw(opcode).stop().bytes
    assert name in refused(zip_with_pickle(pkl), match="not allowed")


def test_reduce_only_calls_constructors():
    # A storage type is allowlisted as data, not as something callable.
    pkl = P().proto().glob("torch", "FloatStorage").raw(b")R").stop().bytes
    refused(zip_with_pickle(pkl), match="REDUCE may only call")


def test_build_beyond_ordered_dict_metadata():
    setstate = P().proto().empty_ordered_dict().raw(b"}").str("__setstate__").int(1).raw(b"s")
    refused(zip_with_pickle(setstate.raw(b"b").stop().bytes), match="BUILD state")
    on_list = P().proto().raw(b"]").raw(b"}").raw(b"b").stop().bytes
    refused(zip_with_pickle(on_list), match="BUILD on a list")


def test_setitem_only_on_dicts():
    # CVE-2026-24747: SETITEM applied to a tensor.
    pkl = P().proto().tensor(zip_pid("0", 2), (2,), (1,)).int(0).int(1).raw(b"s").stop()
    refused(make_zip(pkl.bytes, {"0": b"\0" * 8}), match="SETITEM on a TensorRef")
    appends = P().proto().raw(b"}").mark().int(1).raw(b"e").stop().bytes
    refused(zip_with_pickle(appends), match="APPENDS to a dict")


def test_declared_storage_size_must_match_the_record():
    # CVE-2026-24747: numel=20 over a 10-element record would read past it.
    pkl = state_dict_pickle([("w", zip_pid("0", 20), (20,), (1,), 0)])
    refused(make_zip(pkl, {"0": b"\0" * 40}), match="needs 80 bytes, record has 40")


@pytest.mark.parametrize("shape,stride,offset,match", [
    ((10 ** 12,), (1,), 0, "reaches element"),
    ((4, 4), (4, 1), 1, "reaches element"),
    ((3,), (-1,), 0, "negative"),
    ((3,), (1,), -2, "offset"),
    ((2, 2), (1,), 0, "differ in length"),
    ((2,) * 40, (1,) * 40, 0, "dimensions"),
])
def test_tensor_geometry_is_checked_against_its_storage(shape, stride, offset, match):
    pkl = state_dict_pickle([("w", zip_pid("0", 16), shape, stride, offset)])
    refused(make_zip(pkl, {"0": b"\0" * 64}), match=match)


@pytest.mark.parametrize("pid,match", [
    (lambda p: p.mark().str("module").str("x").tuple(), "unexpected persistent id"),
    (lambda p: p.str("0"), "unexpected persistent id"),
    (lambda p: p.mark().str("storage").glob("torch", "FloatStorage").str("9").str("cpu")
     .int(1).tuple(), "missing from the archive"),
    (lambda p: p.mark().str("storage").glob("torch", "FloatStorage").str("0").str("tpu:0")
     .int(1).tuple(), "location"),
    (lambda p: p.mark().str("storage").glob("torch", "FloatTensor").str("0").str("cpu")
     .int(1).tuple(), "storage type"),
])
def test_odd_persistent_ids(pid, match):
    pkl = state_dict_pickle([("w", pid, (1,), (1,), 0)])
    refused(make_zip(pkl, {"0": b"\0" * 4}), match=match)


def test_absurd_length_claims():
    huge_str = P().proto().raw(b"X" + struct.pack("<I", 0xFFFFFFF0)).stop().bytes
    refused(zip_with_pickle(huge_str), match="remain")
    huge_bytes8 = P().proto().raw(b"\x8e" + struct.pack("<Q", 1 << 60)).stop().bytes
    refused(zip_with_pickle(huge_bytes8), match="remain")
    huge_long = P().proto().raw(b"\x8b" + struct.pack("<i", 1 << 30)).stop().bytes
    refused(zip_with_pickle(huge_long), match="out of range")
    long_line = P().proto().raw(b"I" + b"9" * 100_000 + b"\n").stop().bytes
    refused(zip_with_pickle(long_line), match="text line")


def test_opcode_flood_is_bounded():
    # Millions of tiny containers: refused by the opcode budget, not by running out of memory.
    flood = P().proto().raw(b"]" * 3_000_000).stop().bytes
    refused(zip_with_pickle(flood), match="opcodes|STOP")


def test_stack_and_memo_abuse():
    refused(zip_with_pickle(P().proto().raw(b"0").stop().bytes), match="underflow")
    refused(zip_with_pickle(P().proto().raw(b"h\x07").stop().bytes), match="never stored")
    refused(zip_with_pickle(P().proto().int(1).int(2).stop().bytes), match="malformed stack")
    refused(zip_with_pickle(P().proto().int(1).bytes), match="without STOP")
    refused(zip_with_pickle(P().proto().raw(b"\x80\x09").stop().bytes), match="protocol 9")


def test_compressed_members_are_not_inflated():
    good = craft.simple_zip({"w": np.zeros(1000, np.float32)})
    with zipfile.ZipFile(io.BytesIO(good)) as z:
        members = {n: z.read(n) for n in z.namelist()}
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    refused(out.getvalue(), match="compressed")


def test_zip_structure_attacks():
    pkl = state_dict_pickle([])
    refused(make_zip(pkl, {}, extra=[("../evil", b"x")]), match="outside")
    refused(make_zip(pkl, {}, extra=[("archive/data.pkl", pkl)]), match="twice")
    refused(make_zip(pkl, {}, extra=[("archive/constants.pkl", b"")]), match="TorchScript")
    refused(b"junk" + craft.simple_zip({"w": np.zeros(2, np.float32)}), match="not a PyTorch")
    refused(make_zip(b"", {}, prefix="x").replace(b"x/data.pkl", b"x/data.pkX"),
            match="no x/data.pkl|local and central")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit's own deprecation
def test_torchscript_archive(tv, tmp_path):
    torch, _ = tv
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "ts.pt")
    refused((tmp_path / "ts.pt").read_bytes(), match="TorchScript")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_truncated_and_corrupted_files(tv, tmp_path, zip_format):
    torch, _ = tv
    torch.save({"w": torch.randn(64, 64), "b": torch.randn(64)}, tmp_path / "ok.pth",
               _use_new_zipfile_serialization=zip_format)
    data = (tmp_path / "ok.pth").read_bytes()
    for cut in (len(data) // 4, len(data) // 2, len(data) - 100, len(data) - 1):
        refused(data[:cut])
    rng = np.random.default_rng(0)
    outcomes = set()
    for _ in range(40):
        damaged = bytearray(data)
        for i in rng.integers(0, min(len(data), 2000), 3):   # headers and pickle
            damaged[i] ^= 0xFF
        try:
            numres.load_pth(bytes(damaged))
            outcomes.add("read")       # a flipped byte inside tensor data is just data
        except CheckpointError:
            outcomes.add("refused")
    assert "refused" in outcomes


def test_truncated_tar(tmp_path):
    data = old_tar(tmp_path, old_torch.ordered_dict([("w", Tensor.of(np.ones(100, np.float32)))]))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        starts = {m.name: m.offset_data for m in tar.getmembers()}
    for cut in (600, starts["storages"] + 100, starts["tensors"] + 30):
        refused(data[:cut])


# -- TAR (torch 0.1) and the legacy stream -----------------------------------------------------
def old_tar(tmp_path, state=None, **kwargs):
    """A valid torch 0.1 TAR file from the writer port, as bytes."""
    if state is None:
        state = old_torch.ordered_dict([("w", Tensor.of(np.arange(6, dtype=np.float32)))])
    old_torch.save_tar(state, tmp_path / "old.pth", **kwargs)
    return (tmp_path / "old.pth").read_bytes()


def tar_of(members, pax_headers=None):
    """A TAR archive of ``(TarInfo, bytes or None)`` in order, written by ``tarfile``."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers=pax_headers) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def member(name, data=b"", kind=tarfile.REGTYPE, **fields):
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data) if kind == tarfile.REGTYPE else 0
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data if kind == tarfile.REGTYPE else None


def tar_members(data):
    """{name: bytes} of a valid TAR checkpoint, to rebuild it with one member changed."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def rebuilt(data, **replace):
    parts = {**tar_members(data), **replace}
    return tar_of([member(name, body) for name, body in parts.items()])


F32 = Global("torch", "FloatStorage")


def storages_member(records, views=None, order="<"):
    """``storages`` bytes: ``records`` = [(key, location, numel, data bytes)]."""
    out = old_torch.dump(len(records))
    for key, location, numel, body in records:
        out += old_torch.dump((key, location, F32)) + struct.pack(order + "q", numel) + body
    if views is not None:
        out += old_torch.dump(views)
    return out


def tensors_member(records, order="<"):
    """``tensors`` bytes: ``records`` = [(key, storage key, shape, stride, offset)]."""
    out = old_torch.dump(len(records))
    for key, storage, shape, stride, offset in records:
        out += old_torch.dump((key, storage, Global("torch", "FloatTensor")))
        out += struct.pack(order + "i", len(shape)) + b"\0" * 4
        out += struct.pack(f"{order}{2 * len(shape) + 1}q", *shape, *stride, offset)
    return out


@pytest.mark.parametrize("kind,what", [
    (tarfile.SYMTYPE, "symbolic link"), (tarfile.LNKTYPE, "hard link"),
    (tarfile.CHRTYPE, "character device"), (tarfile.BLKTYPE, "block device"),
    (tarfile.DIRTYPE, "directory"), (tarfile.FIFOTYPE, "FIFO"),
])
def test_tar_members_must_be_regular_files(tmp_path, kind, what):
    parts = tar_members(old_tar(tmp_path))
    members = [member(n, b) for n, b in parts.items() if n != "storages"]
    members.append(member("storages", kind=kind, linkname="/etc/passwd"))
    refused(tar_of(members), match=f"storages.* is an? {what}, not a regular file")


def test_tar_structure_attacks(tmp_path):
    data = old_tar(tmp_path)
    parts = tar_members(data)
    every = [member(n, b) for n, b in parts.items()]
    refused(tar_of(every + [member("storages", parts["storages"])]), match="appears twice")
    refused(tar_of(every + [member("../evil", b"x")]), match="unexpected TAR member")
    refused(tar_of(every[:-1]), match="lacks member")
    # A PAX header bomb: one extended header far beyond what any torch file carries.
    bomb = [member("sys_info", parts["sys_info"], pax_headers={"comment": "A" * 5_000_000})]
    refused(tar_of(bomb + every[1:]), match="PAX header of")
    refused(tar_of(every, pax_headers={"comment": "x"}), match="global PAX header")
    # A member whose size runs past the end of the file (header says 1 MB, file is small).
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        at = tar.getmembers()[-1].offset_data - 512      # its own header, after the PAX one
    header = bytearray(data[at:at + 512])
    header[124:136] = b"%011o\0" % (1 << 20)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    refused(data[:at] + bytes(header) + data[at + 512:], match="runs past the end")
    damaged = bytearray(data)
    damaged[100] ^= 0x01                              # the first header's mode: checksum
    refused(bytes(damaged), match="checksum")


def test_tar_tables_are_checked(tmp_path):
    data = old_tar(tmp_path)
    tensor = object()                             # pickled as the tensor table's key 77
    sd = old_torch.ordered_dict([("w", tensor)])
    pickle_member = old_torch.dump(sd, lambda x: "77" if x is tensor else None)
    good_storage = storages_member([(5, "cpu", 4, b"\0" * 16)], views=[])
    cases = [
        # storage view past its root
        (dict(storages=storages_member([(5, "cpu", 4, b"\0" * 16)], views=[(6, 5, 2, 3)]),
              tensors=tensors_member([(77, 6, (3,), (1,), 0)]), pickle=pickle_member),
         "exceeds root"),
        # a view reusing a storage's key
        (dict(storages=storages_member([(5, "cpu", 4, b"\0" * 16)], views=[(5, 5, 0, 2)])),
         "reuses a storage key"),
        # unknown storage key
        (dict(storages=good_storage, tensors=tensors_member([(77, 9, (4,), (1,), 0)]),
              pickle=pickle_member), "unknown storage 9"),
        # pickle names a tensor that is not in the table
        (dict(storages=good_storage, tensors=tensors_member([(78, 5, (4,), (1,), 0)]),
              pickle=pickle_member), "not in the tensor table"),
        # negative and absurd counts
        (dict(storages=old_torch.dump(-1)), "storage count is -1"),
        (dict(storages=storages_member([(5, "cpu", -4, b"")])), "has -4 elements"),
        (dict(storages=storages_member([(5, "cpu", 1 << 61, b"\0" * 16)])),
         "needs 9223372036854775808 bytes"),
        (dict(storages=good_storage, tensors=old_torch.dump(1) + old_torch.dump(
            (77, 5, Global("torch", "FloatTensor"))) + struct.pack("<i", 1 << 30) + bytes(4)),
         "dimensions"),
        (dict(storages=good_storage, tensors=tensors_member([(77, 5, (1 << 40,), (1,), 0)]),
              pickle=pickle_member), "reaches element"),
        (dict(storages=good_storage + b"junk"), "unexpected bytes after the storage views"),
        (dict(storages=old_torch.dump(1) + old_torch.dump((5, "cpu", Global("os", "system")))),
         "refusing global 'os.system'"),
        (dict(storages=storages_member([(5, "tpu:0", 4, b"\0" * 16)], views=[])), "location"),
        (dict(sys_info=old_torch.dump([1, 2])), "sys_info is a list"),
    ]
    for replace, match in cases:
        refused(rebuilt(data, **replace), match=match)


def test_tar_budget_is_shared_by_all_pickles(tmp_path):
    """One pickle per record: a file cannot escape the opcode limit by splitting its work."""
    arrays = {f"w{i}": np.zeros(1, np.float32) for i in range(300)}
    data = old_tar(tmp_path, old_torch.ordered_dict(
        (k, Tensor.of(v)) for k, v in arrays.items()))
    used = Budget()
    assert len(read_checkpoint(data, budget=used).state_dict) == 300
    assert used.ops < 30 * 300                    # ~25 opcodes per tensor over four members
    with pytest.raises(CheckpointError, match="more than 2000 opcodes in this file"):
        read_checkpoint(data, budget=Budget(max_ops=2000))


def test_legacy_stream_attacks(tmp_path):
    state = old_torch.ordered_dict([("w", Tensor(Storage(np.arange(8, dtype=np.float32)),
                                                 (8,)))])
    old_torch.save_legacy(state, tmp_path / "l.pth")
    good = (tmp_path / "l.pth").read_bytes()
    count_at = good.rindex(struct.pack("<q", 8))
    refused(good[:count_at] + struct.pack("<q", -8) + good[count_at + 8:],
            match="holds -8 elements, the pickle says 8")
    refused(good[:count_at] + struct.pack("<q", 1 << 62) + good[count_at + 8:],
            match="holds 4611686018427387904 elements")
    refused(good + b"\0", match="unexpected bytes after the storages")
    refused(good[:-4], match="truncated")
    # a storage view past its root, an unknown storage key, a wrong protocol number
    view = old_torch.ordered_dict([("w", Tensor(Storage(np.zeros(8, np.float32)).view(6, 2),
                                                (2,)))])
    old_torch.save_legacy(view, tmp_path / "v.pth")
    viewed = (tmp_path / "v.pth").read_bytes()
    assert numres.load_pth(viewed)["w"].shape == (2,)
    refused(viewed.replace(b"K\x06K\x02", b"K\x07K\x02", 1), match="exceeds its root")
    key = good[good.index(b"U\x0e") + 2:good.index(b"U\x0e") + 16]
    refused(good.replace(key, b"1" * len(key), 1), match="does not match the storages")
    refused(good.replace(b"M\xe9\x03", b"M\xe8\x03", 1), match="legacy protocol 1000")


def test_zip_overlapping_members():
    """A central-directory entry pointing at a local header hidden inside another member's
    data: both names check out, but the bytes of one member are part of another."""
    pkl = state_dict_pickle([("w", zip_pid("0", 2), (2,), (1,), 0)])
    name = b"archive/data/0"
    nested = b"PK\x03\x04" + struct.pack("<HHHHHIIIHH", 20, 0, 0, 0, 0, 0, 8, 8, len(name), 0) \
        + name + bytes(8)
    data = bytearray(make_zip(pkl, {"0": bytes(8)}, extra=[("archive/data/1", nested)]))
    assert numres.load_pth(bytes(data))["w"].shape == (2,)      # valid before the change
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
        hidden = z.getinfo("archive/data/1")
    nested_at = hidden.header_offset + 30 + len(hidden.filename) + len(hidden.extra)
    assert data[nested_at:nested_at + 4] == b"PK\x03\x04"
    at = 0
    while True:                                   # data/0's central directory entry
        at = data.index(b"PK\x01\x02", at + 1)
        size = struct.unpack("<H", data[at + 28:at + 30])[0]
        if data[at + 46:at + 46 + size] == name:
            break
    data[at + 42:at + 46] = struct.pack("<I", nested_at)
    refused(bytes(data), match="overlap")


@pytest.mark.parametrize("depth", [40, 400])
def test_self_nesting_tuples_cost_nothing(depth):
    """DUP builds a tuple holding itself twice per level: its repr and hash double each level
    (an 85-byte file would run for days). Refused at once: error messages use a bounded
    preview, and tuples are never dict keys."""
    nested = b"\x80\x02)" + b"2\x86" * depth
    refused(zip_with_pickle(nested + b"Q."), match="unexpected persistent id")
    refused(zip_with_pickle(b"\x80\x02}" + nested[2:] + b"Ns."), match="dict key of type tuple")
    ordered = P().proto().glob("collections", "OrderedDict").raw(b"]")
    ordered.raw(nested[2:]).raw(b"N\x86a\x85R.")
    refused(zip_with_pickle(ordered.bytes), match="OrderedDict key of type tuple")


def test_tar_view_of_a_view(tmp_path):
    views = [(6, 5, 0, 3), (7, 6, 0, 2)]                 # 7 views 6, which views root 5
    data = rebuilt(old_tar(tmp_path),
                   storages=storages_member([(5, "cpu", 4, b"\0" * 16)], views=views))
    refused(data, match="storage view 7 is a view of view 6")
