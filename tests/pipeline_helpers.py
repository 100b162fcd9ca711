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


class HangOnRankAfter(_FaultAfter):
    """Hangs forever on one rank only (the actor seeds torch with its rank when seed=0)."""

    def __init__(self, n: int, rank: int):
        super().__init__(n)
        self.rank = rank

    def fault(self, x):
        if torch.initial_seed() == self.rank:
            time.sleep(3600)
        return x


class HangingStepSGD(torch.optim.SGD):
    """SGD whose (n+1)-th step never returns: a stage stuck in its weight update."""

    def __init__(self, params, n: int, lr: float = 0.1):
        super().__init__(params, lr=lr)
        self.n, self.steps = n, 0

    def step(self, closure=None):
        self.steps += 1
        if self.steps > self.n:
            time.sleep(3600)
        return super().step(closure)


class HangingStateDictSGD(torch.optim.SGD):
    """SGD whose state_dict never returns: a stage stuck in export_state (a checkpoint)."""

    def state_dict(self):
        time.sleep(3600)

    @classmethod
    def wrap(cls, params):
        return cls(params, lr=0.1)


class _StallingState(dict):
    def values(self):
        time.sleep(3600)


class HangingStateSGD(torch.optim.SGD):
    """SGD whose state cannot be walked: a stage stuck in memory() (trainer.stats())."""

    def __init__(self, params, lr: float = 0.1):
        super().__init__(params, lr=lr)
        self.state = _StallingState()
