"""numres beside torch (NCHW and channels_last) and ONNX Runtime, in one process, interleaved.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench.py \\
        --models resnet18,resnet50 --batches 1,8,32 --sizes 224,320 --json results.json

``--backends numba,numba-bf16`` adds numres in bfloat16 (``precision="bfloat16"``).

Every contender runs the same weights (a random torchvision state dict saved with torch.save
and read by numres from that file) on the same input. Per configuration, contenders are timed
in turn, round after round, after warm-up; medians are reported, so a noisy neighbour slows
everyone alike. sgemm peak is measured in the same run (2048^3, NumPy's BLAS). Peak memory
(``--memory``) is the peak RSS of a fresh process per contender that loads the file and runs
one configuration. Missing torch/ONNX Runtime: their columns say so and numres still runs.
The timer itself is ``numres/bench.py`` (``numres bench``: numres alone).
"""

import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numres  # noqa: E402
from numres import bench  # noqa: E402
from numres.backends import default_threads  # noqa: E402
from numres.models.flops import conv_macs  # noqa: E402
from tests.torch_import import import_torchvision  # noqa: E402


def import_torch():
    """torch and torchvision, or (None, reason)."""
    try:
        return import_torchvision(), None
    except ImportError as exc:
        return None, str(exc) if "torchvision" in str(exc) else "torch not installed"


def reference_contenders(arch, ckpt, torch_mods, ort_dir, x):
    """torch eager (NCHW, channels_last) and ONNX Runtime on the weights in ``ckpt``:
    ``(contenders, notes)``."""
    out, notes = [], {}
    if not torch_mods:
        notes["torch"] = notes["onnxruntime"] = "unavailable (no torch to build the reference)"
        return out, notes
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
    out.append(bench.Contender("torch-nchw", lambda: run(tm, xt)))
    out.append(bench.Contender("torch-cl", lambda: run(tm_cl, xt_cl)))
    onnx_path = os.path.join(ort_dir, f"{arch}.onnx")
    try:
        import onnxruntime as ort
        if not os.path.exists(onnx_path):
            torch.onnx.export(tm, xt[:1], onnx_path, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}}, dynamo=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = default_threads()
        sess = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        out.append(bench.Contender("onnxruntime", lambda: sess.run(None, {"x": x})))
    except Exception as exc:  # noqa: BLE001 - any failure removes the column, with the reason
        notes["onnxruntime"] = f"unavailable: {exc}"
    return out, notes


def memory_child(args):
    """Run in a fresh process: one contender's peak RSS (numres's in ``numres.bench``)."""
    name, arch, batch, size, ckpt = args
    if name.startswith("numres-"):
        return bench.memory_child(args)
    x = np.random.default_rng(0).standard_normal(
        (int(batch), 3, int(size), int(size))).astype(np.float32)
    (torch, tv), _ = import_torch()
    base = bench.peak_rss_mib()
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
    peak = bench.peak_rss_mib()
    print(json.dumps({"peak_mib": peak, "above_imports_mib": peak - base}))


def main(argv=None):
    p = bench.options(__doc__.split("\n\n")[0])
    p.prog = "benchmarks/bench.py"
    p.add_argument("--no-torch", action="store_true", help="numres only")
    args = p.parse_args(argv)
    if args.memory_child:
        return memory_child(args.memory_child)
    torch_mods, env, peak_before = start_report(not args.no_torch)
    backends = [b for b in args.backends.split(",") if b]

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models.split(","):
            ckpt = os.path.join(tmp, f"{arch}.pth")
            _write_checkpoint(arch, ckpt, torch_mods)
            for size in map(int, args.sizes.split(",")):
                for batch in map(int, args.batches.split(",")):
                    results.append(run_config(arch, batch, size, ckpt, torch_mods, backends,
                                              tmp, args, peak_before))
    print_summary(results)
    peak_after = bench.sgemm_peak()
    print(f"\nsgemm peak after the run: {peak_after:.0f} GFLOP/s")
    env["sgemm_peak_gflops"] = [round(peak_before, 1), round(peak_after, 1)]
    bench.write_results(args.json, env, results)
    return results


def print_summary(results):
    """One table of every configuration: each numres backend beside torch's best and ONNX
    Runtime (README's table)."""
    print("\n## Summary (medians, this run)\n")
    print("| model | batch | size | numres | numres ms | torch best ms | ORT ms "
          "| numres / torch | numres / ORT |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rows = {row["contender"]: row for row in r["rows"]}
        torch_ms = min((rows[k]["ms"] for k in ("torch-nchw", "torch-cl") if k in rows),
                       default=None)
        ort_ms = rows["onnxruntime"]["ms"] if "onnxruntime" in rows else None
        for name, ours in rows.items():
            if not name.startswith("numres-"):
                continue
            print(f"| {r['model']} | {r['batch']} | {r['size']} | {name[7:]} | "
                  f"{ours['ms']:.1f} | {bench.fmt(torch_ms, '.1f')} | "
                  f"{bench.fmt(ort_ms, '.1f')} | {bench.fmt(ours['vs_torch'], '.2f')} | "
                  f"{bench.fmt(ours['vs_ort'], '.2f')} |")


def run_config(arch, batch, size, ckpt, torch_mods, backends, tmp, args, peak):
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    contenders = bench.numres_contenders(arch, ckpt, backends, x)
    others, notes = reference_contenders(arch, ckpt, torch_mods, tmp, x)
    contenders += others
    medians = bench.bench_config(contenders, args.rounds, args.warmup, args.min_time)
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
        mem = bench.measure_memory([sys.executable, os.path.abspath(__file__)], c.name, arch,
                                   batch, size, ckpt) if args.memory else None
        row = {"contender": c.name, "model": arch, "batch": batch, "size": size,
               "ms": t * 1e3, "img_s": batch / t, "gflops": gflop / t,
               "peak_fraction": gflop / t / peak,
               "vs_torch": torch_best / t if torch_best else None,
               "vs_ort": ort / t if ort else None,
               "peak_rss_mib": mem["peak_mib"] if mem else None}
        rows.append(row)
        print(f"| {c.name} | {row['img_s']:.1f} | {row['ms']:.1f} | {row['gflops']:.0f} | "
              f"{row['peak_fraction']:.0%} | {bench.fmt(row['vs_torch'], '.2f')} | "
              f"{bench.fmt(row['vs_ort'], '.2f')} | {bench.fmt(row['peak_rss_mib'], '.0f')} |")
    for k, v in notes.items():
        print(f"| {k} | {v} | | | | | | |")
    breakdown = []
    if args.layers and backends:
        model = numres.build(arch, weights=ckpt, backend=bench.backend_for(backends[0]))
        total, breakdown = bench.layer_breakdown(model, x, args.layers)
        bench.print_layers(backends[0], total, breakdown)
    return {"model": arch, "batch": batch, "size": size, "gflop_per_image": gflop / batch,
            "rows": rows, "notes": notes,
            "layers": [{"op": label, "count": count, "ms": s * 1e3}
                       for label, count, s in breakdown]}


def start_report(with_torch=True):
    """torch (on numres's thread count) where it imports, and the report's header printed:
    ``(torch_mods or None, environment, sgemm peak)``."""
    torch_mods, torch_note = import_torch() if with_torch else (None, "disabled")
    if torch_mods:
        torch_mods[0].set_num_threads(default_threads())
    env, peak = bench.header(bench.environment(
        torch=torch_mods[0].__version__ if torch_mods else torch_note,
        onnxruntime=bench.version("onnxruntime")))
    return torch_mods, env, peak


def checkpoint_and_input(arch, tmp, torch_mods, batch, size):
    """Random ``arch`` weights saved in ``tmp`` (torch's initialisation where it imports),
    and a standard-normal (batch, 3, size, size) float32 input: ``(path, x)``."""
    ckpt = os.path.join(tmp, f"{arch}.pth")
    _write_checkpoint(arch, ckpt, torch_mods)
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    return ckpt, x


def _write_checkpoint(arch, path, torch_mods):
    if torch_mods:
        torch, tv = torch_mods
        torch.manual_seed(0)
        torch.save(getattr(tv.models, arch)().state_dict(), path)
    else:
        numres.save_pth(numres.build(arch, backend="numpy").state_dict(), path)


if __name__ == "__main__":
    main()
