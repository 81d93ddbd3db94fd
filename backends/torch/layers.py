"""The PyTorch backend's own nn.Module layers (those torch.nn lacks in the IR's exact form)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from samenet.ops import avgpool_divisor


class Padded(nn.Module):
    """Pads explicitly (F.pad, ``(left, right, top, bottom)``, ``value`` None = zeros), then runs ``module``."""

    def __init__(self, module, pad, value=None):
        super().__init__()
        self.module, self.pad, self.value = module, pad, value

    def forward(self, x):
        return self.module(F.pad(x, self.pad, value=self.value))


class Cut(nn.Module):
    """Cuts a pooling output to the IR's size (PyTorch may keep one more ceil window)."""

    def __init__(self, module, ho, wo):
        super().__init__()
        self.module, self.ho, self.wo = module, ho, wo

    def forward(self, x):
        return self.module(x)[..., : self.ho, : self.wo]


class BatchNorm(nn.Module):
    """BatchNorm1d/2d; with only one of scale/center, BN without affine plus that parameter."""

    def __init__(self, c, a, rank):
        super().__init__()
        cls = nn.BatchNorm2d if rank == 3 else nn.BatchNorm1d
        self.affine = a["scale"] and a["center"]
        self.bn = cls(c, eps=a["eps"], momentum=a["momentum"], affine=self.affine)
        self.gamma = nn.Parameter(torch.ones(c)) if a["scale"] and not self.affine else None
        self.beta = nn.Parameter(torch.zeros(c)) if a["center"] and not self.affine else None
        self.shape = (1, c, 1, 1) if rank == 3 else (1, c)

    def forward(self, x):
        y = self.bn(x)
        if self.gamma is not None:
            y = y * self.gamma.view(self.shape)
        if self.beta is not None:
            y = y + self.beta.view(self.shape)
        return y

    def params(self):
        """The canonical parameter table's tensors, by local name."""
        p = {"running_mean": self.bn.running_mean, "running_var": self.bn.running_var}
        if self.affine:
            p.update(weight=self.bn.weight, bias=self.bn.bias)
        if self.gamma is not None:
            p["weight"] = self.gamma
        if self.beta is not None:
            p["bias"] = self.beta
        return p


class Dropout(nn.Module):
    """Inverted dropout; a fixed keep-mask can be set for parity runs (``mask``)."""

    def __init__(self, rate):
        super().__init__()
        self.rate, self.mask = rate, None

    def forward(self, x):
        if not self.training or self.rate == 0:
            return x
        if self.mask is not None:
            return x * self.mask / (1.0 - self.rate)
        return F.dropout(x, self.rate, True)


class DropPath(Dropout):
    """Stochastic depth, one keep decision per sample (torchvision's "row" mode)."""

    def forward(self, x):
        if not self.training or not self.rate:
            return x
        keep = self.mask
        if keep is None:
            keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype,
                               device=x.device).bernoulli_(1.0 - self.rate)
        else:
            keep = keep.reshape((x.shape[0],) + (1,) * (x.dim() - 1))
        return x * keep / (1.0 - self.rate)


class SumPool(nn.Module):
    """Average pooling via explicit pads, window sums and the IR's divisor map."""

    def __init__(self, a, in_hw, out_hw):
        super().__init__()
        t, b, l, r = a["pad"]
        self.pad, self.kernel, self.stride, self.out_hw = (l, r, t, b), a["kernel"], a["stride"], out_hw
        div = avgpool_divisor(in_hw, a, out_hw).astype(np.float32)
        self.register_buffer("divisor", torch.from_numpy(div), persistent=False)

    def forward(self, x):
        x = F.pad(x, self.pad)
        s = F.avg_pool2d(x, self.kernel, self.stride, 0, ceil_mode=True, count_include_pad=True, divisor_override=1)
        return s[..., : self.out_hw[0], : self.out_hw[1]] / self.divisor.to(s.dtype)
