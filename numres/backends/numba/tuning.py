"""Every threshold of the Numba backend, in one object, each with the reason for it.

Defaults were chosen by timing whole networks (ResNet-18/50, ResNeXt-50; batch 1 and 8; 2
cores), every variant interleaved in one process; the figures behind them are in
``benchmarks/results/numba-design.md``. ``NumbaBackend(**overrides)`` replaces any field
(the tests force each path that way). Sizes the compiled kernels are built for (the register
tile and the reduction depth) are not here: they are declared in ``tile.py``.
"""

from dataclasses import dataclass


@dataclass
class Tuning:
    """How the backend chooses its paths (``paths.choose_path``) and splits their work."""

    # -- which path -------------------------------------------------------------------------
    #: Use numres's own kernels (GEMM, direct, Winograd, grouped) where the CPU has
    #: AVX2/AVX-512; otherwise (or when False) BLAS: the weights never change, yet BLAS
    #: repacks them on every call, and at small batches packing, gathering and a separate
    #: epilogue pass cost as much as the multiply.
    own_gemm: bool = True
    #: Convolutions with fewer input channels than this (the 7x7 stem: 3) read the input
    #: directly: with so few channels per pixel, gathering costs more than the multiply.
    direct_max_channels: int = 16
    #: Winograd F(4x4, 3x3) needs this many 4x4 tiles (in the batch) to repay reading its
    #: 4x larger filters...
    winograd_min_tiles: int = 12
    #: ... and this many where C * O > ``winograd_wide`` (ResNet's 7x7x512 layers from batch
    #: 4 on), whose transformed filters are read from memory for fewer tiles.
    winograd_min_tiles_wide: int = 16
    winograd_wide: int = 256 * 256
    #: Grouped convolutions with at most this many outputs per group (and too many for the
    #: grouped-lanes kernel) run as per-group direct convolutions on numres's kernel; wider
    #: groups (ResNeXt-101 32x8d's last stage: 64) are faster on BLAS.
    grouped_direct_max_width: int = 32

    # -- numres's GEMM (``gemm.py``) --------------------------------------------------------
    #: Pixels per block a thread gathers, multiplies and finishes at once, in main tiles:
    #: the block's gathered rows and its output stay in L2.
    gemm_block_tiles: int = 12
    #: Blocks each thread's share of a layer is cut into at least (where it has enough
    #: rows), so that a faster thread can take over the slower one's last blocks.
    blocks_per_thread: int = 4
    #: With fewer output pixels than this per thread, threads split output channels
    #: (weight panels) instead: each panel's weights are then read once, not per block.
    split_rows_min: int = 128

    # -- direct convolutions (``direct.py``, ``stem.py``) ----------------------------------
    #: Tiles per block of output rows: tiles that share one panel of weights from cache.
    direct_block_tiles: int = 12
    #: Direct convolutions with fewer tiles than two blocks per thread and more weight
    #: bytes than this split by panels (the deep layers at batch 1: weights from memory).
    direct_panel_bytes: int = 1 << 20
    #: Pooled rows per block of the stem fused with its max pool: few enough that a
    #: block's band of convolution rows stays in cache.
    stem_pool_rows: int = 8

    # -- Winograd (``winograd.py``) ---------------------------------------------------------
    #: Tiles transformed and multiplied together: enough rows for efficient GEMMs, few
    #: enough that the (36, tiles, C) block stays in L2.
    winograd_block_tiles: int = 128
    #: Transformed filters this small (bytes) stay in cache when re-read per block, so
    #: blocks are cut finer (at least ``winograd_min_block_tiles``) to balance the threads.
    winograd_small_filters: int = 1 << 20
    winograd_min_block_tiles: int = 28

    # -- BLAS (``blas.py``: CPUs without AVX2, ``own_gemm=False``) ---------------------------
    #: GEMMs with at least this many multiply-adds and ``blas_min_n`` output channels run
    #: as one call on BLAS's own threads (they share packed weights); smaller ones run
    #: faster split across numres's threads, single-threaded BLAS each.
    blas_min_macs: int = 200_000_000
    blas_min_n: int = 128
    #: Output pixels per row block when numres's threads split a GEMM by rows.
    row_block: int = 1024
    #: Output pixels per chunk when BLAS threads run a large gathered GEMM (bounds scratch).
    blas_chunk: int = 8192

    # -- the rest ----------------------------------------------------------------------------
    #: Below this many output elements a simple kernel runs in the calling thread only: a
    #: hand-off to the other threads costs more than the work.
    parallel_min_elements: int = 1 << 15
    #: Input shapes per model whose passes are recorded (each keeps its buffers).
    max_plans: int = 2
