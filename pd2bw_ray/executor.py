"""Executes a stage's action lists: the schedule's actions against a Stage and a Transport.

The executor knows nothing about which schedule produced the actions. Per action:
``RECV_*`` take a message registered earlier (activations: when the chunk starts; gradients: when
the matching activation was sent), ``F``/``B`` (or a split backward's ``I`` and ``W``) call the
Stage, ``SEND_*`` hand tensors to the transport (asynchronous), ``REDUCE`` starts the step's
gradient reduction on a background thread and ``UPDATE`` waits for it and applies the optimizer.
Every action is logged with its start and end time, which is what the timeline and the per-stage
compute/communication/idle fractions use.
"""

from __future__ import annotations

import math
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple, Sequence

import torch

from .collectives import CommError, Transport, message_tag
from .schedule import Action, Kind
from .stage import Stage, StageError, clip_coefficient
from .watchdog import Activity

# How the time of each action kind counts: computing, communicating, or waiting for a peer.
CATEGORY = {
    Kind.FORWARD: "compute", Kind.BACKWARD: "compute", Kind.UPDATE: "compute",
    Kind.BACKWARD_INPUT: "compute", Kind.BACKWARD_WEIGHT: "compute",
    Kind.SEND_ACT: "comm", Kind.SEND_GRAD: "comm", Kind.REDUCE: "comm",
    Kind.RECV_ACT: "wait", Kind.RECV_GRAD: "wait",
}


@dataclass(frozen=True)
class TieSpec:
    """One cross-stage tied parameter as held by this stage: ``name`` (canonical on this stage)
    is summed over ``group``; its gradient counts once in the global norm (``counts_in_norm``
    on the first holder only)."""

    group: str
    name: str
    counts_in_norm: bool


@dataclass(frozen=True)
class ReduceSpec:
    """How a stage reduces a step's gradients."""

    stage: int
    replica: int
    num_stages: int
    num_replicas: int
    max_grad_norm: float | None = None
    ties: tuple[TieSpec, ...] = ()
    ranks_per_pipeline: int = 0     # p when ranks hold virtual stages (stage s on rank s % p)

    @property
    def position(self) -> int:
        """The stage's rank within its pipeline (its stage, unless ranks hold several)."""
        return self.stage % self.ranks_per_pipeline if self.ranks_per_pipeline else self.stage


class Event(NamedTuple):
    """One executed action: how its time counts (``CATEGORY``: compute, comm or wait), the
    ``Action`` itself, and its wall-clock start and end (seconds)."""

    category: str
    action: Action
    start: float
    end: float


@dataclass
class ChunkResult:
    """What one chunk did: losses computed (last stage), global gradient norms of the steps it
    updated, and the wall-clock (start, end) of every action it executed, in order. Only the
    times travel back: the caller holds the actions (``events`` pairs them; Actions would
    pickle about 20 times slower than their times)."""

    losses: list[tuple[int, int, float]] = field(default_factory=list)
    grad_norms: dict[int, float] = field(default_factory=dict)
    times: list[tuple[float, float]] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)

    def events(self, actions: Sequence[Action]) -> list[Event]:
        """The ``Event`` of each executed action (``actions``: the chunk's, as run)."""
        return [Event(CATEGORY[a.kind], a, t0, t1) for a, (t0, t1) in zip(actions, self.times)]


class PipelineFailure(RuntimeError):
    """Training stopped: the message names the stage, replica, step and cause."""


class NonFiniteError(PipelineFailure):
    """A loss or gradient was NaN or infinite. Deterministic: restarting would repeat it."""


class StageExecutor:
    """Runs the actions of one rank: its Stage, or several (virtual) stages keyed by index, each
    with its ReduceSpec. Actions naming a ``stage`` go to that one."""

    def __init__(self, stage: Stage | Mapping[int, Stage], transport: Transport,
                 reduce: ReduceSpec | Mapping[int, ReduceSpec], num_microbatches: int,
                 timeout_s: float, activity: Activity | None = None):
        self.stages = dict(stage) if isinstance(stage, Mapping) else {stage.stage: stage}
        self.specs = dict(reduce) if isinstance(reduce, Mapping) else {reduce.stage: reduce}
        self.stage = self.stages[min(self.stages)]
        self.spec = self.specs[min(self.specs)]
        self.activity = activity if activity is not None else Activity()   # for the heartbeat
        self.transport = transport
        self.m = num_microbatches
        self.timeout_s = timeout_s
        self.where = (f"stage {self.spec.stage} replica {self.spec.replica}"
                      if len(self.stages) == 1 else
                      f"stages {sorted(self.stages)} replica {self.spec.replica}")
        self._reducer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pd2bw-reduce")
        self._reductions: dict[int, Future] = {}
        # keyed by (stage or None, step, microbatch)
        self._outputs: dict[tuple, tuple] = {}
        self._received: dict[tuple, list[torch.Tensor]] = {}
        self._input_grads: dict[tuple, list[torch.Tensor]] = {}
        # Virtual stages: messages between two stages of this rank, and gradient receives posted
        # in the order the actions take them (their layout is known once the activation went)
        self._local: dict[tuple, list[torch.Tensor]] = {}
        self._grad_order: dict[int, deque] = {}         # peer rank position -> tags, in order
        self._grad_layouts: dict[tuple[int, int], Any] = {}   # (peer position, tag) -> layout

    # ------------------------------------------------------------------ running a chunk

    def run(self, actions: Sequence[Action], inputs: Mapping[tuple[int, int], Any] | None = None,
            targets: Mapping[tuple[int, int], Any] | None = None) -> ChunkResult:
        inputs = inputs or {}
        targets = targets or {}
        result = ChunkResult()
        for a in actions:   # register every activation this chunk will receive, in order
            if a.kind is Kind.RECV_ACT and not self._is_local(a):
                self.transport.expect(self._peer(a), "act", self._tag(a), None)
            elif a.kind is Kind.RECV_GRAD and a.stage is not None and not self._is_local(a):
                self._grad_order.setdefault(self._peer(a), deque()).append(self._tag(a))
        self._post_grads()
        for a in actions:
            t0 = time.time()
            self.activity.progress(a)
            try:
                self._execute(a, inputs, targets, result)
            except _NonFinite as e:
                raise NonFiniteError(f"{self.where}: {e}") from None
            except (CommError, StageError, PipelineFailure) as e:
                raise PipelineFailure(str(e) if str(e).startswith(self.where)
                                      else f"{self.where}: {a}: {e}") from e
            except Exception as e:
                raise PipelineFailure(f"{self.where}: {a} (step {a.step}) failed: "
                                      f"{type(e).__name__}: {e}") from e
            result.times.append((t0, time.time()))
        result.versions = self.stage.versions()
        return result

    def _tag(self, a: Action) -> int:
        if a.stage is None:
            return message_tag(a.step, a.microbatch, self.m)
        # virtual stages: one tag per (link between stages, step, microbatch)
        link = min(a.stage, a.peer)
        return message_tag(a.step, link * self.m + a.microbatch, self.m * self.spec.num_stages)

    def _peer(self, a: Action) -> int:
        """The rank position the message goes to or comes from (the transport's peer)."""
        p = self.spec.ranks_per_pipeline
        return a.peer % p if a.stage is not None and p else a.peer

    def _is_local(self, a: Action) -> bool:
        return a.stage is not None and a.peer in self.stages

    def _receive(self, a: Action, kind: str, what: str) -> Any:
        """A RECV_ACT's activation or a RECV_GRAD's gradient (``kind`` "act" or "grad"): handed
        over in place by a stage of this rank, or taken from the peer rank's link."""
        if self._is_local(a):
            return self._local.pop((kind, a.stage, a.step, a.microbatch))
        return self.transport.take(self._peer(a), kind, self._tag(a),
                                   f"{what} of step {a.step} microbatch {a.microbatch}")

    def _post_grads(self) -> None:
        """Post the gradient receives whose turn it is and whose layout is known."""
        for peer, order in self._grad_order.items():
            while order and (peer, order[0]) in self._grad_layouts:
                tag = order.popleft()
                self.transport.expect(peer, "grad", tag, self._grad_layouts.pop((peer, tag)))

    def _execute(self, a: Action, inputs, targets, result: ChunkResult) -> None:
        key = (a.step, a.microbatch)
        ikey = (a.stage, a.step, a.microbatch)
        stage = self.stage if a.stage is None else self.stages[a.stage]
        k = a.kind
        if k is Kind.RECV_ACT:
            self._received[ikey] = self._receive(a, "act", "activation")
        elif k is Kind.FORWARD:
            if stage.stage == 0:
                if key not in inputs:
                    raise StageError(f"no input data for step {a.step} microbatch {a.microbatch}")
                x = inputs[key]
                x = tuple(x) if isinstance(x, (tuple, list)) else (x,)
            else:
                x = tuple(self._received.pop(ikey))
            if stage.is_last:
                if key not in targets:
                    raise StageError(f"no targets for step {a.step} microbatch {a.microbatch}")
                loss = stage.forward(a.step, a.microbatch, a.version, x,
                                     _to_device(targets[key], stage.device))
                if not math.isfinite(loss):
                    raise _NonFinite(
                        f"the loss is {loss} at step {a.step} microbatch {a.microbatch}; training "
                        f"stopped (the newest weights are version {stage.newest_version}, "
                        "from before this step)")
                result.losses.append((a.step, a.microbatch, loss))
            else:
                self._outputs[ikey] = stage.forward(a.step, a.microbatch, a.version, x)
        elif k is Kind.SEND_ACT:
            out = self._outputs.pop(ikey)
            if self._is_local(a):
                self._local[("act", a.peer, a.step, a.microbatch)] = list(out)
            elif a.stage is None:
                self.transport.send(a.peer, "act", self._tag(a), out)
                self.transport.expect(a.peer, "grad", self._tag(a), Stage.grad_layout(out))
            else:
                peer = self._peer(a)
                self.transport.send(peer, "act", self._tag(a), out)
                self._grad_layouts[(peer, self._tag(a))] = Stage.grad_layout(out)
                self._post_grads()
        elif k is Kind.RECV_GRAD:
            self._received[ikey] = self._receive(a, "grad", "gradient")
        elif k in (Kind.BACKWARD, Kind.BACKWARD_INPUT):
            # a whole backward, or the input-gradient half of a split one (Zero Bubble's I)
            grads = None if stage.is_last else self._received.pop(ikey)
            run = stage.backward if k is Kind.BACKWARD else stage.backward_input
            gin = run(a.step, a.microbatch, grads)
            if stage.stage > 0:
                self._input_grads[ikey] = gin
        elif k is Kind.BACKWARD_WEIGHT:
            stage.backward_weight(a.step, a.microbatch)
        elif k is Kind.SEND_GRAD:
            gin = self._input_grads.pop(ikey)
            if self._is_local(a):
                self._local[("grad", a.peer, a.step, a.microbatch)] = gin
            else:
                self.transport.send(self._peer(a), "grad", self._tag(a), gin)
        elif k is Kind.REDUCE:
            grads = {s: st.take_grads(a.step) for s, st in sorted(self.stages.items())}
            self._reductions[a.step] = self._reducer.submit(self._reduce, a.step, grads)
        elif k is Kind.UPDATE:
            fut = self._reductions.pop(a.step, None)
            if fut is None:
                raise StageError(f"update of step {a.step} before its reduction")
            try:
                grads, coef, norm = fut.result(timeout=4 * self.timeout_s + 10)
            except FutureTimeout:
                raise CommError(f"gradient reduction of step {a.step} did not finish within "
                                f"{4 * self.timeout_s:.0f} s") from None
            for s, st in sorted(self.stages.items()):
                st.apply_update(a.step, grads[s], coef)
            result.grad_norms[a.step] = norm
        else:  # pragma: no cover
            raise StageError(f"unknown action {a}")

    # ------------------------------------------------------------------ gradient reduction

    def _reduce(self, step: int, grads_of: dict[int, list[torch.Tensor]]
                ) -> tuple[dict[int, list[torch.Tensor]], float, float]:
        """Sum over replicas (and over the holders of tied weights), then the global norm and
        the clipping factor, for every stage of the rank (``grads_of``: stage -> gradients).
        Runs on the reducer thread, one step after another, so every rank issues its
        collectives in the same order."""
        sq = torch.zeros((), dtype=torch.float64)
        bad: list[str] = []
        device: Any = "cpu"
        for s, grads in grads_of.items():
            spec, names = self.specs[s], self.stages[s].param_names
            tied = {t.name: t for t in spec.ties}
            if spec.num_replicas > 1:
                idx = [i for i, n in enumerate(names) if n not in tied]
                for dtype in sorted({grads[i].dtype for i in idx}, key=str):
                    part = [i for i in idx if grads[i].dtype == dtype]
                    flat = torch.cat([grads[i].reshape(-1) for i in part])
                    self.transport.allreduce(f"replicas:{spec.position}", flat)
                    self.activity.progress()
                    off = 0
                    for i in part:
                        n = grads[i].numel()
                        grads[i] = flat[off:off + n].view_as(grads[i])
                        off += n
            for t in sorted(spec.ties, key=lambda t: t.group):
                self.transport.allreduce(t.group, grads[names.index(t.name)])
                self.activity.progress()
            # Per-tensor norms (one pass over each gradient, no float64 copy; low-precision
            # gradients in float32), squared and summed in float64: torch's clip_grad_norm_
            # math.
            counted = [(n, g) for n, g in zip(names, grads)
                       if not (n in tied and not tied[n].counts_in_norm)]
            if counted:
                norms = torch.stack([
                    torch.linalg.vector_norm(g.detach(), dtype=torch.float32 if g.dtype in (
                        torch.float16, torch.bfloat16) else None).double()
                    for _, g in counted]).cpu()
                bad += [n for (n, _), v in zip(counted, norms.tolist()) if not math.isfinite(v)]
                sq = sq + norms.pow(2).sum()
            if grads:
                device = grads[0].device
        spec = self.spec
        if spec.max_grad_norm is not None and spec.num_stages > 1:
            total = sq.reshape(1).to(device)
            self.transport.allreduce(f"pipeline:{spec.replica}", total)
            self.activity.progress()
            sq = total.cpu().reshape(())
        norm = math.sqrt(float(sq)) if math.isfinite(float(sq)) else float("nan")
        if bad or not math.isfinite(norm):
            which = (f"parameters {bad[:5]}" if bad else "another stage's parameters")
            raise _NonFinite(f"non-finite gradient at step {step} ({which}); training stopped "
                             f"before applying it, the newest weights are still version "
                             f"{self.stage.newest_version}")
        return grads_of, clip_coefficient(norm, spec.max_grad_norm), norm

    # ------------------------------------------------------------------ end of a call

    def finish(self) -> None:
        """After a call's last chunk: every send delivered, nothing left half-done."""
        self.transport.wait_sends()
        if (self._reductions or self._outputs or self._received or self._input_grads
                or self._local or any(self._grad_order.values()) or self._grad_layouts):
            raise PipelineFailure(f"{self.where}: the call ended with work left over "
                                  f"(reductions {sorted(self._reductions)}, in flight "
                                  f"{[st.in_flight() for _, st in sorted(self.stages.items())]})")

    def close(self) -> None:
        self._reducer.shutdown(wait=False, cancel_futures=True)
        self.transport.close()


class _NonFinite(StageError):
    """Raised inside the executor for a non-finite loss or gradient (see NonFiniteError)."""


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x
