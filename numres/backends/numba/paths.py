"""Which path a convolution takes, and where each path is computed.

:func:`prepare` lays out a convolution's weights once, at load time, for the family of paths
its shape allows (:class:`Layout`). :func:`choose_path` then names the path each call takes,
from the input's shape, the layout and :class:`~.tuning.Tuning`; :data:`RUNNERS` maps each
:class:`ConvPath` to the module that computes it and describes its memory, so that the
backend's ``conv2d`` and its memory estimate (``memory_events``) follow the same choice.
"""

import enum
from collections import namedtuple
from dataclasses import dataclass, field

import numpy as np

from .._base import conv_output_size, conv_weight_matrix
from . import blas, direct, gemm, grouped, pairs, stem, winograd
from .tile import AVAILABLE, TILE


class ConvPath(enum.Enum):
    """The ways a convolution is computed (module: what it does)."""

    #: ``gemm.py``: numres's GEMM on blocks of gathered pixels (im2col for kxk, a subsample
    #: for strided 1x1s; a 1x1 stride-1 convolution multiplies the activation as it lies).
    GEMM = "gemm"
    #: ``direct.py``: the microkernel reads the (padded) input itself, no gather.
    DIRECT = "direct"
    #: ``stem.py``: ``DIRECT`` fused with the max pool after it (only asked for by
    #: ``conv2d_max_pool``: ResNet's stem).
    STEM = "stem"
    #: ``winograd.py``: F(4x4, 3x3) for stride-1 3x3s with enough tiles: transforms and 36
    #: GEMMs (numres's, or BLAS's where the weights are laid out for BLAS).
    WINOGRAD = "winograd"
    #: ``grouped.py``: 1-8 channels per group, whole groups in each vector.
    GROUPED_LANES = "grouped_lanes"
    #: ``grouped.py``: per-group direct convolutions on the microkernel.
    GROUPED_DIRECT = "grouped_direct"
    #: ``blas.py``: gather + NumPy's BLAS + epilogue.
    BLAS = "blas"
    #: ``blas.py``: per-group im2col + BLAS (wide groups, or no numres kernels).
    BLAS_GROUPED = "blas_grouped"


class Layout(enum.Enum):
    """How a prepared convolution's weights lie (``Conv.weight``)."""

    #: (ceil(O / nr), kh*kw*C, nr) column panels: numres's GEMM, direct, stem, Winograd.
    PANELS = "panels"
    #: (kh*kw*C, O) rows in im2col's (ky, kx, c) order: BLAS (and BLAS Winograd).
    MATRIX = "matrix"
    #: (O / vl, kh, kw, w, vl): ``GROUPED_LANES``.
    LANES = "lanes"
    #: (G, panels, kh*kw*C/G, vl): ``GROUPED_DIRECT``.
    GROUPED_PANELS = "grouped_panels"
    #: (G, kh*kw*C/G, O/G): ``BLAS_GROUPED``.
    GROUPED_MATRIX = "grouped_matrix"


@dataclass
class Conv:
    """A convolution prepared for the Numba backend (:func:`prepare`)."""

    layout: Layout
    weight: np.ndarray      # as ``layout`` says
    bias: np.ndarray        # (O,)
    kernel_size: int
    stride: int
    padding: int
    groups: int
    out_channels: int
    winograd_capable: bool = False
    winograd: np.ndarray = field(default=None, repr=False)  # transformed, made on first use

    @property
    def pairs(self):
        """Whether the weights are bf16 pairs (``pairs.py``): the input is converted too."""
        return self.weight.dtype == np.uint32

    @property
    def own_kernels(self):
        """Whether the weights are packed for numres's kernels (else for BLAS)."""
        return self.layout is not Layout.MATRIX and self.layout is not Layout.GROUPED_MATRIX


def prepare(weight, bias, stride, padding, groups, tuning, winograd_allowed=True,
            bf16=False):
    """Lay out (O, C/groups, k, k) float32 ``weight`` and optional ``bias`` once.

    Grouped convolutions get the layout of their one path: ``LANES`` where the lanes kernel
    fits, ``GROUPED_PANELS`` up to ``tuning.grouped_direct_max_width`` outputs per group, else
    ``GROUPED_MATRIX``. Ungrouped ones get ``PANELS`` where numres's kernels run (only the
    panels are kept: the plain matrix would double the memory), else ``MATRIX``. With
    ``bf16`` (``precision="bfloat16"``), ungrouped ``PANELS`` are bf16 pairs (``pairs.py``)
    where the input has an even number of channels, at least ``tuning.direct_max_channels``
    (not the stem: its 3 channels), and ``LANES`` and ``GROUPED_PANELS`` where a group has
    an even number of channels (``LANES``: and the channels fill vectors of pairs); those
    never take Winograd (its float32 filters): on
    ResNet-18/50 and ResNeXt-50, batch 1 and 8, a stride-1 3x3 ran as fast or faster as a
    bf16 direct convolution than as float32 Winograd (``benchmarks/results/numba-design.md``).
    """
    o, _, k, _ = weight.shape
    bias = np.zeros(o, np.float32) if bias is None else np.asarray(bias, np.float32)
    own = tuning.own_gemm and AVAILABLE
    geometry = (bias, k, stride, padding, groups, o)
    if groups > 1:
        if own and bf16 and grouped.lanes_fit(weight.shape, groups, bf16=True):
            return Conv(Layout.LANES,
                        grouped.pack_lanes_pairs(np.asarray(weight, np.float32)), *geometry)
        if own and grouped.lanes_fit(weight.shape, groups):
            return Conv(Layout.LANES, grouped.pack_lanes(np.asarray(weight, np.float32)),
                        *geometry)
        if own and o // groups <= tuning.grouped_direct_max_width:
            paired = bf16 and weight.shape[1] % 2 == 0
            return Conv(Layout.GROUPED_PANELS, grouped.pack_grouped(
                np.asarray(weight, np.float32), groups, paired), *geometry)
        return Conv(Layout.GROUPED_MATRIX,
                    np.ascontiguousarray(conv_weight_matrix(weight, groups)), *geometry)
    matrix = np.ascontiguousarray(conv_weight_matrix(weight))      # (kh*kw*C, O)
    winograd_capable = (k, stride, padding) == (3, 1, 1) and winograd_allowed
    c = weight.shape[1]
    if own and bf16 and c % 2 == 0 and c >= tuning.direct_max_channels:
        return Conv(Layout.PANELS, gemm.pack_weights(pairs.pack(matrix)), *geometry)
    if own:
        return Conv(Layout.PANELS, gemm.pack_weights(matrix), *geometry, winograd_capable)
    return Conv(Layout.MATRIX, matrix, *geometry, winograd_capable)


def choose_path(conv, x_shape, batch, tuning, pooled=False):
    """The path a convolution takes on an NHWC input of ``x_shape``.

    Args:
        conv: a :class:`Conv`.
        x_shape: (N, H, W, C) of the input.
        batch: the batch size the choice is made for (``Backend.as_batch``: chunks of a
            batch take the whole batch's paths).
        tuning: the backend's :class:`~.tuning.Tuning`.
        pooled: the convolution is followed by a max pool (``conv2d_max_pool``): ``STEM``
            where the two can be fused.

    Returns:
        ConvPath.
    """
    _, h, w, c = x_shape
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    reads_directly = conv.layout is Layout.PANELS and _reads_directly(
        conv, c, conv_output_size(w, k, s, p), tuning)
    if pooled and reads_directly:
        return ConvPath.STEM
    if conv.winograd_capable:
        tiles = batch * -(-h // winograd.TILE) * -(-w // winograd.TILE)
        wide = c * conv.out_channels > tuning.winograd_wide
        if tiles >= (tuning.winograd_min_tiles_wide if wide else tuning.winograd_min_tiles):
            return ConvPath.WINOGRAD
    if conv.groups > 1:
        return _GROUPED_PATHS[conv.layout]
    if conv.layout is Layout.MATRIX:
        return ConvPath.BLAS
    return ConvPath.DIRECT if reads_directly else ConvPath.GEMM


_GROUPED_PATHS = {Layout.LANES: ConvPath.GROUPED_LANES,
                  Layout.GROUPED_PANELS: ConvPath.GROUPED_DIRECT,
                  Layout.GROUPED_MATRIX: ConvPath.BLAS_GROUPED}


def _reads_directly(conv, channels, out_w, tuning):
    """Whether an ungrouped convolution reads its input directly rather than gathering it:
    with few input channels (the stem), and for kxk or strided 1x1 convolutions whose output
    rows are whole tiles (with AVX-512's 14-row tiles: ResNet's 112/56/28/14-wide maps;
    AVX2's 6 divide none of them), where no tile row is wasted and skipping the gather pays.
    A 1x1 stride-1 convolution needs no gather in the first place (``GEMM``)."""
    windows = not (conv.kernel_size == 1 and conv.padding == 0)
    if windows and channels < tuning.direct_max_channels:
        return True
    return (windows or conv.stride > 1) and out_w % TILE.mr == 0


Runner = namedtuple("Runner", "run events")
Runner.__doc__ = """Where a path is computed: ``run(backend, x, conv, epilogue, y)`` runs it
from NHWC ``x`` into the workspace array ``y`` (NHWC), recording its steps for replay;
``events(conv, x_shape, y_shape, threads, tuning)`` lists what it allocates beyond ``y``
(``Backend.memory_events``). ``STEM`` takes the max pool ``(kernel, stride, padding)`` as a
last argument of both, ``y`` being the pooled output."""

#: Each path's runner (see :class:`ConvPath` for what each does).
RUNNERS = {
    ConvPath.GEMM: Runner(gemm.run, gemm.events),
    ConvPath.DIRECT: Runner(direct.run, direct.events),
    ConvPath.STEM: Runner(stem.run, stem.events),
    ConvPath.WINOGRAD: Runner(winograd.run, winograd.events),
    ConvPath.GROUPED_LANES: Runner(grouped.run_lanes, grouped.lanes_events),
    ConvPath.GROUPED_DIRECT: Runner(grouped.run_direct, grouped.direct_events),
    ConvPath.BLAS: Runner(blas.run, blas.events),
    ConvPath.BLAS_GROUPED: Runner(blas.run_grouped, blas.grouped_events),
}
