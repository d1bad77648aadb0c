"""Multiply-accumulate counts, for benchmarks' GFLOP/s figures (torchvision's GFLOPS = GMAC)."""

from ..backends import conv_output_size
from .builders import ARCHS
from .resnet import ResNet


def conv_macs(arch, height=224, width=224, num_classes=1000):
    """MACs of one image through ``arch``: every convolution plus the final linear layer.

    Example:
        >>> round(conv_macs("resnet50") / 1e9, 3)   # torchvision lists 4.089 GFLOPS
        4.089
    """
    block, layers, groups, width_per_group = ARCHS[arch]
    model = ResNet(block, layers, num_classes=num_classes, groups=groups,
                   width_per_group=width_per_group, backend="numpy")
    total = 0

    def conv(module, h, w):
        nonlocal total
        k, s, p = module.kernel_size, module.stride, module.padding
        oh, ow = conv_output_size(h, k, s, p), conv_output_size(w, k, s, p)
        total += oh * ow * module.out_channels * (module.in_channels // module.groups) * k * k
        return oh, ow

    h, w = conv(model.conv1, height, width)
    h, w = conv_output_size(h, 3, 2, 1), conv_output_size(w, 3, 2, 1)   # max pool
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for blk in getattr(model, stage):
            convs = [blk.conv1, blk.conv2] + ([blk.conv3] if hasattr(blk, "conv3") else [])
            bh, bw = h, w
            for c in convs:
                bh, bw = conv(c, bh, bw)
            if blk.downsample is not None:
                conv(blk.downsample[0], h, w)
            h, w = bh, bw
    return total + model.fc.in_features * model.fc.out_features
