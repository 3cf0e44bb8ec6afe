"""Architectures for the detection benchmark's cases.

This file is copied into every case folder as ``net.py`` and named by the case's config
(``factory: net.py:build``), exactly as a user's own model file would be: it imports only
torch. Several architectures, so that no rule is tuned to one network's heatmaps.
"""
import torch
from torch import nn


class MaxNet(nn.Module):
    """Four 3x3 conv blocks, global *max* pooling (one strong local detector can decide)."""

    def __init__(self, num_classes, channels=3, width=16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


class ResNetLite(nn.Module):
    """Stem, two strided stages with a residual block each, global *average* pooling."""

    def __init__(self, num_classes, channels=3, width=16):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())
        self.down1 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
                                    nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w))
        self.relu1 = nn.ReLU()
        self.down2 = nn.Sequential(nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
                                    nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w))
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        a = self.down1(self.stem(x))
        a = self.relu1(a + self.block1(a))
        a = self.down2(a)
        a = self.relu2(a + self.block2(a))
        return self.fc(a.mean((2, 3)))


class WideShallow(nn.Module):
    """Two 5x5 conv layers with LeakyReLU, strided (no pooling layers), average then linear."""

    def __init__(self, num_classes, channels=3, width=24):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 5, stride=2, padding=2), nn.LeakyReLU(0.1),
            nn.Conv2d(width, 2 * width, 5, stride=2, padding=2), nn.LeakyReLU(0.1),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.LeakyReLU(0.1))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).amax((2, 3)))


class LeNet(nn.Module):
    """The classic MNIST CNN: two 5x5 conv + pool stages, then a position-aware dense head."""

    def __init__(self, num_classes, channels=1, width=16, size=28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * (size // 4) ** 2, 64), nn.ReLU(),
                                  nn.Linear(64, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


class ResReLU(nn.Module):
    """Residual network with BatchNorm whose every activation is ONE ``nn.ReLU(inplace=True)``
    module called again and again in ``forward``, as many hand-written ResNets do: a module
    hook on it fires many times per pass, and in-place edits overwrite what a hook kept."""

    def __init__(self, num_classes, channels=3, width=16):
        super().__init__()
        w = width
        self.relu = nn.ReLU(inplace=True)
        self.stem = nn.Sequential(nn.Conv2d(channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w))
        self.stages = nn.ModuleList()
        for c_in, c_out in ((w, w), (w, 2 * w), (2 * w, 4 * w)):
            self.stages.append(nn.ModuleDict({
                "conv1": nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), "bn1": nn.BatchNorm2d(c_out),
                "conv2": nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), "bn2": nn.BatchNorm2d(c_out),
                "skip": nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=2, bias=False), nn.BatchNorm2d(c_out))}))
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        x = self.relu(self.stem(x))
        for s in self.stages:
            y = self.relu(s["bn1"](s["conv1"](x)))
            x = self.relu(s["bn2"](s["conv2"](y)) + s["skip"](x))
        return self.fc(x.mean((2, 3)))


class DepthwiseSiLU(nn.Module):
    """Depthwise-separable blocks (3x3 per-channel conv, then 1x1 mixing) with BatchNorm and
    SiLU, as in MobileNet/EfficientNet: smooth activations, strided, global average pooling."""

    def __init__(self, num_classes, channels=3, width=16):
        super().__init__()
        w = width
        layers = [nn.Conv2d(channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.SiLU()]
        for c_in, c_out, stride in ((w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 4 * w, 2), (4 * w, 4 * w, 2)):
            layers += [nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
                       nn.BatchNorm2d(c_in), nn.SiLU(),
                       nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


ARCHS = {"maxnet": MaxNet, "resnet": ResNetLite, "wide": WideShallow, "lenet": LeNet,
         "resrelu": ResReLU, "dwsilu": DepthwiseSiLU}


def build(arch="maxnet", num_classes=2, channels=3, **kwargs):
    """The config's model factory: an untrained network of the named architecture."""
    return ARCHS[arch](num_classes, channels=channels, **kwargs)
