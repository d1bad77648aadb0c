"""numres on a real Dask cluster: two worker processes, results equal one process's."""

import os

import numpy as np
import pytest

import numres

pytest.importorskip("dask.distributed", reason="dask[distributed] is not installed")


@pytest.mark.slow
def test_local_cluster_matches_single_process(tmp_path):
    import dask.array as da
    from dask.distributed import Client, LocalCluster

    import numres.dask as nd
    model = numres.resnet18(num_classes=10, backend="numpy")
    path = tmp_path / "r18.pth"
    numres.save_pth(model.state_dict(), path)
    x = np.random.default_rng(0).standard_normal((10, 3, 32, 32)).astype(np.float32)
    darr = da.from_array(x, chunks=(3, 3, 32, 32))             # 4 chunks along the batch
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        logits = nd.predict(darr, arch="resnet18", weights=str(path), backend="numpy",
                            num_classes=10)
        feats = nd.features(darr, arch="resnet18", weights=str(path), backend="numpy",
                            num_classes=10)
        assert logits.shape == (10, 10) and feats.shape == (10, 512)
        got_logits, got_feats = logits.compute(), feats.compute()
        caches = client.run(nd.model_cache_info)
    assert len(caches) == 2
    # Each worker built each model at most once, and at least one reused it.
    assert all(info.misses <= 2 for info in caches.values())
    assert sum(info.hits for info in caches.values()) >= 1
    local = numres.build("resnet18", weights=path, num_classes=10, backend="numpy")
    np.testing.assert_allclose(got_logits, local(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_feats, local.features(x), rtol=1e-5, atol=1e-6)


def test_argument_errors():
    import dask.array as da

    import numres.dask as nd
    with pytest.raises(TypeError, match="dask array"):
        nd.predict(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        nd.predict(da.zeros((2, 8, 8), chunks=1))
    with pytest.raises(ValueError, match="unknown architecture"):
        nd.predict(da.zeros((2, 3, 8, 8), chunks=1), arch="vgg")


@pytest.mark.slow
def test_from_files_on_a_cluster_equals_the_cli(tmp_path):
    """Two worker processes decode and compute; bad files are rows with reasons, never a
    failed job; the values equal what ``numres features`` writes in one process."""
    import subprocess
    import sys

    zarr = pytest.importorskip("zarr", reason="zarr is not installed (zarr output)")
    from dask.distributed import Client, LocalCluster
    from PIL import Image

    import numres.dask as nd
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(9):
        Image.fromarray(rng.integers(0, 255, (50, 60, 3), np.uint8)).save(images / f"{i}.png")
    (images / "3b_broken.png").write_bytes((images / "3.png").read_bytes()[:200])
    (images / "5b_empty.jpg").write_bytes(b"")
    (images / "7b_text.jpg").write_text("not an image")
    model = numres.resnet18(num_classes=4, backend="numpy")
    weights = tmp_path / "r18.pth"
    numres.save_pth(model.state_dict(), weights)

    subprocess.run([sys.executable, "-m", "numres", "features", str(images), "--out",
                    str(tmp_path / "cli.npy"), "--weights", str(weights), "--arch", "resnet18",
                    "--backend", "numpy"], check=True, capture_output=True, timeout=300)
    cli_rows = np.load(tmp_path / "cli.npy")
    cli_files = (tmp_path / "cli.files.txt").read_text().splitlines()
    cli_errors = [line.split("\t")[0] for line in
                  (tmp_path / "cli.errors.txt").read_text().splitlines()]

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        shares = [client.submit(nd._worker_threads, workers=[w], pure=False).result()
                  for w in client.scheduler_info()["workers"]]
        res = nd.from_files(str(images), arch="resnet18", weights=str(weights),
                            backend="numpy", num_classes=4, files_per_task=4, batch_size=3)
        values, errors = res.compute()
        good, skipped = res.to_zarr(str(tmp_path / "out.zarr"))
    assert (good, skipped) == (9, 3)
    # Two workers of one thread on this host: each gets half of the cores for numres.
    cores = len(os.sched_getaffinity(0))
    assert shares == [max(1, cores // 2)] * 2
    ok = errors == ""
    assert [p for p, e in zip(res.paths, errors) if e] == cli_errors
    assert [p for p, g in zip(res.paths, ok) if g] == cli_files
    assert np.isnan(values[~ok]).all()
    np.testing.assert_allclose(values[ok], cli_rows, rtol=1e-5, atol=1e-5)
    stored = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    np.testing.assert_array_equal(stored["values"][:], values)
    assert list(stored["errors"][:]) == list(errors)
    assert list(stored["paths"][:]) == res.paths


def test_worker_share_of_the_host():
    import numres.dask as nd
    assert nd._worker_threads() is None                  # not on a worker
