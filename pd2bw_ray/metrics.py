"""Run metrics for the Ray dashboard and Prometheus, through ``ray.util.metrics``.

Ray exports every metric recorded here from the node's metrics agent (Prometheus text format,
the names prefixed ``ray_``), and the dashboard's Metrics view and Grafana read them from there.
Two recorders, each a plain object owned by the process that measures:

- ``DriverMetrics`` (the trainer's process), per weight update: ``pd2bw_loss``,
  ``pd2bw_samples_per_second``, ``pd2bw_weight_updates``; tagged with the trainer's ``run`` name.
- ``StageMetrics`` (each stage replica actor), per executed chunk of actions:
  ``pd2bw_learning_rate``, ``pd2bw_stage_time_fraction`` (``kind`` = compute, comm, wait, idle:
  the shares of the chunk's wall time spent computing, sending/reducing, waiting for a peer, and
  in between) and ``pd2bw_stage_memory_bytes`` (``kind`` = weights (every version held: under
  2bw the second one too), optimizer, gradients, stash (activations stashed now), peak_stash);
  tagged with ``run``, ``stage`` and ``replica``.

A stage records at most once per ``min_interval_s`` so that the metrics cost nothing measurable
on the critical path of a microbatch. In-process (``local=True``) trainers record nothing.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

Event = tuple[str, Any, float, float]   # executor.Event: (category, Action, start, end)

TIME_KINDS = ("compute", "comm", "wait", "idle")
MEMORY_KINDS = ("weights", "optimizer", "gradients", "stash", "peak_stash")


def time_fractions(events: Sequence[Event]) -> dict[str, float]:
    """Split an action log's wall span into compute / comm / wait / idle fractions (sum 1).

    ``comm`` is time spent issuing sends and reductions, ``wait`` time blocked on a peer's
    message, ``idle`` the rest of the span (between actions and between chunks)."""
    if not events:
        return {"compute": 0.0, "comm": 0.0, "wait": 0.0, "idle": 0.0, "seconds": 0.0}
    span = max(e[3] for e in events) - min(e[2] for e in events)
    sums = {"compute": 0.0, "comm": 0.0, "wait": 0.0}
    for cat, _, t0, t1 in events:
        sums[cat] += t1 - t0
    if span <= 0:
        return {**{k: 0.0 for k in sums}, "idle": 0.0, "seconds": 0.0}
    frac = {k: v / span for k, v in sums.items()}
    frac["idle"] = max(0.0, 1.0 - sum(frac.values()))
    frac["seconds"] = span
    return frac


def _gauge(name: str, description: str, tag_keys: tuple[str, ...]):
    from ray.util.metrics import Gauge
    return Gauge(name, description=description, tag_keys=tag_keys)


class DriverMetrics:
    """The trainer-level metrics of one run (see the module docstring)."""

    def __init__(self, run: str):
        self.tags = {"run": run}
        keys = ("run",)
        self.loss = _gauge("pd2bw_loss", "mean loss of the last weight update", keys)
        self.samples_per_s = _gauge("pd2bw_samples_per_second",
                                    "training throughput since the current train() call began",
                                    keys)
        self.updates = _gauge("pd2bw_weight_updates", "weight updates made so far", keys)

    def step(self, updates: int, loss: float, samples_per_s: float | None) -> None:
        self.loss.set(loss, tags=self.tags)
        self.updates.set(updates, tags=self.tags)
        if samples_per_s is not None:
            self.samples_per_s.set(samples_per_s, tags=self.tags)


class StageMetrics:
    """The per-stage metrics of one stage replica (see the module docstring)."""

    def __init__(self, run: str, stage: int, replica: int, min_interval_s: float = 1.0):
        self.tags = {"run": run, "stage": str(stage), "replica": str(replica)}
        keys = ("run", "stage", "replica")
        self.min_interval_s = min_interval_s
        self._last = -float("inf")
        self._events: list[Event] = []
        self.lr = _gauge("pd2bw_learning_rate", "learning rate of the stage's last update", keys)
        self.time = _gauge("pd2bw_stage_time_fraction",
                           "share of the stage replica's wall time, by kind", keys + ("kind",))
        self.memory = _gauge("pd2bw_stage_memory_bytes",
                             "bytes the stage replica holds, by kind", keys + ("kind",))

    def chunk(self, events: Sequence[Event], memory: Callable[[], Mapping[str, Any]],
              lr: Callable[[], float | None], now: float | None = None) -> bool:
        """Account one executed chunk's events. At most once per interval, record the time
        fractions over the chunks since the last recording, ``memory()`` and ``lr()``, and
        return True."""
        self._events.extend(events)
        now = time.monotonic() if now is None else now
        if now - self._last < self.min_interval_s:
            return False
        self._last = now
        for kind, value in time_fractions(self._events).items():
            if kind in TIME_KINDS:
                self.time.set(value, tags={**self.tags, "kind": kind})
        self._events = []
        held = memory()
        for kind in MEMORY_KINDS:
            if kind in held:
                self.memory.set(float(held[kind]), tags={**self.tags, "kind": kind})
        rate = lr()
        if rate is not None:
            self.lr.set(rate, tags=self.tags)
        return True
