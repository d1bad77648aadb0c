"""numres: torchvision's ResNet family on NumPy, Numba and CuPy, without PyTorch.

Example:
    >>> import numres
    >>> model = numres.resnet50(pretrained=True)   # official weights, verified and cached
    >>> logits = model(x)                          # x: (N, 3, H, W) float32
    >>> emb = model.features(x)                    # (N, 2048)
"""

from .backends import available_backends, get_backend
from .checkpoint import load_pth, read_checkpoint, save_pth
from .errors import BackendUnavailable, CheckpointError, DownloadError
from .hub.registry import (ResNet18_Weights, ResNet34_Weights, ResNet50_Weights,
                           ResNet101_Weights, ResNet152_Weights, ResNeXt50_32X4D_Weights,
                           ResNeXt101_32X8D_Weights, ResNeXt101_64X4D_Weights, Weights,
                           Wide_ResNet50_2_Weights, Wide_ResNet101_2_Weights, get_weights)
from .models.builders import (ARCHS, build, from_hub, resnet18, resnet34, resnet50, resnet101,
                              resnet152, resnext50_32x4d, resnext101_32x8d, resnext101_64x4d,
                              wide_resnet50_2, wide_resnet101_2)
from .models.resnet import ResNet
from . import pipeline  # noqa: F401  (numres.pipeline.iter_results, write_arrays)
from .predict import decode, softmax
from .transforms import ImageClassification, load_image, preprocess

__version__ = "0.1.0"

__all__ = [
    "ARCHS", "BackendUnavailable", "ImageClassification", "decode", "load_image", "preprocess",
    "softmax", "CheckpointError", "DownloadError", "ResNet", "Weights",
    "available_backends", "build", "from_hub", "get_backend", "get_weights", "load_pth",
    "read_checkpoint", "save_pth",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
    "ResNet18_Weights", "ResNet34_Weights", "ResNet50_Weights", "ResNet101_Weights",
    "ResNet152_Weights", "ResNeXt50_32X4D_Weights", "ResNeXt101_32X8D_Weights",
    "ResNeXt101_64X4D_Weights", "Wide_ResNet50_2_Weights", "Wide_ResNet101_2_Weights",
]
