"""Liveness of stage replicas: what each is doing (its heartbeat) and when the driver calls it hung.

A stage replica records its progress in an ``Activity``: the driver call it is executing, the
action within it, and when it last made progress (an action started, a collective of the
gradient reduction completed, a call began or ended). Its heartbeat, answered on a thread of its
own while the call runs, is a ``Heartbeat`` snapshot of that record.

The driver's ``Watchdog`` judges heartbeats. Every wait of a stage on a peer ends by itself after
``CommConfig.timeout_s`` and names the peer, so a replica that has made no progress for
``timeout_s + HANG_GRACE_S`` is hung where nobody waits on it (a compute that never returns, the
drain, ``export_state``, ``memory``), and one that does not answer its heartbeat for as long is
stuck below Python. The driver then takes the same path as for a dead actor: it stops every
replica and raises, naming the stage and replica. From the hang to the error:
``timeout_s + HANG_GRACE_S`` plus at most ``2 * interval_s`` between heartbeats plus the
``FAILURE_REPORT_S`` the driver gives the other replicas to report; ``REPORT_MARGIN_S`` bounds the
sum past ``timeout_s``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

HANG_GRACE_S = 2.0          # past timeout_s, so that a stage's own error (naming its peer) comes first
FAILURE_REPORT_S = 3.0      # the other replicas' time to report once one failed
STARTUP_TIMEOUT_S = 300.0   # a replica that never answered yet: building its modules, importing
REPORT_MARGIN_S = 10.0      # hang to error, past timeout_s (with a heartbeat every second)


@dataclass(frozen=True)
class Heartbeat:
    """A snapshot of a replica's ``Activity``: the driver call and action it is in (None
    between calls) and the seconds since its last progress."""

    method: str | None
    detail: str | None
    stalled_s: float

    def doing(self) -> str:
        if self.method is None:
            return "waiting for its next call"
        return f"{self.method}" + (f" at {self.detail}" if self.detail else "")


class Activity:
    """What a stage replica is doing; written by its call thread, read by its heartbeat."""

    def __init__(self) -> None:
        self.method: str | None = None
        self.detail: object = None          # e.g. the Action being executed (str() when read)
        self.since = time.monotonic()

    def begin(self, method: str) -> None:
        self.method, self.detail, self.since = method, None, time.monotonic()

    def end(self) -> None:
        self.method, self.detail, self.since = None, None, time.monotonic()

    def progress(self, detail: object = None) -> None:
        """A step forward: ``detail`` (if given) is what the replica does now."""
        if detail is not None:
            self.detail = detail
        self.since = time.monotonic()

    def heartbeat(self) -> Heartbeat:
        detail = self.detail
        return Heartbeat(self.method, None if detail is None else str(detail),
                         time.monotonic() - self.since)


class Watchdog:
    """Judges heartbeats against ``timeout_s``. ``interval_s``: how often the driver asks."""

    def __init__(self, timeout_s: float, interval_s: float | None = None,
                 grace_s: float = HANG_GRACE_S, startup_s: float = STARTUP_TIMEOUT_S):
        self.timeout_s = timeout_s
        self.limit_s = timeout_s + grace_s
        self.interval_s = interval_s if interval_s is not None else min(1.0, timeout_s / 4)
        self.startup_s = max(startup_s, self.limit_s)

    def stalled(self, where: str, beat: Heartbeat) -> str | None:
        """Why ``where`` counts as hung by its heartbeat, or None (also between calls: see
        ``not_started``)."""
        if beat.method is None or beat.stalled_s <= self.limit_s:
            return None
        return (f"{where} hung: {beat.doing()} made no progress for {beat.stalled_s:.0f} s "
                f"(CommConfig.timeout_s = {self.timeout_s:g} s; a stage stuck in compute or on "
                "its device; raise CommConfig.timeout_s if one action legitimately takes longer)")

    def not_started(self, where: str, idle_s: float) -> str | None:
        """Why ``where`` counts as hung when it has sat between calls for ``idle_s`` although
        one is pending for it, or None."""
        if idle_s <= self.limit_s:
            return None
        return f"{where} hung: its pending call did not start for {idle_s:.0f} s"

    def silent(self, where: str, unanswered_s: float, answered_before: bool) -> str | None:
        """Why ``where`` counts as hung when its heartbeat went unanswered for
        ``unanswered_s``, or None."""
        limit = self.limit_s if answered_before else self.startup_s
        if unanswered_s <= limit:
            return None
        state = ("its process is stuck outside Python" if answered_before else
                 "it never started (its modules did not build?)")
        return f"{where} hung: no heartbeat for {unanswered_s:.0f} s ({state})"
