"""Save, or compare with a saved set, the outputs of every Numba convolution path and of whole
networks: a refactoring of the Numba backend must leave them bit for bit as they were.

    python benchmarks/paths_snapshot.py save /tmp/paths-before      # on the old tree
    python benchmarks/paths_snapshot.py compare /tmp/paths-before   # on the new one

Run the old tree with ``PYTHONPATH=<old checkout>``. Cases: every convolution of
``tests/backends/test_ops.py`` (plus a few that reach the remaining paths) under each
strategy of that file's Numba tests, on 1 and 2 threads, with ReLU and a residual, and
without either; the stem fused with its max pool; ResNet-18/50, ResNeXt-50 32x4d and Wide
ResNet-50-2 at 224 px (batch 1 and 8) and at small shapes, first (recorded) and second
(replayed) call, folded and unfolded batch norm; and the memory estimate's events for a few
passes. Weights and inputs come from fixed seeds.
"""

import argparse
import json
import os
import sys

import numpy as np

import numres
from numres.backends.numpy_backend import NumpyBackend

try:
    from numres.backends.numba import NumbaBackend
except ImportError:                       # the tree before the Numba backend was a package
    from numres.backends.numba_backend import NumbaBackend

# The cases and strategies of tests/backends/test_ops.py when this was written, copied rather
# than imported: the script must run unchanged on an older tree, whose tests differ.
CONV_CASES = [
    # (n, c, h, w, o, k, stride, padding, groups)
    (1, 3, 23, 19, 8, 7, 2, 3, 1),     # stem-like, odd size (Numba: direct, no im2col)
    (2, 3, 2, 3, 8, 7, 2, 3, 1),       # stem on an image smaller than its kernel
    (2, 5, 6, 13, 70, 3, 1, 1, 1),     # few channels, stride 1, a partial weight panel
    (2, 16, 9, 11, 12, 3, 1, 1, 1),    # 3x3 stride 1 (Winograd-capable), partial tiles
    (1, 16, 12, 12, 24, 3, 2, 1, 1),   # 3x3 stride 2
    (3, 32, 7, 7, 16, 1, 1, 0, 1),     # 1x1
    (1, 32, 9, 9, 64, 1, 2, 0, 1),     # strided 1x1 (downsample)
    (2, 32, 8, 10, 32, 3, 1, 1, 8),    # grouped (ResNeXt)
    (1, 64, 5, 6, 64, 3, 2, 1, 32),    # grouped, strided
    (2, 64, 6, 31, 64, 3, 1, 1, 4),    # 16 per group: whole panels, a ragged row tile
    (2, 32, 5, 9, 32, 3, 2, 1, 4),     # 8 per group, strided (Numba: groups across lanes)
    (1, 24, 6, 6, 24, 3, 1, 1, 6),     # 4 per group, channels not a multiple of a vector
    (1, 16, 7, 8, 16, 3, 1, 1, 16),    # depthwise (1 per group)
    (1, 48, 7, 9, 48, 3, 1, 1, 2),     # 24 per group (Numba: per-group GEMMs, not direct)
    (1, 8, 1, 1, 8, 3, 1, 1, 1),       # 1x1 image through a 3x3
    # Output rows of whole 14-pixel tiles (Numba, AVX-512: read directly, no gather):
    (2, 32, 28, 28, 48, 3, 2, 1, 1),   # 3x3 stride 2, a partial weight panel
    (1, 16, 14, 14, 32, 3, 1, 1, 1),   # 3x3 stride 1 (direct where Winograd is not used)
    (2, 32, 28, 27, 40, 1, 2, 0, 1),   # strided 1x1 read from the input itself, odd width
    (1, 64, 7, 7, 48, 3, 1, 1, 1),     # 49 pixels (Numba, AVX-512: 7-row tiles), partial panel
    (1, 256, 28, 28, 272, 3, 2, 1, 1),  # few tiles, 2.6 MB of weights: direct, by panels
]

STRATEGIES = {
    "own-gemm-pixels": dict(split_rows_min=1),
    "own-gemm-channels": dict(split_rows_min=10 ** 9),
    "blas-rows": dict(own_gemm=False, blas_min_macs=10 ** 12, split_rows_min=1, row_block=16),
    "blas-columns": dict(own_gemm=False, blas_min_macs=10 ** 12, split_rows_min=10 ** 9),
    "blas-threads": dict(own_gemm=False, blas_min_macs=0, blas_min_n=0, blas_chunk=40),
    "winograd": dict(winograd_min_tiles=0, winograd_min_tiles_wide=0),
    "winograd-blas": dict(own_gemm=False, winograd_min_tiles=0, winograd_min_tiles_wide=0),
    "no-winograd": dict(winograd_min_tiles=10 ** 9, winograd_min_tiles_wide=10 ** 9),
}

EXTRA_CASES = [
    (1, 128, 6, 6, 128, 3, 1, 1, 2),    # 64 per group: per-group BLAS GEMMs
    (4, 64, 14, 14, 64, 3, 1, 1, 1),    # Winograd at the default thresholds
    (1, 64, 56, 56, 64, 3, 1, 1, 1),    # a ResNet layer1 3x3
    (1, 256, 7, 7, 512, 1, 1, 0, 1),    # 49 pixels, 1x1
    (2, 3, 224, 224, 64, 7, 2, 3, 1),   # the stem, unfused
]
NETWORKS = ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2")
SHAPES = ((1, 3, 224, 224), (8, 3, 224, 224), (2, 3, 64, 64), (1, 3, 97, 131), (3, 3, 32, 32))


def conv_outputs():
    """Every (case, strategy, threads, epilogue) through ``conv2d``."""
    out = {}
    for i, case in enumerate(CONV_CASES + EXTRA_CASES):
        n, c, h, w, o, k, s, p, g = case
        rng = np.random.default_rng(1000 + i)
        x = rng.standard_normal((n, c, h, w)).astype(np.float32)
        wt = rng.standard_normal((o, c // g, k, k)).astype(np.float32)
        b = rng.standard_normal(o).astype(np.float32)
        oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        res = rng.standard_normal((n, o, oh, ow)).astype(np.float32)
        for strategy, tuning in dict(STRATEGIES, default={}).items():
            for threads in (1, 2):
                be = NumbaBackend(threads=threads, **tuning)
                conv = be.prepare_conv(wt, b, s, p, g)
                act = be.from_nchw(x)
                key = "conv_{}_{}_t{}".format("_".join(map(str, case)), strategy, threads)
                y = be.conv2d(act, conv, relu=True, residual=be.from_nchw(res))
                out[key + "_relu_res"] = be.to_numpy(be.to_nchw(y))
                y = be.conv2d(act, conv)
                out[key + "_plain"] = be.to_numpy(be.to_nchw(y))
    for threads in (1, 2):
        for j, (n, h, w, o) in enumerate([(1, 23, 19, 40), (2, 40, 36, 64), (1, 64, 64, 8),
                                          (3, 9, 30, 64), (2, 2, 3, 8), (1, 224, 224, 64)]):
            rng = np.random.default_rng(2000 + j)
            be = NumbaBackend(threads=threads, replay=False)
            x = be.from_nchw(rng.standard_normal((n, 3, h, w)).astype(np.float32))
            conv = be.prepare_conv(rng.standard_normal((o, 3, 7, 7)).astype(np.float32),
                                   rng.standard_normal(o).astype(np.float32), 2, 3, 1)
            out[f"stem_{n}_{h}_{w}_{o}_t{threads}"] = be.to_numpy(
                be.conv2d_max_pool(x, conv, True, 3, 2, 1))
    return out


def state_dict(arch, seed):
    """Deterministic weights: He-scaled convolutions, batch norm near identity."""
    rng = np.random.default_rng(seed)
    model = numres.build(arch, backend=NumpyBackend())
    sd = {}
    for key, value in model.state_dict().items():
        shape = value.shape
        if key.endswith("running_var"):
            sd[key] = (0.5 + rng.random(shape)).astype(np.float32)
        elif key.endswith("running_mean") or key.endswith("bias"):
            sd[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        elif len(shape) == 1:
            sd[key] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            fan_in = int(np.prod(shape[1:]))
            sd[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    return sd


def network_outputs():
    out = {}
    for a, arch in enumerate(NETWORKS):
        sd = state_dict(arch, 3000 + a)
        for fold in (True, False):
            if not fold and arch not in ("resnet18", "resnext50_32x4d"):
                continue
            model = numres.build(arch, weights=sd, backend=NumbaBackend(threads=2),
                                 fold_bn=fold)
            for s, shape in enumerate(SHAPES):
                if not fold and shape[0] == 8:
                    continue
                x = np.random.default_rng(4000 + s).standard_normal(shape).astype(np.float32)
                key = f"net_{arch}_{'x'.join(map(str, shape))}_fold{int(fold)}"
                out[key + "_first"] = model(x)
                out[key + "_replayed"] = model(x)
                if s == 2:
                    for stage, value in model.feature_maps(x, ("stem", "layer2")).items():
                        out[f"{key}_map_{stage}"] = value
    return out


def memory_events():
    from numres.models import memory
    events = {}
    for a, arch in enumerate(NETWORKS):
        model = numres.build(arch, weights=state_dict(arch, 3000 + a),
                             backend=NumbaBackend(threads=2))
        for shape in SHAPES + ((32, 3, 224, 224), (1, 3, 1024, 1024)):
            for batch in (None, 64):
                key = f"{arch}_{'x'.join(map(str, shape))}_b{batch}"
                events[key] = [list(e) for e in memory.pass_events(model, shape, batch=batch)]
    return events


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("save", "compare"))
    p.add_argument("folder")
    args = p.parse_args()
    print("numres from", os.path.dirname(numres.__file__), flush=True)
    outputs = conv_outputs()
    print(f"{len(outputs)} convolution outputs", flush=True)
    outputs.update(network_outputs())
    events = memory_events()
    if args.action == "save":
        os.makedirs(args.folder, exist_ok=True)
        for key, value in outputs.items():
            np.save(os.path.join(args.folder, key + ".npy"), value)
        with open(os.path.join(args.folder, "memory_events.json"), "w") as f:
            json.dump(events, f)
        print(f"saved {len(outputs)} outputs and {len(events)} event lists to {args.folder}")
        return 0
    saved = sorted(f[:-4] for f in os.listdir(args.folder) if f.endswith(".npy"))
    missing = sorted(set(saved) - set(outputs))
    differ = [k for k in saved if k in outputs
              and not np.array_equal(np.load(os.path.join(args.folder, k + ".npy")),
                                     outputs[k], equal_nan=True)]
    with open(os.path.join(args.folder, "memory_events.json")) as f:
        old_events = json.load(f)
    events_differ = [k for k in old_events if old_events[k] != events.get(k)]
    print(f"{len(saved) - len(missing) - len(differ)} of {len(saved)} outputs bit-identical; "
          f"missing {len(missing)}, differing {len(differ)}; memory event lists differing: "
          f"{len(events_differ)} of {len(old_events)}")
    for k in missing[:10]:
        print("  missing:", k)
    for k in differ[:20]:
        old = np.load(os.path.join(args.folder, k + ".npy"))
        print(f"  differs: {k}: max |difference| {np.abs(old - outputs[k]).max():.3g} "
              f"(of max |value| {np.abs(old).max():.3g}), {np.mean(old != outputs[k]):.1%}")
    for k in events_differ[:10]:
        print("  events:", k)
    return 1 if missing or differ or events_differ else 0


if __name__ == "__main__":
    sys.exit(main())
