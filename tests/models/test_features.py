"""Feature extraction: pooled embeddings, stage outputs, and heads trained elsewhere."""

import numpy as np
import pytest

import numres

from .test_resnet import close, randomize_batch_norm


@pytest.fixture(scope="module")
def r50(tv, tmp_path_factory):
    torch, torchvision = tv
    torch.manual_seed(0)
    model = randomize_batch_norm(torch, torchvision.models.resnet50(), 4)
    path = tmp_path_factory.mktemp("f") / "r50.pth"
    torch.save(model.state_dict(), path)
    return model, path


def test_feature_maps_match_intermediate_layer_getter(tv, r50, backend):
    torch, _ = tv
    from torchvision.models._utils import IntermediateLayerGetter
    tmodel, path = r50
    getter = IntermediateLayerGetter(tmodel, {f"layer{i}": f"layer{i}" for i in range(1, 5)})
    x = np.random.default_rng(0).standard_normal((2, 3, 70, 54)).astype(np.float32)
    with torch.no_grad():
        expected = {k: v.numpy() for k, v in getter(torch.from_numpy(x)).items()}
    model = numres.resnet50(weights=path, backend=backend)
    maps = model.feature_maps(x)
    assert list(maps) == ["layer1", "layer2", "layer3", "layer4"]
    for name, ref in expected.items():
        assert maps[name].shape == ref.shape
        close(maps[name], ref, name)
    stem = model.feature_maps(x, stages="stem")["stem"]
    assert stem.shape == (2, 64, 18, 14)
    with pytest.raises(ValueError, match="unknown stage.*layer5"):
        model.feature_maps(x, stages=["layer5"])


def test_head_trained_with_scikit_learn_runs_in_numres(r50):
    """The README's transfer-learning example: features -> LogisticRegression -> numres fc."""
    sklearn_lm = pytest.importorskip("sklearn.linear_model",
                                     reason="scikit-learn is not installed")
    _, path = r50
    rng = np.random.default_rng(1)
    images = rng.standard_normal((12, 3, 64, 64)).astype(np.float32)
    labels = np.arange(12) % 3
    images += labels[:, None, None, None] * 0.5          # make the classes separable
    backbone = numres.resnet50(weights=path)
    feats = backbone.features(images)
    clf = sklearn_lm.LogisticRegression(max_iter=2000).fit(feats, labels)

    head = {"fc.weight": clf.coef_.astype(np.float32),
            "fc.bias": clf.intercept_.astype(np.float32)}
    model = numres.resnet50(weights=path, num_classes=1000)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    classifier = numres.resnet50(weights={**sd, **head}, num_classes=3)
    logits = classifier(images)
    np.testing.assert_allclose(logits, clf.decision_function(feats), rtol=1e-4, atol=1e-4)
    assert (logits.argmax(1) == clf.predict(feats)).all()


def test_pretrained_backbone_with_a_new_head(monkeypatch, r50):
    """Registry weights with num_classes != 1000: backbone loaded, fc fresh."""
    from numres import hub
    _, path = r50
    full = numres.load_pth(path)
    monkeypatch.setattr(hub, "fetch_state_dict", lambda source, progress=True, check=None: full)
    model = numres.resnet50(pretrained=True, num_classes=7, backend="numpy")
    assert model.fc.params["weight"].shape == (7, 2048)
    np.testing.assert_array_equal(model.state_dict()["layer4.2.conv3.weight"],
                                  full["layer4.2.conv3.weight"])
    assert model.weights.tag == "IMAGENET1K_V1"
