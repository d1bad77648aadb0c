"""The ``numres`` command (also ``python -m numres``).

    numres predict IMG... [--arch resnet50] [--weights V1|V2|PATH|URL] [--topk 5] [--json]
    numres features IMG_DIR --out feats.npy [--resume] [--on-error skip|fail]
    numres inspect FILE.pth
    numres fetch ARCH [--weights V2]
    numres warmup
    numres bench

Failures print one line to stderr and exit with status 1 (usage errors: 2). Image files that
cannot be read are skipped with one warning line each (``--on-error fail`` stops instead).
"""

import argparse
import json
import os
import sys


from . import __version__, hub
from .backends import PRECISIONS
from .checkpoint import FORMAT_NAMES, read_checkpoint
from .errors import BackendUnavailable, CheckpointError, DownloadError
from .models.builders import ARCHS, build, fitting_architectures


def _model_args(p, default_weights="DEFAULT"):
    p.add_argument("--arch", choices=list(ARCHS), metavar="ARCH",
                   help=f"one of {', '.join(ARCHS)} (default: what a --weights file fits, "
                        "else resnet50)")
    p.add_argument("--weights", default=default_weights,
                   help="V1, V2, DEFAULT, a .pth path or an http(s) URL (default: %(default)s)")
    p.add_argument("--backend", default="auto", help="auto, numpy, numba or cupy")
    p.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="bfloat16: the Numba backend multiplies in bf16 on CPUs with "
                        "AVX512_BF16 (faster; logits within ~1%% of float32's, not equal)")
    p.add_argument("--batch-size", type=int, default=16)


def _pipeline_args(p):
    p.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                   help="a file that cannot be read: skip it with a warning (default) or stop")
    p.add_argument("--decode-threads", type=int, default=None, metavar="N",
                   help="threads decoding images ahead of the model (default: a quarter of "
                        "the cores, at least 2)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="compute threads of the CPU backend (default: every core; "
                        "NUMRES_NUM_THREADS also sets it)")
    p.add_argument("--draft", action="store_true",
                   help="decode large JPEGs at a reduced size first (faster; no longer "
                        "identical to torchvision's preprocessing)")


def _build(args):
    """The model for --arch/--weights; a checkpoint file sets num_classes (and the arch if
    --arch is not given)."""
    weights, arch, num_classes = args.weights, args.arch, 1000
    if hub.is_local_path(weights):
        weights = read_checkpoint(weights).state_dict
        num_classes = weights["fc.weight"].shape[0] if "fc.weight" in weights else 1000
        if arch is None:
            fits = fitting_architectures(weights)
            if not fits:
                raise ValueError(f"{args.weights} fits no numres architecture; see "
                                 f"'numres inspect {args.weights}'")
            arch = fits[0]
    return build(arch or "resnet50", weights=weights, backend=_backend(args),
                 num_classes=num_classes)


def _backend(args):
    """The backend for --backend in --precision, on --threads threads when given (default:
    every core; see :func:`numres.pipeline.split_threads`)."""
    from .backends import get_backend, with_precision
    from .pipeline import split_threads

    backend = get_backend(with_precision(args.backend, args.precision))
    if backend.name == "numba" and getattr(args, "threads", None):
        _, compute = split_threads(compute_threads=args.threads)
        backend = backend.with_threads(compute)
    return backend


def _run_files(args, model, files, output):
    """Results in file order; one warning line per skipped file and a closing summary."""
    from .pipeline import iter_results

    for item in iter_results(model, files, output=output, batch_size=args.batch_size,
                             decode_threads=args.decode_threads, on_error=args.on_error,
                             draft=args.draft):
        if not item.ok:
            print(f"numres: skipped {item.path}: {item.reason}", file=sys.stderr)
        yield item


def _summary(images, skipped):
    print(f"numres: {images} images, {skipped} skipped", file=sys.stderr)
    if images == 0:
        raise ValueError(f"none of the {skipped} files could be read (reasons above)")


def cmd_predict(args):
    from .predict import decode, find_images
    files = find_images(args.images)
    if not files:
        raise FileNotFoundError("no images found in " + " ".join(args.images))
    model = _build(args)
    categories = model.weights.categories if model.weights else None
    entries, skipped = [], 0
    for item in _run_files(args, model, files, "logits"):
        if not item.ok:
            skipped += 1
            entries.append({"file": item.path, "error": item.reason})
            continue
        [top] = decode(item.value[None], args.topk, categories)
        entries.append({"file": item.path, "top": [
            {"label": lab, "probability": round(p, 6), "index": i} for lab, p, i in top]})
        if not args.json:
            print(item.path)
            for label, p, i in top:
                print(f"  {p:7.2%}  {label} ({i})")
            sys.stdout.flush()
    if args.json:
        json.dump(entries, sys.stdout, indent=1)
        sys.stdout.write("\n")
    _summary(len(files) - skipped, skipped)


def cmd_features(args):
    from .pipeline import output_names, write_arrays
    from .predict import find_images
    files = find_images(args.images)
    if not files:
        raise FileNotFoundError("no images found in " + " ".join(args.images))
    model = _build(args)
    out = args.out if args.out.endswith((".npy", ".zarr")) else args.out + ".npy"

    def warn_skipped(results):
        for item in results:
            if not item.ok:
                print(f"numres: skipped {item.path}: {item.reason}", file=sys.stderr)
            yield item

    rows, skipped = write_arrays(model, files, out, output="features", resume=args.resume,
                                 batch_size=args.batch_size,
                                 decode_threads=args.decode_threads, on_error=args.on_error,
                                 draft=args.draft, observe=warn_skipped)
    names = output_names(out)
    print(f"wrote {rows} x {model.num_features} features to {out} (file names, same order: "
          f"{names['files']}; skipped files: {names['errors']})")
    _summary(rows, skipped)


def cmd_inspect(args):
    ckpt = read_checkpoint(args.file)
    sd = ckpt.state_dict
    n_params = sum(v.size for k, v in sd.items()
                   if not k.endswith(("num_batches_tracked", "running_mean", "running_var")))
    dtypes = {}
    for name, dtype in ckpt.dtypes.items():
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
    fits = fitting_architectures(sd)
    num_classes = sd["fc.weight"].shape[0] if "fc.weight" in sd else None
    info = {"file": args.file, "format": ckpt.format, "tensors": len(sd),
            "parameters": int(n_params), "dtypes": dtypes, "architectures": fits,
            "num_classes": num_classes, "size_bytes": os.path.getsize(args.file)}
    if args.json:
        info["tensor_list"] = [{"name": k, "shape": list(v.shape), "dtype": ckpt.dtypes[k]}
                               for k, v in sd.items()]
        json.dump(info, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return
    print(f"file:         {args.file} ({info['size_bytes'] / 1e6:.1f} MB)")
    print(f"format:       {FORMAT_NAMES[ckpt.format]}")
    print(f"tensors:      {len(sd)} "
          f"({', '.join(f'{n} {t}' for t, n in sorted(dtypes.items()))})")
    print(f"parameters:   {n_params:,} (batch-norm statistics not counted)")
    if fits:
        print(f"fits:         {', '.join(fits)} with num_classes={num_classes}")
    else:
        print("fits:         no numres architecture (names or shapes differ)")
    shown = list(sd.items()) if args.all else list(sd.items())[:12]
    width = max((len(k) for k, _ in shown), default=0)
    for name, value in shown:
        print(f"  {name:<{width}}  {ckpt.dtypes[name]:<8} {tuple(value.shape)}")
    if len(shown) < len(sd):
        print(f"  ... {len(sd) - len(shown)} more (--all lists every tensor)")


def cmd_fetch(args):
    weights = hub.get_weights(args.arch, args.weights)
    path = hub.cached_file(weights.url, progress=True)
    print(f"{args.arch} {weights.tag}: {path}")


def cmd_warmup(args):
    import time

    from .backends.numba import warmup
    start = time.perf_counter()
    warmup()
    print(f"numres: CPU kernels ready ({time.perf_counter() - start:.1f} s)")


def cmd_bench(args, extra):
    from .bench import main
    main(extra, defaults={"models": "resnet18,resnet50", "batches": "1,8", "rounds": 5,
                          "layers": 5})


def make_parser():
    p = argparse.ArgumentParser(prog="numres", description="Pretrained ResNets without "
                                "PyTorch: classify images, extract features, inspect "
                                "checkpoints.")
    p.add_argument("--version", action="version", version=f"numres {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("predict", help="top-k ImageNet labels for images")
    pr.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    _model_args(pr)
    pr.add_argument("--topk", type=int, default=5)
    pr.add_argument("--json", action="store_true", help="machine-readable output")
    _pipeline_args(pr)
    pr.set_defaults(func=cmd_predict)

    fe = sub.add_parser("features", help="pooled embeddings for a folder of images")
    fe.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    fe.add_argument("--out", required=True, help="output .npy, or .zarr with zarr installed "
                    "(good files' names go to <out>.files.txt, skipped ones to "
                    "<out>.errors.txt)")
    fe.add_argument("--resume", action="store_true",
                    help="continue a killed run of the same command where it stopped")
    _model_args(fe)
    _pipeline_args(fe)
    fe.set_defaults(func=cmd_features)

    ins = sub.add_parser("inspect", help="describe a .pth file (no torch needed)")
    ins.add_argument("file")
    ins.add_argument("--all", action="store_true", help="list every tensor")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=cmd_inspect)

    fetch = sub.add_parser("fetch", help="download weights into the cache ahead of time")
    fetch.add_argument("arch", choices=list(ARCHS), metavar="ARCH")
    fetch.add_argument("--weights", default="DEFAULT", help="V1, V2 or DEFAULT")
    fetch.set_defaults(func=cmd_fetch)

    warm = sub.add_parser("warmup", help="compile the CPU kernels now (once per machine)")
    warm.set_defaults(func=cmd_warmup)

    bench = sub.add_parser("bench", help="short benchmark (all options: numres bench --help)",
                           add_help=False)
    bench.set_defaults(func=cmd_bench)
    return p


def main(argv=None):
    parser = make_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "bench":
            args.func(args, extra)
        else:
            args.func(args)
    except (FileNotFoundError, IsADirectoryError, CheckpointError, DownloadError,
            BackendUnavailable, ValueError, TypeError, ImportError, OSError, MemoryError,
            RuntimeError) as exc:
        print(f"numres: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("numres: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
