"""Hostile and damaged files: every one is a CheckpointError, quickly, with bounded memory, and
nothing from the file ever runs."""

import io
import pickle
import struct
import tarfile
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

import numres
from numres import CheckpointError

from . import craft
from .craft import P, make_zip, state_dict_pickle, zip_pid


def refused(data, match=None):
    """Load ``data``; assert it is refused fast and without a large allocation.

    Timed and memory-traced in two separate loads: tracing slows Python ~5x (the 3-million
    opcode flood: 0.7 s plain, 3.7-5.3 s traced), so a traced time says little."""
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=match) as info:
        numres.load_pth(data)
    assert time.perf_counter() - start < 5.0
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=match):
            numres.load_pth(data)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 100 << 20, f"refusing the file allocated {peak} bytes"
    return str(info.value)


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


def test_truncated_tar():
    data = craft.make_tar([("w", 1, np.ones(100, np.float32), (100,), (1,), 0)])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        starts = {m.name: m.offset_data for m in tar.getmembers()}
    for cut in (600, starts["storages"] + 100, starts["tensors"] + 30):
        refused(data[:cut])
