"""Surviving failures: rebuild a failed pipeline from its newest checkpoint and go on.

In the spirit of Ray Train's ``FailureConfig``: a job states how many failures it tolerates and
which checkpoints it keeps; `run_with_restarts` does the rest. A stage replica that dies, hangs
(the watchdog, `pd2bw_ray.watchdog`) or runs out of memory raises `PipelineFailure`; the attempt's
own clean-up runs, the newest complete checkpoint is opened (a corrupted one is reported and the
one before it used), and the attempt is made again from it. A `NonFiniteError` (a NaN or infinite
loss or gradient) is deterministic, so it is never retried.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

from .checkpoint import Checkpoint, latest_checkpoint
from .config import ConfigError
from .executor import NonFiniteError, PipelineFailure

T = TypeVar("T")


@dataclass(frozen=True)
class FailureConfig:
    """``max_failures``: how many times a failed pipeline is rebuilt before the error is
    raised (0: never)."""

    max_failures: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.max_failures, bool) or not isinstance(self.max_failures, int) \
                or self.max_failures < 0:
            raise ConfigError(f"FailureConfig.max_failures must be an integer >= 0, got "
                              f"{self.max_failures!r}")


def run_with_restarts(attempt: Callable[[Checkpoint | None], T], checkpoint_dir: str | os.PathLike,
                      failure: FailureConfig, *, resume_from: Checkpoint | None = None,
                      log: Callable[[str], None] = print, tag: str = "[pd2bw]") -> T:
    """``attempt(checkpoint)`` until it returns, starting from ``resume_from`` (None: from the
    start), and after each `PipelineFailure` from the newest complete checkpoint under
    ``checkpoint_dir``, at most ``failure.max_failures`` times. ``attempt`` cleans up after itself
    (shuts its trainer down) whether it returns or raises. Returns what the last attempt
    returned; raises the failure that exceeded the limit, or a `NonFiniteError` at once."""
    failures = 0
    checkpoint = resume_from
    while True:
        try:
            return attempt(checkpoint)
        except NonFiniteError:
            raise
        except PipelineFailure as e:
            failures += 1
            if failures > failure.max_failures:
                log(f"{tag} giving up after {failures} failure{'s' if failures > 1 else ''}: {e}")
                raise
            checkpoint = latest_checkpoint(checkpoint_dir, report=log)
            log(f"{tag} failure {failures} of at most {failure.max_failures}: {e}")
            log(f"{tag} restarting the pipeline from "
                f"{checkpoint.path if checkpoint is not None else 'the initial weights'}")
