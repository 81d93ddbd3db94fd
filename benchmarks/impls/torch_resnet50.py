"""An independent, hand-written PyTorch ResNet-50 with torchvision's architecture (v1.5).

Written the way torchvision writes it (Bottleneck blocks, in-place ReLU, ``out += identity``),
without any harness code in the model, for the speed-fidelity benchmark.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, width, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet50(nn.Module):
    def __init__(self, classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._stage(64, 3, 1)
        self.layer2 = self._stage(128, 4, 2)
        self.layer3 = self._stage(256, 6, 2)
        self.layer4 = self._stage(512, 3, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, width, blocks, stride):
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, width * 4, 1, stride, bias=False), nn.BatchNorm2d(width * 4))
        layers = [Bottleneck(self.inplanes, width, stride, downsample)]
        self.inplanes = width * 4
        layers += [Bottleneck(self.inplanes, width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def setup(cell):
    if cell.cpu_settings == "tuned":
        torch.set_num_threads(cell.threads)
        torch.set_num_interop_threads(cell.threads)
    torch.manual_seed(cell.seed)
    model = ResNet50()
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    rng = np.random.default_rng(cell.seed)
    x = torch.from_numpy(rng.standard_normal((cell.batch, 3, 224, 224), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, 1000, cell.batch))
    opt = torch.optim.SGD(model.parameters(), lr=cell.lr, momentum=cell.momentum, weight_decay=cell.weight_decay)

    def train():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def infer():
        with torch.inference_mode():
            model(x)

    if cell.mode == "train":
        model.train()
        return train, lambda: None
    model.eval()
    return infer, lambda: None


def outputs(cell, x):
    """Eval-mode, then train-mode logits on ``x`` with the spec's canonical weights, as numpy.

    For ``handwritten.py --check``: the state dict's names are torchvision's, which are the spec's."""
    from samenet import zoo
    from samenet.cell import weights_for

    model = ResNet50()
    ir = zoo.load("resnet50", cell.input)
    weights = weights_for(ir, cell.seed)
    state = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    with torch.no_grad():
        model.eval()
        evaluated = model(torch.from_numpy(x)).numpy()
        model.train()
        return [evaluated, model(torch.from_numpy(x)).numpy()]
