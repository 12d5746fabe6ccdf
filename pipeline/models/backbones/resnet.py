"""torchvision ResNet at any channel count: the CNN teacher for DeiT's hard distillation and the
convolutional baseline. Trained from scratch (or loaded from a local weights file); never a download.

Small inputs (under 64 px, e.g. 16 px satellite tiles) get the CIFAR stem: a 3x3 stride-1 first
convolution and no max-pool, so that the last stage still sees a spatial map instead of 1 x 1
(He et al. 2016, section 4.2).
"""
from __future__ import annotations

from torch import nn
from torchvision.models import resnet
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from pipeline.models.backbones import BackboneSpec, Variant

SMALL_INPUT = 64  # px: below this, the CIFAR stem


def build(variant: Variant, *, img_size, in_chans, num_classes, patch_size=None, window_size=None,
          drop_path_rate=0.0, pretrained_file=None) -> ResNet:
    if pretrained_file:
        raise ValueError("ResNet weights are loaded as a mimflow weights folder or .pt/.pth file, not pretrained_file")
    block, layers = {"resnet_debug": (BasicBlock, [1, 1, 1, 1]), "resnet18": (BasicBlock, [2, 2, 2, 2]),
                     "resnet50": (Bottleneck, [3, 4, 6, 3])}[variant.arch]
    model = resnet.ResNet(block, layers, num_classes=max(num_classes, 1))
    if img_size < SMALL_INPUT:
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_chans != 3:
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if num_classes == 0:
        model.fc = nn.Identity()  # the encoder: pooled features [B, 512 * expansion]
    return model


SPEC = BackboneSpec(
    family="resnet",
    variants={name: Variant(name) for name in ("resnet_debug", "resnet18", "resnet50")},
    debug="resnet_debug",
    build=build,
    encoder_family="resnet",
    classifier=("fc",),
    uses_patch_size=False,
)
