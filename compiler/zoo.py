"""Small built-in models: the demo's digits CNN, a CIFAR ResNet-20 (option-A shortcuts) and PD-QAT's pre-activation
ResNet-20 (width x5, clip activations)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DigitsCNN(nn.Module):
    """A small CNN for the 8x8 digits data: conv-bn-relu x3 with a residual add, then a linear head."""

    input_shape = (1, 1, 8, 8)

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.conv4 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.bn4 = nn.BatchNorm2d(2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.relu(x + self.bn4(self.conv4(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout - cin if (stride != 1 or cin != cout) else 0
        self.stride = stride

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x
        if self.pad:  # option A: subsample and zero-pad the channels, no parameters
            sc = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + sc)


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20 (0.27 M parameters), option-A shortcuts; ``width`` scales the channels."""

    input_shape = (1, 3, 32, 32)

    def __init__(self, classes: int = 10, width: int = 1):
        super().__init__()
        w = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        layers, cin = [], w[0]
        for i, c in enumerate(w):
            blocks = [_Block(cin, c, 1 if i == 0 else 2)] + [_Block(c, c, 1) for _ in range(2)]
            layers.append(nn.Sequential(*blocks))
            cin = c
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(w[2], classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def digits_cnn() -> DigitsCNN:
    return DigitsCNN()


def resnet20() -> ResNet20:
    return ResNet20()


def _activation(kind: str) -> nn.Module:
    if kind == "clip":
        return nn.Hardtanh(0.0, 1.0)  # clip(x, 0, 1), PD-QAT's "activation"
    if kind == "relu":
        return nn.ReLU()
    raise ValueError(f"activation {kind!r}: expected 'clip' or 'relu'")


class _PreActBlock(nn.Module):
    """bn1-act-conv1-bn2-act-conv2 plus the identity, or a 1x1 strided conv + BN on act(bn1(x)) on a shape change."""

    def __init__(self, cin: int, cout: int, stride: int, act: str):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.act1 = _activation(act)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = _activation(act)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = self.shortcut_bn = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
            self.shortcut_bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        out = self.act1(self.bn1(x))
        sc = x if self.shortcut is None else self.shortcut_bn(self.shortcut(out))
        out = self.conv2(self.act2(self.bn2(self.conv1(out))))
        return out + sc


class PreActResNet20(nn.Module):
    """Pre-activation CIFAR ResNet-20 as in PD-QAT / Any-Precision (``resnet20q``): channels 16/32/64 x ``width``,
    9 blocks, 1x1 stride-2 conv shortcuts (with BN) where the shape changes, ``act`` "clip" (clip(x, 0, 1), the
    default) or "relu"; head bn-act-avgpool-fc. The BNs before each conv cannot fold into a conv (there is none
    before them); the shortcut BNs can. Layer names: ``conv1``, ``layer{1,2,3}.{0,1,2}.conv{1,2}``,
    ``layer{2,3}.0.shortcut``, ``fc``.
    """

    input_shape = (1, 3, 32, 32)

    def __init__(self, classes: int = 10, width: int = 1, act: str = "clip"):
        super().__init__()
        w = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        layers, cin = [], w[0]
        for i, c in enumerate(w):
            blocks = [_PreActBlock(cin, c, 1 if i == 0 else 2, act)] + [_PreActBlock(c, c, 1, act) for _ in range(2)]
            layers.append(nn.Sequential(*blocks))
            cin = c
        self.layer1, self.layer2, self.layer3 = layers
        self.bn = nn.BatchNorm2d(w[2])
        self.act = _activation(act)
        self.fc = nn.Linear(w[2], classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.act(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def preact_resnet20x5() -> PreActResNet20:
    """PD-QAT's model: pre-activation ResNet-20, width x5 (80/160/320 channels), clip(x, 0, 1) activations."""
    return PreActResNet20(width=5)
