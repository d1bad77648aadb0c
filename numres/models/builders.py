"""The public builders ``resnet18`` ... ``wide_resnet101_2``, all funnelling into :func:`build`.

Signature: ``(pretrained=False, *, weights=None, num_classes=1000, backend="auto",
progress=True, fold_bn=True, precision="float32")``. ``pretrained=True`` means ImageNet
``IMAGENET1K_V1`` weights, as torchvision maps it; ``weights`` takes a tag
(``"IMAGENET1K_V2"``, ``"DEFAULT"``), a ``ResNet50_Weights`` member, a path to a ``.pth``
file, an http(s) URL, a Hugging Face Hub spec or a state dict. This module is where the
model meets the weights (``numres.hub``); the model itself (``resnet.py``) knows neither
files nor downloads.
"""

import functools
from collections import namedtuple

import numpy as np

from .. import hub
from ..backends import with_precision
from ..checkpoint import release_pages
from ..errors import CheckpointError
from ._modules import Conv2d, Linear, state_dict_problems
from .resnet import BasicBlock, Bottleneck, ResNet

Arch = namedtuple("Arch", "block layers groups width_per_group")
Arch.__doc__ = """An architecture: its block, blocks per stage, and ResNeXt / Wide ResNet
widths (torchvision's ``groups`` and ``width_per_group``)."""

#: arch -> :class:`Arch` (a 4-tuple: block, layers, groups, width_per_group)
ARCHS = {
    "resnet18": Arch(BasicBlock, (2, 2, 2, 2), 1, 64),
    "resnet34": Arch(BasicBlock, (3, 4, 6, 3), 1, 64),
    "resnet50": Arch(Bottleneck, (3, 4, 6, 3), 1, 64),
    "resnet101": Arch(Bottleneck, (3, 4, 23, 3), 1, 64),
    "resnet152": Arch(Bottleneck, (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": Arch(Bottleneck, (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": Arch(Bottleneck, (3, 4, 23, 3), 32, 8),
    "resnext101_64x4d": Arch(Bottleneck, (3, 4, 23, 3), 64, 4),
    "wide_resnet50_2": Arch(Bottleneck, (3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": Arch(Bottleneck, (3, 4, 23, 3), 1, 128),
}


def _model(arch, num_classes, backend="numpy", fold_bn=True):
    """An uninitialised ``arch`` (zero parameters: memory the OS maps only when written)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHS)}")
    block, layers, groups, width = ARCHS[arch]
    return ResNet(block, layers, num_classes=num_classes, groups=groups,
                  width_per_group=width, backend=backend, fold_bn=fold_bn)


def build(arch, pretrained=False, *, weights=None, num_classes=1000, backend="auto",
          progress=True, fold_bn=True, precision="float32"):
    """Build any architecture by name: what every builder (``numres.resnet50`` ...) calls.

    With registry weights and ``num_classes != 1000`` the backbone is pretrained and ``fc`` is
    freshly initialised (for transfer learning: train a head, then ``load_state_dict`` it with
    ``strict=False``). A checkpoint file must match ``num_classes`` exactly.

    Args:
        arch: a key of :data:`ARCHS`, e.g. ``"resnet50"``.
        pretrained: load ImageNet ``IMAGENET1K_V1`` weights (verified, cached).
        weights: ``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"`` (where it exists), ``"DEFAULT"``, a
            ``Weights`` member, a path to a ``.pth``/``.safetensors`` file, an http(s) URL,
            ``"hf-hub:org/name[@revision]"``, or a state dict. Not together with
            ``pretrained``.
        num_classes: size of the classifier; ``1000`` for ImageNet.
        backend: ``"auto"`` (fastest available), ``"numpy"``, ``"numba"``, ``"cupy"`` or a
            Backend.
        progress: progress bar on stderr while downloading (terminals only).
        fold_bn: fold batch norm into the convolutions (keep True except to test folding).
        precision: ``"float32"``, or ``"bfloat16"``: the Numba backend multiplies in bf16
            on CPUs with AVX512_BF16 (faster; logits within ~1% of float32's, no longer
            equal to torch's: see ``NumbaBackend``). With ``backend="auto"`` that is the
            Numba backend; another backend refuses.

    Returns:
        :class:`numres.models.ResNet`; call it on (N, 3, H, W) float32 arrays.

    Raises:
        ValueError: unknown arch, bad tag, ``pretrained`` together with ``weights``, an
            unknown ``precision`` or one the backend does not run.
        BackendUnavailable: ``precision="bfloat16"`` on a CPU without AVX512_BF16.
        CheckpointError: the checkpoint does not fit the architecture (keys/shapes by name).
        DownloadError: the weights could not be fetched.

    Example:
        >>> model = numres.build("resnet50", pretrained=True, precision="bfloat16")
    """
    backend = with_precision(backend, precision)
    model = _model(arch, num_classes, backend, fold_bn)
    source = hub.resolve(arch, pretrained, weights)
    if source is None:
        init_weights(model)
    else:
        fits = functools.partial(architecture_problems, arch,
                                 num_classes=len(getattr(source, "categories", ())) or None)
        state_dict = hub.fetch_state_dict(source, progress=progress, check=fits)
        if isinstance(source, hub.Weights) and num_classes != len(source.categories):
            init_weights(model.fc)
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
            model.load_state_dict(state_dict, strict=False)
        else:
            model.load_state_dict(state_dict)
        # Once the backend holds its own copies, the file's pages can go back to the OS.
        model.after_prepare = release_pages
    model.weights = source if isinstance(source, hub.Weights) else None
    model.arch = arch
    return model


def from_hub(spec, *, num_classes=None, backend="auto", progress=True, fold_bn=True,
             precision="float32"):
    """Build the model a timm repo's ``config.json`` names, with the repo's weights.

    Args:
        spec: ``"hf-hub:org/name[@revision]"``, e.g. ``"hf-hub:timm/resnet50.a1_in1k"``.
        num_classes: classifier size; default the repo's (another value keeps the backbone
            and initialises ``fc``, as for registry weights).
        backend, progress, fold_bn, precision: as for :func:`build`.

    Returns:
        :class:`numres.models.ResNet`; ``model.weights.transforms()`` is the repo's
        preprocessing, ``model.weights.categories`` its class names.

    Raises:
        CheckpointError: the config names an architecture numres does not build, or the
            weights do not fit it (keys listed).
        DownloadError: the repo's files could not be fetched (or, offline, are not cached).

    Example:
        >>> model = numres.from_hub("hf-hub:timm/resnet50.a1_in1k")
        >>> x = model.weights.transforms()("cat.jpg")[None]
        >>> numres.decode(model(x), model.weights.categories)
    """
    repo_id, arch, repo_classes = hub.hf.repo_architecture(spec)
    if arch not in ARCHS:
        raise CheckpointError(f"hf-hub:{repo_id}: config.json names architecture {arch!r:.60}, "
                              f"which numres does not build (it builds {', '.join(ARCHS)}); "
                              "to try its weights on one of those, call that builder with "
                              f"weights={spec!r}")
    return build(arch, weights=spec, num_classes=num_classes or repo_classes, backend=backend,
                 progress=progress, fold_bn=fold_bn, precision=precision)


def architecture_problems(arch, state_dict, num_classes=None):
    """What keeps ``state_dict`` from loading into ``arch`` strictly (the one architecture
    check: builders, ``numres inspect``, Hub weights).

    Args:
        arch: a key of :data:`ARCHS`.
        state_dict: name -> array (torchvision's key names).
        num_classes: the classifier's size (default: the rows of ``fc.weight``).

    Returns:
        list of messages (shape mismatches, missing and unexpected keys, tensors that are
        not floating-point); empty when it fits.
    """
    if num_classes is None:
        fc = state_dict.get("fc.weight")
        num_classes = np.shape(fc)[0] if fc is not None else 1000
    shapes = {name: value.shape for name, value in _model(arch, num_classes).state_dict().items()}
    return state_dict_problems(shapes, state_dict)


def fitting_architectures(state_dict):
    """The architectures ``state_dict`` loads into (any ``num_classes``), in :data:`ARCHS`
    order; empty without ``fc.weight``."""
    if "fc.weight" not in state_dict:
        return []
    return [arch for arch in ARCHS if not architecture_problems(arch, state_dict)]


def init_weights(model, seed=None):
    """Initialise ``model`` (or one sub-module) in place as torchvision does: Kaiming-normal
    (fan_out) convolutions, BN weight 1 and bias 0, and torch's default uniform for ``fc``.

    Args:
        model: a :class:`ResNet` or one of its modules.
        seed: seed of the random generator (None: fresh entropy).
    """
    rng = np.random.default_rng(seed)
    for _, module in model.named_modules():
        p = module.params
        if isinstance(module, Conv2d):
            o, _, kh, kw = p["weight"].shape
            p["weight"] = rng.normal(0.0, np.sqrt(2.0 / (o * kh * kw)),
                                     p["weight"].shape).astype(np.float32)
        elif isinstance(module, Linear):
            bound = 1.0 / np.sqrt(p["weight"].shape[1])
            for name in ("weight", "bias"):
                p[name] = rng.uniform(-bound, bound, p[name].shape).astype(np.float32)
    if isinstance(model, ResNet):
        model.reset_prepared()


def _documented(fn):
    """Append the builders' shared argument documentation to ``fn``'s docstring."""
    fn.__doc__ += """
    Args:
        pretrained, weights, num_classes, backend, progress, fold_bn, precision: as for
            :func:`numres.build` (``pretrained=True``: ImageNet ``IMAGENET1K_V1``;
            ``precision="bfloat16"``: faster on CPUs with AVX512_BF16, not float32-exact).

    Returns:
        :class:`numres.models.ResNet`; call it on (N, 3, H, W) float32 arrays.

    Raises:
        ValueError, CheckpointError, DownloadError: as :func:`numres.build`.
    """
    return fn


@_documented
def resnet18(pretrained=False, *, weights=None, num_classes=1000, backend="auto",
             progress=True, fold_bn=True, precision="float32"):
    """ResNet-18: BasicBlock x (2, 2, 2, 2); weights ``ResNet18_Weights``.
    """
    return build("resnet18", pretrained, weights=weights, num_classes=num_classes,
                 backend=backend, progress=progress, fold_bn=fold_bn,
                 precision=precision)


@_documented
def resnet34(pretrained=False, *, weights=None, num_classes=1000, backend="auto",
             progress=True, fold_bn=True, precision="float32"):
    """ResNet-34: BasicBlock x (3, 4, 6, 3); weights ``ResNet34_Weights``.
    """
    return build("resnet34", pretrained, weights=weights, num_classes=num_classes,
                 backend=backend, progress=progress, fold_bn=fold_bn,
                 precision=precision)


@_documented
def resnet50(pretrained=False, *, weights=None, num_classes=1000, backend="auto",
             progress=True, fold_bn=True, precision="float32"):
    """ResNet-50: Bottleneck x (3, 4, 6, 3); weights ``ResNet50_Weights``.

    Example:
        >>> model = numres.resnet50(weights="DEFAULT")
        >>> logits = model(x)            # (N, 1000)
        >>> emb = model.features(x)      # (N, 2048): pooled, before fc
    """
    return build("resnet50", pretrained, weights=weights, num_classes=num_classes,
                 backend=backend, progress=progress, fold_bn=fold_bn,
                 precision=precision)


@_documented
def resnet101(pretrained=False, *, weights=None, num_classes=1000, backend="auto",
              progress=True, fold_bn=True, precision="float32"):
    """ResNet-101: Bottleneck x (3, 4, 23, 3); weights ``ResNet101_Weights``.
    """
    return build("resnet101", pretrained, weights=weights, num_classes=num_classes,
                 backend=backend, progress=progress, fold_bn=fold_bn,
                 precision=precision)


@_documented
def resnet152(pretrained=False, *, weights=None, num_classes=1000, backend="auto",
              progress=True, fold_bn=True, precision="float32"):
    """ResNet-152: Bottleneck x (3, 8, 36, 3); weights ``ResNet152_Weights``.
    """
    return build("resnet152", pretrained, weights=weights, num_classes=num_classes,
                 backend=backend, progress=progress, fold_bn=fold_bn,
                 precision=precision)


@_documented
def resnext50_32x4d(pretrained=False, *, weights=None, num_classes=1000, backend="auto",
                    progress=True, fold_bn=True, precision="float32"):
    """ResNeXt-50 32x4d: Bottleneck x (3, 4, 6, 3), 32 groups of width 4; weights
    ``ResNeXt50_32X4D_Weights``.
    """
    return build("resnext50_32x4d", pretrained, weights=weights, num_classes=num_classes,
                 backend=backend, progress=progress, fold_bn=fold_bn,
                 precision=precision)


@_documented
def resnext101_32x8d(pretrained=False, *, weights=None, num_classes=1000, backend="auto",
                     progress=True, fold_bn=True, precision="float32"):
    """ResNeXt-101 32x8d: Bottleneck x (3, 4, 23, 3), 32 groups of width 8; weights
    ``ResNeXt101_32X8D_Weights``.
    """
    return build("resnext101_32x8d", pretrained, weights=weights, num_classes=num_classes,
                 backend=backend, progress=progress, fold_bn=fold_bn,
                 precision=precision)


@_documented
def resnext101_64x4d(pretrained=False, *, weights=None, num_classes=1000, backend="auto",
                     progress=True, fold_bn=True, precision="float32"):
    """ResNeXt-101 64x4d: Bottleneck x (3, 4, 23, 3), 64 groups of width 4; weights
    ``ResNeXt101_64X4D_Weights``.
    """
    return build("resnext101_64x4d", pretrained, weights=weights, num_classes=num_classes,
                 backend=backend, progress=progress, fold_bn=fold_bn,
                 precision=precision)


@_documented
def wide_resnet50_2(pretrained=False, *, weights=None, num_classes=1000, backend="auto",
                    progress=True, fold_bn=True, precision="float32"):
    """Wide ResNet-50-2: Bottleneck x (3, 4, 6, 3), inner width 128; weights
    ``Wide_ResNet50_2_Weights``.
    """
    return build("wide_resnet50_2", pretrained, weights=weights, num_classes=num_classes,
                 backend=backend, progress=progress, fold_bn=fold_bn,
                 precision=precision)


@_documented
def wide_resnet101_2(pretrained=False, *, weights=None, num_classes=1000, backend="auto",
                     progress=True, fold_bn=True, precision="float32"):
    """Wide ResNet-101-2: Bottleneck x (3, 4, 23, 3), inner width 128; weights
    ``Wide_ResNet101_2_Weights``.
    """
    return build("wide_resnet101_2", pretrained, weights=weights, num_classes=num_classes,
                 backend=backend, progress=progress, fold_bn=fold_bn,
                 precision=precision)
