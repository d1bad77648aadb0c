"""Public builders ``resnet18`` ... ``wide_resnet101_2``, all through one funnel.

Signature: ``(pretrained=False, *, weights=None, num_classes=1000, backend="auto",
progress=True, fold_bn=True)``. ``pretrained=True`` means ImageNet ``IMAGENET1K_V1`` weights, as
torchvision maps it; ``weights`` takes a tag (``"IMAGENET1K_V2"``, ``"DEFAULT"``), a
``ResNet50_Weights`` member, a path to a ``.pth`` file, an http(s) URL, or a state dict.
"""

import numpy as np

from .. import hub
from .resnet import BasicBlock, Bottleneck, ResNet

#: arch -> (block, layers, groups, width_per_group)
ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), 1, 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 1, 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 1, 64),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 1, 64),
    "resnet152": (Bottleneck, (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": (Bottleneck, (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": (Bottleneck, (3, 4, 23, 3), 32, 8),
    "resnext101_64x4d": (Bottleneck, (3, 4, 23, 3), 64, 4),
    "wide_resnet50_2": (Bottleneck, (3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": (Bottleneck, (3, 4, 23, 3), 1, 128),
}


def build(arch, pretrained=False, *, weights=None, num_classes=1000, backend="auto",
          progress=True, fold_bn=True):
    """Build any architecture by name; the builders below call this.

    With registry weights and ``num_classes != 1000`` the backbone is pretrained and ``fc`` is
    freshly initialised (for transfer learning: train a head, then ``load_state_dict`` it with
    ``strict=False``). A checkpoint file must match ``num_classes`` exactly.

    Raises:
        ValueError: unknown arch, bad tag, ``pretrained`` together with ``weights``.
        CheckpointError: the checkpoint does not fit the architecture (keys/shapes by name).
        DownloadError: the weights could not be fetched.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    block, layers, groups, width = ARCHS[arch]
    source = hub.resolve(arch, pretrained, weights)
    model = ResNet(block, layers, num_classes=num_classes, groups=groups,
                   width_per_group=width, backend=backend, fold_bn=fold_bn)
    if source is None:
        init_weights(model)
    else:
        state_dict = hub.fetch_state_dict(source, progress=progress)
        if isinstance(source, hub.Weights) and num_classes != len(source.categories):
            init_weights(model.fc)
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
            model.load_state_dict(state_dict, strict=False)
        else:
            model.load_state_dict(state_dict)
    model.weights = source if isinstance(source, hub.Weights) else None
    model.arch = arch
    return model


def init_weights(model, seed=None):
    """Initialise ``model`` (or one sub-module) in place as torchvision does: Kaiming-normal
    (fan_out) convolutions, BN weight 1 and bias 0, and torch's default uniform for ``fc``."""
    rng = np.random.default_rng(seed)
    for _, module in model.named_modules():
        kind = type(module).__name__
        p = module.params
        if kind == "Conv2d":
            o, _, kh, kw = p["weight"].shape
            p["weight"] = rng.normal(0.0, np.sqrt(2.0 / (o * kh * kw)),
                                     p["weight"].shape).astype(np.float32)
        elif kind == "Linear":
            bound = 1.0 / np.sqrt(p["weight"].shape[1])
            for name in ("weight", "bias"):
                p[name] = rng.uniform(-bound, bound, p[name].shape).astype(np.float32)
    if hasattr(model, "_plan"):
        model._plan = None


def _builder(arch):
    def builder(pretrained=False, *, weights=None, num_classes=1000, backend="auto",
                progress=True, fold_bn=True):
        return build(arch, pretrained, weights=weights, num_classes=num_classes,
                     backend=backend, progress=progress, fold_bn=fold_bn)

    block, layers, groups, width = ARCHS[arch]
    builder.__name__ = builder.__qualname__ = arch
    builder.__doc__ = f"""{arch}: {block.__name__} x {list(layers)}, groups={groups}, \
width_per_group={width} (torchvision's architecture and parameter names).

    Args:
        pretrained: load ImageNet ``IMAGENET1K_V1`` weights (verified, cached).
        weights: ``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"`` (where it exists), ``"DEFAULT"``, a
            path to a ``.pth`` file, an http(s) URL, or a state dict. Not together with
            ``pretrained``.
        num_classes: size of the classifier; ``1000`` for ImageNet.
        backend: ``"auto"`` (fastest available), ``"numpy"``, ``"numba"`` or ``"cupy"``.
        progress: progress bar on stderr while downloading (terminals only).
        fold_bn: fold batch norm into the convolutions (keep True except to test folding).

    Returns:
        :class:`numres.models.ResNet`; call it on (N, 3, H, W) float32 arrays.

    Example:
        >>> model = numres.{arch}(weights="DEFAULT")
        >>> logits = model(x)            # (N, 1000)
        >>> emb = model.features(x)      # pooled embedding before fc
    """
    return builder


resnet18 = _builder("resnet18")
resnet34 = _builder("resnet34")
resnet50 = _builder("resnet50")
resnet101 = _builder("resnet101")
resnet152 = _builder("resnet152")
resnext50_32x4d = _builder("resnext50_32x4d")
resnext101_32x8d = _builder("resnext101_32x8d")
resnext101_64x4d = _builder("resnext101_64x4d")
wide_resnet50_2 = _builder("wide_resnet50_2")
wide_resnet101_2 = _builder("wide_resnet101_2")
