"""The CIFAR ResNet18 (He et al. 2016, as in kuangliu/pytorch-cifar), with a width parameter.

3x3 stem (stride 1, no max-pool), four stages of two BasicBlocks with w, 2w, 4w, 8w channels,
1x1 conv + BN shortcuts where the shape changes, global average pooling, a linear classifier.
At width 64: 11,173,962 parameters and 555,422,720 conv+linear MACs per 32x32 image.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2), width: int = 64, num_classes: int = 10):
        super().__init__()
        self.width = width
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, in_channels = [], width
        for i, n in enumerate(blocks_per_stage):
            channels, stride = width * 2**i, 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_channels, channels, stride if j == 0 else 1))
                in_channels = channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def resnet18(width: int = 64, num_classes: int = 10) -> ResNet:
    return ResNet((2, 2, 2, 2), width=width, num_classes=num_classes)


# How an arch record's keys rebuild what compression changed: {key: (order, apply(model, value) -> model)}.
# `shapes` (layers resized, e.g. channels removed) is generic; each technique that changes the layout
# registers its own key from its module (`register_arch`).
_ARCH_RULES: dict[str, tuple[int, Callable[[nn.Module, Any], nn.Module]]] = {}


def register_arch(key: str, apply: Callable[[nn.Module, Any], nn.Module], order: int) -> None:
    """Teach `build` an arch record key: `apply(model, value)` runs after the rules of lower `order`."""
    _ARCH_RULES[key] = (order, apply)


def _resize_all(model: nn.Module, shapes: dict[str, list[int]]) -> nn.Module:
    for name, shape in shapes.items():
        model.set_submodule(name, _resized(model.get_submodule(name), shape))
    return model


register_arch("shapes", _resize_all, order=20)  # from the final model, so it covers layers made before it


def build(arch: dict) -> nn.Module:
    """The (untrained) model an `arch` record describes (stored next to weights, so a file says what it holds).

    The record is the ResNet18's `width` plus what compression changed, one key per change, applied in the
    order their rules were registered with (`register_arch`): `shapes` ({layer: weight shape}, from
    `shapes_of`) resizes layers; the techniques add theirs. Any chain of steps rebuilds.
    """
    if arch.get("name") != "resnet18":
        raise ValueError(f"unknown architecture {arch!r}; known: resnet18")
    unknown = [k for k in arch if k not in _ARCH_RULES and k not in ("name", "width", "num_classes")]
    if unknown:
        raise ValueError(f"arch record key {unknown[0]!r} has no rule (its technique's module is not imported; "
                         f"known: {', '.join(_ARCH_RULES)})")
    model: nn.Module = resnet18(int(arch["width"]), int(arch.get("num_classes", 10)))
    for key, (_, apply) in sorted(_ARCH_RULES.items(), key=lambda kv: kv[1][0]):
        if arch.get(key):
            model = apply(model, arch[key])
    return model


class Wrapper(nn.Module):
    """A module that runs a network held in `self.model` (e.g. in another precision): its layers keep the names
    they have in the plain network."""
    model: nn.Module


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a `Wrapper` (its layers carry the names they have in the plain model)."""
    return model.model if isinstance(model, Wrapper) else model


def arch_of(model: ResNet) -> dict:
    return {"name": "resnet18", "width": model.width, "num_classes": model.linear.out_features}


def shapes_of(model: nn.Module) -> dict[str, list[int]]:
    """The weight shape of every conv, BatchNorm and linear layer (what `build` needs to resize them)."""
    return {name: list(m.weight.shape) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))}


def _resized(m: nn.Module, shape: list[int]) -> nn.Module:
    """An untrained copy of layer `m` with the weight shape `shape` (its other settings kept)."""
    if isinstance(m, nn.Conv2d):
        return nn.Conv2d(shape[1] * m.groups, shape[0], m.kernel_size, stride=m.stride, padding=m.padding,
                         dilation=m.dilation, groups=m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)
    if isinstance(m, nn.BatchNorm2d):
        return nn.BatchNorm2d(shape[0], eps=m.eps, momentum=m.momentum, affine=m.affine,
                              track_running_stats=m.track_running_stats)
    if isinstance(m, nn.Linear):
        return nn.Linear(shape[1], shape[0], bias=m.bias is not None)
    raise ValueError(f"cannot resize a {type(m).__name__}")
