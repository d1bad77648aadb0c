"""numres on a real Dask cluster: two worker processes, results equal one process's."""

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
