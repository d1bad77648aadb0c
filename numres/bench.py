"""numres beside torch (NCHW and channels_last) and ONNX Runtime, in one process, interleaved.

Usage: ``numres bench`` (short) or, from a checkout, ``python benchmarks/bench.py`` (full):
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench.py \\
        --models resnet18,resnet50 --batches 1,8,32 --sizes 224,320 --json results.json

Every contender runs the same weights (a random torchvision state dict saved with torch.save
and read by numres from that file) on the same input. Per configuration, contenders are timed
in turn, round after round, after warm-up; medians are reported, so a noisy neighbour slows
everyone alike. sgemm peak is measured in the same run (2048^3, NumPy's BLAS). Peak memory
(``--memory``) is the peak RSS of a fresh process per contender that loads the file and runs
one configuration. Missing torch/ONNX Runtime: their columns say so and numres still runs.
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
import types

import numpy as np

import numres
from numres.backends._base import Backend
from numres.models.flops import conv_macs


def import_torch():
    """torch and torchvision, or (None, reason)."""
    try:
        import torch
    except ImportError:
        return None, "torch not installed"
    # The PyPI torchvision wheel is a CUDA build; beside CPU torch its meta registrations fail
    # to import, and the models do not need them.
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    try:
        import torchvision
    except Exception as exc:  # noqa: BLE001 - any import failure just removes a column
        return None, f"torchvision unusable: {exc}"
    return (torch, torchvision), None


def sgemm_peak(rounds=5):
    a = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)
    a @ a
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t)
    return 2 * 2048 ** 3 / np.median(times) / 1e9


def blas_info():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    return "; ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} "
                     f"threads={i.get('num_threads')}" for i in threadpool_info()
                     if i.get("user_api") == "blas")


SETTLE_S = 0.05


class Contender:
    def __init__(self, name, fn, sync=None):
        self.name, self.fn, self.sync = name, fn, sync
        self.times = []


def make_contenders(arch, batch, size, ckpt, torch_mods, backends, ort_dir):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    out, notes = [], {}
    for backend in backends:
        model = numres.build(arch, weights=ckpt, backend=backend)
        out.append(Contender(f"numres-{backend}", lambda m=model: m(x)))
    if torch_mods:
        torch, tv = torch_mods
        tm = getattr(tv.models, arch)()
        tm.load_state_dict(torch.load(ckpt))
        tm.eval()
        xt = torch.from_numpy(x)
        tm_cl = getattr(tv.models, arch)()
        tm_cl.load_state_dict(tm.state_dict())
        tm_cl = tm_cl.eval().to(memory_format=torch.channels_last)
        xt_cl = xt.contiguous(memory_format=torch.channels_last)

        def run(m, inp):
            with torch.inference_mode():
                return m(inp)
        out.append(Contender("torch-nchw", lambda: run(tm, xt)))
        out.append(Contender("torch-cl", lambda: run(tm_cl, xt_cl)))
        onnx_path = os.path.join(ort_dir, f"{arch}.onnx")
        try:
            import onnxruntime as ort
            if not os.path.exists(onnx_path):
                torch.onnx.export(tm, xt[:1], onnx_path, input_names=["x"],
                                  output_names=["y"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}},
                                  dynamo=False)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = numres_threads()
            sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
            out.append(Contender("onnxruntime", lambda: sess.run(None, {"x": x})))
        except Exception as exc:  # noqa: BLE001
            notes["onnxruntime"] = f"unavailable: {exc}"
    else:
        notes["torch"] = notes["onnxruntime"] = "unavailable (no torch to build the reference)"
    return x, out, notes


def numres_threads():
    from numres.backends._parallel import default_threads
    return default_threads()


def bench_config(contenders, rounds, warmup, min_time):
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
            # ORT's and OpenMP's idle workers spin for a while after a run: let them settle so
            # that no contender is timed against the previous one's spinning threads.
            time.sleep(SETTLE_S)
            t = time.perf_counter()
            for _ in range(reps[c.name]):
                c.fn()
            c.times.append((time.perf_counter() - t) / reps[c.name])
    return {c.name: float(np.median(c.times)) for c in contenders}


def layer_breakdown(arch, batch, size, ckpt, backend, top):
    """Per-op medians for numres, so the slowest layer is visible."""
    from collections import defaultdict
    model = numres.build(arch, weights=ckpt, backend=backend)
    be = model.backend
    stats = defaultdict(list)

    def timed(label_fn, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            result = fn(*args, **kwargs)
            stats[label_fn(*args, **kwargs)].append(time.perf_counter() - t)
            return result
        return wrapper

    layout = "CHW" if backend == "numpy" else "HWC"   # the backend's activation layout

    def conv_label(x, conv, **_):
        shape = "x".join(str(d) for d in x.shape[1:])
        return f"conv k{conv.kernel_size} s{conv.stride} g{conv.groups} in {shape} {layout}"
    if hasattr(be, "replay"):
        be.replay = False        # a replayed pass would skip the timed wrappers
    originals = {n: getattr(be, n) for n in ("conv2d", "conv2d_max_pool", "max_pool2d",
                                             "from_nchw")}
    be.conv2d = timed(conv_label, originals["conv2d"])
    if type(be).conv2d_max_pool is not Backend.conv2d_max_pool:     # fused by the backend
        be.conv2d_max_pool = timed(lambda x, conv, *a, **k: conv_label(x, conv) + " + max_pool",
                                   originals["conv2d_max_pool"])
    be.max_pool2d = timed(lambda *a, **k: "max_pool", originals["max_pool2d"])
    be.from_nchw = timed(lambda *a, **k: "to internal layout", originals["from_nchw"])
    try:
        x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
        for _ in range(2):
            model(x)
        stats.clear()
        runs = 5
        t = time.perf_counter()
        for _ in range(runs):
            model(x)
        total = (time.perf_counter() - t) / runs
    finally:
        for n, fn in originals.items():
            setattr(be, n, fn)
    rows = sorted(((sum(v) / runs, k, len(v) // runs) for k, v in stats.items()), reverse=True)
    return total, [(label, count, seconds) for seconds, label, count in rows[:top]]


def _peak_rss_mib():
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
    """Run in a fresh process: load one contender, run one batch, print peak RSS (MiB)."""
    name, arch, batch, size, ckpt = args
    batch, size = int(batch), int(size)
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    base = _peak_rss_mib()
    if name.startswith("numres-"):
        model = numres.build(arch, weights=ckpt, backend=name.split("-", 1)[1])
        for _ in range(2):
            model(x)
    else:
        mods, _ = import_torch()
        torch, tv = mods
        base = _peak_rss_mib()
        tm = getattr(tv.models, arch)()
        tm.load_state_dict(torch.load(ckpt))
        tm.eval()
        xt = torch.from_numpy(x)
        if name == "torch-cl":
            tm = tm.to(memory_format=torch.channels_last)
            xt = xt.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            for _ in range(2):
                tm(xt)
    peak = _peak_rss_mib()
    print(json.dumps({"peak_mib": peak, "above_imports_mib": peak - base}))


def measure_memory(name, arch, batch, size, ckpt):
    cmd = [sys.executable, "-m", "numres.bench", "--memory-child", name, arch, str(batch),
           str(size), ckpt]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def main(argv=None, defaults=None):
    """Run the benchmark; ``defaults`` overrides argument defaults (``numres bench``)."""
    p = argparse.ArgumentParser(prog="numres bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--sizes", default="224")
    p.add_argument("--backends", default="numba", help="numres backends, comma separated")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per timed sample")
    p.add_argument("--layers", type=int, default=8, help="top-N per-layer rows (0: none)")
    p.add_argument("--memory", action="store_true", help="peak RSS per contender (slow)")
    p.add_argument("--no-torch", action="store_true", help="numres only")
    p.add_argument("--json", help="write results here")
    p.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    p.set_defaults(**(defaults or {}))
    args = p.parse_args(argv)
    if args.memory_child:
        return memory_child(args.memory_child)

    torch_mods, torch_note = (None, "disabled") if args.no_torch else import_torch()
    if torch_mods:
        torch_mods[0].set_num_threads(numres_threads())
    backends = [b for b in args.backends.split(",") if b]
    peak_before = sgemm_peak()
    env = {"python": platform.python_version(), "machine": platform.machine(),
           "processor": _cpu_name(), "cpus": os.cpu_count(), "threads": numres_threads(),
           "numpy": np.__version__, "blas": blas_info(),
           "torch": torch_mods[0].__version__ if torch_mods else torch_note,
           "onnxruntime": _version("onnxruntime"), "numba": _version("numba"),
           "numres": numres.__version__,
           "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)"),
           "date": time.strftime("%Y-%m-%d")}
    print("# numres benchmark\n")
    for k, v in env.items():
        print(f"- {k}: {v}")
    print(f"- sgemm peak (2048^3, NumPy): {peak_before:.0f} GFLOP/s\n")

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models.split(","):
            ckpt = os.path.join(tmp, f"{arch}.pth")
            _write_checkpoint(arch, ckpt, torch_mods)
            for size in map(int, args.sizes.split(",")):
                for batch in map(int, args.batches.split(",")):
                    results.append(run_config(arch, batch, size, ckpt, torch_mods, backends,
                                              tmp, args, peak_before))
    peak_after = sgemm_peak()
    print(f"\nsgemm peak after the run: {peak_after:.0f} GFLOP/s")
    env["sgemm_peak_gflops"] = [round(peak_before, 1), round(peak_after, 1)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": results}, f, indent=1)
        print(f"results written to {args.json}")
    return results


def run_config(arch, batch, size, ckpt, torch_mods, backends, tmp, args, peak):
    x, contenders, notes = make_contenders(arch, batch, size, ckpt, torch_mods, backends, tmp)
    medians = bench_config(contenders, args.rounds, args.warmup, args.min_time)
    gflop = 2 * conv_macs(arch, size, size) * batch / 1e9
    torch_best = min((medians[k] for k in ("torch-nchw", "torch-cl") if k in medians),
                     default=None)
    ort = medians.get("onnxruntime")
    print(f"\n## {arch}, batch {batch}, {size}x{size} ({gflop / batch:.2f} GFLOP/image)\n")
    print("| contender | img/s | ms/batch | GFLOP/s | % sgemm peak | vs torch best | vs ORT "
          "| peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for c in contenders:
        t = medians[c.name]
        mem = measure_memory(c.name, arch, batch, size, ckpt) if args.memory else None
        row = {"contender": c.name, "model": arch, "batch": batch, "size": size,
               "ms": t * 1e3, "img_s": batch / t, "gflops": gflop / t,
               "peak_fraction": gflop / t / peak,
               "vs_torch": torch_best / t if torch_best else None,
               "vs_ort": ort / t if ort else None,
               "peak_rss_mib": mem["peak_mib"] if mem else None}
        rows.append(row)
        print(f"| {c.name} | {row['img_s']:.1f} | {row['ms']:.1f} | {row['gflops']:.0f} | "
              f"{row['peak_fraction']:.0%} | {fmt(row['vs_torch'], '.2f')} | "
              f"{fmt(row['vs_ort'], '.2f')} | {fmt(row['peak_rss_mib'], '.0f')} |")
    for k, v in notes.items():
        print(f"| {k} | {v} | | | | | | |")
    breakdown = []
    if args.layers and backends:
        total, breakdown = layer_breakdown(arch, batch, size, ckpt, backends[0], args.layers)
        print(f"\nslowest numres-{backends[0]} ops (median of 5 runs, {total * 1e3:.1f} ms "
              "total):\n")
        for label, count, seconds in breakdown:
            print(f"- {seconds * 1e3:7.2f} ms  {count:2d}x  {label}")
    return {"model": arch, "batch": batch, "size": size, "gflop_per_image": gflop / batch,
            "rows": rows, "notes": notes,
            "layers": [{"op": label, "count": count, "ms": s * 1e3}
                       for label, count, s in breakdown]}


def _write_checkpoint(arch, path, torch_mods):
    if torch_mods:
        torch, tv = torch_mods
        torch.manual_seed(0)
        torch.save(getattr(tv.models, arch)().state_dict(), path)
    else:
        numres.save_pth(numres.build(arch, backend="numpy").state_dict(), path)


def _version(module):
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


def _cpu_name():
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
