"""Where the driver's calls go: stage replicas as Ray actors (``RayPool``) or as objects on
threads of this process (``ThreadPool``), addressed as (stage, replica).

Every wait on the replicas is bounded by the ``Watchdog`` (``pd2bw_ray/watchdog.py``); on the
first failure, death or hang, a pool stops every replica and raises ``PipelineFailure`` naming who
failed and why (``NonFiniteError`` for a NaN or infinity, which a restart would repeat).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import queue
import re
import threading
import time
from typing import Any, Callable, Sequence

from .actor import StageActor
from .collectives import ThreadHub
from .executor import NonFiniteError, PipelineFailure
from .watchdog import FAILURE_REPORT_S, Watchdog


class Pool:
    """Stage replicas addressed as (stage, replica); calls on one replica run in order."""

    def call(self, s: int, r: int, method: str, *args: Any) -> Any:
        raise NotImplementedError

    def gather(self, calls: Sequence[tuple[int, int, Any]]) -> list[Any]:
        """Results of ``calls`` in order; on the first failure, stop every replica and raise
        PipelineFailure naming who failed and why."""
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def discard(self, calls: Sequence[tuple[int, int, Any]]) -> None:
        """Forget calls that will never be gathered (after a failure)."""


class _Worker:
    """One daemon thread running calls in order: a hung call must not keep the process alive
    (ThreadPoolExecutor's threads are joined at exit)."""

    def __init__(self, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def submit(self, fn: Callable, *args: Any) -> cf.Future:
        fut: cf.Future = cf.Future()
        self._queue.put((fut, fn, args))
        return fut

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            fut, fn, args = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)

    def shutdown(self) -> None:
        self._queue.put(None)


class ThreadPool(Pool):
    """Stage replicas as objects on threads of this process, watched as the Ray pool's are (a
    hung thread cannot be stopped: it is reported and left behind)."""

    def __init__(self, actors: list[list[StageActor]], hub: ThreadHub, watchdog: Watchdog):
        self.actors = actors
        self.hub = hub
        self.watchdog = watchdog
        self.threads = [[_Worker(f"pd2bw-s{s}r{r}") for r in range(len(row))]
                        for s, row in enumerate(actors)]

    def call(self, s, r, method, *args):
        return self.threads[s][r].submit(getattr(self.actors[s][r], method), *args)

    def gather(self, calls):
        futs = [f for _, _, f in calls]
        while True:
            _, pending = cf.wait(futs, timeout=self.watchdog.interval_s,
                                 return_when=cf.FIRST_EXCEPTION)
            failed = [(s, r, f) for s, r, f in calls if f.done() and f.exception() is not None]
            hung = [why for s, r, f in calls if not f.done() for why in
                    [self.watchdog.stalled(f"stage {s} replica {r}",
                                           self.actors[s][r].heartbeat())] if why]
            if failed or hung:
                self.kill()
                causes = [f.exception() for _, _, f in failed]
                raise _failure_class(causes)("; ".join([_describe(c) for c in causes] + hung))
            if not pending:
                return [f.result() for f in futs]

    def kill(self):
        with self.hub.cv:
            self.hub.cv.notify_all()
        for row in self.threads:
            for t in row:
                t.shutdown()


class RayPool(Pool):
    """Stage replicas as Ray actors. Every wait on them is bounded: while calls are pending,
    each replica with a pending call is asked for its heartbeat every ``watchdog.interval_s``
    (answered beside the call, in the actor's "watch" concurrency group), and a replica the
    watchdog calls hung fails the pipeline as a dead one does."""

    def __init__(self, actors: list[list[Any]], placement_group: Any, watchdog: Watchdog):
        self.actors = actors
        self.placement_group = placement_group
        self.watchdog = watchdog
        self._beats: dict[tuple[int, int], tuple[Any, float]] = {}   # (ref, asked at)
        self._idle: dict[tuple[int, int], float] = {}   # first seen between calls, call pending
        self._answered: set[tuple[int, int]] = set()
        self._outstanding: dict[Any, tuple[int, int]] = {}   # every call not yet gathered

    def call(self, s, r, method, *args):
        ref = getattr(self.actors[s][r], method).remote(*args)
        self._outstanding[ref] = (s, r)
        return ref

    def gather(self, calls):
        import ray

        refs = [ref for _, _, ref in calls]
        pending = list(refs)
        self._beats.clear()     # a heartbeat asked during an earlier wait tells nothing now
        self._idle.clear()
        next_check = time.monotonic() + self.watchdog.interval_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1,
                                      timeout=max(0.0, next_check - time.monotonic()))
            for ref in ready:
                try:
                    ray.get(ref)
                except Exception:  # noqa: BLE001 - described below
                    self._fail(calls)
            if pending and time.monotonic() >= next_check:
                waiting = {ref for ref in pending}
                hung = self._hung({(s, r) for s, r, ref in calls if ref in waiting})
                if hung:
                    self._fail(calls, hung)
                next_check = time.monotonic() + self.watchdog.interval_s
        for ref in refs:
            self._outstanding.pop(ref, None)
        return ray.get(refs)

    def _heartbeat(self, s: int, r: int):
        """The replica's heartbeat: a ``Heartbeat``, None while unanswered, or the error of a
        dead actor."""
        import ray

        now = time.monotonic()
        if (s, r) not in self._beats:
            ref = self.actors[s][r].heartbeat.options(concurrency_group="watch").remote()
            self._beats[(s, r)] = (ref, now)
        ref, asked = self._beats[(s, r)]
        ready, _ = ray.wait([ref], timeout=0)
        if not ready:
            return None, now - asked
        del self._beats[(s, r)]
        try:
            beat = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - a dead actor: its call fails too
            return e, 0.0
        self._answered.add((s, r))
        return beat, 0.0

    def _hung(self, replicas) -> list[str]:
        """Why each of ``replicas`` (with pending calls) counts as hung, if any does."""
        hung = []
        for s, r in sorted(replicas):
            beat, unanswered = self._heartbeat(s, r)
            where = f"stage {s} replica {r}"
            if beat is None:
                why = self.watchdog.silent(where, unanswered, (s, r) in self._answered)
            elif isinstance(beat, BaseException):
                why = None
            elif beat.method is None:    # between calls although one is pending
                idle = time.monotonic() - self._idle.setdefault((s, r), time.monotonic())
                why = self.watchdog.not_started(where, idle)
            else:
                self._idle.pop((s, r), None)
                why = self.watchdog.stalled(where, beat)
            if why:
                hung.append(why)
        return hung

    def discard(self, calls):
        import ray

        for _, _, ref in calls:
            self._outstanding.pop(ref, None)
            with contextlib.suppress(Exception):
                ray.get(ref, timeout=5)

    def _fail(self, calls, hung: Sequence[str] = ()) -> None:
        """Give the other replicas a moment to report (a dead actor's peers fail with it), then
        stop everything and raise with the errors: deaths first, then errors, hangs, and what
        the replicas still busy were doing."""
        import ray

        # the calls of later chunks too: a replica may fail in one while this wait is on another
        mine = {ref for _, _, ref in calls}
        calls = list(calls) + [(s, r, ref) for ref, (s, r) in self._outstanding.items()
                               if ref not in mine]
        self._outstanding.clear()
        refs = [ref for _, _, ref in calls]
        ray.wait(refs, num_returns=len(refs), timeout=FAILURE_REPORT_S)
        busy = [] if hung else self._still_busy(calls)
        deaths, errors, causes = [], [], []
        for s, r, ref in calls:
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                continue
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as e:
                how = ("failed to start" if "creation task" in str(e) else "died")
                deaths.append(f"stage {s} replica {r} {how}: {_first_line(e)}")
            except Exception as e:  # noqa: BLE001
                errors.append(_describe(e))
                causes.append(e)
        self.kill()
        raise _failure_class(causes)("; ".join(deaths + errors + list(hung) + busy)
                                     or "a stage replica failed")

    def _still_busy(self, calls) -> list[str]:
        """What the replicas whose calls did not end are doing (asked for a few seconds)."""
        import ray

        busy = {(s, r) for s, r, ref in calls if not ray.wait([ref], timeout=0)[0]}
        asked = {k: self.actors[k[0]][k[1]].heartbeat.options(concurrency_group="watch").remote()
                 for k in sorted(busy)}
        ray.wait(list(asked.values()), num_returns=len(asked), timeout=FAILURE_REPORT_S)
        out = []
        for (s, r), ref in asked.items():
            with contextlib.suppress(Exception):
                beat = ray.get(ref, timeout=0)
                out.append(f"stage {s} replica {r} was still busy: {beat.doing()} "
                           f"(no progress for {beat.stalled_s:.0f} s)")
        return out

    def close(self, timeout_s: float = 15.0) -> None:
        """Graceful stop: let each actor close its threads and groups, then exit."""
        import ray

        refs = [a.close.remote() for row in self.actors for a in row]
        with contextlib.suppress(Exception):
            ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        exits = [a.__ray_terminate__.remote() for row in self.actors for a in row]
        with contextlib.suppress(Exception):
            ray.wait(exits, num_returns=len(exits), timeout=timeout_s)
        self.kill()

    def kill(self):
        import ray

        for row in self.actors:
            for a in row:
                with contextlib.suppress(Exception):
                    ray.kill(a, no_restart=True)
        if self.placement_group is not None:
            with contextlib.suppress(Exception):
                ray.util.remove_placement_group(self.placement_group)
            self.placement_group = None


_EXC_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Failure|Exit))\b:?(.*)$")


def _first_line(e: BaseException) -> str:
    """The line of an error that says what happened: the last 'SomeError: ...' line of a
    remote traceback if there is one, else the first line."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        m = _EXC_LINE.match(line)
        if m and not line.startswith("ray."):
            return f"{m.group(1)}:{m.group(2)}" if m.group(2) else m.group(1)
    return lines[0] if lines else type(e).__name__


def _failure_class(causes) -> type[PipelineFailure]:
    """NonFiniteError if any replica hit a NaN/inf (not worth a restart), else PipelineFailure."""
    for c in causes:
        if isinstance(getattr(c, "cause", None) or c, NonFiniteError):
            return NonFiniteError
    return PipelineFailure


def _describe(e: BaseException | None) -> str:
    cause = getattr(e, "cause", None) or e
    if isinstance(cause, PipelineFailure):
        return str(cause)
    return f"{type(cause).__name__}: {_first_line(cause)}"
