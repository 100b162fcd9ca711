"""Modules for pipeline failure tests (importable by Ray workers: tests/ is on their path).

Each is an identity module that misbehaves from its (n+1)-th forward on."""

import os
import time

import torch
from torch import nn


class _FaultAfter(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.fault(x) if self.calls > self.n else x

    def fault(self, x):
        raise NotImplementedError


class HangAfter(_FaultAfter):
    """Hangs forever: a stage that stops answering."""

    def fault(self, x):
        time.sleep(3600)
        return x


class DieAfter(_FaultAfter):
    """Its process exits: a stage actor that dies."""

    def fault(self, x):
        os._exit(1)


class NanAfter(_FaultAfter):
    """Returns NaN: a diverged loss."""

    def fault(self, x):
        return x * float("nan")


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


class NanGradAfter(_FaultAfter):
    """Its backward sends an infinite gradient."""

    def fault(self, x):
        return _InfGrad.apply(x)
