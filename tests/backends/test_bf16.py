"""``NumbaBackend(precision="bfloat16")``: bf16 pairs (``numres/backends/numba/pairs.py``).

The oracle of a bf16 convolution is the float64 convolution of the bf16-rounded input and
weights: each product of two bf16 values is exact in float32 (``vdpbf16ps`` treats bf16
denormals as zero; these random operands have none), only the float32 sums round. So each
convolution is held to float32's tolerance against it, which float32 arithmetic on the
unrounded operands misses by far (about 4e-3 of the output's scale).
"""

import numpy as np
import pytest

from numres import BackendUnavailable

from .conv_cases import CONV_CASES, case_id, reference_conv, run_conv

numba = pytest.importorskip("numres.backends.numba", reason="Numba is not installed")
from numres.backends.numba import grouped, pairs, tile  # noqa: E402
from numres.backends.numba.paths import ConvPath  # noqa: E402

needs_bf16 = pytest.mark.skipif(not (tile.AVAILABLE and pairs.supported()),
                                reason="this CPU has no AVX512_BF16 (vdpbf16ps)")


def bf16(a):
    """``a`` rounded to bfloat16, as float32."""
    return pairs.widen(pairs.round_bf16(a))


def test_rounding_is_torchs(tv):
    torch, _ = tv
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 1e3
    x[:8] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -3e38, 3.3961776e38]
    bits = x.view(np.uint32)
    bits[8:12] = [0x7F800001, 0xFFFFFFFF, 0x3F808000, 0x3F818000]   # sNaN, -NaN, ties
    ours = pairs.round_bf16(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(ours[~nan], theirs[~nan])
    assert np.isnan(pairs.widen(ours[nan])).all()


def test_the_kernel_conversion_equals_packing():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((7, 40)) * 50).astype(np.float32)
    x.view(np.uint32)[0, :3] = [0x7F800001, 0x7F800000, 0x00000001]
    out = np.zeros((7, 20), np.uint32)
    pairs.to_pairs(0, 7, x, out)
    np.testing.assert_array_equal(out, pairs.pack(x.T).T)   # pairs along channels
    np.testing.assert_array_equal(pairs.unpack(pairs.pack(x.T), 40), bf16(x.T))


def test_odd_reductions_get_a_zero_row():
    m = np.arange(15, dtype=np.float32).reshape(5, 3)
    packed = pairs.pack(m)
    assert packed.shape == (3, 3)
    np.testing.assert_array_equal(packed[2] >> 16, 0)
    np.testing.assert_array_equal(pairs.unpack(packed, 5), m)


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="precision must be one of"):
        numba.NumbaBackend(precision="float16")


def test_a_cpu_without_bf16_is_told_so(monkeypatch):
    monkeypatch.setattr(pairs, "supported", lambda: False)
    with pytest.raises(BackendUnavailable, match="AVX512_BF16"):
        numba.NumbaBackend(precision="bfloat16")


def test_numbas_target_cpu_decides(monkeypatch):
    """Kernels are compiled for Numba's target CPU, not necessarily the host's."""
    import numba as nb
    monkeypatch.setattr(nb.config, "CPU_NAME", "generic")
    monkeypatch.setattr(nb.config, "CPU_FEATURES", "")
    assert not pairs.supported()
    monkeypatch.setattr(nb.config, "CPU_FEATURES", "+avx512f,+avx512bf16")
    assert pairs.supported()
    monkeypatch.setattr(nb.config, "CPU_FEATURES", "+avx512f,-avx512bf16")
    assert not pairs.supported()


@needs_bf16
def test_blas_cannot_multiply_bf16():
    with pytest.raises(ValueError, match="own_gemm=False"):
        numba.NumbaBackend(precision="bfloat16", own_gemm=False)


@needs_bf16
def test_a_thread_count_keeps_the_precision():
    be = numba.NumbaBackend(precision="bfloat16", winograd=False, split_rows_min=7)
    other = be.with_threads(1)
    assert (other.threads, other.precision, other.winograd, other.tuning.split_rows_min) == \
        (1, "bfloat16", False, 7)


def _uses_pairs(case):
    """Ungrouped convolutions of an even number (>= 16) of channels; grouped ones of an even
    number per group: on the lanes kernel where its groups fill vectors of pairs, else on
    the per-group direct path."""
    n, c, h, w, o, k, s, p, g = case
    if g == 1:
        return c % 2 == 0 and c >= 16
    if grouped.lanes_fit((o, c // g, k, k), g, bf16=True):
        return True
    lanes = grouped.lanes_fit((o, c // g, k, k), g)
    return (c // g) % 2 == 0 and not lanes and o // g <= numba.tuning.Tuning(
        ).grouped_direct_max_width


@needs_bf16
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_each_convolution_is_exact_on_rounded_operands(rng, threads, case):
    """Paired convolutions equal the float64 convolution of the bf16-rounded operands to
    float32 tolerance; the rest (the stem, odd channels and groups) stay float32."""
    n, c, h, w, o, k, s, p, g = case
    be = numba.NumbaBackend(threads=threads, precision="bfloat16")
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = rng.standard_normal((o, c // g, k, k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    paired = _uses_pairs(case)
    assert be.prepare_conv(wt, b, s, p, g).pairs == paired
    exact = reference_conv(bf16(x), bf16(wt), b, s, p, g) if paired \
        else reference_conv(x, wt, b, s, p, g)
    res = rng.standard_normal(exact.shape).astype(np.float32)
    expected = np.maximum(exact + res, 0)
    got = run_conv(be, x, wt, b, s, p, g, relu=True, residual=res)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@needs_bf16
@pytest.mark.parametrize("threads", [1, 2])
def test_a_paired_convolution_fused_with_its_max_pool(rng, threads):
    """``conv2d_max_pool`` on a paired convolution (not ResNet's 3-channel stem: a stem
    of 16 channels) takes the fused path on pairs."""
    be = numba.NumbaBackend(threads=threads, precision="bfloat16")
    x = rng.standard_normal((2, 16, 28, 28)).astype(np.float32)
    wt = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    conv = be.prepare_conv(wt, None, 2, 1, 1)
    act = be.from_nchw(x)
    assert conv.pairs and be.conv_path(act.shape, conv, pooled=True) is ConvPath.STEM
    got = be.to_numpy(be.to_nchw(be.conv2d_max_pool(act, conv, True, 3, 2, 1)))
    y = np.maximum(reference_conv(bf16(x), bf16(wt), None, 2, 1, 1), 0)   # (2, 32, 14, 14)
    pad = np.pad(y, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    pooled = np.max([pad[:, :, i:i + 13:2, j:j + 13:2] for i in range(3) for j in range(3)],
                    axis=0)                                                 # (2, 32, 7, 7)
    np.testing.assert_allclose(got, pooled, rtol=1e-4, atol=1e-4 * np.abs(pooled).max())


@needs_bf16
def test_the_cases_reach_every_paired_path():
    """The cases above run bf16 on the GEMM (as it lies and gathered), the direct path
    (padded and in place), the grouped direct path and the lanes kernel."""
    be = numba.NumbaBackend(precision="bfloat16")
    seen = set()
    for case in CONV_CASES:
        n, c, h, w, o, k, s, p, g = case
        if _uses_pairs(case):
            conv = be.prepare_conv(np.zeros((o, c // g, k, k), np.float32), None, s, p, g)
            path = be.conv_path((n, h, w, c), conv)
            seen.add((path, k == 1 and s == 1, p == 0))
    assert {(ConvPath.GEMM, True, True), (ConvPath.GEMM, False, False),
            (ConvPath.DIRECT, False, False), (ConvPath.DIRECT, False, True),
            (ConvPath.GROUPED_DIRECT, False, False), (ConvPath.GROUPED_LANES, False, False)} \
        <= seen


@needs_bf16
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_whole_networks_stay_close_to_torch(tv, arch):
    """bf16 rounds every convolution's operands: logits move, but stay within a few
    percent of the largest and mostly keep their order. Measured on these random-weight
    networks (randomised batch norm, 8 images of 64 px): max |delta| 0.27-0.64% of max
    |logit| (float32: ~1e-6), top-1 agreement 8/8; bounds below with ~3x margin."""
    torch, torchvision = tv
    from ..models.test_resnet import randomize_batch_norm
    import numres
    torch.manual_seed(0)
    tmodel = randomize_batch_norm(torch, getattr(torchvision.models, arch)(), 1)
    x = np.random.default_rng(4).standard_normal((8, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        expected = tmodel(torch.from_numpy(x)).numpy()
    model = numres.build(arch, backend=numba.NumbaBackend(precision="bfloat16"))
    model.load_state_dict({k: v.numpy() for k, v in tmodel.state_dict().items()})
    got = model(x)
    np.testing.assert_array_equal(model(x), got)             # replayed: the same
    scale = np.abs(expected).max()
    err = np.abs(got - expected).max() / scale
    assert 1e-5 < err < 0.02, f"max |delta logit| {err:.2%} of max |logit|"
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.75
