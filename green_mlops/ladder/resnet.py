"""ResNet-18/34/50 as torchvision defines them (v1.5: a bottleneck's stride on its 3×3), module for
module and parameter name for parameter name, so a torchvision state dict (``torch.save(
model.state_dict(), path)``) loads strictly. Written here because torchvision's PyPI wheels are
CUDA builds that do not load beside a CPU-only torch; a user's weights file is all that is needed.

:class:`ResNetLadder` cuts one after each residual stage: stage 1 is the stem and ``layer1``,
stages 2-3 ``layer2``/``layer3``, each with an exit head (global average pool + linear), and stage 4
``layer4`` with the network's own pooling and ``fc``.
"""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


ARCHITECTURES = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
                 "resnet50": (Bottleneck, (3, 4, 6, 3))}


class ResNet(nn.Module):
    def __init__(self, arch: str, num_classes: int = 1000):
        super().__init__()
        block, counts = ARCHITECTURES[arch]
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._layer(block, 64, counts[0])
        self.layer2 = self._layer(block, 128, counts[1], 2)
        self.layer3 = self._layer(block, 256, counts[2], 2)
        self.layer4 = self._layer(block, 512, counts[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.widths = [64 * block.expansion, 128 * block.expansion, 256 * block.expansion, 512 * block.expansion]

    def _layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers.extend(block(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def stem(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNetStage(nn.Module):
    """One rung: its residual stage(s) and an exit head (``(exit_logits, hidden)``), or, last, the
    network's own pooling and ``fc`` (``logits``)."""

    def __init__(self, net: ResNet, index: int, num_classes: int):
        super().__init__()
        self.net, self.index, self.last = net, index, index == 3
        self.head = None if self.last else nn.Linear(net.widths[index], num_classes)

    def features(self, x):
        if self.index == 0:
            x = self.net.stem(x)
        return getattr(self.net, f"layer{self.index + 1}")(x)

    def forward(self, x):
        h = self.features(x)
        pooled = torch.flatten(self.net.avgpool(h), 1)
        if self.last:
            return self.net.fc(pooled)
        return self.head(pooled), h


class ResNetLadder(nn.Module):
    def __init__(self, net: ResNet, num_classes: int):
        super().__init__()
        self.net = net
        self.stages = nn.ModuleList(ResNetStage(net, k, num_classes) for k in range(4))

    def forward(self, x) -> list[torch.Tensor]:
        out = []
        for stage in self.stages[:-1]:
            logits, x = stage(x)
            out.append(logits)
        out.append(self.stages[-1](x))
        return out
