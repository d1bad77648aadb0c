"""Files in, features on disk: numres's CLI beside a torch + torchvision DataLoader script.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/end_to_end.py \\
        --models resnet18,resnet50 --sizes 500x375,4000x3000 --files 160 --rounds 3

Every contender is a whole command in a fresh process, timed from start to exit (start-up,
weight loading, decoding, preprocessing, compute and writing the features), rounds
interleaved, medians reported, as a user meets it:

* ``numres features DIR --out f.npy`` (exact preprocessing; decode threads as given, and the
  CPU backend's threads the rest of the cores), and with ``--draft`` (reduced-size JPEG
  decoding) where the photos are large;
* torch: ``ImageFolder``-style dataset with Pillow and torchvision's ``Resize(256)``,
  ``CenterCrop(224)``, ``ToTensor``, ``Normalize``, a ``DataLoader`` (``num_workers`` 0 and 2),
  ``resnet(...).eval()`` with ``fc = Identity``, channels_last, ``torch.inference_mode``, and
  ``np.save`` of the features;
* numres compute only (the same images as one preprocessed array, batch 16, in-process), so
  the pipeline's overhead shows.

The same random torchvision weights are used by all (saved once with torch.save). The photos
are synthetic JPEGs (smooth gradients with noise, quality 90) of the given sizes.

``--memory-files 1000,10000`` also runs numres's CLI on that many small files and reports its
peak RSS, to show that memory stays flat with the number of files.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TORCH_SCRIPT = f"import sys; sys.path.insert(0, {ROOT!r})\n" + textwrap.dedent("""
    import os, sys
    import numpy as np
    from tests.torch_import import import_torchvision
    torch, torchvision = import_torchvision()
    from PIL import Image
    from torchvision import transforms as T
    arch, weights, folder, out, workers, threads = sys.argv[1:7]
    torch.set_num_threads(int(threads))
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            with open(files[i], "rb") as f:
                return tf(Image.open(f).convert("RGB"))

    model = getattr(torchvision.models, arch)()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.fc = torch.nn.Identity()
    model = model.eval().to(memory_format=torch.channels_last)
    loader = torch.utils.data.DataLoader(Files(), batch_size=16, num_workers=int(workers))
    feats = []
    with torch.inference_mode():
        for x in loader:
            feats.append(model(x.to(memory_format=torch.channels_last)).numpy())
    np.save(out, np.concatenate(feats))
""")


def make_photos(folder, count, width, height, seed=0):
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    for i in range(count):
        base = np.stack([x * (1 + i % 3), y * (2 + i % 5), (x + y)], axis=-1) * 255.0 / \
            max(width, height)
        noise = rng.integers(0, 24, (height, width, 3))
        img = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def timed(cmd):
    """Wall seconds of a command in a fresh process."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return wall


def peak_rss(cmd):
    """Peak RSS (MiB) of one command, read by a fresh wrapper process."""
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
               "capture_output=True); print(resource.getrusage("
               "resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                         check=True).stdout
    return int(out.strip()) / 1024


def compute_only(arch, weights, folder, batch=16):
    """numres's img/s on the already preprocessed images (no files, no decoding)."""
    import numres
    from numres.pipeline import read_image
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    t = numres.transforms.ImageClassification()
    x = np.stack([t(read_image(f)) for f in files])
    model = numres.build(arch, weights=weights)
    model.features(x[:batch])                                 # warm-up, plan recorded
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            model.features(x[i:i + batch])
        times.append(time.perf_counter() - start)
    return len(x) / float(np.median(times))


def draft_difference(folder, resize=256, crop=224):
    """How far ``--draft`` moves the model's input: the uint8 224x224 crops of the exact and
    the reduced-size decode, compared value by value over a folder."""
    from numres.pipeline import read_image
    from numres.transforms import center_crop, resize as resized
    diffs = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        exact = center_crop(resized(read_image(path), resize), crop).astype(np.int16)
        draft = center_crop(resized(read_image(path, resize), resize), crop).astype(np.int16)
        diffs.append(np.abs(exact - draft).ravel())
    d = np.concatenate(diffs)
    return {"max": int(d.max()), "mean": float(d.mean()), "share_differing": float((d > 0).mean()),
            "share_over_4": float((d > 4).mean())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--sizes", default="500x375,4000x3000")
    p.add_argument("--files", type=int, default=160)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode-threads", default="default",
                   help="numres decode threads to try, e.g. 1,2 (default: the CLI's default)")
    p.add_argument("--memory-files", default="", help="e.g. 1000,10000")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    from numres.bench import import_torch
    tv, why = import_torch()
    if tv is None:
        sys.exit(f"torch is needed for the comparison: {why}")
    torch, torchvision = tv
    cores = len(os.sched_getaffinity(0))
    work = tempfile.mkdtemp(prefix="numres-e2e-")
    results = {"machine": {"cores": cores, "python": platform.python_version(),
                           "date": time.strftime("%Y-%m-%d")}, "runs": []}
    try:
        for arch in args.models.split(","):
            weights = os.path.join(work, f"{arch}.pth")
            torch.manual_seed(0)
            torch.save(getattr(torchvision.models, arch)().state_dict(), weights)
            for size in args.sizes.split(","):
                width, height = map(int, size.split("x"))
                folder = os.path.join(work, f"photos-{size}")
                if not os.path.isdir(folder):
                    make_photos(folder, args.files, width, height)
                contenders = {}
                for d in args.decode_threads.split(","):
                    label = "numres" if d == "default" else f"numres (decode threads {d})"
                    contenders[label] = [
                        sys.executable, "-m", "numres", "features", folder, "--out",
                        os.path.join(work, "numres.npy"), "--arch", arch, "--weights", weights]
                    if d != "default":
                        contenders[label] += ["--decode-threads", d]
                    if width * height > 4 * 256 * 256:
                        contenders[label + " --draft"] = contenders[label] + ["--draft"]
                for workers in (0, 2):
                    contenders[f"torch DataLoader(num_workers={workers})"] = [
                        sys.executable, "-c", TORCH_SCRIPT, arch, weights, folder,
                        os.path.join(work, "torch.npy"), str(workers), str(cores)]
                walls = {name: [] for name in contenders}
                for name, cmd in contenders.items():      # warm-up: caches, compiled kernels
                    timed(cmd)
                for _ in range(args.rounds):
                    for name, cmd in contenders.items():
                        walls[name].append(timed(cmd))
                rates = {name: args.files / float(np.median(w)) for name, w in walls.items()}
                compute = compute_only(arch, weights, folder)
                best_torch = max(v for k, v in rates.items() if k.startswith("torch"))
                row = {"arch": arch, "size": size, "files": args.files,
                       "img_per_s": rates, "numres_compute_only_img_per_s": compute,
                       "best_torch_img_per_s": best_torch}
                results["runs"].append(row)
                print(f"\n{arch} {size}, {args.files} files (median of {args.rounds}, whole "
                      "commands):")
                for name, rate in rates.items():
                    print(f"  {name:<40} {rate:7.1f} img/s  {rate / best_torch:5.2f}x torch")
                print(f"  {'numres compute only (batch 16)':<40} {compute:7.1f} img/s")
                if width * height > 4 * 256 * 256 and "draft" not in results:
                    results["draft"] = draft_difference(folder)
                    print(f"  --draft vs exact input (uint8 crops, {size}): "
                          f"{results['draft']}")
        if args.memory_files:
            folder = os.path.join(work, "small")
            most = max(int(n) for n in args.memory_files.split(","))
            make_photos(folder, most, 64, 48, seed=1)
            all_files = sorted(os.listdir(folder))
            results["memory"] = {}
            for n in (int(n) for n in args.memory_files.split(",")):
                sub = os.path.join(work, f"small-{n}")
                os.makedirs(sub, exist_ok=True)
                for f in all_files[:n]:
                    os.link(os.path.join(folder, f), os.path.join(sub, f))
                weights = os.path.join(work, "resnet18.pth")
                if not os.path.exists(weights):
                    torch.save(torchvision.models.resnet18().state_dict(), weights)
                cmd = [sys.executable, "-m", "numres", "features", sub, "--out",
                       os.path.join(work, f"mem-{n}.npy"), "--arch", "resnet18",
                       "--weights", weights]
                peak = peak_rss(cmd)
                results["memory"][n] = peak
                print(f"numres features, resnet18, {n} files: peak RSS {peak:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
