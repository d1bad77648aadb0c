"""Every official torchvision weight for the ResNet family, as data.

Values are torchvision's own (``torchvision/models/resnet.py``, checked by a test against the
installed torchvision where it imports). The hex digits after the last ``-`` of each file
name are the first digits of the file's sha256; downloads are verified against them.
"""

import enum
import re
from dataclasses import dataclass

from .. import imagenet
from ..transforms import ImageClassification

OFFICIAL_BASE = "https://download.pytorch.org/models"
HASH_REGEX = re.compile(r"-([a-f0-9]{8,})\.")

_V1_RECIPE = "https://github.com/pytorch/vision/tree/main/references/classification"
_V2_RECIPE = "https://github.com/pytorch/vision/issues/3995"


#: The 1000 ImageNet-1k class names (:func:`numres.imagenet.categories`).
imagenet_categories = imagenet.categories


def hash_prefix(file_name):
    """The sha256 prefix encoded in ``name-<hex>.pth``, or None."""
    found = HASH_REGEX.search(file_name)
    return found.group(1) if found else None


@dataclass(frozen=True)
class Weights:
    """One set of pretrained weights and what goes with it.

    Attributes:
        arch: builder name, e.g. ``"resnet50"``.
        tag: ``"IMAGENET1K_V1"`` or ``"IMAGENET1K_V2"``.
        file_name: official file name; the URL is ``OFFICIAL_BASE/file_name``.
        acc1, acc5: ImageNet-1k validation accuracy (%), as torchvision reports.
        num_params: parameter count. gflops: GFLOPS (multiply-adds) at 224x224.
        file_size_mb: size of the file in MB. resize_size, crop_size: evaluation transform.
    """

    arch: str
    tag: str
    file_name: str
    acc1: float
    acc5: float
    num_params: int
    gflops: float
    file_size_mb: float
    resize_size: int
    recipe: str
    crop_size: int = 224

    @property
    def url(self):
        return f"{OFFICIAL_BASE}/{self.file_name}"

    @property
    def sha256_prefix(self):
        return hash_prefix(self.file_name)

    @property
    def categories(self):
        return imagenet.categories()

    @property
    def meta(self):
        """torchvision-style metadata dict."""
        return {"num_params": self.num_params, "categories": list(self.categories),
                "min_size": (1, 1), "recipe": self.recipe, "_ops": self.gflops,
                "_file_size": self.file_size_mb,
                "_metrics": {"ImageNet-1K": {"acc@1": self.acc1, "acc@5": self.acc5}}}

    def transforms(self):
        """The evaluation preprocessing these weights expect (see :mod:`numres.transforms`)."""
        return ImageClassification(crop_size=self.crop_size, resize_size=self.resize_size,
                                   mean=imagenet.MEAN, std=imagenet.STD)


_WEIGHTS = (
    Weights("resnet18", "IMAGENET1K_V1", "resnet18-f37072fd.pth",
            acc1=69.758, acc5=89.078, num_params=11689512, gflops=1.814, file_size_mb=44.661,
            resize_size=256, recipe=_V1_RECIPE + "#resnet"),
    Weights("resnet34", "IMAGENET1K_V1", "resnet34-b627a593.pth",
            acc1=73.314, acc5=91.42, num_params=21797672, gflops=3.664, file_size_mb=83.275,
            resize_size=256, recipe=_V1_RECIPE + "#resnet"),
    Weights("resnet50", "IMAGENET1K_V1", "resnet50-0676ba61.pth",
            acc1=76.13, acc5=92.862, num_params=25557032, gflops=4.089, file_size_mb=97.781,
            resize_size=256, recipe=_V1_RECIPE + "#resnet"),
    Weights("resnet50", "IMAGENET1K_V2", "resnet50-11ad3fa6.pth",
            acc1=80.858, acc5=95.434, num_params=25557032, gflops=4.089, file_size_mb=97.79,
            resize_size=232, recipe=_V2_RECIPE + "#issuecomment-1013906621"),
    Weights("resnet101", "IMAGENET1K_V1", "resnet101-63fe2227.pth",
            acc1=77.374, acc5=93.546, num_params=44549160, gflops=7.801, file_size_mb=170.511,
            resize_size=256, recipe=_V1_RECIPE + "#resnet"),
    Weights("resnet101", "IMAGENET1K_V2", "resnet101-cd907fc2.pth",
            acc1=81.886, acc5=95.78, num_params=44549160, gflops=7.801, file_size_mb=170.53,
            resize_size=232, recipe=_V2_RECIPE + "#new-recipe"),
    Weights("resnet152", "IMAGENET1K_V1", "resnet152-394f9c45.pth",
            acc1=78.312, acc5=94.046, num_params=60192808, gflops=11.514, file_size_mb=230.434,
            resize_size=256, recipe=_V1_RECIPE + "#resnet"),
    Weights("resnet152", "IMAGENET1K_V2", "resnet152-f82ba261.pth",
            acc1=82.284, acc5=96.002, num_params=60192808, gflops=11.514, file_size_mb=230.474,
            resize_size=232, recipe=_V2_RECIPE + "#new-recipe"),
    Weights("resnext50_32x4d", "IMAGENET1K_V1", "resnext50_32x4d-7cdf4587.pth",
            acc1=77.618, acc5=93.698, num_params=25028904, gflops=4.23, file_size_mb=95.789,
            resize_size=256, recipe=_V1_RECIPE + "#resnext"),
    Weights("resnext50_32x4d", "IMAGENET1K_V2", "resnext50_32x4d-1a0047aa.pth",
            acc1=81.198, acc5=95.34, num_params=25028904, gflops=4.23, file_size_mb=95.833,
            resize_size=232, recipe=_V2_RECIPE + "#new-recipe"),
    Weights("resnext101_32x8d", "IMAGENET1K_V1", "resnext101_32x8d-8ba56ff5.pth",
            acc1=79.312, acc5=94.526, num_params=88791336, gflops=16.414, file_size_mb=339.586,
            resize_size=256, recipe=_V1_RECIPE + "#resnext"),
    Weights("resnext101_32x8d", "IMAGENET1K_V2", "resnext101_32x8d-110c445d.pth",
            acc1=82.834, acc5=96.228, num_params=88791336, gflops=16.414, file_size_mb=339.673,
            resize_size=232, recipe=_V2_RECIPE + "#new-recipe-with-fixres"),
    Weights("resnext101_64x4d", "IMAGENET1K_V1", "resnext101_64x4d-173b62eb.pth",
            acc1=83.246, acc5=96.454, num_params=83455272, gflops=15.46, file_size_mb=319.318,
            resize_size=232, recipe="https://github.com/pytorch/vision/pull/5935"),
    Weights("wide_resnet50_2", "IMAGENET1K_V1", "wide_resnet50_2-95faca4d.pth",
            acc1=78.468, acc5=94.086, num_params=68883240, gflops=11.398, file_size_mb=131.82,
            resize_size=256, recipe="https://github.com/pytorch/vision/pull/912"),
    Weights("wide_resnet50_2", "IMAGENET1K_V2", "wide_resnet50_2-9ba9bcbe.pth",
            acc1=81.602, acc5=95.758, num_params=68883240, gflops=11.398, file_size_mb=263.124,
            resize_size=232, recipe=_V2_RECIPE + "#new-recipe-with-fixres"),
    Weights("wide_resnet101_2", "IMAGENET1K_V1", "wide_resnet101_2-32ee1156.pth",
            acc1=78.848, acc5=94.284, num_params=126886696, gflops=22.753, file_size_mb=242.896,
            resize_size=256, recipe="https://github.com/pytorch/vision/pull/912"),
    Weights("wide_resnet101_2", "IMAGENET1K_V2", "wide_resnet101_2-d733dc28.pth",
            acc1=82.51, acc5=96.02, num_params=126886696, gflops=22.753, file_size_mb=484.747,
            resize_size=232, recipe=_V2_RECIPE + "#new-recipe"),
)

#: arch -> {tag: Weights}
REGISTRY = {}
for _weights in _WEIGHTS:
    REGISTRY.setdefault(_weights.arch, {})[_weights.tag] = _weights

#: The tag torchvision's ``DEFAULT`` points at: the best weights for each architecture.
DEFAULT_TAGS = {arch: ("IMAGENET1K_V2" if "IMAGENET1K_V2" in tags else "IMAGENET1K_V1")
                for arch, tags in REGISTRY.items()}


class WeightsEnum(enum.Enum):
    """Enum of :class:`Weights` with torchvision's spelling: ``ResNet50_Weights.DEFAULT``."""

    def __getattr__(self, name):
        # Forward .url, .meta, .transforms() ... to the Weights value, as torchvision does.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.value, name)

    def __repr__(self):
        return f"{type(self).__name__}.{self.name}"


def _make_enum(class_name, arch):
    members = dict(REGISTRY[arch])
    members["DEFAULT"] = REGISTRY[arch][DEFAULT_TAGS[arch]]  # an alias, as in torchvision
    return WeightsEnum(class_name, members, module=__name__)


ResNet18_Weights = _make_enum("ResNet18_Weights", "resnet18")
ResNet34_Weights = _make_enum("ResNet34_Weights", "resnet34")
ResNet50_Weights = _make_enum("ResNet50_Weights", "resnet50")
ResNet101_Weights = _make_enum("ResNet101_Weights", "resnet101")
ResNet152_Weights = _make_enum("ResNet152_Weights", "resnet152")
ResNeXt50_32X4D_Weights = _make_enum("ResNeXt50_32X4D_Weights", "resnext50_32x4d")
ResNeXt101_32X8D_Weights = _make_enum("ResNeXt101_32X8D_Weights", "resnext101_32x8d")
ResNeXt101_64X4D_Weights = _make_enum("ResNeXt101_64X4D_Weights", "resnext101_64x4d")
Wide_ResNet50_2_Weights = _make_enum("Wide_ResNet50_2_Weights", "wide_resnet50_2")
Wide_ResNet101_2_Weights = _make_enum("Wide_ResNet101_2_Weights", "wide_resnet101_2")


def get_weights(arch, tag="DEFAULT"):
    """Look up registry weights.

    Args:
        arch: builder name, e.g. ``"resnet50"``.
        tag: ``"IMAGENET1K_V1"``, ``"IMAGENET1K_V2"``, ``"V1"``, ``"V2"``, ``"DEFAULT"`` or
            ``"ResNet50_Weights.IMAGENET1K_V2"``.

    Raises:
        ValueError: unknown arch or tag (the message lists the valid ones).
    """
    if arch not in REGISTRY:
        raise ValueError(f"no pretrained weights for {arch!r}; known: {', '.join(REGISTRY)}")
    name = tag.split(".")[-1].upper()
    if name == "DEFAULT":
        name = DEFAULT_TAGS[arch]
    elif name in ("V1", "V2"):
        name = "IMAGENET1K_" + name
    if name not in REGISTRY[arch]:
        raise ValueError(f"{arch} has no weights {tag!r}; choose from "
                         f"{', '.join(list(REGISTRY[arch]) + ['DEFAULT'])}")
    return REGISTRY[arch][name]
