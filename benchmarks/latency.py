"""Latency as a service meets it: calls after idle gaps, and a stream of requests with random
gaps, numres beside torch and ONNX Runtime in one process, batch 1.

Cases, for every contender (the gap cases interleaved at random, so a slow phase of the
machine falls on all of them alike):

* back to back: a call right after another;
* after a gap: ``time.sleep(gap)``, then the call (0.25 s and 2 s by default);
* request stream: each request follows the previous answer after a random (exponential) gap
  as long as the contender's own back-to-back call on average, so it is busy half the time;
  latency is the call (p50, p99). (Requests arriving on their own clock would add queueing:
  at half load a single server's p99 is several times its p50 whatever the server does.)

``numres-unplaced`` is numres with its threads neither spinning nor placed
(``NUMRES_SPIN_US=0``, ``NUMRES_PLACE_THREADS=0``): the hand-offs as they were before.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/latency.py
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402

import numres  # noqa: E402
from numres import bench  # noqa: E402
from bench import _write_checkpoint, import_torch, reference_contenders  # noqa: E402


def numres_variants(arch, ckpt, x):
    """numres as shipped, and with spinning and placement off (its own threads)."""
    from numres.backends.numba import NumbaBackend, background, threads
    background.wait()
    out = []
    for name, env in (("numres", {}),
                      ("numres-unplaced", {"NUMRES_SPIN_US": "0",
                                           "NUMRES_PLACE_THREADS": "0"})):
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            backend = NumbaBackend()
            if env:
                # Its own threads, made while the settings hold (the shared ones keep theirs).
                backend._executor = threads.Executor(backend.threads)
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        model = numres.build(arch, weights=ckpt, backend=backend)
        out.append(bench.Contender(name, lambda m=model: m(x)))
    return out


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def stream(fn, service, requests, rng):
    """Call times of ``requests`` calls, each after an exponential gap of mean ``service``."""
    latencies = []
    for gap in rng.exponential(service, requests):
        time.sleep(gap)
        latencies.append(timed(fn))
    return np.array(latencies)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--gaps", default="0.25,2")
    p.add_argument("--trials", type=int, default=12, help="calls per gap and contender")
    p.add_argument("--requests", type=int, default=300, help="requests per stream")
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)
    torch_mods, note = import_torch()
    if torch_mods:
        torch_mods[0].set_num_threads(numres.backends.default_threads())
    env, _ = bench.header(bench.environment(
        torch=torch_mods[0].__version__ if torch_mods else note,
        onnxruntime=bench.version("onnxruntime")))
    gaps = [float(g) for g in args.gaps.split(",") if g]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models.split(","):
            ckpt = os.path.join(tmp, f"{arch}.pth")
            _write_checkpoint(arch, ckpt, torch_mods)
            x = np.random.default_rng(0).standard_normal((1, 3, args.size, args.size)) \
                .astype(np.float32)
            contenders = numres_variants(arch, ckpt, x)
            others, notes = reference_contenders(arch, ckpt, torch_mods, tmp, x)
            contenders += [c for c in others if c.name != "torch-cl"]   # NCHW: torch's best
            results.append(measure(arch, contenders, gaps, args, notes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": results}, f, indent=1)
        print(f"results written to {args.json}")
    return results


def measure(arch, contenders, gaps, args, notes):
    for c in contenders:
        for _ in range(5):
            c.fn()
    cases = [(c, g) for c in contenders for g in [0.0] + gaps] * args.trials
    random.Random(0).shuffle(cases)
    times = {}
    for c, gap in cases:
        c.fn()                                   # the call before: back to back from here
        if gap:
            time.sleep(gap)
        times.setdefault((c.name, gap), []).append(timed(c.fn))
    rng = np.random.default_rng(1)
    rows = []
    for c in contenders:
        base = float(np.median(times[(c.name, 0.0)]))
        lat = stream(c.fn, base, args.requests, rng)
        row = {"contender": c.name, "back_to_back_ms": base * 1e3,
               "after_gap_ms": {str(g): float(np.median(times[(c.name, g)])) * 1e3
                                for g in gaps},
               "stream_p50_ms": float(np.percentile(lat, 50)) * 1e3,
               "stream_p99_ms": float(np.percentile(lat, 99)) * 1e3}
        rows.append(row)
    print(f"\n## {arch}, batch 1, {args.size}x{args.size}: latency (medians of "
          f"{args.trials}; a stream of {args.requests} requests at half load)\n")
    gap_cols = " | ".join(f"after {g:g} s (x back to back)" for g in gaps)
    print(f"| contender | back to back | {gap_cols} | stream p50 | stream p99 | p99 / p50 |")
    print("|---|---|" + "---|" * len(gaps) + "---|---|---|")
    for r in rows:
        cells = " | ".join(f"{r['after_gap_ms'][str(g)]:.1f} ms "
                           f"({r['after_gap_ms'][str(g)] / r['back_to_back_ms']:.2f})"
                           for g in gaps)
        print(f"| {r['contender']} | {r['back_to_back_ms']:.1f} ms | {cells} | "
              f"{r['stream_p50_ms']:.1f} ms | {r['stream_p99_ms']:.1f} ms | "
              f"{r['stream_p99_ms'] / r['stream_p50_ms']:.2f} |")
    for k, v in notes.items():
        print(f"\n{k}: {v}")
    return {"model": arch, "size": args.size, "rows": rows, "notes": notes}


if __name__ == "__main__":
    main()
