"""Modules for pipeline failure tests (importable by Ray workers: tests/ is on their path)."""

import os
import time

import torch
from torch import nn


class HangAfter(nn.Module):
    """Identity that hangs forever on its (n+1)-th forward: a stage that stops answering."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > self.n:
            time.sleep(3600)
        return x


class DieAfter(nn.Module):
    """Identity whose process exits on its (n+1)-th forward: a stage actor that dies."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > self.n:
            os._exit(1)
        return x


class NanAfter(nn.Module):
    """Identity that returns NaN from its (n+1)-th forward on: a diverged loss."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * float("nan") if self.calls > self.n else x


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


class NanGradAfter(nn.Module):
    """Identity whose backward sends an infinite gradient from its (n+1)-th forward on."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return _NanGrad.apply(x) if self.calls > self.n else x
