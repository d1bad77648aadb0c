"""The weights registry matches torchvision's own catalogue, and tags resolve as torchvision's."""

import pytest

import numres
from numres.hub import registry, resolve

TV_ENUMS = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights",
            "resnet50": "ResNet50_Weights", "resnet101": "ResNet101_Weights",
            "resnet152": "ResNet152_Weights", "resnext50_32x4d": "ResNeXt50_32X4D_Weights",
            "resnext101_32x8d": "ResNeXt101_32X8D_Weights",
            "resnext101_64x4d": "ResNeXt101_64X4D_Weights",
            "wide_resnet50_2": "Wide_ResNet50_2_Weights",
            "wide_resnet101_2": "Wide_ResNet101_2_Weights"}


def test_every_builder_has_weights():
    assert set(registry.REGISTRY) == set(numres.ARCHS) == set(TV_ENUMS)


@pytest.mark.parametrize("arch", sorted(TV_ENUMS))
def test_matches_torchvision(tv, arch):
    _, torchvision = tv
    theirs = getattr(torchvision.models, TV_ENUMS[arch])
    ours = getattr(numres, TV_ENUMS[arch])
    assert {w.name for w in theirs} == {w.name for w in ours}
    assert ours.DEFAULT.tag == theirs.DEFAULT.name
    for w in theirs:
        mine = ours[w.name].value
        assert mine.url == w.url
        meta = w.meta
        assert mine.num_params == meta["num_params"]
        assert mine.gflops == meta["_ops"]
        assert mine.file_size_mb == meta["_file_size"]
        assert mine.acc1 == meta["_metrics"]["ImageNet-1K"]["acc@1"]
        assert mine.acc5 == meta["_metrics"]["ImageNet-1K"]["acc@5"]
        assert list(mine.categories) == list(meta["categories"])
        t = w.transforms()
        assert [mine.resize_size] == list(t.resize_size)
        assert [mine.crop_size] == list(t.crop_size)
        assert len(mine.sha256_prefix) == 8 and mine.url.endswith(f"-{mine.sha256_prefix}.pth")


def test_tag_spellings():
    v2 = numres.ResNet50_Weights.IMAGENET1K_V2.value
    for tag in ("DEFAULT", "IMAGENET1K_V2", "V2", "ResNet50_Weights.IMAGENET1K_V2", "v2"):
        assert numres.get_weights("resnet50", tag) is v2
    assert numres.get_weights("resnet18", "DEFAULT").tag == "IMAGENET1K_V1"
    with pytest.raises(ValueError, match="IMAGENET1K_V1, DEFAULT"):
        numres.get_weights("resnet18", "IMAGENET1K_V2")
    with pytest.raises(ValueError, match="no pretrained weights for 'vgg16'"):
        numres.get_weights("vgg16")


def test_pretrained_true_means_v1_like_torchvision():
    assert resolve("resnet50", pretrained=True).tag == "IMAGENET1K_V1"
    assert resolve("resnet50", weights="DEFAULT").tag == "IMAGENET1K_V2"
    assert resolve("resnet50", weights=numres.ResNet50_Weights.DEFAULT).tag == "IMAGENET1K_V2"
    assert resolve("resnet50") is None
    with pytest.raises(ValueError, match="not both"):
        resolve("resnet50", pretrained=True, weights="DEFAULT")
    with pytest.raises(ValueError, match="do not fit resnet18"):
        resolve("resnet18", weights=numres.ResNet50_Weights.DEFAULT)
    with pytest.raises(TypeError, match="int"):
        resolve("resnet18", weights=3)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        resolve("resnet18", weights="missing.pth")
    url = "https://example.org/x-0123abcd.pth"
    assert resolve("resnet18", weights=url) == url


def test_enum_forwards_to_weights():
    w = numres.ResNet50_Weights.IMAGENET1K_V1
    assert w.url.endswith("resnet50-0676ba61.pth")
    assert w.meta["_metrics"]["ImageNet-1K"]["acc@1"] == 76.13
    assert len(w.categories) == 1000 and w.categories[0] == "tench"
    assert repr(numres.ResNet50_Weights.DEFAULT) == "ResNet50_Weights.IMAGENET1K_V2"
