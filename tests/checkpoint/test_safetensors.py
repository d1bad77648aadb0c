"""numres reads safetensors files exactly as the reference library writes them, and refuses
every malformed one with a CheckpointError, quickly and with bounded memory.

Reference files are written by the real ``safetensors`` package (``safetensors.numpy`` and
``safetensors.torch``); the hostile ones are built byte by byte here.
"""

import json
import struct
import tracemalloc

import numpy as np
import pytest

import numres
from numres import CheckpointError
from numres.checkpoint import _safetensors, read_checkpoint, release_pages

from .craft import refused

st_numpy = pytest.importorskip("safetensors.numpy", reason="safetensors (the reference writer) "
                               "is not installed")

NUMPY_DTYPES = ["bool", "uint8", "int8", "int16", "uint16", "float16", "int32", "uint32",
                "float32", "float64", "int64", "uint64"]


def sample(dtype, shape, seed):
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if np.dtype(dtype).kind == "f":
        # Raw bit patterns, NaNs and infinities included: the comparison is bit for bit.
        bits = rng.integers(0, 256, (int(np.prod(shape)) * np.dtype(dtype).itemsize,), np.uint8)
        return bits.view(dtype).reshape(shape)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def assert_bits_equal(ours, theirs):
    assert list(ours) == list(theirs) or sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        got = ours[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert got.tobytes() == expected.tobytes(), name


def header_file(header, data=b"", raw=None):
    """A safetensors file with this header (a dict, or ``raw`` JSON bytes) and data."""
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def f32_entry(begin, end, shape=(1,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


# -- what the reference writer writes ---------------------------------------------------------
def test_every_numpy_dtype_bit_for_bit(tmp_path):
    tensors = {f"t.{dtype}": sample(dtype, (3, 5), i) for i, dtype in enumerate(NUMPY_DTYPES)}
    tensors["scalar"] = np.array(2.5, np.float32)
    tensors["empty"] = np.zeros((0, 4), np.float32)
    tensors["odd.length.u8"] = np.arange(7, dtype=np.uint8)   # forces padding after it
    path = tmp_path / "weights.safetensors"
    st_numpy.save_file(tensors, path, metadata={"format": "np", "note": "x"})
    ckpt = read_checkpoint(path)
    assert ckpt.format == "safetensors" and ckpt.source == "weights.safetensors"
    assert ckpt.metadata == {"format": "np", "note": "x"}
    assert_bits_equal(ckpt.state_dict, tensors)
    assert_bits_equal(ckpt.state_dict, st_numpy.load_file(path))
    assert ckpt.dtypes["t.float32"] == "Float" and ckpt.dtypes["t.uint8"] == "Byte"
    assert ckpt.dtypes["t.float16"] == "Half" and ckpt.dtypes["t.bool"] == "Bool"
    # The same bytes in memory, and through load_pth (which reads both formats).
    assert_bits_equal(numres.load_pth(path.read_bytes()), tensors)


def test_arrays_are_aligned_copy_on_write_views_of_the_file(tmp_path):
    tensors = {"a": np.arange(1000, dtype=np.float32), "b": np.ones((10, 10), np.float64),
               "c": np.arange(3, dtype=np.uint8)}
    path = tmp_path / "m.safetensors"
    st_numpy.save_file(tensors, path)
    before = path.read_bytes()
    sd = numres.load_pth(path)
    assert all(v.flags.aligned and v.flags.c_contiguous for v in sd.values())
    assert release_pages(sd.values()) == 1          # all of them views of one mapping
    sd["a"][0] = 42.0                                # private to this process
    assert path.read_bytes() == before


def test_torch_writer_bf16_f16_and_metadata(tv, tmp_path):
    torch, _ = tv
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(4, 3, 3, 3, generator=g), "bf": torch.randn(5, 7, generator=g)
             .bfloat16(), "h": torch.randn(6, generator=g).half(),
             "n": torch.tensor(7), "mask": torch.tensor([True, False])}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ckpt = read_checkpoint(tmp_path / "model.safetensors")
    assert ckpt.metadata == {"format": "pt"}
    assert ckpt.dtypes == {"w": "Float", "bf": "BFloat16", "h": "Half", "n": "Long",
                           "mask": "Bool"} or sorted(ckpt.dtypes.items()) == sorted(
        {"w": "Float", "bf": "BFloat16", "h": "Half", "n": "Long", "mask": "Bool"}.items())
    sd = ckpt.state_dict
    # bfloat16 widened to float32 exactly, as for .pth files.
    assert sd["bf"].dtype == np.float32
    np.testing.assert_array_equal(sd["bf"], state["bf"].float().numpy())
    for name in ("w", "h", "n", "mask"):
        assert sd[name].dtype == state[name].numpy().dtype
        np.testing.assert_array_equal(sd[name], state[name].numpy())
    assert sd["n"].shape == ()


def test_eight_bit_floats_are_refused_by_name(tv, tmp_path):
    torch, _ = tv
    from safetensors.torch import save_file
    save_file({"q": torch.zeros(4).to(torch.float8_e4m3fn)}, tmp_path / "f8.safetensors")
    with pytest.raises(CheckpointError, match="'q': dtype F8_E4M3 .* not supported"):
        numres.load_pth(tmp_path / "f8.safetensors")


def test_a_model_round_trips(tmp_path):
    model = numres.resnet18(num_classes=10, backend="numpy")
    st_numpy.save_file(model.state_dict(), tmp_path / "r18.safetensors")
    loaded = numres.resnet18(weights=str(tmp_path / "r18.safetensors"), num_classes=10,
                             backend="numpy")
    for name, value in model.state_dict().items():
        assert loaded.state_dict()[name].tobytes() == value.tobytes(), name


def test_unaligned_tensors_are_copied_aligned():
    # Not what the reference writer makes (it pads the header to 8 bytes), but it reads it.
    header = json.dumps({"a": f32_entry(0, 8, (2,))}).encode()        # length 51: odd
    assert len(header) % 8
    values = np.array([1.5, -2.25], np.float32)
    data = header_file(None, values.tobytes(), raw=header)
    sd = numres.load_pth(data)
    assert sd["a"].flags.aligned
    np.testing.assert_array_equal(sd["a"], values)
    np.testing.assert_array_equal(st_numpy.load(data)["a"], values)


def test_offsets_in_any_order_and_padded_header_are_read():
    # The reference sorts entries by offset and allows JSON whitespace after the object.
    header = {"second": f32_entry(4, 8), "first": f32_entry(0, 4)}
    text = json.dumps(header).encode() + b" \t\n"
    data = header_file(None, np.array([1, 2], np.float32).tobytes(), raw=text)
    sd = numres.load_pth(data)
    assert (sd["first"][0], sd["second"][0]) == (1.0, 2.0)
    assert st_numpy.load(data)["second"][0] == 2.0


# -- hostile and damaged files -----------------------------------------------------------------
def reference_refuses(data):
    try:
        st_numpy.load(data)
    except Exception:       # SafetensorError, or KeyError for dtypes numpy lacks
        return True
    return False


F4 = np.zeros(1, np.float32).tobytes()
HOSTILE = {
    "header length past the end": (struct.pack("<Q", 1000) + b'{"a":1}', "runs past the end"),
    "header length 2**63": (struct.pack("<Q", 1 << 63) + b"{}", "runs past the end"),
    "header length 2**64-1": (struct.pack("<Q", (1 << 64) - 1) + b"{" * 64, "past the end"),
    "invalid JSON": (header_file(None, raw=b'{"a": {"dtype": "F32",'), "not valid JSON"),
    "not UTF-8": (header_file(None, raw=b'{"\xff\xfe": 1}'), "not UTF-8"),
    "NaN literal": (header_file(None, raw=b'{"a": NaN}'), "not valid JSON"),
    "header is a list": (header_file([1, 2]), "not a PyTorch checkpoint"),
    "entry not an object": (header_file({"a": [0, 4]}, F4), "must be an object"),
    "entry without dtype": (header_file({"a": {"shape": [1], "data_offsets": [0, 4]}}, F4),
                            "no 'dtype'"),
    "unknown dtype": (header_file({"a": f32_entry(0, 4, dtype="F31")}, F4), "unknown dtype"),
    "dtype not a string": (header_file({"a": f32_entry(0, 4, dtype=["F32"])}, F4),
                           "unknown dtype"),
    "negative dimension": (header_file({"a": f32_entry(0, 4, (-1,))}, F4), "negative"),
    "float dimension": (header_file({"a": f32_entry(0, 4, (1.0,))}, F4), "list of integers"),
    "bool dimension": (header_file({"a": f32_entry(0, 4, (True,))}, F4), "list of integers"),
    "40 dimensions": (header_file({"a": f32_entry(0, 4, (1,) * 40)}, F4), "dimensions"),
    "huge shape": (header_file({"a": f32_entry(0, 4, (1 << 40, 1 << 40))}, F4), "needs"),
    "shape * itemsize != size": (header_file({"a": f32_entry(0, 4, (2,))}, F4), "needs 8"),
    "begin > end": (header_file({"a": f32_entry(4, 0, (0,))}, F4), "end before"),
    "three offsets": (header_file({"a": {"dtype": "F32", "shape": [1],
                                         "data_offsets": [0, 4, 8]}}, F4), "data_offsets"),
    "negative offset": (header_file({"a": f32_entry(-4, 0, (1,))}, F4), "data_offsets"),
    "overlapping": (header_file({"a": f32_entry(0, 4), "b": f32_entry(0, 4)}, F4),
                    "overlaps"),
    "gap": (header_file({"a": f32_entry(4, 8)}, F4 * 2), "gap"),
    "offsets past the end": (header_file({"a": f32_entry(0, 4), "b": f32_entry(4, 4 + (1 << 40),
                                          (1 << 38,))}, F4), "truncated"),
    "bytes after the last tensor": (header_file({"a": f32_entry(0, 4)}, F4 + b"junk"),
                                    "after the last tensor"),
    "duplicate tensor": (header_file(None, F4, raw=b'{"a": {"dtype": "F32", "shape": [1], '
                                     b'"data_offsets": [0, 4]}, "a": {"dtype": "F32", '
                                     b'"shape": [1], "data_offsets": [0, 4]}}'), "repeats"),
    "duplicate field": (header_file(None, F4, raw=b'{"a": {"dtype": "F32", "dtype": "F64", '
                                    b'"shape": [1], "data_offsets": [0, 4]}}'), "repeats"),
    "metadata not a mapping": (header_file({"__metadata__": ["x"]}), "__metadata__"),
    "metadata value not a string": (header_file({"__metadata__": {"k": 1}}), "__metadata__"),
    "metadata nested": (header_file({"__metadata__": {"k": {"x": "y"}}}), "__metadata__"),
}
# Where numres is stricter than the reference, which keeps the last of duplicate keys
# silently and takes any number of dimensions (numres: 32, as for .pth files).
STRICTER = {"duplicate tensor", "duplicate field", "40 dimensions"}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file_is_refused(case):
    data, match = HOSTILE[case]
    # "{" after the length makes bytes a safetensors file; a header that is not an object
    # cannot start with it, and is refused as no known format.
    assert _safetensors.is_safetensors(data) == (case != "header is a list")
    message = refused(data, match)
    assert "<bytes>" in message or case == "header is a list"
    if case not in STRICTER:
        assert reference_refuses(data), f"the reference library reads {case!r}"


def test_header_over_the_limit_is_refused_unread():
    size = _safetensors.MAX_HEADER_BYTES + 8
    data = struct.pack("<Q", size) + b"{" + b" " * (size - 1)
    refused(data, "over numres's limit")


def test_json_amplification_is_bounded():
    # 12 MB of [0,0,...] would take ~300 MB as Python objects; it is refused before parsing.
    body = b"[" + b"0," * (6 << 20) + b"0]"
    refused(header_file(None, raw=b'{"a":' + body + b"}"), "JSON values")
    # Deep nesting under the value limit: the parser's recursion guard, not a crash.
    deep = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    refused(header_file(None, raw=deep), "not valid JSON")


def test_largest_headers_stay_bounded():
    """Under both limits, what the header can make Python build stays far below 100 MB."""
    text = b'{"__metadata__": {"k": "' + b"x" * (_safetensors.MAX_HEADER_BYTES - 64) + b'"}}'
    tracemalloc.start()
    try:
        assert len(numres.read_checkpoint(header_file(None, raw=text)).metadata["k"]) > 1e7
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 100 << 20
    # As many entries as the value limit lets through, each a small object: refused (not a
    # tensor entry) within the bound.
    n = _safetensors.MAX_HEADER_VALUES // 3 - 10
    many = b"{" + b",".join(b'"%032d":{}' % i for i in range(n)) + b"}"
    refused(header_file(None, raw=many), "entry has no 'dtype'")


def test_truncated_and_corrupted_reference_files(tmp_path):
    tensors = {"w": sample("float32", (64, 64), 0), "b": sample("float16", (64,), 1)}
    data = st_numpy.save(tensors)
    for cut in (9, 20, len(data) // 2, len(data) - 1):
        refused(data[:cut])
    rng = np.random.default_rng(0)
    outcomes = set()
    for _ in range(60):
        damaged = bytearray(data)
        for i in rng.integers(8, 8 + struct.unpack("<Q", data[:8])[0], 2):   # the header
            damaged[i] = rng.integers(0, 256)
        try:
            numres.load_pth(bytes(damaged))
            outcomes.add("read")
        except CheckpointError:
            outcomes.add("refused")
    assert "refused" in outcomes
