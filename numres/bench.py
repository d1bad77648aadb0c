"""``numres bench``: numres's own timer, and the pieces ``benchmarks/bench.py`` builds on.

Usage: ``numres bench`` (short defaults; ``numres bench --help`` lists the options). For each
model, batch and size, every numres backend asked for runs the same random weights (saved
with ``numres.save_pth`` and read back from that file) on the same input, in turn, round after
round, after warm-up; medians are reported. sgemm peak is measured in the same run (2048^3,
NumPy's BLAS). ``--memory``: the peak RSS of a fresh process per contender that loads the file
and runs one configuration. ``--layers N``: the N slowest ops of one pass, timed through
:meth:`numres.backends.Backend.observe`. The comparison with torch and ONNX Runtime is
``benchmarks/bench.py`` in a checkout.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np

import numres
from numres.backends import default_threads
from numres.models.flops import conv_macs

#: Seconds each contender waits before it is timed: ORT's and OpenMP's idle threads spin for
#: a while after a run, and no contender should be timed against another's spinning threads.
SETTLE_S = 0.05


def sgemm_peak(rounds=5):
    """GFLOP/s of NumPy's BLAS on a 2048^3 float32 product (median of ``rounds``)."""
    a = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)
    a @ a
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t)
    return 2 * 2048 ** 3 / np.median(times) / 1e9


def blas_info():
    """The BLAS libraries threadpoolctl sees, one line."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    return "; ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} "
                     f"threads={i.get('num_threads')}" for i in threadpool_info()
                     if i.get("user_api") == "blas")


def environment(**extra):
    """The machine and library versions a run reports, plus ``extra`` entries."""
    env = {"python": platform.python_version(), "machine": platform.machine(),
           "processor": cpu_name(), "cpus": os.cpu_count(), "threads": default_threads(),
           "numpy": np.__version__, "blas": blas_info()}
    env.update(extra)
    env.update({"numba": version("numba"), "numres": numres.__version__,
                "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
                "date": time.strftime("%Y-%m-%d")})
    return env


class Contender:
    """One thing timed: ``fn()`` runs a batch; ``times`` collects seconds per call."""

    def __init__(self, name, fn):
        self.name, self.fn = name, fn
        self.times = []


#: Backend names with options the benchmarks accept (``--backends numba,numba-bf16``).
VARIANTS = {"numba-bf16": ("numba", {"precision": "bfloat16"})}


def backend_for(spec):
    """The backend a benchmark's ``--backends`` entry names: a backend's name, or one of
    :data:`VARIANTS` (a backend with options)."""
    from .backends import get_backend
    name, options = VARIANTS.get(spec, (spec, {}))
    return get_backend(name, **options)


def numres_contenders(arch, ckpt, backends, x):
    """A :class:`Contender` per backend (a ``--backends`` entry: :func:`backend_for`):
    ``arch`` with the weights in ``ckpt`` on ``x``."""
    out = []
    for backend in backends:
        model = numres.build(arch, weights=ckpt, backend=backend_for(backend))
        if model.backend.stand_in() is not None:
            # A fresh machine: time the compiled kernels, not NumPy standing in for them.
            print(f"(waiting for the {backend} kernels to compile in the background)")
            from .backends.numba import background
            background.wait()
        out.append(Contender(f"numres-{backend}", lambda m=model: m(x)))
    return out


def bench_config(contenders, rounds, warmup, min_time):
    """Time ``contenders`` in turn, round after round: ``{name: median seconds per call}``."""
    for c in contenders:
        for _ in range(warmup):
            c.fn()
    # Repeat each call enough times that one sample lasts >= min_time.
    reps = {}
    for c in contenders:
        t = time.perf_counter()
        c.fn()
        reps[c.name] = max(1, int(min_time / max(time.perf_counter() - t, 1e-6)))
    for _ in range(rounds):
        for c in contenders:
            time.sleep(SETTLE_S)
            t = time.perf_counter()
            for _ in range(reps[c.name]):
                c.fn()
            c.times.append((time.perf_counter() - t) / reps[c.name])
    return {c.name: float(np.median(c.times)) for c in contenders}


def layer_breakdown(model, x, top, runs=5):
    """The ``top`` slowest ops of ``model(x)``, observed on its backend
    (:meth:`numres.backends.Backend.observe`).

    Returns:
        ``(seconds per pass, [(label, calls per pass, seconds per pass), ...])``.
    """
    layout = "CHW" if model.backend.name == "numpy" else "HWC"   # the activation layout
    stats = defaultdict(list)

    def label(op, args):
        if op in ("conv2d", "conv2d_max_pool"):
            x, conv = args[:2]
            shape = "x".join(str(d) for d in x.shape[1:])
            text = f"conv k{conv.kernel_size} s{conv.stride} g{conv.groups} in {shape} {layout}"
            return text + (" + max_pool" if op == "conv2d_max_pool" else "")
        return {"max_pool2d": "max_pool", "from_nchw": "to internal layout",
                "to_nchw": "to NCHW", "global_avg_pool": "avg_pool"}.get(op, op)

    with model.backend.observe(lambda op, args, kwargs, s: stats[label(op, args)].append(s)):
        for _ in range(2):
            model(x)
        stats.clear()
        t = time.perf_counter()
        for _ in range(runs):
            model(x)
        total = (time.perf_counter() - t) / runs
    rows = sorted(((sum(v) / runs, k, len(v) // runs) for k, v in stats.items()), reverse=True)
    return total, [(name, count, seconds) for seconds, name, count in rows[:top]]


def peak_rss_mib():
    """Peak RSS of this process's address space (VmHWM). Not getrusage's ru_maxrss, which
    Linux carries across fork/exec: a child would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(args):
    """Run in a fresh process: load one numres contender, run one batch twice, print its
    peak RSS (MiB) as JSON."""
    name, arch, batch, size, ckpt = args
    x = np.random.default_rng(0).standard_normal(
        (int(batch), 3, int(size), int(size))).astype(np.float32)
    base = peak_rss_mib()
    model = numres.build(arch, weights=ckpt, backend=backend_for(name.split("-", 1)[1]))
    for _ in range(2):
        model(x)
    peak = peak_rss_mib()
    print(json.dumps({"peak_mib": peak, "above_imports_mib": peak - base}))


def measure_memory(command, name, arch, batch, size, ckpt):
    """Peak RSS of ``command + ["--memory-child", name, arch, batch, size, ckpt]`` run in a
    fresh process (the child's JSON), or None when it failed."""
    cmd = list(command) + ["--memory-child", name, arch, str(batch), str(size), ckpt]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def fmt(v, spec):
    """``v`` formatted, or ``"n/a"``."""
    return "n/a" if v is None else format(v, spec)


def print_layers(backend, total, breakdown):
    """The per-op table of :func:`layer_breakdown`."""
    print(f"\nslowest numres-{backend} ops (median of 5 runs, {total * 1e3:.1f} ms total):\n")
    for label, count, seconds in breakdown:
        print(f"- {seconds * 1e3:7.2f} ms  {count:2d}x  {label}")


def header(env):
    """Measure the sgemm peak and print the report's header; returns ``(env, peak)``."""
    peak = sgemm_peak()
    print("# numres benchmark\n")
    for k, v in env.items():
        print(f"- {k}: {v}")
    print(f"- sgemm peak (2048^3, NumPy): {peak:.0f} GFLOP/s\n")
    return env, peak


def options(description, defaults=None):
    """The options of a benchmark run (``numres bench`` and ``benchmarks/bench.py``)."""
    p = argparse.ArgumentParser(prog="numres bench", description=description)
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--sizes", default="224")
    p.add_argument("--backends", default="numba", help="numres backends, comma separated")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per timed sample")
    p.add_argument("--layers", type=int, default=8, help="top-N per-layer rows (0: none)")
    p.add_argument("--memory", action="store_true", help="peak RSS per contender (slow)")
    p.add_argument("--json", help="write results here")
    p.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    p.set_defaults(**(defaults or {}))
    return p


def main(argv=None, defaults=None):
    """Run the benchmark; ``defaults`` overrides argument defaults (``numres bench``).

    Returns:
        list of per-configuration result dicts (also written with ``--json``).
    """
    p = options(__doc__.split("\n\n")[0], defaults)
    p.add_argument("--no-torch", action="store_true", help=argparse.SUPPRESS)   # always
    args = p.parse_args(argv)
    if args.memory_child:
        return memory_child(args.memory_child)
    backends = [b for b in args.backends.split(",") if b]
    env, peak_before = header(environment())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models.split(","):
            ckpt = os.path.join(tmp, f"{arch}.pth")
            numres.save_pth(numres.build(arch, backend="numpy").state_dict(), ckpt)
            for size in map(int, args.sizes.split(",")):
                for batch in map(int, args.batches.split(",")):
                    results.append(_run_config(arch, batch, size, ckpt, backends, args,
                                               peak_before))
    peak_after = sgemm_peak()
    print(f"\nsgemm peak after the run: {peak_after:.0f} GFLOP/s")
    env["sgemm_peak_gflops"] = [round(peak_before, 1), round(peak_after, 1)]
    write_results(args.json, env, results)
    return results


def write_results(path, env, results):
    """``{"environment": env, "results": results}`` as JSON to ``path`` (nothing if None)."""
    if path:
        with open(path, "w") as f:
            json.dump({"environment": env, "results": results}, f, indent=1)
        print(f"results written to {path}")


def _run_config(arch, batch, size, ckpt, backends, args, peak):
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    contenders = numres_contenders(arch, ckpt, backends, x)
    medians = bench_config(contenders, args.rounds, args.warmup, args.min_time)
    gflop = 2 * conv_macs(arch, size, size) * batch / 1e9
    print(f"\n## {arch}, batch {batch}, {size}x{size} ({gflop / batch:.2f} GFLOP/image)\n")
    print("| contender | img/s | ms/batch | GFLOP/s | % sgemm peak | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    rows = []
    for c in contenders:
        t = medians[c.name]
        mem = measure_memory([sys.executable, "-m", "numres.bench"], c.name, arch, batch, size,
                             ckpt) if args.memory else None
        row = {"contender": c.name, "model": arch, "batch": batch, "size": size,
               "ms": t * 1e3, "img_s": batch / t, "gflops": gflop / t,
               "peak_fraction": gflop / t / peak,
               "peak_rss_mib": mem["peak_mib"] if mem else None}
        rows.append(row)
        print(f"| {c.name} | {row['img_s']:.1f} | {row['ms']:.1f} | {row['gflops']:.0f} | "
              f"{row['peak_fraction']:.0%} | {fmt(row['peak_rss_mib'], '.0f')} |")
    breakdown = []
    if args.layers and backends:
        model = numres.build(arch, weights=ckpt, backend=backend_for(backends[0]))
        total, breakdown = layer_breakdown(model, x, args.layers)
        print_layers(backends[0], total, breakdown)
    return {"model": arch, "batch": batch, "size": size, "gflop_per_image": gflop / batch,
            "rows": rows, "layers": [{"op": label, "count": count, "ms": s * 1e3}
                                     for label, count, s in breakdown]}


def version(module):
    """``module.__version__``, or ``"not installed"``."""
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def cpu_name():
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
