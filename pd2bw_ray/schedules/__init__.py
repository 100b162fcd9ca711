"""The schedules by name: a constant registry built at import, never changed at run time.

Adding a schedule means one file here (a ``Schedule`` subclass giving the order of computations
per rank and its version rule) and its tests; the lowering, the simulator and the executor take
any schedule.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from ..config import ConfigError
from .flush import Flush
from .gpipe import GPipe
from .interleaved import Interleaved
from .ir import COMPUTE, MESSAGES, Action, Kind, Schedule
from .pipedream_2bw import PipeDream2BW
from .zero_bubble import ZeroBubbleH1

REGISTRY: Mapping[str, Schedule] = MappingProxyType(
    {s.name: s for s in (PipeDream2BW(), Flush(), GPipe(), Interleaved(), ZeroBubbleH1())})


def get(name: str) -> Schedule:
    """The schedule called ``name``; ConfigError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown schedule {name!r}; choose one of "
                          f"{', '.join(REGISTRY)}") from None


__all__ = ["Action", "COMPUTE", "ConfigError", "Kind", "MESSAGES", "REGISTRY", "Schedule", "get"]
