"""The stage-replica actor: a thin shell that builds a Stage, a Transport and an executor.

``StageActor`` is a plain class. The driver runs it as a Ray actor (``ray.remote(StageActor)``,
resources and placement stated where it is created) or, for tests and debugging, as an object in a
thread of the driver's process. ``plan_stages`` is the pure function deciding what each stage
replica holds: its modules, tied parameters and how it reduces gradients.
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .collectives import DistTransport, ThreadHub, ThreadTransport, Topology, Transport
from .config import ConfigError, PipelineConfig
from .executor import ChunkResult, ReduceSpec, StageExecutor, TieSpec
from .metrics import StageMetrics
from .schedule import Action
from .stage import OptimizerFactory, Stage, StageError
from .watchdog import Activity, Heartbeat
from .wire import from_wire


@dataclass(frozen=True)
class StageSpec:
    """Everything one stage replica needs to know, decided on the driver."""

    stage: int
    replica: int
    rank: int
    num_stages: int
    num_replicas: int
    num_microbatches: int
    module_ids: tuple[int, ...]
    local_ties: tuple[tuple[str, ...], ...]     # tied names that live together on this stage
    ties: tuple[TieSpec, ...]                   # tied names shared with other stages
    tie_sources: tuple[tuple[str, int], ...]    # (group, rank whose value all holders start from)
    max_grad_norm: float | None
    grad_scale: float
    device: str
    torch_threads: int
    recompute: bool
    autocast_bf16: bool
    timeout_s: float
    seed: int
    two_versions: bool = True
    ranks_per_pipeline: int = 0     # p where ranks hold virtual stages (stage s on rank s % p)

    @property
    def where(self) -> str:
        return f"stage {self.stage} replica {self.replica}"

    @property
    def position(self) -> int:
        """The stage's rank within its pipeline (its stage, unless ranks hold several)."""
        return self.stage % self.ranks_per_pipeline if self.ranks_per_pipeline else self.stage


@dataclass(frozen=True)
class StagePlan:
    """The pure result of planning: one spec per (stage, replica) and the group topology (of
    the ranks of one pipeline; with virtual stages, stage ``s`` is on the ranks of ``s % p``)."""

    specs: tuple[tuple[StageSpec, ...], ...]    # specs[s][r]
    topology: Topology

    def actor_specs(self) -> list[list[tuple[StageSpec, ...]]]:
        """The specs each actor holds: ``[position][replica]``, stages in order."""
        p = self.topology.num_stages
        return [[tuple(self.specs[s][r] for s in range(q, len(self.specs), p))
                 for r in range(len(self.specs[q]))] for q in range(p)]


def plan_stages(
    config: PipelineConfig,
    num_modules: int,
    param_shapes: Sequence[Mapping[str, tuple[int, ...]]],
    tied_parameters: Sequence[Sequence[str]] | None,
    *,
    num_microbatches: int,
    max_grad_norm: float | None,
    device: str = "cpu",
    torch_threads: int = 1,
    recompute: Sequence[int] = (),
    autocast_bf16: bool = False,
    timeout_s: float = 120.0,
    seed: int = 0,
    two_versions: bool = True,
) -> StagePlan:
    """Decide each stage replica's modules and ties. ``param_shapes[k]`` maps module k's
    parameter names to shapes (used to check tied parameters before anything starts)."""
    m2s = list(config.module_to_stage_map)
    d, w = config.num_stages, config.num_replicas
    p = config.ranks_per_pipeline
    if len(m2s) == num_modules + 1:
        if m2s[-1] != d - 1:
            raise ConfigError(f"{config.source}: module_to_stage_map has one entry more than there "
                              f"are modules ({num_modules}), which is read as the loss's stage; "
                              f"the loss must be on the last stage ({d - 1}), not {m2s[-1]}")
        m2s = m2s[:-1]
        if m2s[-1] != d - 1:
            raise ConfigError(f"{config.source}: the last stage ({d - 1}) has no modules besides "
                              "the loss; give it at least one module")
    elif len(m2s) != num_modules:
        raise ConfigError(f"{config.source}: module_to_stage_map has {len(m2s)} entries but there "
                          f"are {num_modules} modules; give one stage per module (optionally one "
                          "more, last, for the loss)")
    stage_of = {k: m2s[k] for k in range(num_modules)}

    groups = [list(g) for g in (tied_parameters or [])]
    local_ties: dict[int, list[tuple[str, ...]]] = {s: [] for s in range(d)}
    # Per cross-stage tie: the holder stages, the canonical name on each, and the stage holding
    # the group's first name, whose value every holder starts from.
    cross: list[tuple[list[int], dict[int, str], int]] = []
    for gi, group in enumerate(groups):
        if len(group) < 2:
            raise ConfigError(f"tied_parameters[{gi}] = {group} needs at least two names")
        shapes = []
        for name in group:
            mod, _, local = name.partition(".")
            if not mod.isdigit() or int(mod) >= num_modules or local not in param_shapes[int(mod)]:
                example = next(iter(param_shapes[0]), "weight") if param_shapes else "weight"
                raise ConfigError(
                    f"tied_parameters[{gi}]: {name!r} is not a parameter; names are "
                    f"'<module index>.<parameter name>', e.g. '0.{example}'")
            shapes.append(tuple(param_shapes[int(mod)][local]))
        if len(set(shapes)) != 1:
            raise ConfigError(f"tied_parameters[{gi}]: shapes differ: "
                              + ", ".join(f"{n} {s}" for n, s in zip(group, shapes)))
        by_stage: dict[int, list[str]] = {}
        for name in group:
            by_stage.setdefault(stage_of[int(name.split(".", 1)[0])], []).append(name)
        for s, names in by_stage.items():
            if len(names) > 1:
                local_ties[s].append(tuple(names))
        if len({s % p for s in by_stage}) < len(by_stage):
            raise ConfigError(f"tied_parameters[{gi}]: {group} are on stages {sorted(by_stage)}, "
                              f"of which some share ranks (virtual stages, {p} ranks per "
                              "pipeline); tie parameters of stages on different ranks, or "
                              "put them on one stage")
        if len(by_stage) > 1:
            source = stage_of[int(group[0].split(".", 1)[0])]
            cross.append((sorted(by_stage), {s: names[0] for s, names in by_stage.items()},
                          source))
    topology = Topology.build([list(config.stage_to_rank_map[str(q)]) for q in range(p)],
                              [[s % p for s in stages] for stages, _, _ in cross], devices=device,
                              wrap=p < d)
    specs = []
    for s in range(d):
        row = []
        for r in range(w):
            ties, sources = [], []
            for ti, (stages, canonical, source) in enumerate(cross):
                if s in stages:
                    ties.append(TieSpec(f"tie:{ti}", canonical[s],
                                        counts_in_norm=(s == stages[0])))
                    sources.append((f"tie:{ti}", topology.rank(source % p, 0)))
            row.append(StageSpec(
                stage=s, replica=r, rank=topology.rank(s % p, r), num_stages=d, num_replicas=w,
                num_microbatches=num_microbatches,
                module_ids=tuple(k for k in range(num_modules) if stage_of[k] == s),
                local_ties=tuple(local_ties[s]), ties=tuple(ties), tie_sources=tuple(sources),
                max_grad_norm=max_grad_norm, grad_scale=1.0 / (num_microbatches * w),
                device=device, torch_threads=torch_threads, recompute=s in set(recompute),
                autocast_bf16=autocast_bf16, timeout_s=timeout_s, seed=seed,
                two_versions=two_versions, ranks_per_pipeline=p if p < d else 0))
        specs.append(tuple(row))
    return StagePlan(tuple(specs), topology)


@dataclass(frozen=True)
class CommSetup:
    """How an actor reaches its peers: "dist" (Ray actors: torch.distributed, GLOO for CPU
    tensors and NCCL for CUDA ones unless ``use_nccl`` is False) or "thread" (in-process)."""

    backend: str
    world_name: str
    hub: ThreadHub | None = None
    use_nccl: bool = True


def transport_class(comm: CommSetup) -> type[Transport]:
    """The transport an actor uses; the same class whatever device the stage computes on."""
    if comm.backend == "thread":
        return ThreadTransport
    if comm.backend == "dist":
        return DistTransport
    raise ConfigError(f"unknown communication backend {comm.backend!r} (\"dist\" or \"thread\")")


def _watched(method):
    """Record a driver call in the replica's ``Activity`` while it runs (its heartbeat)."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        self.activity.begin(method.__name__)
        try:
            return method(self, *args, **kwargs)
        finally:
            self.activity.end()
    return call


class StageActor:
    """One stage replica, or (``spec`` a sequence) one rank's replicas of several virtual
    stages, each its own ``Stage`` with its weight versions, optimizer state and stash. Methods
    are called by the driver, one at a time, in order; only ``heartbeat`` runs beside them (on a
    Ray actor, in its own concurrency group "watch")."""

    def __init__(self, spec: StageSpec | Sequence[StageSpec],
                 modules: Mapping[int, nn.Module | Callable[[], nn.Module]],
                 loss_fn: Callable | None, optimizer_factory: OptimizerFactory,
                 initial_state: Mapping[str, torch.Tensor] | None = None,
                 lr_schedule: Callable[[int], float] | None = None):
        self.specs = (spec,) if isinstance(spec, StageSpec) else tuple(spec)
        spec = self.spec = self.specs[0]
        self.activity = Activity()
        if spec.device == "cpu":
            torch.set_num_threads(spec.torch_threads)
        torch.manual_seed(spec.seed * 1000003 + spec.rank)
        built = {}
        for k, mod in modules.items():
            built[k] = mod if isinstance(mod, nn.Module) else mod()
            if not isinstance(built[k], nn.Module):
                raise ConfigError(f"module {k}: the factory returned a "
                                  f"{type(built[k]).__name__}, not a torch.nn.Module")
        device = spec.device
        if device == "cuda":
            device = f"cuda:{torch.cuda.current_device()}"
        self.stages: dict[int, Stage] = {}
        for sp in self.specs:
            try:
                self.stages[sp.stage] = self._build(
                    sp, {k: built[k] for k in sp.module_ids}, loss_fn, optimizer_factory,
                    initial_state, device, lr_schedule)
            except Exception as e:
                raise StageError(f"{sp.where}: building the stage failed: "
                                 f"{type(e).__name__}: {e}") from e
        self.stage = self.stages[spec.stage]
        self.executor: StageExecutor | None = None
        self.transport: Transport | None = None
        self.metrics: StageMetrics | None = None

    @staticmethod
    def _build(spec, built, loss_fn, optimizer_factory, initial_state, device,
               lr_schedule) -> Stage:
        return Stage(
            stage=spec.stage, num_stages=spec.num_stages, modules=built,
            optimizer_factory=optimizer_factory,
            loss_fn=loss_fn if spec.stage == spec.num_stages - 1 else None,
            local_ties=spec.local_ties, grad_scale=spec.grad_scale, device=device,
            recompute=spec.recompute, autocast_bf16=spec.autocast_bf16,
            initial_state=initial_state, two_versions=spec.two_versions,
            lr_schedule=lr_schedule)

    def heartbeat(self) -> Heartbeat:
        """What this replica is doing and how long since it last made progress."""
        return self.activity.heartbeat()

    @_watched
    def where(self) -> dict[str, Any]:
        """Where this replica runs (node, process, device)."""
        node = None
        try:
            import ray
            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001 - informational only
            pass
        return {"stage": self.spec.stage, "stages": sorted(self.stages),
                "replica": self.spec.replica, "rank": self.spec.rank,
                "host": socket.gethostname(), "pid": os.getpid(), "node_id": node,
                "device": str(self.stage.device)}

    @_watched
    def setup(self, topology: Topology, comm: CommSetup) -> None:
        """Join the communication groups (all replicas call this at the same time)."""
        spec = self.spec
        if transport_class(comm) is ThreadTransport:
            assert comm.hub is not None
            self.transport = comm.hub.transport(spec.position, spec.replica, spec.timeout_s)
        else:
            self.transport = DistTransport(topology, spec.position, spec.replica, spec.timeout_s,
                                           comm.world_name, self.stage.device, comm.use_nccl)
        self.executor = StageExecutor(
            self.stages, self.transport,
            {sp.stage: ReduceSpec(sp.stage, sp.replica, sp.num_stages, sp.num_replicas,
                                  sp.max_grad_norm, sp.ties, sp.ranks_per_pipeline)
             for sp in self.specs},
            spec.num_microbatches, spec.timeout_s, self.activity)
        if comm.backend != "thread":     # a Ray actor: its metrics reach the dashboard
            self.metrics = StageMetrics(comm.world_name, spec.stage, spec.replica)

    @_watched
    def sync_weights(self) -> None:
        """Make replicas (from replica 0) and tied copies (from the group's first name) equal."""
        assert self.transport is not None
        for spec in self.specs:
            stage = self.stages[spec.stage]
            slot = stage._slot_of(stage.newest_version)
            with torch.no_grad():
                if spec.num_replicas > 1:
                    src = self.transport.topology.rank(spec.position, 0)
                    for n in stage.param_names:
                        self.transport.broadcast(f"replicas:{spec.position}", slot[n], src)
                for tie, (group, src) in zip(spec.ties, spec.tie_sources):
                    self.transport.broadcast(group, slot[tie.name], src)

    @_watched
    def run(self, actions: Sequence[Action], inputs: Mapping | None = None,
            targets: Mapping | None = None) -> ChunkResult:
        assert self.executor is not None, "setup() first"
        result = self.executor.run(actions, from_wire(inputs), from_wire(targets))
        if self.metrics is not None:
            self.metrics.chunk(result.events(actions), self.stage.memory, self.stage.lr)
        return result

    @_watched
    def finish(self) -> None:
        assert self.executor is not None
        self.executor.finish()

    @_watched
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for stage in self.stages.values()
                for k, v in stage.named_weights().items()}

    @_watched
    def versions(self) -> list[int]:
        return self.stage.versions()

    @_watched
    def memory(self, reset_peaks: bool = False) -> dict[str, int]:
        """The stage's memory accounting (bytes) and this process's peak resident size."""
        import resource

        # virtual stages: their accounting summed (weight versions: how many each holds)
        parts = [stage.memory() for stage in self.stages.values()]
        out = {k: (max if k == "weight_versions" else sum)(m[k] for m in parts)
               for k in parts[0]}
        out["process_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if self.stage.device.type == "cuda":
            out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(self.stage.device)
        if reset_peaks:
            for stage in self.stages.values():
                stage.reset_peaks()
            if self.stage.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.stage.device)
        return out

    @_watched
    def set_lr(self, lr: float) -> None:
        for stage in self.stages.values():
            stage.set_lr(lr)

    @_watched
    def lr(self) -> float | None:
        return self.stage.lr()

    @_watched
    def export_state(self, with_weights: bool) -> dict[str, Any]:
        """This replica's RNG state, and (``with_weights``) the stage's weights and optimizer."""
        out: dict[str, Any] = {"rng": torch.get_rng_state()}
        if self.stage.device.type == "cuda":
            out["cuda_rng"] = torch.cuda.get_rng_state(self.stage.device)
        if with_weights and len(self.stages) > 1:     # virtual stages: one state per stage
            out["stages"] = {s: stage.export_state() for s, stage in self.stages.items()}
        elif with_weights:
            out.update(self.stage.export_state())
        return out

    @_watched
    def import_state(self, state: Mapping[str, Any]) -> None:
        if "stages" in state:
            for s, st in state["stages"].items():
                self.stages[s].import_state(st)
        else:
            self.stage.import_state(state)
        if state.get("rng") is not None:
            torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and self.stage.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.stage.device)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
