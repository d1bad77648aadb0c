"""GPU check and benchmark: numres-cupy beside torch eager (cuDNN), in one process.

    python -m numres.bench_gpu --json gpu.json            # checks, then the benchmark

First it checks correctness (every builder, float32/TF32/float16, against the NumPy backend
on the same weights; CuPy in -> CuPy out; CUDA-graph replay equals eager) and prints the
measured errors. Then it times numres-cupy (float32, float16) and torch eager (NCHW and
channels_last, float32 and float16) on device-resident input, interleaved round by round,
with a device synchronisation after each call; medians are reported. torch models come from
torchvision when it imports, else from a minimal torch definition loaded with the same
weights (checked against numres before timing).
"""

import argparse
import json
import sys
import time

import numpy as np

import numres
from numres.backends import get_backend
from numres.models.flops import conv_macs


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


def check(archs, report):
    """Correctness on the GPU against the NumPy backend; appends findings to ``report``."""
    import cupy
    ok = True
    sizes = {"resnet18": (64, 64), "resnet50": (97, 131), "resnext50_32x4d": (64, 80)}
    for arch in archs:
        ref_model = numres.build(arch, backend="numpy")
        sd = ref_model.state_dict()
        shape = (2, 3) + sizes.get(arch, (32, 32))
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        expected = ref_model(x)
        scale = max(1.0, float(np.abs(expected).max()))
        for label, opts, limit in (("float32", {}, 1e-4), ("tf32", {"tf32": True}, 5e-3),
                                   ("float16", {"dtype": "float16"}, 3e-2)):
            model = numres.build(arch, weights=sd, backend=get_backend("cupy", **opts))
            got = model(x)
            dev = model(cupy.asarray(x))
            err = float(np.abs(got - expected).max()) / scale
            same = float(np.abs(cupy.asnumpy(dev).astype(np.float32) - got).max()) / scale
            graphs = list(model._prepared()["graphs"].values())
            captured = bool(graphs) and all(g != "eager" for g in graphs)
            passed = err <= limit and same <= limit and isinstance(dev, cupy.ndarray)
            ok &= passed
            report.append({"check": f"{arch} {label}", "max_rel_error": err,
                           "limit": limit, "cuda_graph": captured, "passed": passed})
            print(f"{'PASS' if passed else 'FAIL'} {arch:18s} {label:8s} max |err|/max|ref| "
                  f"= {err:.2e} (limit {limit:.0e}); CUDA graph captured: {captured}")
    return ok


def bench(archs, batches, rounds, report):
    import cupy
    try:
        import torch
        assert torch.cuda.is_available()
    except (ImportError, AssertionError):
        torch = None
        print("torch with CUDA is not available: numres columns only")
    gpu_name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"\nGPU: {gpu_name}; CuPy {cupy.__version__}"
          + (f"; torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}"
             if torch else ""))
    if torch:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    for arch in archs:
        sd = numres.build(arch, backend="numpy").state_dict()
        models = {"numres-cupy fp32": numres.build(arch, weights=sd,
                                                   backend=get_backend("cupy")),
                  "numres-cupy fp16": numres.build(arch, weights=sd, backend=get_backend(
                      "cupy", dtype="float16"))}
        tm = _torch_model(torch, arch, sd) if torch else None
        for batch in batches:
            x = np.random.default_rng(1).standard_normal((batch, 3, 224, 224)).astype(
                np.float32)
            xc = cupy.asarray(x)
            fns = {name: (lambda m=m: m(xc)) for name, m in models.items()}
            if tm is not None:
                xt = torch.from_numpy(x).cuda()
                variants = {"torch fp32 NCHW": (tm.cuda(), xt),
                            "torch fp32 channels_last": (
                                _clone(torch, tm, arch, sd).cuda().to(
                                    memory_format=torch.channels_last),
                                xt.contiguous(memory_format=torch.channels_last)),
                            "torch fp16 NCHW": (_clone(torch, tm, arch, sd).cuda().half(),
                                                xt.half()),
                            "torch fp16 channels_last": (
                                _clone(torch, tm, arch, sd).cuda().half().to(
                                    memory_format=torch.channels_last),
                                xt.half().contiguous(memory_format=torch.channels_last))}
                for name, (m, inp) in variants.items():
                    fns[name] = (lambda m=m, inp=inp: _torch_call(torch, m, inp))
            times = _interleave(fns, rounds, cupy, torch)
            gflop = 2 * conv_macs(arch) * batch / 1e9
            print(f"\n{arch} batch {batch}: img/s (ms per batch)")
            t32 = min((times[k] for k in times if k.startswith("torch fp32")), default=None)
            t16 = times.get("torch fp16 channels_last")
            for name, t in times.items():
                ratio = ""
                if name == "numres-cupy fp32" and t32:
                    ratio = f"  {t32 / t:.2f}x torch fp32 best"
                if name == "numres-cupy fp16" and t16:
                    ratio = f"  {t16 / t:.2f}x torch fp16 channels_last"
                print(f"  {name:26s} {batch / t:9.1f} ({t * 1e3:8.2f} ms) "
                      f"{gflop / t / 1e3:6.1f} TFLOP/s{ratio}")
                report.append({"model": arch, "batch": batch, "contender": name,
                               "ms": t * 1e3, "img_s": batch / t, "gpu": gpu_name})
        del models


def _clone(torch, tm, arch, sd):
    return _torch_model(torch, arch, sd)


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check-archs", default="resnet18,resnet50,resnext50_32x4d")
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--batches", default="1,8,64,256")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json")
    args = p.parse_args(argv)
    report = {"checks": [], "bench": []}
    ok = check(args.check_archs.split(","), report["checks"])
    bench(args.models.split(","), [int(b) for b in args.batches.split(",")], args.rounds,
          report["bench"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
