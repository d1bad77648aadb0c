"""Recorded and replayed passes of the Numba backend (``backends/numba/replay.py``)."""

import numpy as np
import pytest

import numres

numba = pytest.importorskip("numres.backends.numba", reason="Numba is not installed")


def _pair(arch="resnet18", **kw):
    """The same random model twice: replaying passes, and always eager (the reference)."""
    replayed = numres.build(arch, num_classes=5, backend=numba.NumbaBackend(**kw))
    eager = numres.build(arch, num_classes=5,
                         backend=numba.NumbaBackend(replay=False, **kw))
    eager.load_state_dict(replayed.state_dict())
    return replayed, eager


def _plans(model):
    return {k: v for k, v in model._prepared()["graphs"].items()}


@pytest.mark.parametrize("threads", [1, 2])
def test_replay_matches_eager_passes(rng, threads):
    replayed, eager = _pair(threads=threads)
    a, b = (rng.standard_normal((2, 3, 40, 48)).astype(np.float32) for _ in range(2))
    first = replayed(a)                              # recorded
    assert [type(p).__name__ for p in _plans(replayed).values()] == ["Plan"]
    for x in (b, a, b):                              # replayed, on new inputs
        np.testing.assert_array_equal(replayed(x), eager(x))
    np.testing.assert_array_equal(first, eager(a))


def test_replay_skips_the_layer_code(rng, monkeypatch):
    model, eager = _pair()
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    model(x)

    def fail(*args, **kwargs):
        raise AssertionError("a replayed pass called conv2d")
    monkeypatch.setattr(model.backend, "conv2d", fail)
    np.testing.assert_array_equal(model(x), eager(x))


def test_features_and_maps_are_replayed_and_returned_as_copies(rng):
    model, eager = _pair("resnet50")
    x, y = (rng.standard_normal((1, 3, 32, 32)).astype(np.float32) for _ in range(2))
    for _ in range(2):
        emb_x, emb_y = model.features(x), model.features(y)
        np.testing.assert_array_equal(emb_x, eager.features(x))
        np.testing.assert_array_equal(emb_y, eager.features(y))
        assert not np.shares_memory(emb_x, emb_y)
        maps_x, maps_y = model.feature_maps(x), model.feature_maps(y)
        for stage, expected in eager.feature_maps(x).items():
            np.testing.assert_array_equal(maps_x[stage], expected)
            assert not np.shares_memory(maps_x[stage], maps_y[stage])
    emb_x[:] = 0                                     # the caller's copy: the plan's own
    np.testing.assert_array_equal(model.features(x), eager.features(x))


def test_recording_keeps_the_pools_reuse(rng):
    """While recording, the plan must not keep layer buffers from being reused within the
    pass: the pool ends up no larger than an eager pass leaves it."""
    model, eager = _pair(threads=1)
    x = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    model(x)
    eager(x)
    sizes = [sum(m.backend.workspace._local.sizes) for m in (model, eager)]
    assert sizes[0] == sizes[1]
    model(x)                                         # a replay allocates nothing
    assert sum(model.backend.workspace._local.sizes) == sizes[0]


def test_other_shapes_do_not_touch_a_plans_buffers(rng):
    model, eager = _pair(threads=1)
    x = rng.standard_normal((1, 3, 48, 48)).astype(np.float32)
    model(x)                                         # recorded: its buffers are the plan's
    for size in (40, 56, 64):                        # two more plans, then eager passes
        z = rng.standard_normal((1, 3, size, size)).astype(np.float32)
        np.testing.assert_array_equal(model(z), eager(z))
        np.testing.assert_array_equal(model(x), eager(x))
    plans = _plans(model)
    assert len(plans) == numba.Tuning().max_plans
    assert all(type(p).__name__ == "Plan" for p in plans.values())


def test_replay_can_be_switched_off(rng, monkeypatch):
    monkeypatch.setenv("NUMRES_REPLAY", "0")
    model = numres.resnet18(num_classes=3, backend=numba.NumbaBackend())
    model(rng.standard_normal((1, 3, 32, 32)).astype(np.float32))
    assert _plans(model) == {}
