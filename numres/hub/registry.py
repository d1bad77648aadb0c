"""Every official torchvision weight for the ResNet family, as data.

Values are torchvision's own (``torchvision/models/resnet.py``, checked by a test against the
installed torchvision where it imports). The hex digits after the last ``-`` of each file
name are the first digits of the file's sha256; downloads are verified against them.
"""

import enum
import functools
import re
from dataclasses import dataclass
from importlib import resources

OFFICIAL_BASE = "https://download.pytorch.org/models"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HASH_REGEX = re.compile(r"-([a-f0-9]{8,})\.")

_V1_RECIPE = "https://github.com/pytorch/vision/tree/main/references/classification"
_V2_RECIPE = "https://github.com/pytorch/vision/issues/3995"


@functools.lru_cache(maxsize=1)
def imagenet_categories():
    """The 1000 ImageNet-1k class names, in logit order (torchvision's list)."""
    text = resources.files(__package__).joinpath("imagenet_categories.txt").read_text("utf-8")
    names = text.splitlines()
    assert len(names) == 1000, "imagenet_categories.txt must hold 1000 lines"
    return tuple(names)


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
        return imagenet_categories()

    @property
    def meta(self):
        """torchvision-style metadata dict."""
        return {"num_params": self.num_params, "categories": list(self.categories),
                "min_size": (1, 1), "recipe": self.recipe, "_ops": self.gflops,
                "_file_size": self.file_size_mb,
                "_metrics": {"ImageNet-1K": {"acc@1": self.acc1, "acc@5": self.acc5}}}

    def transforms(self):
        """The evaluation preprocessing these weights expect (see :mod:`numres.transforms`)."""
        from ..transforms import ImageClassification
        return ImageClassification(crop_size=self.crop_size, resize_size=self.resize_size,
                                   mean=IMAGENET_MEAN, std=IMAGENET_STD)


def _w(arch, tag, file_name, acc1, acc5, params, gflops, size_mb, resize, recipe):
    return Weights(arch, tag, file_name, acc1, acc5, params, gflops, size_mb, resize, recipe)


_TABLE = [
    # arch, tag, file, acc@1, acc@5, params, GFLOPS, MB, resize, recipe
    ("resnet18", "IMAGENET1K_V1", "resnet18-f37072fd.pth", 69.758, 89.078, 11689512, 1.814,
     44.661, 256, _V1_RECIPE + "#resnet"),
    ("resnet34", "IMAGENET1K_V1", "resnet34-b627a593.pth", 73.314, 91.42, 21797672, 3.664,
     83.275, 256, _V1_RECIPE + "#resnet"),
    ("resnet50", "IMAGENET1K_V1", "resnet50-0676ba61.pth", 76.13, 92.862, 25557032, 4.089,
     97.781, 256, _V1_RECIPE + "#resnet"),
    ("resnet50", "IMAGENET1K_V2", "resnet50-11ad3fa6.pth", 80.858, 95.434, 25557032, 4.089,
     97.79, 232, _V2_RECIPE + "#issuecomment-1013906621"),
    ("resnet101", "IMAGENET1K_V1", "resnet101-63fe2227.pth", 77.374, 93.546, 44549160, 7.801,
     170.511, 256, _V1_RECIPE + "#resnet"),
    ("resnet101", "IMAGENET1K_V2", "resnet101-cd907fc2.pth", 81.886, 95.78, 44549160, 7.801,
     170.53, 232, _V2_RECIPE + "#new-recipe"),
    ("resnet152", "IMAGENET1K_V1", "resnet152-394f9c45.pth", 78.312, 94.046, 60192808,
     11.514, 230.434, 256, _V1_RECIPE + "#resnet"),
    ("resnet152", "IMAGENET1K_V2", "resnet152-f82ba261.pth", 82.284, 96.002, 60192808,
     11.514, 230.474, 232, _V2_RECIPE + "#new-recipe"),
    ("resnext50_32x4d", "IMAGENET1K_V1", "resnext50_32x4d-7cdf4587.pth", 77.618, 93.698,
     25028904, 4.23, 95.789, 256, _V1_RECIPE + "#resnext"),
    ("resnext50_32x4d", "IMAGENET1K_V2", "resnext50_32x4d-1a0047aa.pth", 81.198, 95.34,
     25028904, 4.23, 95.833, 232, _V2_RECIPE + "#new-recipe"),
    ("resnext101_32x8d", "IMAGENET1K_V1", "resnext101_32x8d-8ba56ff5.pth", 79.312, 94.526,
     88791336, 16.414, 339.586, 256, _V1_RECIPE + "#resnext"),
    ("resnext101_32x8d", "IMAGENET1K_V2", "resnext101_32x8d-110c445d.pth", 82.834, 96.228,
     88791336, 16.414, 339.673, 232, _V2_RECIPE + "#new-recipe-with-fixres"),
    ("resnext101_64x4d", "IMAGENET1K_V1", "resnext101_64x4d-173b62eb.pth", 83.246, 96.454,
     83455272, 15.46, 319.318, 232, "https://github.com/pytorch/vision/pull/5935"),
    ("wide_resnet50_2", "IMAGENET1K_V1", "wide_resnet50_2-95faca4d.pth", 78.468, 94.086,
     68883240, 11.398, 131.82, 256, "https://github.com/pytorch/vision/pull/912"),
    ("wide_resnet50_2", "IMAGENET1K_V2", "wide_resnet50_2-9ba9bcbe.pth", 81.602, 95.758,
     68883240, 11.398, 263.124, 232, _V2_RECIPE + "#new-recipe-with-fixres"),
    ("wide_resnet101_2", "IMAGENET1K_V1", "wide_resnet101_2-32ee1156.pth", 78.848, 94.284,
     126886696, 22.753, 242.896, 256, "https://github.com/pytorch/vision/pull/912"),
    ("wide_resnet101_2", "IMAGENET1K_V2", "wide_resnet101_2-d733dc28.pth", 82.51, 96.02,
     126886696, 22.753, 484.747, 232, _V2_RECIPE + "#new-recipe"),
]

#: arch -> {tag: Weights}
REGISTRY = {}
for _row in _TABLE:
    REGISTRY.setdefault(_row[0], {})[_row[1]] = _w(*_row)

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
