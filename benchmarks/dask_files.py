"""numres.dask.from_files on a LocalCluster: one worker against two (one thread each).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/dask_files.py \\
        --arch resnet18 --files 160 --rounds 3

Each cluster first runs one small job (workers build the model and load compiled kernels),
then the timed jobs: img/s over the whole folder, medians of ``--rounds``. With one worker
numres gets all the host's cores; with two, each gets half (see ``numres.dask.from_files``).
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.end_to_end import make_photos  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--files", type=int, default=160)
    p.add_argument("--size", default="500x375")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--files-per-task", type=int, default=32)
    args = p.parse_args(argv)

    from dask.distributed import Client, LocalCluster

    import numres
    import numres.dask as nd

    work = tempfile.mkdtemp(prefix="numres-dask-")
    try:
        width, height = map(int, args.size.split("x"))
        folder = os.path.join(work, "photos")
        make_photos(folder, args.files, width, height)
        weights = os.path.join(work, "w.pth")
        numres.save_pth(numres.build(args.arch, backend="numpy").state_dict(), weights)
        for workers in (1, 2):
            with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                              dashboard_address=None) as cluster, Client(cluster):
                warm = nd.from_files(sorted(os.path.join(folder, f)
                                            for f in os.listdir(folder))[:4 * workers],
                                     arch=args.arch, weights=weights, files_per_task=4)
                warm.compute()
                times = []
                for _ in range(args.rounds):
                    res = nd.from_files(folder, arch=args.arch, weights=weights,
                                        files_per_task=args.files_per_task)
                    start = time.perf_counter()
                    values, errors = res.compute()
                    times.append(time.perf_counter() - start)
                    assert (errors == "").all() and np.isfinite(values).all()
                rate = args.files / float(np.median(times))
                print(f"{workers} worker(s) x 1 thread, {args.arch}, {args.files} files of "
                      f"{args.size}: {rate:.1f} img/s (median of {args.rounds})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
