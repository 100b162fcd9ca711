"""The driver: ``PipelineTrainer`` validates a pipeline, starts its stage actors and streams steps.

For each step the driver computes every stage's actions (``schedule.step_actions``) and hands
them, with the step's inputs (first stage) and targets (last stage), to each stage replica as a
chunk: one step, or several consecutive steps when steps are short (a chunk is about
``CHUNK_SECONDS`` of work, so the cost of a Ray call is paid per chunk, not per step). Actors
execute whole chunks and talk to each other directly; the driver only submits chunks a couple
ahead, so that a 2bw pipeline never waits for it, and collects losses.

Stage replicas run as Ray actors (``local=False``, the default) or as objects on threads of this
process (``local=True``: same code, in-process transport, no Ray; for tests and debugging); the
pools that reach them are in ``pool.py``, where the actors are placed in ``placement.py``.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .actor import CommSetup, StageActor, plan_stages
from .collectives import ThreadHub
from . import schedules
from .config import (SCHEDULES, ActorResources, CommConfig, ConfigError, PipelineConfig,
                     StageOptions)
from .executor import ChunkResult, Event, PipelineFailure
from .metrics import DriverMetrics, time_fractions
from .progress import ProgressBar
from .schedule import check_shape, step_actions
from .placement import actor_options, check_resources, stage_placement_group
from .pool import Pool, RayPool, ThreadPool
from .stage import OptimizerFactory
from .watchdog import Watchdog
from .wire import to_wire

_END = object()
LOOKAHEAD_CHUNKS = 2      # chunks submitted ahead of the oldest unfinished one
CHUNK_SECONDS = 0.25      # short steps are grouped into chunks of about this duration ...
MAX_STEPS_PER_CHUNK = 16  # ... of at most this many steps


# ------------------------------------------------------------------------------------------------


@dataclass
class _CallState:
    """One ``train()`` call in progress: what was submitted and not yet gathered, the losses
    of its steps as they come in, and what it reports."""

    first: int                                  # the call's first step
    on_step: Callable[[int, float], None] | None
    events: dict[tuple[int, int], list[Event]]  # per (stage, replica), executed actions
    bar: ProgressBar | None = None
    outstanding: list[tuple[list, list]] = field(default_factory=list)   # (calls, actions)
    losses: dict[int, list[float]] = field(default_factory=dict)  # step -> losses so far
    reported: dict[int, float] = field(default_factory=dict)      # step -> mean loss
    samples: dict[int, int] = field(default_factory=dict)         # step -> samples in it
    done_samples: int = 0                       # samples of the steps reported so far
    pending_error: BaseException | None = None  # a bad next step, raised after the drain
    t_call: float = field(default_factory=time.time)


@dataclass(frozen=True)
class StepData:
    """One step's microbatches split by replica: ``inputs[r][i]``, ``targets[r][i]``."""

    inputs: list[list[Any]]
    targets: list[list[Any]]
    samples: int       # over all microbatches: the first dimension of each one's first tensor


class PipelineTrainer:
    """Pipeline-parallel training of a chain of modules over Ray actors.

    ``modules[k]``'s output feeds ``modules[k+1]`` (a tuple is unpacked into its arguments); a
    microbatch's inputs go to module 0 and ``loss_fn(last_output, targets)`` gives its loss.
    ``config`` says which stage runs each module and which ranks run each stage (replicas).
    ``schedule`` is "2bw" (PipeDream-2BW: ``W(t+1) = W(t) - update(grad f(W(t-1)))``), "flush",
    "gpipe", "zb-h1" (Zero Bubble H1) or "interleaved" (Megatron's, over the virtual stages of a
    ``config`` whose stage ``s`` and ``s + p`` share ranks), the last four all
    ``W(t+1) = W(t) - update(grad f(W(t)))``. Each step is one weight update over
    ``num_microbatches`` microbatches per replica. ``tied_parameters`` lists groups of names
    ("<module index>.<parameter name>") that are one weight (they start from the first name's
    value, their gradients are summed, they stay identical). ``max_grad_norm`` clips by the
    global norm over all stages. ``lr_schedule(step)`` multiplies every parameter group's initial
    learning rate at update ``step`` (``torch.optim.lr_scheduler.LambdaLR`` semantics). Modules
    may be given as zero-argument factories (built on the actor, e.g. for models too big for the
    driver). ``local=True`` runs the stages on threads of this process instead of Ray actors.
    """

    def __init__(
        self,
        modules: Sequence[nn.Module | Callable[[], nn.Module]],
        loss_fn: Callable[[Any, Any], torch.Tensor],
        config: PipelineConfig | Mapping | str,
        optimizer_factory: OptimizerFactory,
        schedule: str = "2bw",
        num_microbatches: int = 4,
        tied_parameters: Sequence[Sequence[str]] | None = None,
        max_grad_norm: float | None = None,
        initial_state_dict: Mapping[str, torch.Tensor] | None = None,
        *,
        lr_schedule: Callable[[int], float] | None = None,
        resources: ActorResources | None = None,
        stage_options: StageOptions | None = None,
        comm: CommConfig | None = None,
        seed: int = 0,
        name: str | None = None,
        local: bool = False,
    ) -> None:
        if isinstance(config, str):
            config = PipelineConfig.from_json(config)
        elif isinstance(config, Mapping):
            config = PipelineConfig.from_dict(config)
        if not isinstance(config, PipelineConfig):
            raise ConfigError(f"config must be a PipelineConfig, a dict or a conf.json path, "
                              f"got {type(config).__name__}")
        self.config = config
        self.schedule = schedule
        self.num_microbatches = int(num_microbatches)
        self.resources = resources or ActorResources()
        self.stage_options = stage_options or StageOptions()
        self.comm = comm or CommConfig()
        self.local = local
        self.name = name or f"pd2bw-{uuid.uuid4().hex[:8]}"
        d = config.num_stages
        if config.stages_per_rank > 1 and not schedules.get(schedule).virtual:
            p = config.ranks_per_pipeline
            raise ConfigError(
                f"{config.source}: rank {config.rank(p, 0)} is used twice (stage 0 and stage "
                f"{p}); under schedule {schedule!r} each rank runs exactly one stage replica "
                f"(stage s and s + {p} may share ranks as virtual stages under "
                + " or ".join(repr(n) for n, sc in schedules.REGISTRY.items()
                              if sc.virtual and n in SCHEDULES) + ")")
        check_shape(schedule, config.ranks_per_pipeline, self.num_microbatches,
                    config.stages_per_rank)
        if not modules:
            raise ConfigError("modules is empty; pass the list of torch.nn.Module the pipeline "
                              "chains")
        if not callable(loss_fn):
            raise ConfigError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if not callable(optimizer_factory):
            raise ConfigError("optimizer_factory must be callable: "
                              "lambda params: torch.optim.Adam(params, lr=1e-3)")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0 (or None), got {max_grad_norm}")
        for s in self.stage_options.recompute:
            if not 0 <= s < d:
                raise ConfigError(f"StageOptions.recompute names stage {s}; stages are "
                                  f"0..{d - 1}")
        shapes, names = _shapes_and_names(modules)
        self._plan = plan_stages(
            config, len(modules), shapes, tied_parameters, num_microbatches=self.num_microbatches,
            max_grad_norm=max_grad_norm, device=self.resources.device,
            torch_threads=self.resources.torch_threads,
            recompute=self.stage_options.recompute,
            autocast_bf16=self.stage_options.autocast_bf16, timeout_s=self.comm.timeout_s,
            seed=seed, two_versions=(schedule == "2bw"))
        if initial_state_dict is not None:
            _check_state_keys(initial_state_dict, names)

        self._next_step = 0
        self._failed: str | None = None
        self._step_seconds: float | None = None    # measured wall time per step (chunk sizing)
        self._events: dict[tuple[int, int], list[Event]] = {}
        self._ray_started = False
        self._pool: Pool | None = None
        self._metrics: DriverMetrics | None = None
        if not local and self.comm.backend == "nccl" and self.resources.num_gpus <= 0:
            raise ConfigError("CommConfig.backend='nccl' needs GPU actors "
                              "(ActorResources(num_gpus=1))")
        self.backend = "thread" if local else "dist"
        if lr_schedule is not None and not callable(lr_schedule):
            raise ConfigError("lr_schedule must be a function of the step returning a factor")
        self._lr_schedule = lr_schedule
        # per actor row: a rank of the pipeline, holding its stage or its virtual stages
        self._actor_specs = self._plan.actor_specs()
        held = [sorted(k for spec in row[0] for k in spec.module_ids) for row in self._actor_specs]
        per_stage = [{k: modules[k] for k in ids} for ids in held]
        states = [None if initial_state_dict is None else
                  {k: v for k, v in initial_state_dict.items()
                   if int(k.split(".", 1)[0]) in ids} for ids in held]
        try:
            if local:
                self._start_threads(per_stage, loss_fn, optimizer_factory, states)
            else:
                self._start_ray(per_stage, loss_fn, optimizer_factory, states)
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ starting

    def _start_threads(self, per_stage, loss_fn, optimizer_factory, states) -> None:
        import copy

        hub = ThreadHub(self._plan.topology)
        actors = [[StageActor(_one(specs), copy.deepcopy(per_stage[q]), loss_fn,
                              optimizer_factory, states[q], self._lr_schedule)
                   for specs in row]
                  for q, row in enumerate(self._actor_specs)]
        self._pool = ThreadPool(actors, hub, Watchdog(self.comm.timeout_s))
        comm = CommSetup("thread", self.name, hub)
        self._all("setup", self._plan.topology, comm)
        self._all("sync_weights")

    def _start_ray(self, per_stage, loss_fn, optimizer_factory, states) -> None:
        import ray

        if not ray.is_initialized():
            ray.init()
            self._ray_started = True
        res = self.resources
        world = self.config.world_size
        check_resources(res, world)
        pg = stage_placement_group(self.name, res, world)
        remote_cls = ray.remote(concurrency_groups={"watch": 1})(StageActor)
        module_refs = [ray.put(m) for m in per_stage]
        actors = []
        p = self.config.ranks_per_pipeline
        for s, row in enumerate(self._actor_specs):
            actor_row = []
            for specs in row:
                opts = actor_options(self.name, s, specs[0].replica, p, res, pg)
                actor_row.append(remote_cls.options(**opts).remote(
                    _one(specs), module_refs[s], loss_fn if s == p - 1 else None,
                    optimizer_factory, states[s], self._lr_schedule))
            actors.append(actor_row)
        self._pool = RayPool(actors, pg, Watchdog(self.comm.timeout_s))
        self._all("where")      # every replica built before any waits on the others in setup
        self._all("setup", self._plan.topology,
                  CommSetup(self.backend, self.name, use_nccl=self.comm.backend != "gloo"))
        self._all("sync_weights")

    def _all(self, method: str, *args: Any) -> list[Any]:
        assert self._pool is not None
        calls = [(s, r, self._pool.call(s, r, method, *args))
                 for s, row in enumerate(self._actor_specs) for r in range(len(row))]
        return self._gather(calls)

    def _gather(self, calls):
        assert self._pool is not None
        try:
            return self._pool.gather(calls)
        except PipelineFailure as e:
            self._failed = str(e)
            raise

    # ------------------------------------------------------------------ training

    @property
    def num_stages(self) -> int:
        return self.config.num_stages

    @property
    def num_replicas(self) -> int:
        return self.config.num_replicas

    @property
    def step(self) -> int:
        """Number of weight updates made so far (the next step's index)."""
        return self._next_step

    def _check_alive(self) -> None:
        if self._failed is not None:
            raise PipelineFailure(f"this trainer stopped after a failure and cannot continue: "
                                  f"{self._failed}")
        if self._pool is None:
            raise PipelineFailure("this trainer was shut down")

    def _split(self, item: Any, t: int, position: int) -> StepData:
        m, w = self.num_microbatches, self.num_replicas
        if not isinstance(item, (list, tuple)) or len(item) != m * w:
            got = f"{len(item)} items" if isinstance(item, (list, tuple)) else type(item).__name__
            raise ConfigError(f"step {t} (item {position} of the steps passed to train): expected "
                              f"a list of num_microbatches x replicas = {m} x {w} = {m * w} "
                              f"(inputs, targets) microbatches, got {got}")
        inputs: list[list[Any]] = [[] for _ in range(w)]
        targets: list[list[Any]] = [[] for _ in range(w)]
        for j, mb in enumerate(item):
            if not isinstance(mb, (list, tuple)) or len(mb) != 2:
                raise ConfigError(f"step {t}, microbatch {j}: expected an (inputs, targets) pair, "
                                  f"got {type(mb).__name__}")
            inputs[j % w].append(mb[0])
            targets[j % w].append(mb[1])
        return StepData(inputs, targets, sum(_batch_size(mb[0]) for mb in item))

    def train(self, steps: Iterable[Sequence[tuple[Any, Any]]],
              on_step: Callable[[int, float], None] | None = None,
              progress: bool = False) -> list[float]:
        """Run one weight update per item of ``steps`` and return each step's mean loss.

        Each item holds ``num_microbatches * replicas`` (inputs, targets) microbatches; replica
        ``r`` takes items ``r::replicas``. Under 2bw the pipeline is not drained between steps,
        only at the end of the call, which changes nothing: training continues from the same
        state in the next call. ``on_step(step, loss)`` is called as each step's loss is known.
        ``progress=True`` shows steps, samples/s, loss and ETA (a bar in a terminal or notebook,
        plain lines in a log). Loss, samples/s and the update count also go to the Ray
        dashboard's metrics (``pd2bw_*``, see ``pd2bw_ray.metrics``).
        """
        self._check_alive()
        assert self._pool is not None
        first = self._next_step
        total = len(steps) if hasattr(steps, "__len__") else None   # type: ignore[arg-type]
        it = iter(steps)
        cur = next(it, _END)
        if cur is _END:
            return []
        first_data = self._split(cur, first, 0)    # bad first step: nothing has started
        if self._metrics is None and not self.local:
            self._metrics = DriverMetrics(self.name)
        call = _CallState(first, on_step, {key: [] for key in self._replicas()})
        if progress:
            call.bar = ProgressBar(total, first=first, samples_per_step=first_data.samples,
                                   desc=self.name)
        try:
            t = self._stream(call, it, first_data)
        except BaseException:
            for calls, _ in call.outstanding:
                self._pool.discard(calls)
            raise
        finally:
            if call.bar is not None:
                call.bar.close()
        self._all("finish")
        self._next_step = t
        self._events = call.events
        if call.pending_error is not None:
            # the steps before the bad one were trained and the pipeline drained cleanly
            raise call.pending_error
        missing = [st for st in range(first, t) if st not in call.reported]
        if missing:
            raise PipelineFailure(f"no loss reported for steps {missing}")
        return [call.reported[st] for st in range(first, t)]

    def _replicas(self) -> list[tuple[int, int]]:
        return [(s, r) for s in range(self.config.ranks_per_pipeline)
                for r in range(self.num_replicas)]

    def _stream(self, call: "_CallState", it, data: StepData) -> int:
        """Submit chunks of consecutive steps to every stage replica, a couple of chunks ahead of
        the slowest replica. A chunk holds one step, or as many as take about
        ``CHUNK_SECONDS`` (short steps: the cost of a driver call is per chunk). The step after
        a chunk is fetched and checked before the chunk is submitted, so a bad or failing next
        step ends the call with a clean drain (kept as ``call.pending_error``, raised after).
        Returns the index after the last trained step."""
        assert self._pool is not None
        d, m = self.config.ranks_per_pipeline, self.num_microbatches
        v = self.config.stages_per_rank
        t = call.first
        ahead: StepData | None = data     # the next step, fetched and checked
        while ahead is not None:
            chunk: list[StepData] = []
            size = self._steps_per_chunk()
            while ahead is not None and len(chunk) < size:
                chunk.append(ahead)
                ahead = self._fetch(call, it, t + len(chunk))
            calls, sent = [], []
            for s, r in self._replicas():
                acts, inputs, targets = [], {}, {}
                for j, step_data in enumerate(chunk):
                    st = t + j
                    acts += step_actions(self.schedule, s, d, m, st, call.first,
                                         ahead is None and j == len(chunk) - 1, v)
                    if s == 0:
                        inputs.update({(st, i): step_data.inputs[r][i] for i in range(m)})
                    if s == d - 1:
                        targets.update({(st, i): step_data.targets[r][i] for i in range(m)})
                calls.append((s, r, self._pool.call(s, r, "run", acts, to_wire(inputs) or None,
                                                    to_wire(targets) or None)))
                sent.append(acts)
            for j, step_data in enumerate(chunk):
                call.samples[t + j] = step_data.samples
            call.outstanding.append((calls, sent))
            t += len(chunk)
            while len(call.outstanding) > LOOKAHEAD_CHUNKS:
                self._absorb(call, *call.outstanding.pop(0))
        while call.outstanding:
            self._absorb(call, *call.outstanding.pop(0))
        return t

    def _fetch(self, call: "_CallState", it, step: int) -> StepData | None:
        """The next step from ``it``, checked; None at the end or on an error (kept)."""
        try:
            nxt = next(it, _END)
            return None if nxt is _END else self._split(nxt, step, step - call.first)
        except Exception as e:   # noqa: BLE001 - re-raised once the pipeline is drained
            call.pending_error = e
            return None

    def _absorb(self, call: "_CallState", step_calls, sent_actions) -> None:
        """Gather one chunk's results: its events, its losses, and for every step whose losses
        are all in, the step's report (``on_step``, metrics, progress)."""
        m, w = self.num_microbatches, self.num_replicas
        results: list[ChunkResult] = self._gather(step_calls)
        fresh: set[int] = set()
        for (s, r, _), acts, res in zip(step_calls, sent_actions, results):
            call.events[(s, r)].extend(res.events(acts))
            for st, _, loss in res.losses:
                call.losses.setdefault(st, []).append(loss)
                fresh.add(st)
        for st in sorted(fresh):
            if len(call.losses[st]) < m * w:
                continue
            loss = call.reported[st] = sum(call.losses.pop(st)) / (m * w)
            if call.on_step is not None:
                call.on_step(st, loss)
            call.done_samples += call.samples.get(st, 0)
            elapsed = time.time() - call.t_call
            if self._metrics is not None:
                self._metrics.step(st + 1, loss,
                                   call.done_samples / elapsed if elapsed > 0 else None)
            if call.bar is not None:
                call.bar.update(st, loss)
        if call.reported:
            self._step_seconds = (time.time() - call.t_call) / len(call.reported)

    def _steps_per_chunk(self) -> int:
        """Steps per driver call: as many as take ``CHUNK_SECONDS`` by the step time measured
        so far (one until a step was timed)."""
        if not self._step_seconds:
            return 1
        return max(1, min(MAX_STEPS_PER_CHUNK, int(CHUNK_SECONDS / self._step_seconds)))

    # ------------------------------------------------------------------ inspection

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of the newest version, merged over stages (replica 0), keys
        "<module index>.<name>"."""
        self._check_alive()
        assert self._pool is not None
        calls = [(s, 0, self._pool.call(s, 0, "state_dict"))
                 for s in range(self.config.ranks_per_pipeline)]
        merged: dict[str, torch.Tensor] = {}
        for part in self._gather(calls):
            merged.update(part)
        return dict(sorted(merged.items(), key=lambda kv: _key_order(kv[0])))

    def replica_state_dicts(self) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
        """Every stage replica's newest weights (to check replicas and tied copies agree)."""
        self._check_alive()
        assert self._pool is not None
        calls = [(s, r, self._pool.call(s, r, "state_dict"))
                 for s in range(self.config.ranks_per_pipeline) for r in range(self.num_replicas)]
        return {(s, r): sd for (s, r, _), sd in zip(calls, self._gather(calls))}

    def versions(self) -> dict[tuple[int, int], list[int]]:
        """Weight versions each stage replica holds (at most two)."""
        self._check_alive()
        assert self._pool is not None
        calls = [(s, r, self._pool.call(s, r, "versions"))
                 for s in range(self.config.ranks_per_pipeline) for r in range(self.num_replicas)]
        return {(s, r): v for (s, r, _), v in zip(calls, self._gather(calls))}

    def placement(self) -> dict[tuple[int, int], dict[str, Any]]:
        """Where each stage replica runs (host, pid, Ray node id, device)."""
        self._check_alive()
        assert self._pool is not None
        calls = [(s, r, self._pool.call(s, r, "where"))
                 for s in range(self.config.ranks_per_pipeline) for r in range(self.num_replicas)]
        return {(s, r): v for (s, r, _), v in zip(calls, self._gather(calls))}

    def action_log(self) -> dict[tuple[int, int], list[Event]]:
        """The last train() call's executed actions per (stage, replica), each an ``Event``
        ``(category, action, start, end)``: the ``Action`` and its wall-clock times."""
        return {k: list(v) for k, v in self._events.items()}

    def timeline(self, path: str, last_steps: int | None = None) -> dict[str, str]:
        """Export what each stage replica did in the last ``train()`` call: a Chrome trace
        (open it in ui.perfetto.dev or chrome://tracing) and a PNG in the style of the 2BW
        paper's pipeline figures. ``path`` names either file (``.json`` or ``.png``; the other
        gets the sibling name) or, without a suffix, their common stem. ``last_steps`` keeps
        only the actions of the call's last steps (a long call's picture stays readable).
        Returns ``{"trace": ..., "png": ...}``."""
        from pathlib import Path

        from .timeline import draw_timeline, restrict_steps, write_chrome_trace

        log = self.action_log()
        if not any(log.values()):
            raise ConfigError("no action log yet: call train() before timeline()")
        if last_steps is not None:
            log = restrict_steps(log, last_steps)
        p = Path(path)
        stem = p.with_suffix("") if p.suffix.lower() in (".json", ".png") else p
        trace = write_chrome_trace(log, stem.with_name(stem.name + ".json"))
        png = draw_timeline(log, stem.with_name(stem.name + ".png"),
                            title=f"{self.name}: {self.schedule}, {self.num_stages} stages x "
                                  f"{self.num_replicas} replicas, m={self.num_microbatches}")
        return {"trace": str(trace), "png": str(png)}

    def stats(self, reset_peaks: bool = False) -> dict[tuple[int, int], dict[str, Any]]:
        """Per (stage, replica): memory (bytes: weights incl. the second version, gradients,
        optimizer state, stashed activations now and at peak) and, over the last train() call,
        the fraction of wall time spent computing, communicating (sends, reductions), waiting
        for a peer, and otherwise idle (between chunks). The four fractions sum to 1."""
        self._check_alive()
        assert self._pool is not None
        calls = [(s, r, self._pool.call(s, r, "memory", reset_peaks))
                 for s in range(self.config.ranks_per_pipeline) for r in range(self.num_replicas)]
        out: dict[tuple[int, int], dict[str, Any]] = {}
        for (s, r, _), mem in zip(calls, self._gather(calls)):
            out[(s, r)] = {"memory": mem, "time": time_fractions(self._events.get((s, r), []))}
        return out

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group, from the next update on (with an
        ``lr_schedule``, the base it multiplies)."""
        self._all("set_lr", lr)

    def lr(self) -> float | None:
        """The learning rate used by the last update (first parameter group of stage 0)."""
        self._check_alive()
        assert self._pool is not None
        return self._gather([(0, 0, self._pool.call(0, 0, "lr"))])[0]

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self, root: str, extra: Mapping[str, Any] | None = None,
                   keep: int | None = None) -> str:
        """Write a checkpoint of the current state as ``<root>/step-<step>`` (atomically) and
        return its path. ``extra``: JSON metadata stored with it (data position, model config,
        epoch, ...). ``keep``: keep only the newest ``keep`` checkpoints under ``root``."""
        from .checkpoint import stage_files, write_checkpoint

        self._check_alive()
        assert self._pool is not None
        calls = [(s, r, self._pool.call(s, r, "export_state", r == 0))
                 for s in range(self.config.ranks_per_pipeline) for r in range(self.num_replicas)]
        exported = {}
        for (q, r, _), st in zip(calls, self._gather(calls)):
            # a rank holding virtual stages exports each of them (with a copy of its RNG state)
            for s, part in st["stages"].items() if "stages" in st else [(q, st)]:
                exported[(s, r)] = {**part, **{k: st[k].clone() for k in ("rng", "cuda_rng")
                                               if k in st}}
        files, stages = stage_files(exported)
        manifest = {
            "schedule": self.schedule, "num_microbatches": self.num_microbatches,
            "config": self.config.to_dict(), "stages": stages,
            "extra": dict(extra or {}),
        }
        path = write_checkpoint(root, self._next_step, files, manifest, keep=keep)
        return str(path)

    def load_checkpoint(self, path: str) -> dict:
        """Restore weights (both versions under 2bw), optimizer and RNG state from a checkpoint
        (a ``step-*`` directory, or the newest valid one under a root). Returns its ``extra``."""
        from .checkpoint import CheckpointError, resolve_checkpoint, stage_states

        self._check_alive()
        assert self._pool is not None
        ck = resolve_checkpoint(path)
        man = ck.manifest
        m2s = list(man["config"]["module_to_stage_map"])
        if m2s != list(self.config.module_to_stage_map) or len(man["stages"]) != self.num_stages:
            raise CheckpointError(
                f"{ck.path}: checkpoint is for module_to_stage_map {m2s} "
                f"({len(man['stages'])} stages); this pipeline has "
                f"{list(self.config.module_to_stage_map)} ({self.num_stages} stages)")
        states = stage_states(ck, self.num_replicas)
        p = self.config.ranks_per_pipeline
        if self.config.stages_per_rank > 1:    # one state per actor, holding its stages'
            held: dict[tuple[int, int], dict[str, Any]] = {}
            for (s, r), st in sorted(states.items()):
                held.setdefault((s % p, r), {"stages": {}, "rng": st["rng"],
                                             "cuda_rng": st["cuda_rng"]})["stages"][s] = st
            states = held
        calls = [(s, r, self._pool.call(s, r, "import_state", st))
                 for (s, r), st in sorted(states.items())]
        self._gather(calls)
        self._next_step = ck.step
        return ck.extra

    @classmethod
    def from_checkpoint(cls, path: str, modules, loss_fn, optimizer_factory,
                        config: PipelineConfig | Mapping | str | None = None,
                        **kwargs: Any) -> "PipelineTrainer":
        """A trainer continuing from a checkpoint. The code (modules, loss, optimizer factory)
        is passed again, never stored; conf, schedule and microbatches come from the checkpoint
        unless given (the number of replicas may change)."""
        from .checkpoint import resolve_checkpoint

        ck = resolve_checkpoint(path)
        man = ck.manifest
        if config is None:
            config = PipelineConfig.from_dict(man["config"], source=f"{ck.path}/manifest.json")
        kwargs.setdefault("schedule", man["schedule"])
        kwargs.setdefault("num_microbatches", man["num_microbatches"])
        trainer = cls(modules, loss_fn, config, optimizer_factory, **kwargs)
        try:
            trainer.load_checkpoint(str(ck.path))
        except BaseException:
            trainer.shutdown()
            raise
        return trainer

    def shutdown(self) -> None:
        """Stop the stage actors (and the local Ray started by this trainer, if any)."""
        if self._pool is not None:
            if isinstance(self._pool, ThreadPool):
                for row in self._pool.actors:
                    for a in row:
                        with contextlib.suppress(Exception):
                            a.close()
                self._pool.kill()
            elif isinstance(self._pool, RayPool):
                if self._failed is None:
                    self._pool.close()
                else:
                    self._pool.kill()
            self._pool = None
        if self._ray_started:
            import ray
            ray.shutdown()
            self._ray_started = False

    def __enter__(self) -> "PipelineTrainer":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _batch_size(x: Any) -> int:
    """Samples in a microbatch's inputs: the first dimension of the first tensor found (1 if
    there is none)."""
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() else 1
    if isinstance(x, Mapping):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        for v in x:
            if isinstance(v, (torch.Tensor, list, tuple, Mapping)):
                return _batch_size(v)
    return 1


def _key_order(key: str) -> tuple[int, str]:
    k, _, rest = key.partition(".")
    return (int(k), rest) if k.isdigit() else (math.inf, key)  # type: ignore[return-value]


def _shapes_and_names(modules) -> tuple[list[dict[str, tuple[int, ...]]], set[str]]:
    """Parameter shapes per module and all state names, without building factories for real
    (a factory is called on the meta device)."""
    shapes, names = [], set()
    for k, mod in enumerate(modules):
        if not isinstance(mod, nn.Module):
            if not callable(mod):
                raise ConfigError(f"modules[{k}] is a {type(mod).__name__}, not a torch.nn.Module "
                                  "or a factory returning one")
            with torch.device("meta"):
                mod = mod()
            if not isinstance(mod, nn.Module):
                raise ConfigError(f"modules[{k}]: the factory returned a {type(mod).__name__}, "
                                  "not a torch.nn.Module")
        shapes.append({n: tuple(p.shape) for n, p in mod.named_parameters(remove_duplicate=False)})
        names |= {f"{k}.{n}" for n in mod.state_dict(keep_vars=True)}
    return shapes, names


def _check_state_keys(state: Mapping[str, torch.Tensor], names: set[str]) -> None:
    unknown = sorted(set(state) - names)
    missing = sorted(n for n in names - set(state))
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown keys {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        raise ConfigError("initial_state_dict does not match the modules: " + "; ".join(parts)
                          + " (keys are '<module index>.<name>', as trainer.state_dict())")


def _one(specs: tuple) -> Any:
    """An actor's spec: the spec of its stage, or the tuple of its virtual stages' specs."""
    return specs[0] if len(specs) == 1 else specs
