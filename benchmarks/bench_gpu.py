"""GPU check and benchmark: numres-cupy against the NumPy backend, then beside torch eager.

    python benchmarks/bench_gpu.py --json gpu.json         # checks, then the benchmark

1. Checks (every precision, on seeded weights with random batch-norm statistics, so that a
   wrong bias or a wrong folding changes the result): the largest difference from the NumPy
   backend, relative to the reference's largest magnitude, against the limit of each
   precision (float32, TF32, float16); NumPy in -> NumPy out and CuPy in -> CuPy out equal;
   the CUDA graph was captured and its replay equals an eager pass. The measured errors are
   printed and written, so the limits can be set from measurements.
2. Benchmark: numres-cupy (float32, float16; graphs on) and torch eager (cuDNN; NCHW and
   channels_last; float32 and float16) on device-resident input, interleaved round by round,
   a device synchronisation after each call; medians in img/s, and each contender's peak
   device memory.

One JSON holds both. ``--budget-s`` stops the benchmark (not the checks) once that many
seconds have passed, marking what was left out, so a device session's time is never overrun.
torch models come from torchvision when it imports, else from a minimal torch definition with
the same parameter names. Runs on the CuPy stand-in of the tests too (tiny configurations).
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np

if __package__ in (None, ""):        # run as a script from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numres  # noqa: E402
from numres.backends import get_backend  # noqa: E402
from numres.models.flops import conv_macs  # noqa: E402

#: Backend options of each precision.
PRECISIONS = {"float32": {}, "tf32": {"tf32": True}, "float16": {"dtype": "float16"}}
#: Largest |numres - NumPy| / max(1, max |NumPy|) each precision may show. Float32 is the
#: project's tolerance; TF32 and float16 are ~5x what the CPU emulation measured on these
#: weights (README, "GPU (CuPy)"); the GPU run prints its own measurements beside them.
LIMITS = {"float32": 1e-4, "tf32": 5e-3, "float16": 1e-2}
#: Input sizes of the checks (small: the NumPy reference runs on the host).
CHECK_SIZES = {"resnet18": (64, 64), "resnet50": (97, 131), "resnext50_32x4d": (64, 80),
               "resnet101": (224, 224)}

# The time budget counts from here: imports, kernel compiles and checks included.
_STARTED = time.perf_counter()


def seeded_state_dict(arch, seed=0, num_classes=1000):
    """Seeded weights that exercise every parameter and keep activations small.

    Convolutions He-normal (fan-in); batch norm with random running mean (N(0, 0.2)),
    variance (U(0.5, 2)), weight and bias (N(0, 0.2)): a backend that drops a bias or folds
    batch norm wrongly gets a different answer (identity batch norm would hide both). The last
    batch norm of each residual branch (and of each downsample) has a small weight (U(0.1,
    0.4)), so a block adds little to its input and activations stay O(10) through 152 layers
    at 224x224 (measured: at most 16.5 for ResNet-152), far from float16's 65504; with
    identity batch norm they double per block.

    Returns:
        dict of float32 arrays under torchvision's names.
    """
    model = numres.build(arch, num_classes=num_classes, backend="numpy")
    rng = np.random.default_rng(seed)
    last = "bn2" if numres.ARCHS[arch][0].expansion == 1 else "bn3"
    out = {}
    for name, value in model.state_dict().items():
        shape, owner = value.shape, name.rsplit(".", 1)[0]
        if name.endswith("num_batches_tracked"):
            out[name] = value
        elif value.ndim == 4:
            out[name] = rng.normal(0.0, math.sqrt(2.0 / math.prod(shape[1:])), shape)
        elif name.startswith("fc."):
            out[name] = rng.normal(0.0, 1 / math.sqrt(shape[-1]) if value.ndim == 2 else 0.1,
                                   shape)
        elif name.endswith("running_mean"):
            out[name] = rng.normal(0.0, 0.2, shape)
        elif name.endswith("running_var"):
            out[name] = rng.uniform(0.5, 2.0, shape)
        elif name.endswith(".weight"):
            small = owner.endswith(last) or owner.endswith("downsample.1")
            out[name] = rng.uniform(0.1, 0.4, shape) if small else rng.uniform(0.5, 1.5, shape)
        else:
            out[name] = rng.normal(0.0, 0.2, shape)
    return {k: np.asarray(v, np.float32) if v.dtype.kind == "f" else v for k, v in out.items()}


def _graph_captured(model):
    """True when every pass of ``model`` so far runs as a captured CUDA graph (a cache entry
    that is not a string: numres marks a shape it could not capture with one)."""
    entries = list(model._prepared()["graphs"].values())
    return bool(entries) and not any(isinstance(e, str) for e in entries)


def measure(arch, precision, shape, cupy, seed=0, num_classes=1000, state_dict=None,
            reference=None):
    """One check: ``arch`` in ``precision`` on a seeded batch of ``shape``; ``state_dict``
    (:func:`seeded_state_dict` of ``seed`` by default) and the NumPy backend's ``reference``
    output may be passed in when several precisions share them.

    Returns:
        dict: ``max_abs``, ``scale`` (max(1, max |reference|)), ``rel`` (max_abs / scale),
        ``device_vs_host`` (CuPy in vs NumPy in), ``replay_vs_eager``, ``captured``,
        ``max_activation`` (of the reference's logits, for float16 headroom), ``limit``,
        ``passed``.
    """
    sd = seeded_state_dict(arch, seed, num_classes) if state_dict is None else state_dict
    x = np.random.default_rng(seed + 1).standard_normal(shape).astype(np.float32)
    if reference is None:
        reference = numres.build(arch, weights=sd, num_classes=num_classes,
                                 backend="numpy")(x)
    opts = PRECISIONS[precision]
    graph = numres.build(arch, weights=sd, num_classes=num_classes,
                         backend=get_backend("cupy", **opts))
    eager = numres.build(arch, weights=sd, num_classes=num_classes,
                         backend=get_backend("cupy", cuda_graph=False, **opts))
    got = graph(x)                                          # NumPy in -> NumPy out
    on_device = graph(cupy.asarray(x))                      # CuPy in -> CuPy out
    if not isinstance(on_device, cupy.ndarray):
        raise TypeError(f"CuPy in gave {type(on_device).__name__} out")
    plain = eager(x)
    scale = max(1.0, float(np.abs(reference).max()))
    max_abs = float(np.abs(got - reference).max())
    result = {
        "model": arch, "precision": precision, "shape": list(shape), "max_abs": max_abs,
        "scale": scale, "rel": max_abs / scale,
        "device_vs_host": float(np.abs(cupy.asnumpy(on_device).astype(np.float32)
                                       - got).max()) / scale,
        "replay_vs_eager": float(np.abs(got - plain).max()) / scale,
        "captured": _graph_captured(graph), "max_activation": float(np.abs(reference).max()),
        "limit": LIMITS[precision]}
    result["passed"] = bool(result["rel"] <= result["limit"] and result["captured"]
                            and result["device_vs_host"] <= result["limit"]
                            and result["replay_vs_eager"] <= result["limit"])
    return result


def check(archs, precisions, report, cupy, sizes=None, batch=2):
    """Every ``arch`` x ``precision`` (:func:`measure`); appends to ``report``, prints one
    line each. Returns whether all passed."""
    ok = True
    for arch in archs:
        size = (sizes or CHECK_SIZES).get(arch, (64, 64))
        shape = (batch, 3) + tuple(size)
        x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        sd = seeded_state_dict(arch)
        reference = numres.build(arch, weights=sd, backend="numpy")(x)
        for precision in precisions:
            row = measure(arch, precision, shape, cupy, state_dict=sd, reference=reference)
            ok &= row["passed"]
            report.append(row)
            print(f"{'PASS' if row['passed'] else 'FAIL'} {arch:18s} {precision:8s} "
                  f"max|err|/max(1,|ref|) = {row['rel']:.2e} (limit {row['limit']:.0e}); "
                  f"CuPy-in vs NumPy-in {row['device_vs_host']:.1e}; replay vs eager "
                  f"{row['replay_vs_eager']:.1e}; graph captured: {row['captured']}",
                  flush=True)
    return ok


def compile_kernels(builds=("float", "__half")):
    """Compile the kernel builds ``builds`` (element types) with NVRTC, as the first launch
    would: returns the seconds it took."""
    from numres.backends.cupy import backend, kernels
    start = time.perf_counter()
    for ctype in builds:
        backend.KERNELS.get(kernels.name_expressions(ctype)[0], ctype)
    return time.perf_counter() - start


def _epilogue_fallbacks():
    """GEMM problems whose fused epilogue cuBLASLt refused (numres ran its own kernel)."""
    from numres.backends.cupy import backend
    lt = backend._blas
    return [{"problem": [str(part) for part in key], "status": status}
            for key, status in (lt.unfused if lt is not None else [])]


def _torch_model(torch, arch, state_dict):
    """torchvision's model, or an equivalent built from torch.nn with the same names."""
    try:
        import types
        sys.modules.setdefault("torchvision._meta_registrations",
                               types.ModuleType("torchvision._meta_registrations"))
        import torchvision
        model = getattr(torchvision.models, arch)()
    except Exception:  # noqa: BLE001 - torchvision missing or broken: use the fallback
        model = _minimal_torch_resnet(torch, arch)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                           for k, v in state_dict.items()})
    return model.eval()


def _minimal_torch_resnet(torch, arch):
    nn = torch.nn
    block_kind, layers, groups, width_per_group = numres.ARCHS[arch]
    expansion = block_kind.expansion

    class Block(nn.Module):
        def __init__(self, inplanes, planes, stride, down):
            super().__init__()
            width = int(planes * width_per_group / 64) * groups
            if expansion == 1:
                self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
                self.bn1 = nn.BatchNorm2d(planes)
                self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
                self.bn2 = nn.BatchNorm2d(planes)
                self.convs = [(self.conv1, self.bn1), (self.conv2, self.bn2)]
            else:
                self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
                self.bn1 = nn.BatchNorm2d(width)
                self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
                self.bn2 = nn.BatchNorm2d(width)
                self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
                self.bn3 = nn.BatchNorm2d(planes * 4)
                self.convs = [(self.conv1, self.bn1), (self.conv2, self.bn2),
                              (self.conv3, self.bn3)]
            self.downsample = down

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = x
            for i, (conv, bn) in enumerate(self.convs):
                out = bn(conv(out))
                if i + 1 < len(self.convs):
                    out = torch.relu(out)
            return torch.relu(out + identity)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            inplanes, stages = 64, []
            for planes, blocks, stride in zip((64, 128, 256, 512), layers, (1, 2, 2, 2)):
                seq = []
                for i in range(blocks):
                    s = stride if i == 0 else 1
                    down = None
                    if i == 0 and (s != 1 or inplanes != planes * expansion):
                        down = nn.Sequential(nn.Conv2d(inplanes, planes * expansion, 1, s,
                                                       bias=False),
                                             nn.BatchNorm2d(planes * expansion))
                    seq.append(Block(inplanes, planes, s, down))
                    inplanes = planes * expansion
                stages.append(nn.Sequential(*seq))
            self.layer1, self.layer2, self.layer3, self.layer4 = stages
            self.fc = nn.Linear(512 * expansion, 1000)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = torch.nn.functional.max_pool2d(x, 3, 2, 1)
            for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
                x = layer(x)
            return self.fc(torch.flatten(x.mean((2, 3), keepdim=True), 1))

    return Net()


def _torch_cuda():
    try:
        import torch
        return torch if torch.cuda.is_available() else None
    except ImportError:
        return None


def bench(archs, batches, rounds, report, cupy, size=224, budget_s=None, torch=None,
          saved=lambda: None):
    """Time every contender at every batch; appends rows to ``report`` and calls ``saved``
    after each (so a run cut off by a timeout keeps what it measured). ``budget_s`` counts
    from the start of the process, checks and compilation included; a row left out for it
    says so (``"skipped": "budget"``)."""
    start = _STARTED
    gpu = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    gpu = gpu.decode() if isinstance(gpu, bytes) else str(gpu)
    print(f"\nGPU: {gpu}; CuPy {cupy.__version__}"
          + (f"; torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}"
             if torch else "; torch with CUDA is not available: numres columns only"))
    if torch:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    for arch in archs:
        sd = seeded_state_dict(arch)
        contenders = _contenders(arch, sd, torch)
        for batch in batches:
            if budget_s is not None and time.perf_counter() - start > budget_s:
                report.append({"model": arch, "batch": batch, "skipped": "budget"})
                print(f"{arch} batch {batch}: left out (time budget of {budget_s:.0f} s)")
                continue
            x = np.random.default_rng(1).standard_normal((batch, 3, size, size)).astype(
                np.float32)
            rows = _bench_one(contenders, x, rounds, cupy, torch)
            gflop = 2 * conv_macs(arch, size, size) * batch / 1e9
            print(f"\n{arch} batch {batch}: img/s (ms per batch), peak device memory")
            for row in rows:
                row.update(model=arch, batch=batch, gpu=gpu, size=size,
                           tflops=gflop / (row["ms"] / 1e3) / 1e3)
                print(f"  {row['contender']:26s} {row['img_s']:9.1f} ({row['ms']:8.2f} ms) "
                      f"{row['tflops']:6.1f} TFLOP/s  {row['peak_mib']:8.0f} MiB", flush=True)
                report.append(row)
            saved()
        del contenders


def _contenders(arch, sd, torch):
    """name -> (model, how its input is made from a float32 device array)."""
    out = {}
    for name, opts in (("numres-cupy fp32", {}), ("numres-cupy fp16", {"dtype": "float16"})):
        out[name] = (numres.build(arch, weights=sd, backend=get_backend("cupy", **opts)),
                     None)
    if torch is not None:
        for label, half, cl in (("fp32 NCHW", False, False), ("fp32 channels_last", False, True),
                                ("fp16 NCHW", True, False), ("fp16 channels_last", True, True)):
            m = _torch_model(torch, arch, sd).cuda()
            m = m.half() if half else m
            m = m.to(memory_format=torch.channels_last) if cl else m

            def prepare(xt, half=half, cl=cl):
                xt = xt.half() if half else xt
                return xt.contiguous(memory_format=torch.channels_last) if cl else xt

            out[f"torch {label}"] = (m, prepare)
    return out


def _bench_one(contenders, x, rounds, cupy, torch):
    xc = cupy.asarray(x)
    xt = torch.from_numpy(x).cuda() if torch is not None else None
    fns = {}
    for name, (model, prepare) in contenders.items():
        if prepare is None:
            fns[name] = lambda m=model: m(xc)
        else:
            fns[name] = lambda m=model, inp=prepare(xt): _torch_call(torch, m, inp)
    rows = [{"contender": name, "peak_mib": _peak_device_bytes(
        fn, cupy, torch, name.startswith("torch")) / 2 ** 20} for name, fn in fns.items()]
    times = _interleave(fns, rounds, cupy, torch)
    for row in rows:
        t = times[row["contender"]]
        row.update(ms=t * 1e3, img_s=x.shape[0] / t)
    return rows


def _peak_device_bytes(fn, cupy, torch, is_torch):
    """Device memory one call takes at its peak, beyond what is allocated before it: torch's
    allocator statistics; for numres, what CuPy's pool holds after the call once its cached
    free blocks were released before it (the pool keeps what a call asked for)."""
    if is_torch:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    pool = cupy.get_default_memory_pool()
    cupy.cuda.Device().synchronize()
    pool.free_all_blocks()
    base = pool.used_bytes()
    fn()
    cupy.cuda.Device().synchronize()
    return pool.total_bytes() - base


def _torch_call(torch, model, inp):
    with torch.inference_mode():
        return model(inp)


def _interleave(fns, rounds, cupy, torch):
    def sync():
        cupy.cuda.Device().synchronize()
        if torch:
            torch.cuda.synchronize()
    for fn in fns.values():
        for _ in range(3):
            fn()
    sync()
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            for _ in range(5):
                fn()
            sync()
            samples[name].append((time.perf_counter() - t) / 5)
    return {k: float(np.median(v)) for k, v in samples.items()}


def parse_args(argv=None):
    """The command line (``--help`` lists it); lists split, names checked.

    Raises:
        SystemExit: an unknown model or precision (argparse's error).
    """
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check-archs", default="resnet18,resnet50,resnext50_32x4d,resnet101",
                   help="models checked against the NumPy backend")
    p.add_argument("--precisions", default="float32,tf32,float16")
    p.add_argument("--models", default="resnet18,resnet50,resnext50_32x4d",
                   help="models benchmarked")
    p.add_argument("--batches", default="1,8,64,256")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting benchmark rows after this many seconds")
    p.add_argument("--no-bench", action="store_true", help="checks only")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--json", help="write every figure here")
    args = p.parse_args(argv)
    args.check_archs = [a for a in args.check_archs.split(",") if a]
    args.precisions = [a for a in args.precisions.split(",") if a]
    args.models = [a for a in args.models.split(",") if a]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    for name in args.check_archs + args.models:
        if name not in numres.ARCHS:
            p.error(f"unknown model {name!r}")
    for name in args.precisions:
        if name not in PRECISIONS:
            p.error(f"unknown precision {name!r} (choose from {', '.join(PRECISIONS)})")
    return args


def main(argv=None, check_sizes=None):
    """Checks, then (unless ``--no-bench``) the benchmark; writes ``--json``.

    Args:
        argv: the command line (default ``sys.argv[1:]``).
        check_sizes: input size per checked model, instead of :data:`CHECK_SIZES`.

    Returns:
        0 when every check passed, else 1.
    """
    args = parse_args(argv)
    import cupy
    report = {"checks": [], "bench": [], "numres": numres.__version__,
              "cupy": cupy.__version__}
    half = "float16" in args.precisions or not args.no_bench
    report["kernel_compile_s"] = compile_kernels(("float", "__half") if half else ("float",))
    print(f"NVRTC compiled the kernels in {report['kernel_compile_s']:.1f} s")

    def save():
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(report, f, indent=1)
            os.replace(args.json + ".tmp", args.json)

    ok = check(args.check_archs, args.precisions, report["checks"], cupy, sizes=check_sizes)
    save()
    if not args.no_bench:
        bench(args.models, args.batches, args.rounds, report["bench"], cupy, size=args.size,
              budget_s=args.budget_s, torch=None if args.no_torch else _torch_cuda(),
              saved=save)
    report["epilogue_fallbacks"] = _epilogue_fallbacks()
    if report["epilogue_fallbacks"]:
        print(f"cuBLASLt refused {len(report['epilogue_fallbacks'])} fused epilogue(s); "
              "those layers ran a separate epilogue kernel (see the JSON)")
    save()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
