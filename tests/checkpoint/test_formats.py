"""numres.load_pth reads what torch writes, in all three formats, exactly."""

import sys

import numpy as np
import pytest

import numres
from numres import CheckpointError
from numres.checkpoint import read_checkpoint, release_pages

from . import craft, old_torch
from .old_torch import Tensor


def torch_state(torch):
    """A state dict with the awkward cases: shared storages, transposes, views, dtypes."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "transposed": base.t(),                      # non-contiguous strides
        "row_view": base[2],                         # shares base's storage, offset 16
        "base": base,
        "strided": base[:, ::2],                     # every other column
        "expanded": torch.arange(3.0).expand(4, 3),  # stride 0
        "half": torch.randn(5, generator=g).half(),
        "double": torch.randn(2, 2, generator=g).double(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "count": torch.tensor(7),                    # 0-d int64, like num_batches_tracked
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "empty": torch.zeros(0, 4),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
    }


def assert_same(ours, theirs):
    assert list(ours) == list(theirs)
    for name, t in theirs.items():
        t = t.detach()
        expected = t.float().numpy() if t.dtype.is_floating_point and t.itemsize == 2 and \
            str(t.dtype) == "torch.bfloat16" else t.numpy()
        got = ours[name]
        assert got.shape == tuple(t.shape), name
        assert got.dtype == expected.dtype, name
        np.testing.assert_array_equal(got, expected, err_msg=name)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reads_torch_save(tv, tmp_path, zip_format):
    torch, _ = tv
    state = torch_state(torch)
    path = tmp_path / "model.bin"  # no .pth: the format comes from the bytes
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    ckpt = read_checkpoint(path)
    assert ckpt.format == ("zip" if zip_format else "legacy")
    assert_same(ckpt.state_dict, state)
    assert ckpt.dtypes["bf16"] == "BFloat16"


def test_contiguous_tensors_are_views_of_the_file(tv, tmp_path):
    torch, _ = tv
    torch.save({"w": torch.randn(256, 256)}, tmp_path / "w.pth")
    w = numres.load_pth(tmp_path / "w.pth")["w"]
    # Zero copy: the array's memory is the file's mapping, not a private array.
    assert not w.flags.owndata
    assert w.flags.writeable
    w[0, 0] = 123.0                                   # copy-on-write: the file is unchanged
    assert numres.load_pth(tmp_path / "w.pth")["w"][0, 0] != 123.0


def test_reads_bytes_and_any_archive_folder_name(tv, tmp_path):
    torch, _ = tv
    state = {"a": torch.arange(6.0).reshape(2, 3)}
    torch.save(state, tmp_path / "some-odd.name.pth")
    data = (tmp_path / "some-odd.name.pth").read_bytes()
    assert_same(numres.load_pth(data), state)
    crafted = craft.simple_zip({"a": np.arange(6.0, dtype=np.float32).reshape(2, 3)},
                               prefix="whatever_folder")
    assert_same(numres.load_pth(crafted), state)


def test_training_checkpoint_nests_the_state_dict(tv, tmp_path):
    torch, _ = tv
    torch.save({"epoch": 3, "state_dict": {"w": torch.ones(2)}, "lr": 0.1}, tmp_path / "c.pth")
    sd = numres.load_pth(tmp_path / "c.pth")
    assert list(sd) == ["w"] and sd["w"].tolist() == [1.0, 1.0]


def test_torch_refuses_tar_with_weights_only_but_numres_reads_it(tv, tmp_path):
    # More on the TAR and legacy formats, from ports of the old writers: test_old_writers.py.
    torch, _ = tv
    old_torch.save_tar(old_torch.ordered_dict([("w", Tensor.of(np.ones(3, np.float32)))]),
                       tmp_path / "old.pth")
    with pytest.raises(Exception, match="legacy .tar format"):
        torch.load(tmp_path / "old.pth", weights_only=True)
    assert numres.load_pth(tmp_path / "old.pth")["w"].tolist() == [1.0, 1.0, 1.0]


def test_save_pth_roundtrip_through_torch(tv, tmp_path):
    torch, _ = tv
    sd = {"w": np.arange(12, dtype=np.float32).reshape(3, 4).T, "n": np.array(3, np.int64),
          "h": np.ones(2, np.float16)}
    numres.save_pth(sd, tmp_path / "out.pth")
    back = torch.load(tmp_path / "out.pth", weights_only=True)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k].numpy(), v)
        assert back[k].numpy().dtype == v.dtype
    assert_same(numres.load_pth(tmp_path / "out.pth"), back)


def test_save_pth_refuses_unsupported_dtype(tmp_path):
    with pytest.raises(CheckpointError, match="complex64"):
        numres.save_pth({"z": np.zeros(2, np.complex64)}, tmp_path / "z.pth")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_missing_empty_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        numres.load_pth(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        numres.load_pth(tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="directory"):
        numres.load_pth(tmp_path)
    (tmp_path / "text.pth").write_text("hello, I am not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        numres.load_pth(tmp_path / "text.pth")


def test_release_pages_keeps_values_and_modifications(tmp_path):
    """Reclaiming the file's pages changes no array: unmodified pages come back from the
    file, modified (copy-on-write) ones are never dropped."""
    rng = np.random.default_rng(0)
    path = tmp_path / "w.pth"
    saved = {"a": rng.standard_normal((256, 300)).astype(np.float32),
             "b": rng.standard_normal(5000).astype(np.float32)}
    numres.save_pth(saved, path)
    sd = numres.load_pth(path)
    sd["b"][:10] = 7.0
    assert release_pages(sd.values()) == (1 if sys.platform.startswith("linux") else 0)
    np.testing.assert_array_equal(sd["a"], saved["a"])
    np.testing.assert_array_equal(sd["b"][:10], 7.0)
    np.testing.assert_array_equal(sd["b"][10:], saved["b"][10:])
    assert release_pages([np.zeros(3, np.float32)]) == 0       # not from a file
