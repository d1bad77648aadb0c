"""The first call on a fresh install: numres (kernels compiling in the background, and in the
process as before) beside torch, each a whole new process on a checkpoint file.

"Fresh" means a new clone of this repository's committed HEAD installed with pip into a new
virtual environment, and an empty Numba cache (``NUMBA_CACHE_DIR``) for every process, as a
container or CI job meets numres; torch runs from this interpreter's environment. Each
process reports when it has imported, built the model from the ``.pth`` file and answered its
first call; numres's also how long until the compiled kernels took over (background compile)
and its call times after that. Medians over ``--repeats`` fresh processes per contender.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/first_call.py
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


import numres  # noqa: E402
from numres import bench  # noqa: E402

# The child: everything timed from the moment the interpreter starts running it.
NUMRES_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import numres
t_import = time.perf_counter()
arch, ckpt, batch, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = numres.build(arch, weights=ckpt)
t_build = time.perf_counter()
x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
first = model(x)
t_first = time.perf_counter()
out = {"file": numres.__file__, "import_s": t_import - t0, "build_s": t_build - t_import,
       "first_call_s": t_first - t_build, "first_ran_on": model.active_backend.name,
       "to_first_answer_s": t_first - t0}
try:
    from numres.backends.numba import background
    t = time.perf_counter()
    background.wait()
    out["compile_left_s"] = time.perf_counter() - t
except Exception:
    pass
t = time.perf_counter(); model(x); out["switch_call_s"] = time.perf_counter() - t
out["then_ran_on"] = model.active_backend.name
calls = []
for _ in range(5):
    t = time.perf_counter(); model(x); calls.append(time.perf_counter() - t)
out["steady_call_s"] = sorted(calls)[2]
print(json.dumps(out))
"""

TORCH_CHILD = r"""
import json, sys, time, types
t0 = time.perf_counter()
import torch
sys.modules.setdefault("torchvision._meta_registrations",
                       types.ModuleType("torchvision._meta_registrations"))
import torchvision
t_import = time.perf_counter()
arch, ckpt, batch, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model = getattr(torchvision.models, arch)()
model.load_state_dict(torch.load(ckpt, weights_only=True))
model.eval()
t_build = time.perf_counter()
import numpy as np
x = torch.from_numpy(np.random.default_rng(0).standard_normal(
    (batch, 3, size, size)).astype(np.float32))
with torch.inference_mode():
    model(x)
t_first = time.perf_counter()
print(json.dumps({"import_s": t_import - t0, "build_s": t_build - t_import,
                  "first_call_s": t_first - t_build, "to_first_answer_s": t_first - t0}))
"""


def run_child(python, code, args, env, label):
    t = time.perf_counter()
    # Run from the root folder: ``-c`` puts the working directory first on sys.path, and
    # this checkout's numres must not be the one imported.
    proc = subprocess.run([python, "-c", code, *args], env=env, capture_output=True,
                          text=True, timeout=3600, cwd="/")
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = wall
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)
    env_info, _ = bench.header(bench.environment(torch=bench.version("torch")))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        clone = os.path.join(tmp, "clone")
        subprocess.run(["git", "clone", "-q", ROOT, clone], check=True)
        commit = subprocess.run(["git", "-C", clone, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        venv = os.path.join(tmp, "venv")
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        python = os.path.join(venv, "bin", "python")
        subprocess.run([python, "-m", "pip", "install", "-q", clone], check=True,
                       stderr=subprocess.DEVNULL)
        print(f"  fresh install (venv + pip install): {time.perf_counter() - t:.1f} s")
        ckpt = os.path.join(tmp, f"{args.model}.pth")
        numres.save_pth(numres.build(args.model, backend="numpy").state_dict(), ckpt)
        child_args = [args.model, ckpt, str(args.batch), str(args.size)]
        contenders = [("numres, fresh (background compile)", NUMRES_CHILD, {}),
                      ("numres, fresh (compile in process)", NUMRES_CHILD,
                       {"NUMRES_BACKGROUND_COMPILE": "0"}),
                      ("numres, cache filled", NUMRES_CHILD, {"warm": "1"})]
        if not args.no_torch:
            contenders.append(("torch", TORCH_CHILD, {}))
        warm_cache = os.path.join(tmp, "warm-cache")
        fresh = 0
        for i in range(args.repeats):
            for name, code, extra in contenders:
                fresh += 1              # a new, empty Numba cache for every fresh process
                cache = warm_cache if extra.get("warm") else os.path.join(tmp, f"cache-{fresh}")
                env = dict(os.environ, NUMBA_CACHE_DIR=cache,
                           **{k: v for k, v in extra.items() if k != "warm"})
                env.pop("PYTHONPATH", None)
                exe = sys.executable if code is TORCH_CHILD else python
                if extra.get("warm") and not os.path.isdir(cache):
                    subprocess.run([python, "-m", "numres", "warmup"], env=env, check=True,
                                   capture_output=True, cwd="/")
                out = run_child(exe, code, child_args, env, name)
                if "file" in out and not out.pop("file").startswith(venv):
                    raise SystemExit("the child did not import the freshly installed numres")
                results.setdefault(name, []).append(out)
                print(f"  {name}, run {i + 1}: first answer after "
                      f"{out['to_first_answer_s']:.2f} s", flush=True)
    print(f"\n## First call, {args.model}, batch {args.batch}, {args.size}x{args.size}, "
          f"fresh clone {commit} ({args.repeats} processes each, medians)\n")
    cols = [("import_s", "import"), ("build_s", "build from .pth"),
            ("first_call_s", "first call"), ("to_first_answer_s", "start to first answer"),
            ("compile_left_s", "then compiled after"), ("switch_call_s", "first Numba call"),
            ("steady_call_s", "steady call"), ("process_s", "whole process")]
    print("| contender | " + " | ".join(c for _, c in cols) + " | first ran on |")
    print("|---|" + "---|" * len(cols) + "---|")
    summary = {}
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k, _ in cols if k in runs[0]}
        summary[name] = dict(med, first_ran_on=runs[0].get("first_ran_on", "torch"))
        cells = [f"{med[k]:.2f} s" if k in med else "" for k, _ in cols]
        print(f"| {name} | " + " | ".join(cells) + f" | {summary[name]['first_ran_on']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env_info, "commit": commit, "model": args.model,
                       "batch": args.batch, "size": args.size, "runs": results,
                       "medians": summary}, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
