"""Pipeline schedules as pure functions: per-stage action lists, the 2BW version rule, a simulator.

A schedule is data. For a call of ``train()`` covering steps ``first..last`` (one step = one weight
update = ``m`` microbatches per replica), ``stage_actions`` gives the list of actions stage ``s``
executes, in order: forward/backward of microbatch ``(step, i)`` on weight version ``v``, sends and
receives of activations/gradients to a neighbouring stage, and per step a gradient reduction
(``REDUCE``) and weight update (``UPDATE``). Every replica of a stage runs the same list (replica
``r`` talks to replica ``r`` of the neighbouring stages). Stage actors only execute actions; a new
schedule never touches the actor.

Schedules:
- ``2bw`` (PipeDream-2BW): 1F1B over the whole call, never drained between steps. Step ``t``'s
  microbatches use version ``W(t-1)``; ``UPDATE(t)`` makes ``W(t+1)`` just before the first forward
  that needs it (step ``t+2``), so the gradient all-reduce has a whole step to complete.
- ``flush`` (PipeDream-Flush): 1F1B within each step, drained before the update.
- ``gpipe``: all forwards of a step, then all backwards, drained before the update.

The actions of one call are cut into one chunk per step (``step_actions``) so the driver can stream
data: under 2bw chunk ``t`` holds the actions up to the forward of step ``t``'s last microbatch, and
the last chunk also holds the drain; under flush and gpipe chunk ``t`` is the whole step ``t``. A chunk depends only on whether later steps exist, never on how many.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Sequence

from .config import SCHEDULES, ConfigError


class Kind(str, Enum):
    FORWARD = "F"
    BACKWARD = "B"
    SEND_ACT = "SA"      # send this microbatch's output activations to stage peer (= s + 1)
    RECV_ACT = "RA"      # receive this microbatch's input activations from stage peer (= s - 1)
    SEND_GRAD = "SG"     # send the gradient of this microbatch's inputs to stage peer (= s - 1)
    RECV_GRAD = "RG"     # receive the gradient of this microbatch's outputs from peer (= s + 1)
    REDUCE = "R"         # start averaging the step's gradients (replicas, tied copies, norm)
    UPDATE = "U"         # wait for the reduction, apply the optimizer: creates version `version`


@dataclass(frozen=True)
class Action:
    """One thing a stage does. ``microbatch`` is the index within ``step`` (-1 for REDUCE/UPDATE);
    ``version`` is the weight version used (F/B) or created (UPDATE); ``peer`` the other stage."""

    kind: Kind
    step: int
    microbatch: int = -1
    version: int = -1
    peer: int | None = None

    def __str__(self) -> str:
        if self.kind in (Kind.FORWARD, Kind.BACKWARD):
            return f"{self.kind.value}{self.step}.{self.microbatch}@v{self.version}"
        if self.kind in (Kind.SEND_ACT, Kind.RECV_ACT, Kind.SEND_GRAD, Kind.RECV_GRAD):
            return f"{self.kind.value}{self.step}.{self.microbatch}:{self.peer}"
        if self.kind is Kind.UPDATE:
            return f"U{self.step}->v{self.version}"
        return f"{self.kind.value}{self.step}"


def weight_version(schedule: str, step: int) -> int:
    """The weight version that all microbatches of ``step`` use, in forward and backward alike.

    PipeDream-2BW: ``W(t+1) = W(t) - lr * grad f(W(t-1))`` with ``W(-1) = W(0)``: the gradient
    applied by update ``t`` is computed on the version one older than the one it updates, the same
    staleness of one for every stage, so step ``t`` runs on ``W(max(t-1, 0))``. Each stage then
    holds at most two versions: ``W(t)`` (in use by step ``t+1``) and the newest ``W(t+1)``.

    PipeDream-Flush and GPipe: ``W(t+1) = W(t) - lr * grad f(W(t))``, plain minibatch SGD.
    """
    check_schedule(schedule)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if schedule == "2bw":
        return max(step - 1, 0)
    return step


def check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def check_shape(schedule: str, num_stages: int, num_microbatches: int) -> None:
    """Raise ConfigError unless the schedule can run ``num_stages`` stages with ``m`` microbatches."""
    check_schedule(schedule)
    if num_stages < 1:
        raise ConfigError(f"need at least one stage, got {num_stages}")
    if num_microbatches < 1:
        raise ConfigError(f"num_microbatches must be >= 1, got {num_microbatches}")
    if schedule == "2bw" and num_microbatches < num_stages:
        raise ConfigError(
            f"schedule '2bw' needs num_microbatches (m) >= number of stages (d) so that a stage "
            f"never needs a third weight version; got m={num_microbatches} < d={num_stages}. "
            f"Raise num_microbatches (e.g. --gradient_accumulation_steps) to at least "
            f"{num_stages}, or use fewer stages.")


def _compute_order(schedule: str, stage: int, d: int, m: int, n_steps: int) -> list[tuple[str, int]]:
    """Forward/backward order of one stage over a call, as ("F"|"B", call-local microbatch id)."""
    order: list[tuple[str, int]] = []

    def one_f_one_b(ids: Sequence[int]) -> None:
        warm = min(d - stage - 1, len(ids))
        order.extend(("F", k) for k in ids[:warm])
        for j in range(warm, len(ids)):
            order.append(("F", ids[j]))
            order.append(("B", ids[j - warm]))
        order.extend(("B", k) for k in ids[len(ids) - warm:])

    if schedule == "2bw":
        one_f_one_b(list(range(n_steps * m)))
    else:
        for t in range(n_steps):
            ids = list(range(t * m, (t + 1) * m))
            if schedule == "flush":
                one_f_one_b(ids)
            else:  # gpipe
                order.extend(("F", k) for k in ids)
                order.extend(("B", k) for k in ids)
    return order


def call_actions(schedule: str, stage: int, num_stages: int, num_microbatches: int,
                 first_step: int, last_step: int) -> list[list[Action]]:
    """All actions of ``stage`` for a call covering steps ``first_step..last_step``, one list per
    step (chunk). See the module docstring for where chunks are cut."""
    check_shape(schedule, num_stages, num_microbatches)
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} out of range for {num_stages} stages")
    if last_step < first_step:
        raise ValueError(f"empty call: last_step {last_step} < first_step {first_step}")
    d, m, s = num_stages, num_microbatches, stage
    n = last_step - first_step + 1
    chunks: list[list[Action]] = [[] for _ in range(n)]
    chunk = 0
    pending_updates: deque[int] = deque()   # 2bw: reduced steps whose UPDATE is not placed yet
    backwards_done = [0] * n

    def mb(k: int) -> tuple[int, int]:
        return first_step + k // m, k % m

    for kind, k in _compute_order(schedule, s, d, m, n):
        step, i = mb(k)
        v = weight_version(schedule, step)
        if kind == "F":
            if schedule == "2bw" and i == 0:
                # W(step-1) must exist before the first forward of `step`: place UPDATE(step-2).
                while pending_updates and pending_updates[0] <= step - 2:
                    u = pending_updates.popleft()
                    chunks[chunk].append(Action(Kind.UPDATE, u, version=u + 1))
            if s > 0:
                chunks[chunk].append(Action(Kind.RECV_ACT, step, i, peer=s - 1))
            chunks[chunk].append(Action(Kind.FORWARD, step, i, version=v))
            if s < d - 1:
                chunks[chunk].append(Action(Kind.SEND_ACT, step, i, peer=s + 1))
            if schedule == "2bw" and i == m - 1 and step - first_step < n - 1:
                chunk += 1      # a 2bw chunk ends with the forward of its step's last microbatch
        else:
            if s < d - 1:
                chunks[chunk].append(Action(Kind.RECV_GRAD, step, i, peer=s + 1))
            chunks[chunk].append(Action(Kind.BACKWARD, step, i, version=v))
            if s > 0:
                chunks[chunk].append(Action(Kind.SEND_GRAD, step, i, peer=s - 1))
            backwards_done[step - first_step] += 1
            if backwards_done[step - first_step] == m:
                chunks[chunk].append(Action(Kind.REDUCE, step))
                if schedule == "2bw":
                    pending_updates.append(step)
                else:
                    chunks[chunk].append(Action(Kind.UPDATE, step, version=step + 1))
                    if step - first_step < n - 1:
                        chunk += 1   # a flush/gpipe chunk is its whole, drained step
    for u in pending_updates:   # the drain at the end of the call
        chunks[-1].append(Action(Kind.UPDATE, u, version=u + 1))
    return chunks


def step_actions(schedule: str, stage: int, num_stages: int, num_microbatches: int,
                 step: int, first_step: int, is_last: bool) -> list[Action]:
    """The chunk of actions for ``step`` in a call starting at ``first_step``.

    ``is_last`` says whether ``step`` is the call's last step (its chunk then holds the drain).
    A chunk only depends on whether more steps follow, so the driver can stream steps with a
    look-ahead of one.
    """
    if step < first_step:
        raise ValueError(f"step {step} < first_step {first_step}")
    # Generate from a short window instead of the whole call. A chunk never depends on how many
    # steps follow, only on whether one does (so end the window at step + 1). Under 2bw, chunk t
    # only touches steps t-1 and t and UPDATE(t-2) (warm-up is < m forwards because m >= d), so a
    # call starting two steps earlier yields the same chunk; flush and gpipe chunks are one step.
    window_first = max(first_step, step - 2) if schedule == "2bw" else step
    last = step if is_last else step + 1
    return call_actions(schedule, stage, num_stages, num_microbatches,
                        window_first, last)[step - window_first]


def stage_actions(schedule: str, stage: int, num_stages: int, num_microbatches: int,
                  num_steps: int, first_step: int = 0) -> list[Action]:
    """The whole action list of ``stage`` for a call of ``num_steps`` steps."""
    chunks = call_actions(schedule, stage, num_stages, num_microbatches,
                          first_step, first_step + num_steps - 1)
    return [a for c in chunks for a in c]


# ------------------------------------------------------------------------------------------------
# Simulation: run all stages' action lists against each other.


class ScheduleError(RuntimeError):
    """The action lists of a schedule do not fit together (deadlock, mismatched message, ...)."""


@dataclass(frozen=True)
class SimulationResult:
    """What a simulated run of all stages did."""

    rounds: int                      # scheduler rounds until every stage finished
    max_in_flight: tuple[int, ...]   # per stage: most microbatches forwarded but not backwarded
    max_live_versions: tuple[int, ...]  # per stage: most weight versions alive at once
    order: tuple[tuple[int, Action], ...]  # (stage, action) in a valid global execution order


def simulate(schedule: str, actions: Sequence[Sequence[Action]], num_microbatches: int,
             first_step: int = 0) -> SimulationResult:
    """Execute every stage's action list against the others, like processes would.

    Sends never block (they are asynchronous in the runtime); a receive blocks until the matching
    send was issued on that channel (FIFO per (sender, receiver)), and must match it in kind, step
    and microbatch. ``UPDATE(t)`` blocks until every stage issued ``REDUCE(t)`` (the most any
    reduction waits for: the global gradient norm spans all stages). A forward or backward needs
    its weight version to exist, and a stage keeps only versions still in use or the newest one.
    Raises ScheduleError on a deadlock or any mismatch.
    """
    d = len(actions)
    pcs = [0] * d
    channels: dict[tuple[int, int, str], deque[tuple[int, int]]] = {}
    reduced: dict[int, set[int]] = {}
    versions: list[set[int]] = [{weight_version(schedule, first_step)} for _ in range(d)]
    newest = [weight_version(schedule, first_step)] * d
    if schedule == "2bw" and first_step > 0:
        # A later call starts with W(first) and W(first-1) alive, as the previous call left them.
        for s in range(d):
            versions[s] = {first_step - 1, first_step}
            newest[s] = first_step
    in_flight: list[dict[tuple[int, int], int]] = [{} for _ in range(d)]
    max_in_flight = [0] * d
    max_versions = [len(v) for v in versions]
    order: list[tuple[int, Action]] = []
    rounds = 0

    def gc_versions(s: int) -> None:
        used = set(in_flight[s].values())
        versions[s] = {v for v in versions[s] if v in used or v == newest[s]
                       or v == newest[s] - 1 and schedule == "2bw"}

    while any(pcs[s] < len(actions[s]) for s in range(d)):
        rounds += 1
        progressed = False
        for s in range(d):
            while pcs[s] < len(actions[s]):
                a = actions[s][pcs[s]]
                where = f"stage {s} action {pcs[s]} ({a})"
                if a.kind in (Kind.SEND_ACT, Kind.SEND_GRAD):
                    want = s + 1 if a.kind is Kind.SEND_ACT else s - 1
                    if a.peer != want or not 0 <= a.peer < d:
                        raise ScheduleError(f"{where}: sends to stage {a.peer}, expected {want}")
                    channels.setdefault((s, a.peer, a.kind.value), deque()).append(
                        (a.step, a.microbatch))
                elif a.kind in (Kind.RECV_ACT, Kind.RECV_GRAD):
                    want = s - 1 if a.kind is Kind.RECV_ACT else s + 1
                    if a.peer != want or not 0 <= a.peer < d:
                        raise ScheduleError(f"{where}: receives from stage {a.peer}, "
                                            f"expected {want}")
                    sent_kind = "SA" if a.kind is Kind.RECV_ACT else "SG"
                    q = channels.get((a.peer, s, sent_kind))
                    if not q:
                        break   # blocked
                    got = q.popleft()
                    if got != (a.step, a.microbatch):
                        raise ScheduleError(f"{where}: receives step {a.step} microbatch "
                                            f"{a.microbatch} but stage {a.peer} sent step "
                                            f"{got[0]} microbatch {got[1]} first")
                elif a.kind is Kind.FORWARD:
                    if a.version not in versions[s]:
                        raise ScheduleError(f"{where}: needs weight version {a.version}, but stage "
                                            f"{s} holds {sorted(versions[s])}")
                    key = (a.step, a.microbatch)
                    if key in in_flight[s]:
                        raise ScheduleError(f"{where}: forward of a microbatch already in flight")
                    in_flight[s][key] = a.version
                    max_in_flight[s] = max(max_in_flight[s], len(in_flight[s]))
                elif a.kind is Kind.BACKWARD:
                    key = (a.step, a.microbatch)
                    if in_flight[s].get(key) != a.version:
                        raise ScheduleError(f"{where}: backward without a forward of that "
                                            "microbatch on the same weight version")
                    del in_flight[s][key]
                elif a.kind is Kind.REDUCE:
                    if any(st == a.step for st, _ in in_flight[s]):
                        raise ScheduleError(f"{where}: reduces step {a.step} before all its "
                                            "backwards")
                    reduced.setdefault(a.step, set()).add(s)
                elif a.kind is Kind.UPDATE:
                    if s not in reduced.get(a.step, ()):
                        raise ScheduleError(f"{where}: update before its own REDUCE")
                    if len(reduced[a.step]) < d:
                        break   # waits for the slowest stage's reduction
                    if a.version != newest[s] + 1:
                        raise ScheduleError(f"{where}: creates version {a.version} but the "
                                            f"newest is {newest[s]}")
                    newest[s] = a.version
                    versions[s].add(a.version)
                else:  # pragma: no cover - Kind is closed
                    raise ScheduleError(f"{where}: unknown action")
                gc_versions(s)
                max_versions[s] = max(max_versions[s], len(versions[s]))
                order.append((s, a))
                pcs[s] += 1
                progressed = True
        if not progressed:
            stuck = "; ".join(f"stage {s} waits at action {pcs[s]} ({actions[s][pcs[s]]})"
                              for s in range(d) if pcs[s] < len(actions[s]))
            raise ScheduleError(f"deadlock: {stuck}")
    leftovers = {k: q for k, q in channels.items() if q}
    if leftovers:
        raise ScheduleError(f"messages sent but never received: {leftovers}")
    for s in range(d):
        if in_flight[s]:
            raise ScheduleError(f"stage {s} ends with microbatches in flight: "
                                f"{sorted(in_flight[s])}")
    return SimulationResult(rounds, tuple(max_in_flight), tuple(max_versions), tuple(order))


def format_actions(actions: Iterable[Action]) -> str:
    """A compact one-line rendering, e.g. ``RA0.1:0 F0.1@v0 SA0.1:2``."""
    return " ".join(str(a) for a in actions)
