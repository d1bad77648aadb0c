"""Bounded memory for any input: estimate a forward pass before running it, split or refuse.

A model called on a batch that cannot fit (one 20000 x 20000 image, say) used to be killed by
the kernel's OOM killer, without a word. Before a pass, the model now asks this module for
the largest chunk of the batch that fits (:func:`batch_chunk`):

* :func:`estimate_peak_bytes` walks the pass layer by layer, in the order the model runs it,
  and asks the backend what each op allocates (``Backend.memory_events``: outputs, im2col
  windows, padded copies, per-thread scratch, Winograd filters made on first use, result
  copies). Which activations are alive at once (a block's input, its intermediate outputs,
  the residual, the maps kept for ``feature_maps``) follows the model's own code. The peak is
  then played out with the backend's allocator (:func:`simulate`): glibc malloc for the
  NumPy backend (a heap that keeps what it cannot trim, mmap for large blocks), the
  workspace pool for Numba and CuPy (buffers kept, best-fit reuse, starting from the pool's
  free buffers), plus a margin. The figure is what the pass adds to the process: the
  prepared weights are excluded (they are resident before the call), the input the caller
  holds too, but a float32 copy of it is counted where one is made. Kernel compilation
  (Numba's first call on a machine without its cache) is not counted either.
* :func:`memory_budget` is what the pass may take: ``NUMRES_MEMORY_LIMIT`` or the model's
  ``memory_limit`` where set (bytes or ``"4GiB"``; ``"none"`` turns the check off), else 85%
  of the smaller of the cgroup's headroom and ``MemAvailable`` (:func:`host_available`), or
  on a GPU 85% of the device's free memory plus what CuPy's pool holds free.
* If the batch does not fit, it runs in chunks that do, each computed exactly as in the
  whole batch (bit for bit); if one image does not fit, :class:`MemoryError` says so before
  anything large is allocated.

Calibration: measured as the larger of peak RSS growth and tracemalloc's peak, in a child
process, over the built, prepared, warmed-up model (2 cores; ResNet-18/50, ResNeXt-50 at
batch 1 and 8 x 224 px, 1 x 512, 1 x 1024, logits, features and maps), the estimate was
1.02-1.21x the measured peak wherever that was 50 MiB or more (Numba 1.10-1.13, NumPy
1.02-1.21), up to 1.63x for passes of 13-30 MiB (the fixed margin, the heap model's
pessimism); ``tests/models/test_memory.py`` checks the bound.
"""

import bisect
import os
import re
import threading
import time
from collections import namedtuple

import numpy as np

from ..backends import Backend, PassOp, conv_output_size, nbytes

#: Share of the detected free memory a pass may use (the rest: other allocations meanwhile,
#: the allocator's own overhead, and estimates being estimates).
SAFETY = 0.85
#: Environment variable overriding the detected memory (bytes, ``"4GiB"``, ``"none"``).
ENV = "NUMRES_MEMORY_LIMIT"
#: Seconds a reading of free memory is reused: reading takes ~50 us, batch-1 passes ~10 ms.
TTL = 1.0
#: A pass estimated at no more than this share of the budget last read reuses that reading
#: for up to :data:`AMPLE_TTL` seconds: after the process has idled, reading /proc/meminfo
#: and the cgroup files took 0.3-0.7 ms of a 23 ms ResNet-50 call (caches gone cold), on the
#: path of the next request. A pass this far inside the limit would need the free memory to
#: fall fourfold meanwhile to miss a split it needs.
AMPLE = 0.25
AMPLE_TTL = 60.0
# A cgroup v1 "no limit" is the largest page-aligned int64; anything this large is no limit.
_NO_LIMIT = 1 << 60

#: The stages of a ResNet pass, in order (``resnet.STAGES``: ``feature_maps`` names them).
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")

Budget = namedtuple("Budget", "bytes source")
Budget.__doc__ = """Bytes a pass may add (``None``: unknown, never split) and where that came
from, for messages."""


# -- sizes -------------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6,
          "g": 10 ** 9, "gb": 10 ** 9, "t": 10 ** 12, "tb": 10 ** 12,
          "ki": 2 ** 10, "kib": 2 ** 10, "mi": 2 ** 20, "mib": 2 ** 20,
          "gi": 2 ** 30, "gib": 2 ** 30, "ti": 2 ** 40, "tib": 2 ** 40}


def parse_bytes(text):
    """Bytes from ``"4GiB"``, ``"512 MB"``, ``"1.5G"`` or ``"1000000"`` (SI units are powers
    of 1000, IEC units of 1024, as Kubernetes reads them).

    Returns:
        int bytes, or ``None`` for ``"none"``, ``"off"``, ``"inf"`` or ``"unlimited"``.

    Raises:
        ValueError: anything else.
    """
    if isinstance(text, (int, np.integer)):
        return int(text)
    value = str(text).strip().lower()
    if value in ("none", "off", "inf", "unlimited"):
        return None
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", value)
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"cannot read a memory size from {text!r}; use bytes or e.g. "
                         "'4GiB', '512MB', or 'none'")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_bytes(n):
    """``1536 * 2**20`` -> ``"1.5 GiB"``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# -- memory available to this process ---------------------------------------------------------
def meminfo_available(path="/proc/meminfo"):
    """``MemAvailable`` of ``path`` in bytes, or ``None`` when it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    fields = line.split()
                    return int(fields[1]) * (1024 if fields[2:3] == ["kB"] else 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_available(proc="/proc", root="/sys/fs/cgroup"):
    """Headroom of the process's memory cgroups: ``(bytes, description)`` of the tightest
    limit, or ``None`` when none applies or none can be read.

    The process's cgroup paths come from ``<proc>/self/cgroup``: cgroup v2 (line ``0::path``,
    files ``memory.max`` and ``memory.current`` under ``root`` or ``root/unified``) and v1
    (the ``memory`` controller's line, ``memory.limit_in_bytes`` and
    ``memory.usage_in_bytes`` under ``root/memory``). Every level from the process's cgroup
    up to the mount's root is read (a parent's limit binds too; inside a container's cgroup
    namespace the path may not exist, its ancestors or the root do). Headroom is limit minus
    usage, usage without the inactive page cache (``inactive_file`` of ``memory.stat``: the
    kernel reclaims it before it kills), as ``docker stats`` and the kubelet count it.
    ``"max"`` or a v1 limit near 2**63 is no limit.
    """
    try:
        with open(os.path.join(proc, "self", "cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            found = [_cgroup_headroom(base, path, "memory.max", "memory.current",
                                      "inactive_file", "v2")
                     for base in (root, os.path.join(root, "unified"))]
        elif "memory" in controllers.split(","):
            found = [_cgroup_headroom(os.path.join(root, "memory"), path,
                                      "memory.limit_in_bytes", "memory.usage_in_bytes",
                                      "total_inactive_file", "v1")]
        else:
            continue
        for headroom in found:
            if headroom is not None and (best is None or headroom[0] < best[0]):
                best = headroom
    return best


def _cgroup_headroom(base, path, limit_file, usage_file, inactive_key, version):
    """The tightest (limit - usage) over ``base/path`` and its ancestors up to ``base``."""
    parts = [p for p in path.strip("/").split("/") if p]
    best = None
    for depth in range(len(parts), -1, -1):
        folder = os.path.join(base, *parts[:depth])
        limit = _read_int(os.path.join(folder, limit_file))
        if limit is None or limit >= _NO_LIMIT:
            continue
        usage = _read_int(os.path.join(folder, usage_file))
        if usage is None:
            continue
        usage -= min(usage, _stat_value(os.path.join(folder, "memory.stat"), inactive_key))
        headroom = max(0, limit - usage)
        if best is None or headroom < best[0]:
            best = (headroom, f"cgroup {version} limit {format_bytes(limit)} "
                              f"({os.path.join(folder, limit_file)}) less "
                              f"{format_bytes(usage)} in use")
    return best


def _read_int(path):
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if text == "max":
        return _NO_LIMIT
    try:
        return int(text)
    except ValueError:
        return None


def _stat_value(path, key):
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def host_available(proc="/proc", root="/sys/fs/cgroup"):
    """Memory this process can still take: ``(bytes, description)``, the smaller of its
    cgroups' headroom (:func:`cgroup_available`) and ``MemAvailable``; ``None`` when neither
    can be read (not Linux, no /proc): then no check is made and batches are never split."""
    options = []
    cgroup = cgroup_available(proc, root)
    if cgroup is not None:
        options.append(cgroup)
    meminfo = meminfo_available(os.path.join(proc, "meminfo"))
    if meminfo is not None:
        options.append((meminfo, "MemAvailable in /proc/meminfo"))
    return min(options, key=lambda o: o[0]) if options else None


_readings = {}
_readings_lock = threading.Lock()


def _reading(key, read, max_age=TTL):
    """``read()``, reused for ``max_age`` seconds."""
    now = time.monotonic()
    cached = _readings.get(key)
    if cached is not None and now - cached[0] < max_age:
        return cached[1]
    value = read()
    with _readings_lock:
        _readings[key] = (now, value)
    return value


def memory_budget(backend, limit=None, max_age=TTL):
    """What a forward pass on ``backend`` may add: a :class:`Budget`.

    Args:
        backend: the model's backend (a GPU backend reports its device's memory).
        limit: an override (the model's ``memory_limit``): bytes, ``"4GiB"`` or ``"none"``;
            else ``NUMRES_MEMORY_LIMIT``, else the detected memory.
        max_age: seconds a reading of the detected memory may be reused.

    Returns:
        ``Budget(bytes, source)``: an explicit limit as given, detected memory times
        :data:`SAFETY`; ``bytes`` is ``None`` when unlimited or unknown.
    """
    if limit is not None:
        return Budget(parse_bytes(limit), f"the model's memory_limit={limit!r}")
    env = os.environ.get(ENV)
    if env:
        return Budget(parse_bytes(env), f"{ENV}={env}")
    if type(backend).device_memory is not Backend.device_memory:      # a GPU backend
        found = _reading(("device", id(backend)), backend.device_memory, max_age)
    else:
        found = _reading("host", host_available, max_age)
    if found is None:
        return Budget(None, "no memory limit could be read")
    free, where = found
    return Budget(int(free * SAFETY),
                  f"{SAFETY:.0%} of {format_bytes(free)}: {where}")


# -- the estimate ------------------------------------------------------------------------------
class _Trace:
    """The events of one pass: each op's events, its buffers renamed to be unique."""

    def __init__(self, backend, batch):
        self.backend, self.batch = backend, batch
        self.events, self.shapes = [], {}

    def op(self, kind, x=(), y=(), **fields):
        op = PassOp(kind, tuple(x), tuple(y), batch=self.batch, **fields)
        number = len(self.shapes)
        out = f"act{number}"
        for event in self.backend.memory_events(op):
            name = event[1]
            if event[0] != "scratch":
                name = out if name == "out" else f"{number}.{name}"
            self.events.append((event[0], name) + tuple(event[2:]))
        self.shapes[out] = tuple(y)
        return out

    def heap(self, name, size):
        self.events.append(("heap", name, size))

    def free(self, name):
        self.events.append(("free", name))

    def unit(self, unit, conv, x, residual=None, pool=None):
        """A ``_ConvBN`` (``resnet.py``): folded, one op; else convolution then batch norm
        (then max pooling for the stem), each intermediate freed when the next is made."""
        n, _, h, w = self.shapes[x]
        k, s, p, g = conv.kernel_size, conv.stride, conv.padding, conv.groups
        shape = (n, conv.out_channels, conv_output_size(h, k, s, p),
                 conv_output_size(w, k, s, p))
        geometry = dict(kernel=k, stride=s, padding=p, groups=g, conv=unit.conv)
        if pool is not None:
            pooled = shape[:2] + tuple(conv_output_size(d, *pool) for d in shape[2:])
        if unit.bn is None:
            if pool is not None:
                return self.op("conv_pool", self.shapes[x], pooled, pool=pool, **geometry)
            return self.op("conv", self.shapes[x], shape, residual=residual is not None,
                           **geometry)
        y = self.op("conv", self.shapes[x], shape, **geometry)
        z = self.op("batch_norm", shape, shape, residual=residual is not None)
        self.free(y)
        if pool is None:
            return z
        out = self.op("max_pool", shape, pooled, kernel=pool[0], stride=pool[1],
                      padding=pool[2])
        self.free(z)
        return out


def pass_events(model, input_shape, kind="logits", stages=(), batch=None, copy_input=False):
    """The allocation events of one pass, in order (see ``Backend.memory_events``).

    Args:
        model: a :class:`~numres.models.resnet.ResNet` (its weights get prepared).
        input_shape: (N, 3, H, W).
        kind: ``"logits"``, ``"features"`` or ``"maps"`` (``stages`` as
            :meth:`~numres.models.resnet.ResNet.feature_maps` takes them).
        batch: the batch size the backend's choices are made for (``Backend.as_batch``).
        copy_input: the input gets copied to float32 C order first.

    Returns:
        list of ``(kind, name, ...)`` tuples with unique names.
    """
    plan = model._prepared()
    n = input_shape[0]
    trace = _Trace(model.active_backend, batch or n)
    if copy_input:
        trace.heap("input_copy", nbytes(input_shape))
    # forward() keeps the first activation until the pass ends (its local variable)
    first = trace.op("input", input_shape, input_shape)
    x = trace.unit(plan["stem"], model.conv1, first, pool=(3, 2, 1))
    wanted = stages if kind == "maps" else ()
    last = max((STAGES.index(s) for s in wanted), default=len(STAGES) - 1)
    found, kept = {}, {first}
    if "stem" in wanted:
        found["stem"] = x
        kept.add(x)
    blocks = plan["blocks"] if last > 0 else []
    for i, (stage, block, run) in enumerate(blocks):
        names = [conv for conv, _ in block.units]
        identity = x
        if block.downsample is not None:
            identity = trace.unit(run["downsample"], block.downsample[0], x)
        out = trace.unit(run[names[0]], getattr(block, names[0]), x)
        for name in names[1:-1]:
            nxt = trace.unit(run[name], getattr(block, name), out)
            trace.free(out)
            out = nxt
        y = trace.unit(run[names[-1]], getattr(block, names[-1]), out, residual=identity)
        trace.free(out)
        if identity is not x:
            trace.free(identity)
        if x not in kept:
            trace.free(x)
        x = y
        if (i + 1 == len(blocks) or blocks[i + 1][0] != stage) and stage in wanted:
            found[stage] = x
            kept.add(x)
            if STAGES.index(stage) == last:
                break
    if kind == "maps":
        results = [trace.op("to_nchw", trace.shapes[found[s]], trace.shapes[found[s]])
                   for s in stages]
    else:
        pooled = trace.op("avg_pool", trace.shapes[x], trace.shapes[x][:2])
        results = [pooled]
        if kind == "logits":
            results = [trace.op("linear", trace.shapes[pooled],
                                (n, model.fc.out_features))]
    trace.op("output", results=tuple(trace.shapes[r] for r in results))
    return trace.events


# Bytes the workspace pool allocates beyond each request (``_workspace._SLACK``).
_POOL_SLACK = 64
# glibc malloc: blocks of at least this many bytes are mmapped (its dynamic threshold rises to
# at most 32 MiB, assumed already there: more blocks in the heap is the worse case) and freed
# at once; smaller ones come from the heap, whose free top is returned above 2x that.
MMAP_MIN = 32 << 20
TRIM_MIN = 2 * MMAP_MIN
#: Added to every simulated peak: what the model leaves out (allocator rounding, transparent
#: huge pages, the Python objects of a pass and of a recorded plan). Calibrated: the
#: simulated peak alone was 0.92-1.06x the measured one.
MARGIN, MARGIN_BYTES = 0.10, 2 << 20


class _Heap:
    """glibc's heap, simply: address-ordered chunks, best fit, neighbours merged when
    freed, the free top returned to the system beyond :data:`TRIM_MIN`. Its size is what
    the process keeps resident, however little of it is in use."""

    def __init__(self):
        self.chunks = []                   # [size, free] in address order
        self.size = 0

    def malloc(self, nbytes):
        fits = [c for c in self.chunks if c[1] and c[0] >= nbytes]
        if fits:
            chunk = min(fits, key=lambda c: c[0])
        elif self.chunks and self.chunks[-1][1]:     # the free top grows into new memory
            chunk = self.chunks[-1]
            self.size += nbytes - chunk[0]
            chunk[0] = nbytes
        else:
            chunk = [nbytes, True]
            self.chunks.append(chunk)
            self.size += nbytes
        if chunk[0] > nbytes:                         # split: the rest stays free
            i = self._index(chunk)
            self.chunks.insert(i + 1, [chunk[0] - nbytes, True])
            chunk[0] = nbytes
        chunk[1] = False
        return chunk

    def _index(self, chunk):
        # by identity: list.index would stop at any equal [size, free]
        return next(i for i, c in enumerate(self.chunks) if c is chunk)

    def free(self, chunk):
        chunk[1] = True
        i = self._index(chunk)
        if i + 1 < len(self.chunks) and self.chunks[i + 1][1]:
            chunk[0] += self.chunks.pop(i + 1)[0]
        if i > 0 and self.chunks[i - 1][1]:
            self.chunks[i - 1][0] += self.chunks.pop(i)[0]
        if self.chunks and self.chunks[-1][1] and self.chunks[-1][0] > TRIM_MIN:
            self.size -= self.chunks.pop()[0]


def simulate(events, allocator="malloc", free_sizes=()):
    """Peak bytes that ``events`` add to the process, plus :data:`MARGIN`.

    Args:
        events: from :func:`pass_events`.
        allocator: where "alloc" events come from (``Backend.allocator``): ``"pool"``, a
            pool that keeps its buffers and hands out the smallest free one that is large
            enough (``_workspace.Workspace``); ``"malloc"``, C's allocator (:class:`_Heap`
            below :data:`MMAP_MIN`, mmap above). "heap" events are malloc'd either way.
        free_sizes: sizes of the pool's free buffers before the pass (reused at no cost).

    Returns:
        int: the largest sum, at any moment, of new pool buffers, the heap's size, mmapped
        blocks and per-thread scratch growth, with the margin.
    """
    free = sorted(free_sizes)
    heap = _Heap()
    where = {}            # name -> ("pool", size) | ("heap", chunk) | ("mmap", size)
    pool_new = mapped = scratch_total = peak = 0
    scratch = {}
    for event in events:
        kind, name = event[0], event[1]
        if kind == "free":
            held = where.pop(name, None)
            if held is None:
                continue
            if held[0] == "pool":
                bisect.insort(free, held[1])
            elif held[0] == "heap":
                heap.free(held[1])
            else:
                mapped -= held[1]
            continue
        size = event[2]
        if kind == "scratch":
            grow = max(0, size - scratch.get(name, 0))
            scratch[name] = scratch.get(name, 0) + grow
            scratch_total += grow
        elif not size:
            continue
        elif kind == "alloc" and allocator == "pool":
            i = bisect.bisect_left(free, size)
            if i < len(free):
                where[name] = ("pool", free.pop(i))
            else:
                pool_new += size + _POOL_SLACK
                where[name] = ("pool", size)
        elif size < MMAP_MIN:
            where[name] = ("heap", heap.malloc(size))
        else:
            mapped += size
            where[name] = ("mmap", size)
        peak = max(peak, pool_new + heap.size + mapped + scratch_total)
    return int(peak * (1 + MARGIN)) + MARGIN_BYTES


def estimate_peak_bytes(model, input_shape, kind="logits", stages=(), batch=None,
                        copy_input=False):
    """Peak bytes one forward pass of ``input_shape`` adds to the process (the device's, for
    a GPU backend), from a backend that holds nothing yet: weights excluded (prepared before
    the pass, they are resident anyway), Winograd filters the pass makes on first use
    included, the caller's input excluded unless ``copy_input`` (a float16/float64 or
    strided input is copied to float32 first).

    Args:
        model: a :class:`~numres.models.resnet.ResNet`.
        input_shape: (N, 3, H, W); nothing of that size is allocated.
        kind: ``"logits"`` (calling the model), ``"features"`` or ``"maps"``.
        stages: for ``"maps"``, the stages asked for.
        batch: make the backend's choices as for this batch size (chunks of a batch).
        copy_input: count a float32 copy of the input.

    Returns:
        int bytes.

    Example:
        >>> model = numres.resnet50(backend="numba")
        >>> format_bytes(estimate_peak_bytes(model, (1, 3, 20000, 20000)))
        '95.4 GiB'
    """
    events = pass_events(model, tuple(input_shape), kind, tuple(stages), batch, copy_input)
    return simulate(events, model.active_backend.allocator)


def pass_key(kind, stages, shape, batch=None):
    """The key a pass is recorded (or captured) under in ``Backend.execute``'s cache."""
    key = (kind, stages, tuple(shape))
    return key if batch in (None, shape[0]) else key + (batch,)


def _pass_need(model, shape, kind, stages, batch, copy_input, reuse):
    """Bytes a pass would add; with ``reuse``, given what the backend holds right now."""
    backend = model.active_backend
    if not reuse:
        return estimate_peak_bytes(model, shape, kind, stages, batch, copy_input)
    events = pass_events(model, shape, kind, stages, batch, copy_input)
    free = backend.reusable_buffers(model._prepared()["graphs"],
                                    pass_key(kind, stages, shape, batch))
    if free is None:
        # a recorded pass replays on its own buffers: only the copies are new
        events = [e for e in events if e[0] == "heap"]
        free = ()
    return simulate(events, backend.allocator, free)


def chunk_need(model, input_shape, chunk, kind="logits", stages=(), copy_input=False,
               reuse=True):
    """Bytes that running ``input_shape``'s batch in chunks of ``chunk`` images adds: one
    chunk's pass (choices made for the whole batch), the whole batch's results, and each
    chunk's float32 (or padded) input copy.

    Args:
        model, input_shape, kind, stages, copy_input: as for :func:`estimate_peak_bytes`.
        chunk: images per chunk (< N).
        reuse: count what the backend already holds as reusable (as the model does).

    Returns:
        int bytes.
    """
    n = input_shape[0]
    shape = (chunk,) + tuple(input_shape[1:])
    run_kind = "features" if kind == "logits" else kind
    copy = copy_input or model.active_backend.keeps_buffers_per_shape    # padded last chunk
    need = _pass_need(model, shape, run_kind, tuple(stages), n, copy, reuse)
    # the whole batch's results, gathered as the chunks finish
    per_image = _result_bytes(model, input_shape, kind, stages)
    return need + n * per_image


def _result_bytes(model, input_shape, kind, stages):
    """Bytes of one image's results as the chunked path gathers them."""
    _, _, h, w = input_shape
    expansion = model.num_features // 512
    if kind != "maps":
        # pooled features, then for logits the linear layer's output, its copy
        return 4 * (model.num_features + (3 * model.fc.out_features if kind == "logits"
                                          else 0))
    total = 0
    for stage in stages:
        i = STAGES.index(stage)
        channels = 64 if i == 0 else 64 * 2 ** (i - 1) * expansion
        total += 4 * channels * _stage_size(h, i) * _stage_size(w, i)
    return total


def _stage_size(d, stage):
    """Spatial size of a stage's output for an input side ``d`` (stride 4, 4, 8, 16, 32)."""
    d = conv_output_size(conv_output_size(d, 7, 2, 3), 3, 2, 1)     # stem: conv, max pool
    for _ in range(max(0, stage - 1)):
        d = conv_output_size(d, 3, 2, 1)                              # strided 3x3 (v1.5)
    return d


def batch_chunk(model, input_shape, kind="logits", stages=(), copy_input=False):
    """The most images of ``input_shape``'s batch one pass may take within the memory budget
    (:func:`memory_budget`): N when the batch fits (or nothing is known), fewer to split.

    Cheap when the batch fits easily: the estimate from an empty backend is cached per shape
    with the model's prepared weights, the free memory read at most every :data:`TTL` s, or
    every :data:`AMPLE_TTL` s for a pass within :data:`AMPLE` of the budget last read.
    Only when that estimate exceeds the budget are the backend's reusable buffers counted
    (a shape run before may fit where a fresh one would not) and chunk sizes searched.

    Args:
        model: a :class:`~numres.models.resnet.ResNet`.
        input_shape: (N, 3, H, W) of the batch; nothing of that size is allocated.
        kind, stages, copy_input: as for :func:`estimate_peak_bytes`.

    Returns:
        int images per chunk (N: no split).

    Raises:
        MemoryError: one image alone does not fit; the message names the shape, the
            estimate, what is available and where that figure came from.
    """
    input_shape, stages = tuple(input_shape), tuple(stages)
    n = input_shape[0]
    budget = memory_budget(model.active_backend, model.memory_limit, AMPLE_TTL)
    if budget.bytes is None:
        return n
    cache = model._prepared()["memory"]
    key = (input_shape, kind, stages, copy_input)
    fresh = cache.get(key)
    if fresh is None:
        if len(cache) >= 64:
            cache.clear()
        fresh = cache[key] = estimate_peak_bytes(model, input_shape, kind, stages, None,
                                                 copy_input)
    if fresh > budget.bytes * AMPLE:
        # Not far inside the last reading: decide on one at most TTL old.
        budget = memory_budget(model.active_backend, model.memory_limit)
        if budget.bytes is None:
            return n
    if fresh <= budget.bytes:
        return n
    need = _pass_need(model, input_shape, kind, stages, None, copy_input, reuse=True)
    if need <= budget.bytes:
        return n
    if n > 1:
        # The chunk size chosen last time for this shape first: its pass may be recorded
        # and hold its buffers already (a new size would pin a second set).
        last = cache.get(("chunk",) + key)
        if last and chunk_need(model, input_shape, last, kind, stages, copy_input) \
                <= budget.bytes:
            return last
        # Else the largest that fits from nothing held: monotone in the chunk size (every
        # chunk makes the whole batch's choices), so a binary search over [1, n - 1].
        lo, hi = 0, n - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if chunk_need(model, input_shape, mid, kind, stages, copy_input,
                          reuse=False) <= budget.bytes:
                lo = mid
            else:
                hi = mid - 1
        if not lo and chunk_need(model, input_shape, 1, kind, stages, copy_input) \
                <= budget.bytes:
            lo = 1
        if lo:
            cache[("chunk",) + key] = lo
            return lo
        need = chunk_need(model, input_shape, 1, kind, stages, copy_input)
    raise MemoryError(_message(model, input_shape, need, budget))


def _message(model, input_shape, need, budget):
    backend = model.active_backend.name
    one = "one image" if input_shape[0] == 1 else "even one image at a time"
    hint = ("use smaller images (downscale, or tile the image), free memory or run where "
            "more is available")
    if backend == "numpy":
        hint += ", or use backend='numba' (no im2col copies of whole layers)"
    return (f"input of shape {input_shape} does not fit in memory: a forward pass of {one} "
            f"on the '{backend}' backend needs about {format_bytes(need)} beyond the model's "
            f"weights, and {format_bytes(budget.bytes)} is available ({budget.source}); "
            f"{hint}. {ENV} (bytes, e.g. '64GiB', or 'none') overrides the limit if the "
            "estimate is too cautious")
