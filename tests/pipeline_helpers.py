"""Modules for pipeline failure tests (importable by Ray workers: tests/ is on their path)."""

import os
import time

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
