"""ImageNet-1k facts that the weights registry, the preprocessing and ``decode`` share: the
normalisation constants and the 1000 class names, in logit order (torchvision's list)."""

import functools
from importlib import resources

#: Per-channel (R, G, B) mean and standard deviation of ImageNet, as torchvision normalises.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=1)
def categories():
    """The 1000 ImageNet-1k class names, in logit order (torchvision's list).

    The list is package data, ``numres/hub/imagenet_categories.txt`` (read without importing
    :mod:`numres.hub`).
    """
    text = (resources.files("numres") / "hub" / "imagenet_categories.txt").read_text("utf-8")
    names = text.splitlines()
    assert len(names) == 1000, "imagenet_categories.txt must hold 1000 lines"
    return tuple(names)
