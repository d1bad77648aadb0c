"""The register tile of numres's GEMM kernels, declared once per instruction set.

The microkernel (``microkernel.py``) keeps an ``mr x nr`` block of the output in vector
registers: ``mr`` output pixels (rows) by ``nr`` output channels (columns, ``nr / vl``
vectors). Per step of the reduction it loads ``nr / vl`` weight vectors, broadcasts ``mr``
input values and issues ``mr * nr / vl`` fused multiply-adds. Everything else about the
tiling derives from the declaration below: the short, half-height and grouped variants, the
grouped-lanes kernel's rows per group width, the cache lines the kernel prefetches, and
which layers can read their input directly (``paths.py``: output rows of whole tiles).

Changing the tile: edit :data:`DECLARED` (or add an instruction set there and to
:func:`host_tiles`). Construction checks the register budget of every variant
(accumulators + weight vectors + one broadcast <= the register file). Then run
``tests/backends/test_microkernel.py`` (every tile the host can run, AVX2 ones on an AVX-512
machine too) and ``tests/backends/test_ops.py``, and time whole networks
(``benchmarks/bench.py``): ``mr`` decides which of ResNet's map widths (112, 56, 28, 14, 7)
are whole tiles, so it moves layers between the direct and the gathering paths.
"""

from dataclasses import dataclass, field

from llvmlite import binding as llvm_binding

#: Rows of a Winograd block of 16 tiles (ResNet's 14x14 maps at batch 1, 7x7 at batch 4):
#: tiles taller than half of it run such GEMMs as two short tiles (16 rows, not 28).
SHORT_ROWS = 16
#: Output pixels of ResNet's deepest maps per image row (7x7 at batch 1: 49 pixels): a main
#: tile whose half height divides it runs those GEMMs in half-height tiles (7 of 7 rows
#: rather than 4 of 14: 56 rows, 1/8 wasted).
DEEPEST_ROW = 7
#: The grouped kernel's tiles are at most this tall: their rows are C floats apart in the
#: image, and with C >= 512, 28 of them fell into too few L1 sets (slower than 14).
GROUPED_MAX_ROWS = 14
#: Channels per group the grouped-lanes kernel handles (whole groups in each vector).
LANE_WIDTHS = (1, 2, 4, 8)


@dataclass(frozen=True)
class Tile:
    """One register tile and what derives from it.

    Attributes:
        isa: the instruction set's name.
        vl: floats per vector register.
        registers: vector registers the instruction set has.
        mr: rows (output pixels) of the main tile.
        nr: columns (output channels), a multiple of ``vl``.
        kc: depth of one chunk of the reduction: ``mr * kc`` input floats and ``kc * nr``
            weight floats per microkernel call stay in L1 (AVX-512: 14 + 32 KiB of 48).
        line: floats per cache line (64 bytes).
        lane_accumulators: accumulator vectors of the grouped-lanes kernel (``grouped.py``).
    """

    isa: str
    vl: int
    registers: int
    mr: int
    nr: int
    kc: int = 256
    line: int = 16
    lane_accumulators: int = 24
    lane_rows: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.nr % self.vl:
            raise ValueError(f"{self.isa}: nr={self.nr} is not a multiple of vl={self.vl}")
        rows = {}
        for w in LANE_WIDTHS:
            # Accumulators (rows * w) + w weight vectors + one input vector.
            fit = min(self.lane_accumulators // w, (self.registers - 1 - w) // w)
            if w < self.vl and fit >= 1:
                rows[w] = fit
        object.__setattr__(self, "lane_rows", rows)
        for name, mr, nr in self.variants():
            need = self.registers_used(mr, nr)
            if need > self.registers:
                raise ValueError(f"{self.isa} {name} tile {mr} x {nr} needs {need} vector "
                                 f"registers, the instruction set has {self.registers}")
        for w, mr in rows.items():
            assert mr * w + w + 1 <= self.registers, (self.isa, w, mr)

    def registers_used(self, mr, nr):
        """Vector registers a tile ``mr x nr`` holds: accumulators, one row of weight
        vectors, one broadcast input."""
        return mr * (nr // self.vl) + nr // self.vl + 1

    @property
    def vectors(self):
        """Weight vectors per row of the tile (``nr / vl``)."""
        return self.nr // self.vl

    @property
    def short_mr(self):
        """Rows of the short tile (:data:`SHORT_ROWS`): the main height where it is no taller
        than half of those rows."""
        return min(self.mr, SHORT_ROWS // 2)

    @property
    def half_mr(self):
        """Rows of the half-height tile (:data:`DEEPEST_ROW`), or the main height where half
        of it does not divide the deepest maps' rows (AVX2's 6: no half tile)."""
        half = self.mr // 2
        return half if self.mr % 2 == 0 and DEEPEST_ROW % half == 0 else self.mr

    @property
    def grouped_mr(self):
        """Rows of the grouped tile (one vector of columns): as many accumulators as the
        main tile, up to :data:`GROUPED_MAX_ROWS`."""
        return min(self.mr * self.vectors, GROUPED_MAX_ROWS)

    @property
    def grouped_half_mr(self):
        """Rows of the grouped kernel's short tile: one row of ResNet's deepest maps
        (:data:`DEEPEST_ROW`), where that is shorter than the grouped tile (7 of 7 rows
        rather than 7 of 14 at 7x7)."""
        return min(DEEPEST_ROW, self.grouped_mr)

    @property
    def grouped_nr(self):
        """Columns of the grouped tile: one vector (groups have 4 to 64 output channels)."""
        return self.vl

    @property
    def grouped_wide_nr(self):
        """Columns of the grouped tile for groups of two vectors' outputs (ResNeXt's 32 per
        group): two vectors where the grouped tile's rows still fit the registers with them
        (each broadcast then feeds two FMAs), else one."""
        wide = 2 * self.vl
        return wide if self.registers_used(self.grouped_mr, wide) <= self.registers else self.vl

    def variants(self):
        """``(name, mr, nr)`` of every tile the kernels use."""
        return (("main", self.mr, self.nr), ("short", self.short_mr, self.nr),
                ("half", self.half_mr, self.nr),
                ("grouped", self.grouped_mr, self.grouped_nr),
                ("grouped half", self.grouped_half_mr, self.grouped_nr),
                ("grouped wide", self.grouped_mr, self.grouped_wide_nr),
                ("grouped wide half", self.grouped_half_mr, self.grouped_wide_nr))


#: AVX-512: 14 x 32 (28 accumulators + 2 weight vectors + 1 broadcast = 31 of 32 registers);
#: 14 rows divide ResNet's 112, 56, 28, 14 and 7 pixel rows, so little of a tile is wasted
#: (49 pixels take 56 rows, not 60 as with 12 rows). AVX2: 6 x 16 (12 + 2 + 1 = 15 of 16).
DECLARED = {
    "avx512": Tile("avx512", vl=16, registers=32, mr=14, nr=32, lane_accumulators=24),
    "avx2": Tile("avx2", vl=8, registers=16, mr=6, nr=16, lane_accumulators=12),
}


def host_tiles():
    """The declared tiles this CPU can run, preferred first (an AVX-512 CPU runs AVX2 too);
    empty without AVX2 and FMA (numres then uses BLAS)."""
    try:
        features = llvm_binding.get_host_cpu_features()
    except RuntimeError:
        return []
    tiles = []
    if features.get("avx512f"):
        tiles.append(DECLARED["avx512"])
    if features.get("avx2") and features.get("fma"):
        tiles.append(DECLARED["avx2"])
    return tiles


_HOST = host_tiles()
#: Whether numres's own kernels run here (otherwise every convolution uses BLAS).
AVAILABLE = bool(_HOST)
#: The tile the kernels are compiled for: the host's best (AVX2's where none runs, so that
#: the modules still import; nothing calls them then).
TILE = _HOST[0] if _HOST else DECLARED["avx2"]
