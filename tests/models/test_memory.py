"""Bounded memory (``numres/models/memory.py``): estimates, the budget, chunks, refusals."""

import json
import os
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest

import numres
from numres.models import memory


def _backend(name):
    """A fresh backend instance: its pool and recorded passes are this test's alone."""
    if name == "numba":
        from numres.backends.numba import NumbaBackend
        return NumbaBackend()
    from numres.backends.numpy_backend import NumpyBackend
    return NumpyBackend()


# -- the estimate bounds what a pass really takes ---------------------------------------------
_MEASURE = textwrap.dedent("""
    import gc, json, sys, tracemalloc
    import numpy as np
    import numres
    from numres.models import memory

    def rss():
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return [int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")]

    backend, arch, shape, kind = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    if backend.startswith("numba"):
        from numres.backends.numba import warmup
        warmup()          # kernels loaded: their code is not the pass's memory
    if backend == "numba-bf16":
        from numres.backends import get_backend
        backend = get_backend("numba", precision="bfloat16")
    model = numres.build(arch, num_classes=10, backend=backend)
    model.memory_limit = "none"
    model._prepared()                    # weights prepared: excluded from the estimate
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    stages = ("layer1", "layer2", "layer3", "layer4") if kind == "maps" else ()
    estimate = memory.estimate_peak_bytes(model, x.shape, kind, stages)
    gc.collect()
    tracemalloc.start()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                     # the peak RSS (VmHWM) starts again from here
    base = rss()[0]
    {"logits": model, "features": model.features, "maps": model.feature_maps}[kind](x)
    peak = rss()[1] - base
    traced = tracemalloc.get_traced_memory()[1]
    print(json.dumps({"estimate": estimate, "rss": peak, "traced": traced}))
""")


def _measure(backend, arch, shape, kind):
    """Peak memory growth of one pass in a child process: the larger of peak RSS growth
    (malloc's heap included) and tracemalloc's peak (exact for NumPy arrays, also where
    the pass reuses memory the process had already freed, which RSS does not see)."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    out = subprocess.run([sys.executable, "-c", _MEASURE, backend, arch, json.dumps(shape),
                          kind], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["estimate"], max(result["rss"], result["traced"])


@pytest.mark.parametrize("arch, shape, kind", [
    ("resnet18", [4, 3, 160, 160], "logits"),
    ("resnext50_32x4d", [1, 3, 192, 192], "maps"),
])
def test_estimate_is_an_upper_bound_of_the_measured_peak(backend, arch, shape, kind):
    estimate, measured = _measure(backend, arch, shape, kind)
    # Calibrated at 1.02-1.21x for peaks of 50 MiB and more (numres/models/memory.py);
    # small passes have the fixed 2 MiB margin on top.
    assert measured <= estimate <= 1.6 * measured + memory.MARGIN_BYTES, \
        f"estimate {estimate / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"


@pytest.mark.parametrize("arch, shape, kind", [
    ("resnet18", [4, 3, 160, 160], "logits"),
    ("resnet18", [1, 3, 224, 224], "logits"),       # 56/28/14-wide maps: direct paths
    ("resnext50_32x4d", [1, 3, 192, 192], "maps"),
])
def test_the_estimate_bounds_bfloat16_passes_too(arch, shape, kind):
    """``precision="bfloat16"`` converts inputs to pairs and pads them as pairs: the
    estimate counts those copies (half an input's bytes each), on every path."""
    pytest.importorskip("numres.backends.numba", reason="Numba is not installed")
    from numres.backends.numba import pairs, tile
    if not (tile.AVAILABLE and pairs.supported()):
        pytest.skip("this CPU has no AVX512_BF16 (vdpbf16ps)")
    estimate, measured = _measure("numba-bf16", arch, shape, kind)
    assert measured <= estimate <= 1.6 * measured + memory.MARGIN_BYTES, \
        f"estimate {estimate / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB"


def test_estimate_grows_with_the_input_and_needs_no_allocation(backend):
    model = numres.resnet18(num_classes=10, backend=_backend(backend))
    model._prepared()
    tracemalloc.start()
    try:
        small = memory.estimate_peak_bytes(model, (1, 3, 224, 224))
        big = memory.estimate_peak_bytes(model, (1, 3, 20000, 20000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 10 << 20 < small < 200 << 20
    assert big > 20 << 30                        # tens of GB of activations and windows
    assert peak < 5 << 20                       # shapes only: nothing of that size exists
    assert memory.estimate_peak_bytes(model, (8, 3, 224, 224)) > 4 * small


# -- a batch that does not fit runs in chunks, bit for bit --------------------------------------
def _limit_between(model, shape, kind, stages, fits, fails):
    """A NUMRES_MEMORY_LIMIT under which chunks of ``fits`` images fit, ``fails`` do not."""
    low = memory.chunk_need(model, shape, fits, kind, stages, reuse=False)
    high = memory.chunk_need(model, shape, fails, kind, stages, reuse=False)
    assert low < high
    return str((low + high) // 2)


def _chunk_sizes(model, monkeypatch):
    """Record the batch size of every pass the backend runs."""
    seen = []
    execute = model.backend.execute

    def spy(cache, key, fn, x):
        seen.append(x.shape[0])
        return execute(cache, key, fn, x)
    monkeypatch.setattr(model.backend, "execute", spy)
    return seen


def test_a_batch_that_does_not_fit_runs_in_chunks_bit_for_bit(backend, monkeypatch):
    rng = np.random.default_rng(0)
    # 128 x 64: ResNet-18's layer3 is 8 x 4 (two Winograd tiles per image), so the numba
    # backend's choice differs between 3 images (6 tiles) and 8 (16): chunks must take
    # the whole batch's choice to give its results.
    x = rng.standard_normal((8, 3, 128, 64)).astype(np.float32)
    whole = numres.resnet18(num_classes=7, backend=_backend(backend))
    whole.memory_limit = "none"
    chunked = numres.resnet18(num_classes=7, backend=_backend(backend))
    chunked.load_state_dict(whole.state_dict())
    expected = {"logits": whole(x), "features": whole.features(x),
                "maps": whole.feature_maps(x, ("stem", "layer2", "layer4"))}
    seen = _chunk_sizes(chunked, monkeypatch)
    padded = chunked.backend.keeps_buffers_per_shape   # numba pads the last chunk
    for kind, stages, run in [("logits", (), chunked), ("features", (), chunked.features),
                              ("maps", ("stem", "layer2", "layer4"),
                               lambda z: chunked.feature_maps(z, ("stem", "layer2",
                                                                  "layer4")))]:
        for repeat in range(2):                  # recorded, then replayed
            # (the limit from what the model holds now: the first pass made Winograd
            # filters, which the whole batch then no longer needs to make)
            monkeypatch.setenv("NUMRES_MEMORY_LIMIT",
                               _limit_between(chunked, x.shape, kind, stages, 3, 4))
            assert memory.batch_chunk(chunked, x.shape, kind, stages) == 3
            seen.clear()
            got = run(x)
            assert seen == ([3, 3, 3] if padded else [3, 3, 2]), kind
            if kind == "maps":
                assert list(got) == list(stages)
                for stage in stages:
                    np.testing.assert_array_equal(got[stage], expected["maps"][stage])
            else:
                assert got.dtype == np.float32 and got.flags.c_contiguous
                np.testing.assert_array_equal(got, expected[kind])
    if padded:   # logits and features share one recorded chunk pass, maps have the other
        assert len(chunked._prepared()["graphs"]) == 2
    monkeypatch.delenv("NUMRES_MEMORY_LIMIT")
    seen.clear()
    np.testing.assert_array_equal(chunked(x), expected["logits"])      # fits again: whole
    assert seen == [8]


def test_float64_input_is_cast_chunk_by_chunk(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3, 48, 48))
    model = numres.resnet18(num_classes=4, backend=_backend("numpy"))
    model.memory_limit = "none"
    expected = model(x.astype(np.float32))
    model.memory_limit = None
    low = memory.chunk_need(model, x.shape, 2, copy_input=True, reuse=False)
    high = memory.chunk_need(model, x.shape, 3, copy_input=True, reuse=False)
    monkeypatch.setenv("NUMRES_MEMORY_LIMIT", str((low + high) // 2))
    seen = _chunk_sizes(model, monkeypatch)
    np.testing.assert_array_equal(model(x), expected)
    assert seen == [2, 2, 1]


def test_the_check_is_cached_per_shape(monkeypatch):
    model = numres.resnet18(num_classes=4, backend=_backend("numpy"))
    x = np.zeros((2, 3, 32, 32), np.float32)
    model(x)
    walks = []
    original = memory.pass_events
    monkeypatch.setattr(memory, "pass_events", lambda *a, **k: walks.append(1) or
                        original(*a, **k))
    for _ in range(3):
        model(x)
    assert walks == []                          # estimate cached, the batch fits
    model(np.zeros((1, 3, 40, 32), np.float32))
    assert len(walks) == 1                      # a new shape is walked once


# -- one image that cannot fit: MemoryError, before anything large is allocated ------------------
def test_an_image_too_large_for_memory_raises_memory_error(backend, monkeypatch):
    model = numres.resnet50(num_classes=10, backend=_backend(backend))
    model._prepared()
    monkeypatch.setenv("NUMRES_MEMORY_LIMIT", "16GiB")
    with pytest.raises(MemoryError) as info:    # 4.8 GB of input: never allocated
        memory.batch_chunk(model, (1, 3, 20000, 20000))
    message = str(info.value)
    need = memory.estimate_peak_bytes(model, (1, 3, 20000, 20000))
    assert "(1, 3, 20000, 20000)" in message
    assert memory.format_bytes(need) in message and "GiB" in message
    assert "16.0 GiB is available (NUMRES_MEMORY_LIMIT=16GiB)" in message
    assert "smaller images" in message
    with pytest.raises(MemoryError, match="even one image"):
        memory.batch_chunk(model, (4, 3, 20000, 20000))


def test_the_model_refuses_before_allocating(backend, monkeypatch):
    model = numres.resnet18(num_classes=10, backend=_backend(backend))
    model._prepared()
    x = np.zeros((2, 3, 512, 512), np.float32)
    model.memory_limit = "20MiB"           # the model's own limit wins over the environment
    monkeypatch.setenv("NUMRES_MEMORY_LIMIT", "none")
    tracemalloc.start()
    try:
        with pytest.raises(MemoryError, match=r"\(2, 3, 512, 512\).*even one image.*"
                                              r"20\.0 MiB is available.*memory_limit"):
            model.features(x)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20                       # refused before the pass allocated anything


def test_no_limit_never_splits(monkeypatch):
    model = numres.resnet18(num_classes=4, backend=_backend("numpy"))
    monkeypatch.setenv("NUMRES_MEMORY_LIMIT", "none")
    assert memory.batch_chunk(model, (64, 3, 20000, 20000)) == 64
    monkeypatch.delenv("NUMRES_MEMORY_LIMIT")
    monkeypatch.setattr(memory, "host_available", lambda: None)
    memory._readings.clear()
    try:
        assert memory.memory_budget(model.backend) == (None, "no memory limit could be read")
        assert memory.batch_chunk(model, (64, 3, 20000, 20000)) == 64
    finally:
        memory._readings.clear()


def test_reading_reused_while_the_pass_is_far_inside_it(monkeypatch):
    """A pass within AMPLE of the last reading reuses it for AMPLE_TTL s (no file reads on
    the call after an idle gap); one closer to the limit reads again after TTL s."""
    model = numres.resnet18(num_classes=4, backend=_backend("numpy"))
    monkeypatch.delenv("NUMRES_MEMORY_LIMIT", raising=False)
    reads = []
    free = [0]

    def host():
        reads.append(free[0])
        return free[0], "MemAvailable in x"

    monkeypatch.setattr(memory, "host_available", host)
    shape = (1, 3, 64, 64)
    need = memory.estimate_peak_bytes(model, shape)

    def age_reading(seconds):
        when, value = memory._readings["host"]
        memory._readings["host"] = (when - seconds, value)

    memory._readings.clear()
    try:
        free[0] = int(need / memory.SAFETY / memory.AMPLE) * 2        # ample: 8x the pass
        assert memory.batch_chunk(model, shape) == 1 and len(reads) == 1
        age_reading(memory.TTL + 1)
        assert memory.batch_chunk(model, shape) == 1 and len(reads) == 1     # reused
        age_reading(memory.AMPLE_TTL)
        assert memory.batch_chunk(model, shape) == 1 and len(reads) == 2     # too old
        # Within 4x of the budget: a reading older than TTL is not trusted.
        free[0] = int(need / memory.SAFETY) * 2
        memory._readings.clear()
        assert memory.batch_chunk(model, shape) == 1 and len(reads) == 3
        age_reading(memory.TTL + 1)
        free[0] = need // 4                              # memory fell: the pass must not run
        with pytest.raises(MemoryError):
            memory.batch_chunk(model, shape)
        assert len(reads) == 4
    finally:
        memory._readings.clear()


# -- how much memory there is ------------------------------------------------------------------
def _tree(root, files):
    for path, text in files.items():
        full = root / path
        full.parent.mkdir(parents=True, exist_ok=True)
        full.write_text(text)
    return str(root / "proc"), str(root / "cg")


def test_cgroup_v2_limit_less_usage_and_inactive_cache(tmp_path):
    proc, cg = _tree(tmp_path, {
        "proc/self/cgroup": "0::/user.slice/app.scope\n",
        "cg/user.slice/app.scope/memory.max": "1073741824\n",
        "cg/user.slice/app.scope/memory.current": "268435456\n",
        "cg/user.slice/app.scope/memory.stat": "anon 1\ninactive_file 67108864\nfile 9\n",
        "cg/user.slice/memory.max": "max\n",
        "cg/user.slice/memory.current": "999999999999\n",
    })
    headroom, where = memory.cgroup_available(proc, cg)
    assert headroom == (1 << 30) - (256 << 20) + (64 << 20)
    assert "cgroup v2" in where and "app.scope/memory.max" in where


def test_cgroup_v2_parent_limit_binds(tmp_path):
    proc, cg = _tree(tmp_path, {
        "proc/self/cgroup": "0::/kube/pod/ctr\n",
        "cg/kube/pod/ctr/memory.max": "max\n",
        "cg/kube/pod/ctr/memory.current": "100\n",
        "cg/kube/pod/memory.max": "536870912\n",
        "cg/kube/pod/memory.current": "419430400\n",
    })
    assert memory.cgroup_available(proc, cg)[0] == (512 - 400) << 20


def test_cgroup_v2_max_everywhere_is_no_limit(tmp_path):
    proc, cg = _tree(tmp_path, {"proc/self/cgroup": "0::/\n", "cg/memory.max": "max\n",
                                "cg/memory.current": "123\n"})
    assert memory.cgroup_available(proc, cg) is None


def test_cgroup_v1_and_a_namespaced_path(tmp_path):
    proc, cg = _tree(tmp_path, {
        # hybrid: v1 memory controller plus an empty v2 hierarchy; the process's own path
        # does not exist inside the container's namespace, the root's files do
        "proc/self/cgroup": "12:pids:/docker/abc\n4:cpu,memory:/docker/abc\n0::/\n",
        "cg/memory/memory.limit_in_bytes": "2147483648\n",
        "cg/memory/memory.usage_in_bytes": "1610612736\n",
        "cg/memory/memory.stat": "cache 5\ntotal_inactive_file 536870912\n",
        "cg/unified/cgroup.procs": "1\n",
    })
    headroom, where = memory.cgroup_available(proc, cg)
    assert headroom == (2 << 30) - (1536 << 20) + (512 << 20)
    assert "cgroup v1" in where


def test_cgroup_v1_unlimited_and_missing_files(tmp_path):
    proc, cg = _tree(tmp_path, {
        "proc/self/cgroup": "4:memory:/\n",
        "cg/memory/memory.limit_in_bytes": "9223372036854771712\n",
        "cg/memory/memory.usage_in_bytes": "1\n",
    })
    assert memory.cgroup_available(proc, cg) is None
    assert memory.cgroup_available(str(tmp_path / "nowhere"), cg) is None
    proc, cg = _tree(tmp_path / "b", {"proc/self/cgroup": "4:memory:/x\n",
                                      "cg/memory/x/memory.limit_in_bytes": "100\n"})
    assert memory.cgroup_available(proc, cg) is None        # no usage file: unknown


def test_meminfo_and_the_smaller_of_both(tmp_path):
    proc, cg = _tree(tmp_path, {
        "proc/meminfo": "MemTotal:  16000000 kB\nMemFree: 1 kB\nMemAvailable:  8000000 kB\n",
        "proc/self/cgroup": "0::/\n",
        "cg/memory.max": "4294967296\n",
        "cg/memory.current": "0\n",
    })
    assert memory.meminfo_available(os.path.join(proc, "meminfo")) == 8000000 * 1024
    assert memory.host_available(proc, cg) == (4 << 30, memory.cgroup_available(proc, cg)[1])
    (tmp_path / "cg" / "memory.max").write_text("max\n")
    assert memory.host_available(proc, cg) == (8000000 * 1024,
                                               "MemAvailable in /proc/meminfo")
    (tmp_path / "proc" / "meminfo").write_text("MemTotal: 5 kB\n")
    assert memory.meminfo_available(os.path.join(proc, "meminfo")) is None
    assert memory.host_available(proc, cg) is None
    assert memory.host_available(str(tmp_path / "none"), cg) is None


def test_budget_sources(monkeypatch):
    backend = numres.get_backend("numpy")
    monkeypatch.setenv("NUMRES_MEMORY_LIMIT", "1.5GiB")
    assert memory.memory_budget(backend) == (3 << 29, "NUMRES_MEMORY_LIMIT=1.5GiB")
    assert memory.memory_budget(backend, "100MB") == (10 ** 8,
                                                      "the model's memory_limit='100MB'")
    monkeypatch.delenv("NUMRES_MEMORY_LIMIT")
    monkeypatch.setattr(memory, "host_available", lambda: (1000, "MemAvailable in x"))
    memory._readings.clear()
    try:
        assert memory.memory_budget(backend) == (850, "85% of 1000 B: MemAvailable in x")
    finally:
        memory._readings.clear()


@pytest.mark.parametrize("text, expected", [
    ("4GiB", 4 << 30), ("4 gib", 4 << 30), ("4Gi", 4 << 30), ("4G", 4 * 10 ** 9),
    ("512MB", 512 * 10 ** 6), ("1.5MiB", 3 << 19), ("123", 123), (77, 77),
    ("none", None), ("OFF", None), ("inf", None)])
def test_parse_bytes(text, expected):
    assert memory.parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "4 GiBs", "-1", "1e9"])
def test_parse_bytes_refuses_nonsense(text):
    with pytest.raises(ValueError, match="memory size"):
        memory.parse_bytes(text)
