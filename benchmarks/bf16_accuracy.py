"""How far ``precision="bfloat16"`` moves the logits from float32, beside torch's own bf16.

    python benchmarks/bf16_accuracy.py --models resnet18,resnet50,resnext50_32x4d \\
        --images 64 --json benchmarks/results/bf16-accuracy.json

Per model: a random-weight torchvision network with randomised batch-norm statistics (as the
tests build them), saved with torch.save and read by numres; ``--images`` random 224 px
inputs in batches of 8. Reported against torch's float32 logits: numres float32, numres
bfloat16, and torch under CPU autocast to bfloat16 (its convolutions and linear layer in
bf16) as the yardstick of what bf16 costs anywhere. Per contender: max and mean |delta
logit| (also relative to max |logit|), top-1 agreement (same argmax) and top-5 agreement
(the same five classes, in any order), also of the centred logits (each class's mean over
the inputs subtracted from both: what the input changes).

Random networks are not trained ones: their logits grow with depth (ResNet-152's reach
1e11) and most inputs share one top class (the run prints how many distinct top-1 classes
the reference gave), so top-1 agreement is easy here; the centred agreement, top-5 and the
relative differences say more. What the rounding does to a trained network's accuracy is
not measured (the official weights cannot be downloaded on this machine).
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numres  # noqa: E402
from numres.backends import get_backend  # noqa: E402
from numres.backends.numba import background  # noqa: E402
from tests.models.test_resnet import randomize_batch_norm  # noqa: E402
from tests.torch_import import import_torchvision  # noqa: E402


def agreement(logits, reference):
    """(top-1, top-5) agreement: the same argmax; the same five classes in any order."""
    top5 = np.argsort(-logits, 1)[:, :5]
    ref5 = np.argsort(-reference, 1)[:, :5]
    return (float((logits.argmax(1) == reference.argmax(1)).mean()),
            float(np.mean([set(a) == set(b) for a, b in zip(top5, ref5)])))


def compare(logits, reference):
    """Differences of ``logits`` from ``reference`` (both (N, classes))."""
    d = np.abs(logits - reference)
    scale = float(np.abs(reference).max())
    top1, top5 = agreement(logits, reference)
    # What the input changes: each class's mean over the inputs taken away (a random
    # network's logits are dominated by a bias that gives every input one top class).
    mean = reference.mean(0)
    top1_c, top5_c = agreement(logits - mean, reference - mean)
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "max_rel": float(d.max()) / scale, "mean_rel": float(d.mean()) / scale,
            "top1": top1, "top5": top5, "top1_centred": top1_c, "top5_centred": top5_c,
            "max_logit": scale, "reference_classes": len(set(reference.argmax(1))),
            "centred_classes": len(set((reference - mean).argmax(1)))}


def run_model(arch, images, batch, torch, torchvision, tmp):
    torch.manual_seed(0)
    tmodel = randomize_batch_norm(torch, getattr(torchvision.models, arch)(), 1)
    ckpt = os.path.join(tmp, f"{arch}.pth")
    torch.save(tmodel.state_dict(), ckpt)
    models = {"numres-float32": numres.build(arch, weights=ckpt, backend="numba"),
              "numres-bfloat16": numres.build(
                  arch, weights=ckpt, backend=get_backend("numba", precision="bfloat16"))}
    if models["numres-bfloat16"].backend.stand_in() is not None:
        # A fresh machine: NumPy (float32) stands in until the kernels are compiled.
        print("(waiting for the numba kernels to compile in the background)")
        background.wait()
    x_all = np.random.default_rng(5).standard_normal((images, 3, 224, 224)).astype(np.float32)
    got = {name: [] for name in list(models) + ["torch-autocast-bf16"]}
    reference = []
    for i in range(0, images, batch):
        x = x_all[i:i + batch]
        xt = torch.from_numpy(x)
        with torch.no_grad():
            reference.append(tmodel(xt).numpy())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got["torch-autocast-bf16"].append(tmodel(xt).float().numpy())
        for name, model in models.items():
            got[name].append(model(x))
    reference = np.concatenate(reference)
    return {name: compare(np.concatenate(v), reference) for name, v in got.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,resnet50,resnext50_32x4d")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)
    torch, torchvision = import_torchvision()
    results = {}
    print("| model | contender | max abs | mean abs | max / max|logit| | mean / max|logit| "
          "| top-1 | top-5 | centred top-1 | centred top-5 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models.split(","):
            results[arch] = run_model(arch, args.images, args.batch, torch, torchvision, tmp)
            for name, r in results[arch].items():
                print(f"| {arch} | {name} | {r['max_abs']:.3g} | {r['mean_abs']:.3g} | "
                      f"{r['max_rel']:.2e} | {r['mean_rel']:.2e} | {r['top1']:.1%} | "
                      f"{r['top5']:.1%} | {r['top1_centred']:.1%} | {r['top5_centred']:.1%} |",
                      flush=True)
    print(f"\n{args.images} images of 224 px per model; reference: torch float32 "
          f"(max |logit|, distinct top-1 classes, distinct centred top-1 classes per model: "
          + "; ".join(f"{a} {r['numres-float32']['max_logit']:.3g}, "
                      f"{r['numres-float32']['reference_classes']}, "
                      f"{r['numres-float32']['centred_classes']}"
                      for a, r in results.items()) + ")")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": args.images, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
