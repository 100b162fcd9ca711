"""Pipeline schedules lowered to per-rank action lists, the version rule, and a simulator.

A schedule is data. ``pd2bw_ray.schedules`` holds each schedule as an object in a constant
registry; it gives only the order of computations per rank (``F``, ``B``, or ``I``/``W`` for a split
backward, with the stage each belongs to) and its version rule. ``call_actions`` lowers that order
in one pass to what a rank executes for a call of ``train()`` covering steps ``first..last`` (one
step = one weight update = ``m`` microbatches per replica): a receive before and a send after each
computation that needs one, per step a gradient reduction (``REDUCE``) after the rank's last
weight gradient of the step and a weight update (``UPDATE``), cut into one chunk per step. Every
replica of a stage runs the same list (replica ``r`` talks to replica ``r`` of the neighbouring
stages). Stage actors only execute actions; a new schedule never touches the actor.

Schedules (``pd2bw_ray/schedules/``):
- ``2bw`` (PipeDream-2BW): 1F1B over the whole call, never drained between steps. Step ``t``'s
  microbatches use version ``W(t-1)``; ``UPDATE(t)`` makes ``W(t+1)`` just before the first forward
  that needs it (step ``t+2``), so the gradient all-reduce has a whole step to complete.
- ``flush`` (PipeDream-Flush): 1F1B within each step, drained before the update.
- ``gpipe``: all forwards of a step, then all backwards, drained before the update.
- ``interleaved``: Megatron's interleaved 1F1B, ``v`` virtual stages per rank, drained per step.
- ``zb-h1``: Zero Bubble H1, backward split into ``I`` and ``W``, drained per step (also over
  ``v`` virtual stages per rank, on the interleaved order).

Where chunks are cut: a schedule with version lag 0 drains each step, and chunk ``t`` is the whole
step ``t``; under 2bw chunk ``t`` holds the actions up to the rank's last forward of step ``t``, and
the last chunk also holds the drain. A chunk depends only on whether later steps exist, never on
how many.

Stages and ranks: ``d`` ranks form a pipeline; with ``stages_per_rank`` ``v`` > 1 there are ``d v``
stages and stage ``s`` lives on rank ``s % d`` (PipeDream's conf with stage ``s`` and ``s + d`` on
the same ranks); ``stage`` and ``num_stages`` arguments below count ranks of a pipeline, which
equal stages when ``v`` is 1.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable, Sequence

from . import schedules
from .config import SCHEDULES, ConfigError
from .schedules import COMPUTE, Action, Kind, Schedule

__all__ = ["Action", "Kind", "ScheduleError", "SimulationResult", "call_actions", "check_schedule",
           "check_shape", "format_actions", "simulate", "stage_actions", "step_actions",
           "weight_version"]


def weight_version(schedule: str, step: int) -> int:
    """The weight version that all microbatches of ``step`` use, in forward and backward alike.

    PipeDream-2BW (version lag 1): ``W(t+1) = W(t) - lr * grad f(W(t-1))`` with ``W(-1) = W(0)``:
    the gradient applied by update ``t`` is computed on the version one older than the one it
    updates, the same staleness of one for every stage, so step ``t`` runs on ``W(max(t-1, 0))``.
    Each stage then holds at most two versions: ``W(t)`` (in use by step ``t+1``) and the newest
    ``W(t+1)``.

    PipeDream-Flush, GPipe, interleaved and zb-h1 (version lag 0):
    ``W(t+1) = W(t) - lr * grad f(W(t))``, plain minibatch SGD.
    """
    lag = schedules.get(schedule).version_lag
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return max(step - lag, 0)


def check_schedule(schedule: str) -> None:
    """Raise ConfigError unless the runtime (``PipelineTrainer``) can run ``schedule``."""
    sched = schedules.get(schedule)
    if sched.name not in SCHEDULES:
        raise ConfigError(f"schedule {schedule!r} has action lists (pd2bw_ray/schedules) but the "
                          f"runtime cannot run it yet; choose one of {', '.join(SCHEDULES)}")


def check_shape(schedule: str, num_stages: int, num_microbatches: int,
                stages_per_rank: int = 1) -> None:
    """Raise ConfigError unless the runtime can run ``schedule`` on ``num_stages`` ranks per
    pipeline, each holding ``stages_per_rank`` stages, with ``m`` microbatches per step."""
    check_schedule(schedule)
    schedules.get(schedule).check_shape(num_stages, num_microbatches, stages_per_rank)


def _lower(sched: Schedule, rank: int, d: int, m: int, first_step: int, last_step: int,
           v: int) -> list[list[Action]]:
    """The one lowering pass: the schedule's computations of ``rank`` for a call, with the
    messages, reductions and updates added, cut into one chunk per step."""
    n = last_step - first_step + 1
    last_stage = d * v - 1
    lag = sched.version_lag
    chunks: list[list[Action]] = [[] for _ in range(n)]
    chunk = 0
    pending_updates: deque[int] = deque()   # lag > 0: reduced steps whose UPDATE is not placed yet
    forwards_left = [m * v] * n             # per step of the call, on this rank
    weights_left = [m * v] * n              # weight gradients (B or W) still to compute
    started = [False] * n                   # whether the rank ran a forward of the step

    for c in sched.compute_order(rank, d, m, first_step, n, v):
        t, i, s = c.step, c.microbatch, c.stage
        if not (first_step <= t <= last_step and 0 <= i < m and s is not None
                and 0 <= s <= last_stage and s % d == rank and c.kind in COMPUTE):
            raise ScheduleError(f"schedule {sched.name!r}: rank {rank} of {d} computes {c} "
                                f"(stage {s}), outside its stages or the call")
        k = t - first_step
        tag = s if v > 1 else None      # name the stage only where a rank holds several
        ver = weight_version(sched.name, t)
        emit = chunks[chunk].append
        if c.kind is Kind.FORWARD:
            if not started[k]:
                started[k] = True
                # The version this step runs on must exist before its first forward: place the
                # updates that create it, as late as possible (2bw: UPDATE(t-2) before step t).
                while pending_updates and pending_updates[0] + 1 <= ver:
                    u = pending_updates.popleft()
                    emit(Action(Kind.UPDATE, u, version=u + 1))
            if s > 0:
                emit(Action(Kind.RECV_ACT, t, i, peer=s - 1, stage=tag))
            emit(Action(Kind.FORWARD, t, i, version=ver, stage=tag))
            if s < last_stage:
                emit(Action(Kind.SEND_ACT, t, i, peer=s + 1, stage=tag))
            forwards_left[k] -= 1
            if lag and forwards_left[k] == 0 and k < n - 1:
                chunk += 1      # a pipelined chunk ends with the rank's last forward of its step
            continue
        if c.kind in (Kind.BACKWARD, Kind.BACKWARD_INPUT):
            # B, and I alike, take the output gradient and send the input gradient at once
            if s < last_stage:
                emit(Action(Kind.RECV_GRAD, t, i, peer=s + 1, stage=tag))
            emit(Action(c.kind, t, i, version=ver, stage=tag))
            if s > 0:
                emit(Action(Kind.SEND_GRAD, t, i, peer=s - 1, stage=tag))
        else:
            emit(Action(c.kind, t, i, version=ver, stage=tag))
        if c.kind in (Kind.BACKWARD, Kind.BACKWARD_WEIGHT):
            weights_left[k] -= 1
            if weights_left[k] == 0:
                emit(Action(Kind.REDUCE, t))
                if lag:
                    pending_updates.append(t)
                else:
                    emit(Action(Kind.UPDATE, t, version=t + 1))
                    if k < n - 1:
                        chunk += 1   # a drained chunk is its whole step
    if any(forwards_left) or any(weights_left):
        raise ScheduleError(f"schedule {sched.name!r}: rank {rank} of {d} ({v} stages per rank, "
                            f"m={m}) leaves forwards {forwards_left} and weight gradients "
                            f"{weights_left} per step undone")
    for u in pending_updates:   # the drain at the end of the call
        chunks[-1].append(Action(Kind.UPDATE, u, version=u + 1))
    return chunks


def call_actions(schedule: str, stage: int, num_stages: int, num_microbatches: int,
                 first_step: int, last_step: int, stages_per_rank: int = 1) -> list[list[Action]]:
    """All actions of rank ``stage`` of ``num_stages`` for a call covering steps
    ``first_step..last_step``, one list per step (chunk). See the module docstring for where
    chunks are cut."""
    sched = schedules.get(schedule)
    sched.check_shape(num_stages, num_microbatches, stages_per_rank)
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} out of range for {num_stages} stages")
    if last_step < first_step:
        raise ValueError(f"empty call: last_step {last_step} < first_step {first_step}")
    if first_step < 0:
        raise ValueError(f"first_step must be >= 0, got {first_step}")
    return _lower(sched, stage, num_stages, num_microbatches, first_step, last_step,
                  stages_per_rank)


def step_actions(schedule: str, stage: int, num_stages: int, num_microbatches: int,
                 step: int, first_step: int, is_last: bool, stages_per_rank: int = 1
                 ) -> list[Action]:
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
    # call starting two steps earlier yields the same chunk; a drained chunk is one step.
    lag = schedules.get(schedule).version_lag
    window_first = max(first_step, step - 2) if lag else step
    last = step if is_last else step + 1
    return call_actions(schedule, stage, num_stages, num_microbatches,
                        window_first, last, stages_per_rank)[step - window_first]


def stage_actions(schedule: str, stage: int, num_stages: int, num_microbatches: int,
                  num_steps: int, first_step: int = 0, stages_per_rank: int = 1) -> list[Action]:
    """The whole action list of rank ``stage`` for a call of ``num_steps`` steps."""
    chunks = call_actions(schedule, stage, num_stages, num_microbatches,
                          first_step, first_step + num_steps - 1, stages_per_rank)
    return [a for c in chunks for a in c]


# ------------------------------------------------------------------------------------------------
# Simulation: run all ranks' action lists against each other.


class ScheduleError(RuntimeError):
    """The action lists of a schedule do not fit together (deadlock, mismatched message, ...)."""


@dataclass(frozen=True)
class SimulationResult:
    """What a simulated run of all ranks did (per rank = per stage when each holds one)."""

    rounds: int                      # scheduler rounds until every rank finished
    max_in_flight: tuple[int, ...]   # per rank: most microbatches forwarded whose input gradient
    #                                  (B or I) is not computed yet, over all its stages
    max_live_versions: tuple[int, ...]  # per rank: most weight versions alive at once
    order: tuple[tuple[int, Action], ...]  # (rank, action) in a valid global execution order
    max_held: tuple[int, ...] = ()   # per rank: most microbatches forwarded whose weight gradient
    #                                  (B or W) is not computed yet: the activations it keeps


def simulate(schedule: str, actions: Sequence[Sequence[Action]], num_microbatches: int,
             first_step: int = 0) -> SimulationResult:
    """Execute every rank's action list against the others, like processes would.

    ``actions[r]`` is rank ``r``'s list; an action naming a ``stage`` belongs to that stage, which
    must live on rank ``stage % d``, and one without belongs to stage ``r``. Sends never block
    (they are asynchronous in the runtime); a receive blocks until a send was issued on that
    channel, FIFO per (sending rank, receiving rank, kind) however many stages share the ranks,
    and must match it in stage, step and microbatch. ``UPDATE(t)`` blocks until every rank issued
    ``REDUCE(t)`` (the most any reduction waits for: the global gradient norm spans all stages).
    A computation needs its weight version to exist, and a rank keeps only versions still in use
    or the newest ``lag + 1``. ``B`` or ``I`` follows the microbatch's ``F`` on that stage and
    version, ``W`` follows its ``I``, and ``REDUCE(t)`` follows every weight gradient of step
    ``t`` on the rank. Raises ScheduleError on a deadlock or any mismatch.
    """
    lag = schedules.get(schedule).version_lag
    d = len(actions)
    stage_of = [[r if a.stage is None else a.stage for a in acts]
                for r, acts in enumerate(actions)]
    num_stages = max([d] + [s + 1 for ss in stage_of for s in ss])
    for r, acts in enumerate(actions):
        for j, a in enumerate(acts):
            s = stage_of[r][j]
            if a.kind in (Kind.REDUCE, Kind.UPDATE) and a.stage is not None:
                raise ScheduleError(f"rank {r} action {j} ({a}): {a.kind.name} covers every "
                                    "stage of the rank and names none")
            if s % d != r:
                raise ScheduleError(f"rank {r} action {j} ({a}): stage {s} lives on rank "
                                    f"{s % d} of {d}")
    pcs = [0] * d
    channels: dict[tuple[int, int, str], deque[tuple[int, int, int]]] = {}
    reduced: dict[int, set[int]] = {}
    versions: list[set[int]] = [set(range(weight_version(schedule, first_step), first_step + 1))
                                for _ in range(d)]
    newest = [first_step] * d
    # per rank: (stage, step, microbatch) -> [version, input gradient done]
    in_flight: list[dict[tuple[int, int, int], list]] = [{} for _ in range(d)]
    max_in_flight = [0] * d
    max_held = [0] * d
    max_versions = [len(v) for v in versions]
    order: list[tuple[int, Action]] = []
    rounds = 0

    def gc_versions(r: int) -> None:
        used = {v for v, _ in in_flight[r].values()}
        versions[r] = {v for v in versions[r] if v in used or newest[r] - lag <= v}

    while any(pcs[r] < len(actions[r]) for r in range(d)):
        rounds += 1
        progressed = False
        for r in range(d):
            while pcs[r] < len(actions[r]):
                a = actions[r][pcs[r]]
                s = stage_of[r][pcs[r]]
                where = f"rank {r} action {pcs[r]} ({a})" if num_stages > d else \
                    f"stage {s} action {pcs[r]} ({a})"
                key = (s, a.step, a.microbatch)
                if a.kind in (Kind.SEND_ACT, Kind.SEND_GRAD):
                    want = s + 1 if a.kind is Kind.SEND_ACT else s - 1
                    if a.peer != want or not 0 <= a.peer < num_stages:
                        raise ScheduleError(f"{where}: sends to stage {a.peer}, expected {want}")
                    channels.setdefault((r, a.peer % d, a.kind.value), deque()).append(key)
                elif a.kind in (Kind.RECV_ACT, Kind.RECV_GRAD):
                    want = s - 1 if a.kind is Kind.RECV_ACT else s + 1
                    if a.peer != want or not 0 <= a.peer < num_stages:
                        raise ScheduleError(f"{where}: receives from stage {a.peer}, "
                                            f"expected {want}")
                    sent_kind = "SA" if a.kind is Kind.RECV_ACT else "SG"
                    q = channels.get((a.peer % d, r, sent_kind))
                    if not q:
                        break   # blocked
                    got = q.popleft()
                    if got != (a.peer, a.step, a.microbatch):
                        raise ScheduleError(f"{where}: receives step {a.step} microbatch "
                                            f"{a.microbatch} from stage {a.peer} but stage "
                                            f"{got[0]} sent step {got[1]} microbatch {got[2]} "
                                            "first")
                elif a.kind is Kind.FORWARD:
                    if a.version not in versions[r]:
                        raise ScheduleError(f"{where}: needs weight version {a.version}, but "
                                            f"rank {r} holds {sorted(versions[r])}")
                    if key in in_flight[r]:
                        raise ScheduleError(f"{where}: forward of a microbatch already in flight")
                    in_flight[r][key] = [a.version, False]
                elif a.kind in (Kind.BACKWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT):
                    entry = in_flight[r].get(key)
                    if entry is None or entry[0] != a.version:
                        raise ScheduleError(f"{where}: backward without a forward of that "
                                            "microbatch on the same weight version")
                    if a.kind is Kind.BACKWARD_WEIGHT:
                        if not entry[1]:
                            raise ScheduleError(f"{where}: weight gradient before the input "
                                                "gradient (I) of that microbatch")
                        del in_flight[r][key]
                    elif entry[1]:
                        raise ScheduleError(f"{where}: a second backward of that microbatch")
                    elif a.kind is Kind.BACKWARD:
                        del in_flight[r][key]
                    else:
                        entry[1] = True
                elif a.kind is Kind.REDUCE:
                    if any(st == a.step for _, st, _ in in_flight[r]):
                        raise ScheduleError(f"{where}: reduces step {a.step} before all its "
                                            "weight gradients")
                    reduced.setdefault(a.step, set()).add(r)
                elif a.kind is Kind.UPDATE:
                    if r not in reduced.get(a.step, ()):
                        raise ScheduleError(f"{where}: update before its own REDUCE")
                    if len(reduced[a.step]) < d:
                        break   # waits for the slowest rank's reduction
                    if a.version != newest[r] + 1:
                        raise ScheduleError(f"{where}: creates version {a.version} but the "
                                            f"newest is {newest[r]}")
                    newest[r] = a.version
                    versions[r].add(a.version)
                else:  # pragma: no cover - Kind is closed
                    raise ScheduleError(f"{where}: unknown action")
                max_in_flight[r] = max(max_in_flight[r],
                                       sum(not done for _, done in in_flight[r].values()))
                max_held[r] = max(max_held[r], len(in_flight[r]))
                gc_versions(r)
                max_versions[r] = max(max_versions[r], len(versions[r]))
                order.append((r, a))
                pcs[r] += 1
                progressed = True
        if not progressed:
            stuck = "; ".join(f"rank {r} waits at action {pcs[r]} ({actions[r][pcs[r]]})"
                              for r in range(d) if pcs[r] < len(actions[r]))
            raise ScheduleError(f"deadlock: {stuck}")
    leftovers = {k: q for k, q in channels.items() if q}
    if leftovers:
        raise ScheduleError(f"messages sent but never received: {leftovers}")
    for r in range(d):
        if in_flight[r]:
            raise ScheduleError(f"rank {r} ends with microbatches in flight (stage, step, "
                                f"microbatch): {sorted(in_flight[r])}")
    return SimulationResult(rounds, tuple(max_in_flight), tuple(max_versions), tuple(order),
                            tuple(max_held))


def format_actions(actions: Iterable[Action]) -> str:
    """A compact one-line rendering, e.g. ``RA0.1:0 F0.1@v0 SA0.1:2``."""
    return " ".join(str(a) for a in actions)
