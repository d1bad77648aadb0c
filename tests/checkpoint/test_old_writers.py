"""Files as torch 0.1 (TAR) and 0.2-0.3 (legacy stream) wrote them, under Python 2.

The files come from ports of the historical writers (``old_torch.py``, with its sources), not
from numres's reading of the formats. Where torch 2.x can still read a file, numres's arrays
must equal torch's bit for bit; torch runs those files' pickles (``weights_only=False``), so it
reads them in a child process with an empty environment and its own working folder.
"""

import io
import os
import pickletools
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest

import numres
from numres.checkpoint import read_checkpoint

from . import old_torch
from .old_torch import Storage, Tensor, ordered_dict

pytest.importorskip("torch", reason="torch is not installed (reference reader)")

_TORCH_READER = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    for src, dst in zip(sys.argv[1::2], sys.argv[2::2]):
        try:
            obj = torch.load(src, map_location="cpu", weights_only=False)
            np.savez(dst, **{k: v.numpy() for k, v in obj.items()})
        except Exception as exc:
            with open(dst + ".error", "w") as f:
                f.write(f"{type(exc).__name__}: {exc}")
""")


def torch_reads(tmp_path, *paths):
    """torch's own reading of each file: {name: array} in file order, or the error text."""
    out = tmp_path / "torch-read"
    out.mkdir(exist_ok=True)
    args = []
    for i, path in enumerate(paths):
        args += [str(path), str(out / f"{i}.npz")]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(out)}
    subprocess.run([sys.executable, "-c", _TORCH_READER, *args], cwd=out, env=env, check=True,
                   timeout=600)
    results = []
    for i in range(len(paths)):
        error = out / f"{i}.npz.error"
        if error.exists():
            results.append(error.read_text())
            continue
        with np.load(out / f"{i}.npz") as z:
            results.append({k: z[k] for k in z.files})
    return results


def assert_bitwise_equal(got, expected):
    assert list(got) == list(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype, name
        assert got[name].shape == want.shape, name
        assert got[name].tobytes() == np.ascontiguousarray(want).tobytes(), name


def resnet18_arrays(seed=0):
    """torchvision resnet18's names and shapes with random values, as 2017 files held them
    (no ``num_batches_tracked``)."""
    rng = np.random.default_rng(seed)
    shapes = {k: v.shape for k, v in numres.resnet18(backend="numpy").state_dict().items()}
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def tar_member(path, name):
    with tarfile.open(path) as tar:
        return tar.extractfile(name).read()


def opcode_names(pickle_bytes):
    return {op.name for op, _, _ in pickletools.genops(pickle_bytes)}


def test_2017_resnet18_saved_from_gpu(tmp_path):
    """The shape of resnet18-5c106cde.pth: a state dict of CUDA tensors, torch 0.1, Python 2."""
    arrays = resnet18_arrays()
    path = tmp_path / "resnet18-5c106cde.pth"
    old_torch.save_tar(ordered_dict((k, Tensor.of(v, "cuda:0")) for k, v in arrays.items()),
                       path)
    # The test covers what the old writers really emitted:
    raw = path.read_bytes()
    assert raw.count(b"././@PaxHeader") == 4                  # float mtimes -> PAX headers
    assert b"protocol_version" in tar_member(path, "sys_info")
    assert {"SHORT_BINSTRING", "BINPERSID", "LONG_BINPUT", "APPENDS", "REDUCE"} <= \
        opcode_names(tar_member(path, "pickle"))
    storages = tar_member(path, "storages")
    assert b"cuda:0" in storages and b"ctorch\nFloatStorage" in storages
    assert b"ctorch.cuda\nFloatTensor" in tar_member(path, "tensors")
    assert b"\nI9" in tar_member(path, "tensors")             # 64-bit keys as text INT

    ckpt = read_checkpoint(path)
    assert ckpt.format == "tar"
    assert_bitwise_equal(ckpt.state_dict, arrays)
    [theirs] = torch_reads(tmp_path, path)
    assert_bitwise_equal(ckpt.state_dict, theirs)
    model = numres.resnet18(weights=str(path), backend="numpy")
    for name, value in arrays.items():
        np.testing.assert_array_equal(model.state_dict()[name], value)


def shared_storage_state(device):
    """Tensors sharing one storage at offsets, transposed, and through storage views."""
    base = Storage(np.arange(48, dtype=np.float32) * 0.5, device)
    view = base.view(30, 12)                                   # elements 30..41
    other = Storage(np.arange(7, dtype=np.float64) - 3, device)
    state = ordered_dict([
        ("conv.weight", Tensor(base, (2, 3, 2, 2))),
        ("fc.weight", Tensor(base, (4, 6), stride=(1, 4), offset=24)),
        ("on_view", Tensor(view, (10,), offset=0)),
        ("on_view_2d", Tensor(view, (2, 3), stride=(3, 1), offset=2)),
        ("double", Tensor(other, (7,))),
        ("bytes", Tensor.of(np.arange(5, dtype=np.uint8), device)),
    ])
    flat = np.arange(48, dtype=np.float32) * 0.5
    expected = {
        "conv.weight": flat[:24].reshape(2, 3, 2, 2),
        "fc.weight": np.lib.stride_tricks.as_strided(flat[24:], (4, 6), (4, 16)).copy(),
        "on_view": flat[30:40],
        "on_view_2d": flat[32:38].reshape(2, 3),
        "double": np.arange(7, dtype=np.float64) - 3,
        "bytes": np.arange(5, dtype=np.uint8),
    }
    return state, expected


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_tar_shared_storages_and_views_equal_torch(tmp_path, device):
    state, expected = shared_storage_state(device)
    path = tmp_path / "shared.pth"
    old_torch.save_tar(state, path)
    assert old_torch.dump([]) in tar_member(path, "storages") or \
        b"(" in tar_member(path, "storages")                  # a views list was written
    got = numres.load_pth(path)
    assert_bitwise_equal(got, expected)
    [theirs] = torch_reads(tmp_path, path)
    assert_bitwise_equal(got, theirs)


def test_first_tar_writers(tmp_path):
    """The first 0.1 releases: (key, type) storage records, (key, type, storage) tensor
    records, no views list. torch 2.x cannot read these; the values are checked instead."""
    base = Storage(np.arange(12, dtype=np.float32), "cuda:0")
    state = ordered_dict([("a", Tensor(base, (3, 4))), ("b", Tensor(base, (2,), offset=10)),
                          ("c", Tensor.of(np.ones(3, np.int64)))])
    path = tmp_path / "early.pth"
    old_torch.save_tar(state, path, early=True)
    got = numres.load_pth(path)
    assert_bitwise_equal(got, {"a": np.arange(12, dtype=np.float32).reshape(3, 4),
                               "b": np.array([10, 11], np.float32),
                               "c": np.ones(3, np.int64)})


def test_tar_from_a_big_endian_machine(tmp_path):
    """0.1 wrote counts, geometry and data in the machine's order, which sys_info records."""
    state, expected = shared_storage_state("cpu")
    path = tmp_path / "be.pth"
    old_torch.save_tar(state, path, byteorder=">", padding=b"\xde\xad\xbe\xef")
    assert b"\x00\x00\x00\x00\x00\x00\x00\x30" in tar_member(path, "storages")  # 48, big-endian
    got = numres.load_pth(path)
    assert_bitwise_equal(got, expected)
    assert all(a.dtype.isnative for a in got.values())


def test_tar_metadata_padding_is_never_read(tmp_path):
    state, expected = shared_storage_state("cpu")
    path = tmp_path / "pad.pth"
    old_torch.save_tar(state, path, padding=b"\xde\xad\xbe\xef")   # struct padding, any bytes
    assert_bitwise_equal(numres.load_pth(path), expected)


def legacy_state(device):
    base = Storage(np.linspace(-1, 1, 40, dtype=np.float32), device)
    view = base.view(8, 16)
    arrays = resnet18_arrays(seed=1)
    items = [(k, Tensor.of(v, device)) for k, v in list(arrays.items())[:12]]
    items += [("shared.a", Tensor(base, (5, 8))),
              ("shared.b", Tensor(base, (8, 5), stride=(1, 8))),
              ("view", Tensor(view, (4, 4))),
              ("view.offset", Tensor(view, (6,), offset=3))]
    flat = np.linspace(-1, 1, 40, dtype=np.float32)
    expected = dict(list(arrays.items())[:12])
    expected.update({"shared.a": flat.reshape(5, 8), "shared.b": flat.reshape(5, 8).T.copy(),
                     "view": flat[8:24].reshape(4, 4), "view.offset": flat[11:17]})
    return ordered_dict(items), expected


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_legacy_stream_of_torch_02_equals_torch(tmp_path, device):
    state, expected = legacy_state(device)
    path = tmp_path / "legacy.pth"
    old_torch.save_legacy(state, path)
    assert b"ctorch._utils\n_rebuild_tensor\n" in path.read_bytes()     # v1, not _v2
    ckpt = read_checkpoint(path)
    assert ckpt.format == "legacy"
    assert_bitwise_equal(ckpt.state_dict, expected)
    [theirs] = torch_reads(tmp_path, path)
    assert_bitwise_equal(ckpt.state_dict, theirs)


def test_legacy_stream_from_a_big_endian_machine(tmp_path):
    """Storage data is little-endian from every writer of this format; the element count was
    the machine's order in 0.2-0.3 and little-endian later. Both read; torch reads the latter
    the same way."""
    state, expected = legacy_state("cpu")
    native_count = tmp_path / "be-native-count.pth"
    old_torch.save_legacy(state, native_count, byteorder=">")
    little_count = tmp_path / "be-little-count.pth"
    old_torch.save_legacy(state, little_count, byteorder=">", count_order="<")
    assert_bitwise_equal(numres.load_pth(native_count), expected)
    got = numres.load_pth(little_count)
    assert_bitwise_equal(got, expected)
    [theirs] = torch_reads(tmp_path, little_count)
    assert_bitwise_equal(got, theirs)


def test_python2_pickler_port_matches_cpython_for_what_both_can_write():
    """The port's opcode choices equal Python 3's protocol-2 pickler wherever Python 2 and 3
    agree (ints, bools, None, tuples, lists, dicts; not str, which Python 3 writes as
    unicode), so the port is no freer than the real pickler."""
    import pickle
    for obj in [5, 300, 70000, -2, None, True, (1, 2), (1, 2, 3, 4), [], [1], [1, 2],
                {1: 2}, {1: 2, 3: [4, 5]}, [(1,), [2, (3, 4)]], list(range(2500))]:
        assert old_torch.dump(obj) == pickle.dumps(obj, protocol=2), obj
    assert pickle.loads(old_torch.dump(2 ** 40)) == 2 ** 40             # text INT
    assert pickle.loads(old_torch.dump(old_torch.MAGIC_NUMBER)) == 0x1950A86A20F9469CFC6C
    assert io.BytesIO(old_torch.dump("key")).read()[2:3] == b"U"        # SHORT_BINSTRING
