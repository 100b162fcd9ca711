"""The PipeDream-2BW planner: depth, width, microbatch size and recomputation from profiles.

PipeDream-2BW's planner (Narayanan et al., ICML 2021, section 3) trains a model of ``L`` identical
blocks on ``n`` workers with ``M`` bytes of memory each. It chooses the depth ``d`` (stages) and
width ``w`` (replicas per stage, ``d * w = n``), the microbatch size ``b`` and whether to recompute
activations, maximising predicted throughput among the configurations that fit in memory. Here it
also chooses how many layers each stage holds, because BERT's first stage carries the embeddings
and its last the pooler, the heads and the loss, which are not free.

**Profile** (a `ModelProfile`; for BERT, `stages.bert_planner.profile_bert` measures it on the
local device with the runtime's own `Stage`, so times include its per-microbatch work and bytes
are counted as ``trainer.stats()`` counts them).
A stage of kind ``k`` (``first``: embeddings + layers, ``middle``, ``last``: layers + pooler,
heads and loss, ``only``: everything, when ``d = 1``) holding ``n`` layers costs ``X_k + n * X^k``
for every quantity ``X``: forward time ``f``, backward time ``g`` (``g'`` with recomputation: the
forward again, then the backward) and stashed activation bytes per microbatch ``a`` (``a'`` with
recomputation: only the stage's inputs and outputs), all at microbatch size ``b``; parameter
bytes of one weight version ``p``, optimizer-state bytes ``o`` and update time ``u`` (copying
the newest version into the other slot, then the optimizer step). The profile measures stages of
each kind with one and two layers, in the order 1F1B runs them: before the last stage a backward
follows the next microbatch's forward, which has evicted its activations from the caches (on
CPUs that makes it measurably slower than right after its own forward).

**Cost model.** A configuration: ``d, w, b``, ``m = B / (w * b)`` microbatches per replica per
step for a global batch ``B`` (2BW needs ``m >= d``), recomputation ``r``, ``n_s`` layers on stage
``s``. Per step (one weight update), a worker of stage ``s`` spends::

    compute_s = m * (F_s + G_s) + U_s        F_s = f_k + n_s f^k,  G_s = g_k + n_s g^k  (g' if r),
                                              U_s = u_k + n_s u
    comm_s    = m * X_s + R_s
        X_s = sum over the messages of one microbatch it receives and sends (activations from and
              gradients to stage s-1, activations to and gradients from s+1) of
              latency + bytes / bw(link)
        R_s = ring(P_s, w, bw(the replicas of s))    gradients over replicas; P_s = p_k + n_s p
              + ring(P_tied, 2w, bw(its holders))  on stages 0 and d-1 when d > 1: the word
                                                   embedding tied to the MLM decoder
        ring(bytes, k, bw) = 2 (k-1)/k * bytes / (e * bw) + 2 (k-1) * latency    (0 if k = 1;
                             e: the fraction of the bandwidth a ring all-reduce achieves)
    T_s = max(compute_s, comm_s)   when communication overlaps computation (GPUs: NCCL; 2BW's
                                   all-reduce has a whole step to finish before its update)
          compute_s + comm_s       when it does not (CPUs: gloo copies and reduces on the cores)
    throughput = w * m * b / max_s T_s        samples/s; 2BW never flushes, the slowest stage
                                              sets the pace

``bw`` is the intra-node bandwidth when both ends share a node and the inter-node bandwidth
otherwise; the runtime places the ``d`` stages of pipeline ``r`` on slots ``r*d .. r*d + d-1``
(`node_of`), ``workers_per_node`` consecutive slots per node.

**Memory model**, bytes on a worker of stage ``s``::

    M_s = 2 P_s  +  2 P_s  +  O_s  +  min(d - s, m) * A_s  +  [r] * A_s^full
          weights   grads     optim.  stashed activations     recomputation working set
                              O_s = o_k + n_s o

two weight versions (2BW); two steps' gradients (step t's wait for their all-reduce and update
while step t+1's accumulate); ``d - s`` microbatches in flight on stage ``s`` under 1F1B;
``A_s = a_k + n_s a^k`` (``a'_k`` with recomputation, which adds nothing per layer); with
recomputation, one microbatch's full activations ``a_k + n_s a^k`` are alive again while it is
recomputed. ``trainer.stats()`` reports the weights, optimizer and stash terms as ``weights``,
``optimizer`` and ``peak_stash``; its ``gradients`` are the buffers a stage holds when asked, not
their peak, and the working set of recomputation is not counted.

**Search** (`search`): every ``d`` dividing ``n``, every profiled ``b`` with ``w * b`` dividing
``B`` and ``m >= d``, recomputation off and on; for each, the partition minimising ``max_s T_s``
with every ``M_s <= M`` (`fastest_partition`: exact, as ``T_s`` and ``M_s`` never decrease with
``n_s``). A configuration no partition fits is listed with its fastest partition and marked as not
fitting; the chosen configuration is the fitting one with the highest predicted throughput.

This module knows nothing of BERT: it takes a `ModelProfile` however it was measured.
``python -m pd2bw_ray.plan`` plans from a saved profile; BERT's profiler, the pre-training job's
``--module models.bert<L>.depth=auto`` and ``python -m stages.plan`` (profile BERT, then plan)
live next to the BERT code, in ``stages/bert_planner.py`` and ``stages/plan.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .config import PipelineConfig

KINDS = ("first", "middle", "last", "only")
DEFAULT_MICROBATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


class PlanError(ValueError):
    """A planner input is wrong, or nothing fits; the message says what to change."""


# ------------------------------------------------------------------------------------------------
# Sizes and rates as people write them


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_bytes(text: str | int, what: str = "size") -> int:
    """``"16GiB"`` -> 17179869184, ``"12.5GB"`` -> 12500000000, ``1024`` -> 1024."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise PlanError(f"{what} must be positive, got {text}")
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if m is None or m[2].lower() not in _UNITS or float(m[1]) <= 0:
        raise PlanError(f"{what} {text!r} is not a size; write e.g. 16GiB, 512MiB or 12.5GB")
    return int(float(m[1]) * _UNITS[m[2].lower()])


def parse_rate(text: str | float, what: str = "bandwidth") -> float:
    """Bytes per second from ``"12.5GB/s"`` or ``"100GiB/s"`` (or a number of bytes/s)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not text > 0:
            raise PlanError(f"{what} must be positive, got {text}")
        return float(text)
    body = str(text).strip()
    if not body.endswith("/s"):
        raise PlanError(f"{what} {text!r} is not a rate; write e.g. 12.5GB/s (bytes per second)")
    return float(parse_bytes(body[:-2], what))


def parse_seconds(text: str | float, what: str = "latency") -> float:
    """Seconds from ``"20us"``, ``"1.5ms"``, ``"0.1s"`` (or a number of seconds)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise PlanError(f"{what} must be >= 0, got {text}")
        return float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|ms|us|µs|ns)\s*", str(text))
    if m is None:
        raise PlanError(f"{what} {text!r} is not a duration; write e.g. 20us, 1.5ms or 0.1s")
    return float(m[1]) * _TIME_UNITS[m[2]]


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


# ------------------------------------------------------------------------------------------------
# Profiles


def _check_nonnegative(where: str, obj: Any) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not (math.isfinite(value) and value >= 0):
                raise PlanError(f"{where}: {f.name} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class Part:
    """Per-microbatch cost of part of a stage (one layer, or a stage kind's fixed part)."""

    forward_s: float
    backward_s: float              # without recomputation
    recompute_backward_s: float    # with recomputation: the forward again, then the backward
    stash_bytes: int               # saved for backward while the microbatch is in flight
    recompute_stash_bytes: int     # the same with recomputation (only inputs and outputs)

    def __post_init__(self) -> None:
        _check_nonnegative("Part", self)


@dataclass(frozen=True)
class WeightPart:
    """Weight-side cost of part of a stage: independent of the microbatch size."""

    param_bytes: int        # one weight version
    optimizer_bytes: int    # optimizer state for those parameters
    update_s: float         # copy the newest version into the other slot, then optimizer step

    def __post_init__(self) -> None:
        _check_nonnegative("WeightPart", self)


@dataclass(frozen=True)
class MicrobatchProfile:
    """Everything measured at one microbatch size ``b``, per stage kind (KINDS)."""

    microbatch_size: int
    layer: Mapping[str, Part]       # what one more encoder layer adds to a stage of each kind
    base: Mapping[str, Part]        # a stage of each kind without its layers
    activation_message_bytes: int   # one microbatch's activations sent from stage s to s+1
    gradient_message_bytes: int     # one microbatch's gradients sent from stage s+1 to s

    def __post_init__(self) -> None:
        if isinstance(self.microbatch_size, bool) or not isinstance(self.microbatch_size, int) \
                or self.microbatch_size < 1:
            raise PlanError(f"microbatch_size must be a positive integer, got "
                            f"{self.microbatch_size!r}")
        for name in ("layer", "base"):
            parts = getattr(self, name)
            missing = [k for k in KINDS if k not in parts]
            if missing:
                raise PlanError(f"profile for microbatch size {self.microbatch_size}: no {name} "
                                f"cost for stage kind(s) {missing}; a profile needs all of "
                                f"{KINDS}")
            object.__setattr__(self, name, {k: parts[k] for k in KINDS})
        for name in ("activation_message_bytes", "gradient_message_bytes"):
            if getattr(self, name) < 0:
                raise PlanError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class ModelProfile:
    """A model of ``num_layers`` identical layers, profiled at several microbatch sizes.

    ``tied_bytes``: bytes of a weight held by both the first and the last stage (BERT's word
    embedding and MLM decoder), whose gradients are all-reduced between them when ``d > 1``.
    ``description`` says what was profiled where (model config, device, threads, optimizer);
    a saved profile is reused only for the same description.
    """

    num_layers: int
    seq_length: int
    layer_weights: WeightPart
    base_weights: Mapping[str, WeightPart]
    microbatches: tuple[MicrobatchProfile, ...]
    tied_bytes: int = 0
    description: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise PlanError(f"num_layers must be >= 1, got {self.num_layers}")
        missing = [k for k in KINDS if k not in self.base_weights]
        if missing:
            raise PlanError(f"base_weights lacks stage kind(s) {missing}")
        if not self.microbatches:
            raise PlanError("a profile needs at least one microbatch size")
        sizes = [p.microbatch_size for p in self.microbatches]
        if len(set(sizes)) != len(sizes):
            raise PlanError(f"microbatch sizes profiled twice: {sizes}")
        object.__setattr__(self, "microbatches",
                           tuple(sorted(self.microbatches, key=lambda p: p.microbatch_size)))
        object.__setattr__(self, "base_weights", {k: self.base_weights[k] for k in KINDS})

    @property
    def microbatch_sizes(self) -> tuple[int, ...]:
        return tuple(p.microbatch_size for p in self.microbatches)

    def at(self, microbatch_size: int) -> MicrobatchProfile:
        for p in self.microbatches:
            if p.microbatch_size == microbatch_size:
                return p
        raise PlanError(f"microbatch size {microbatch_size} was not profiled (profiled: "
                        f"{list(self.microbatch_sizes)}); profile it or choose one of those")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> "ModelProfile":
        try:
            return cls(
                num_layers=d["num_layers"], seq_length=d["seq_length"],
                layer_weights=WeightPart(**d["layer_weights"]),
                base_weights={k: WeightPart(**v) for k, v in d["base_weights"].items()},
                microbatches=tuple(MicrobatchProfile(
                    microbatch_size=p["microbatch_size"],
                    layer={k: Part(**v) for k, v in p["layer"].items()},
                    base={k: Part(**v) for k, v in p["base"].items()},
                    activation_message_bytes=p["activation_message_bytes"],
                    gradient_message_bytes=p["gradient_message_bytes"])
                    for p in d["microbatches"]),
                tied_bytes=d.get("tied_bytes", 0), description=d.get("description", {}))
        except (KeyError, TypeError) as e:
            raise PlanError(f"{source}: not a planner profile ({type(e).__name__}: {e}); write "
                            "one with `python -m stages.plan --profile_path ...` (BERT) or "
                            "your model's profiler") from None

    def save(self, path: str | os.PathLike) -> None:
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelProfile":
        path = os.fspath(path)
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise PlanError(f"{path}: no such profile") from None
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
        return cls.from_dict(d, source=path)


# ------------------------------------------------------------------------------------------------
# The cluster


@dataclass(frozen=True)
class Network:
    """Links between workers. Bandwidths in bytes/s, latency in seconds per message.

    ``allreduce_efficiency``: the fraction of the link bandwidth a ring all-reduce achieves (its
    reductions and copies take time too: about 0.4 for gloo on CPU, near 1 for NCCL).
    ``comm_overlaps_compute``: communication runs beside computation (GPUs with NCCL) rather than
    on the same cores (CPUs with gloo); see the cost model in the module docstring."""

    intra_node_bandwidth: float = 100e9
    inter_node_bandwidth: float = 12.5e9
    latency_s: float = 20e-6
    allreduce_efficiency: float = 1.0
    comm_overlaps_compute: bool = True

    def __post_init__(self) -> None:
        for name in ("intra_node_bandwidth", "inter_node_bandwidth"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise PlanError(f"Network.{name} must be a positive number of bytes/s, got "
                                f"{value!r}")
        if not (math.isfinite(self.latency_s) and self.latency_s >= 0):
            raise PlanError(f"Network.latency_s must be >= 0, got {self.latency_s!r}")
        if not 0 < self.allreduce_efficiency <= 1:
            raise PlanError(f"Network.allreduce_efficiency must be in (0, 1], got "
                            f"{self.allreduce_efficiency!r}")


@dataclass(frozen=True)
class Cluster:
    """``num_workers`` workers (one stage replica each), ``workers_per_node`` per node, each with
    ``memory_per_worker`` bytes for weights, gradients, optimizer state and activations."""

    num_workers: int
    memory_per_worker: int
    workers_per_node: int | None = None     # None: all on one node
    network: Network = Network()

    def __post_init__(self) -> None:
        for name in ("num_workers", "memory_per_worker"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanError(f"Cluster.{name} must be a positive integer, got {value!r}")
        k = self.workers_per_node
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise PlanError(f"Cluster.workers_per_node must be a positive integer, got {k!r}")
        if k is None:
            object.__setattr__(self, "workers_per_node", self.num_workers)


def node_of(stage: int, replica: int, depth: int, workers_per_node: int) -> int:
    """The node of a stage replica: the driver places pipeline ``replica``'s stages on
    consecutive slots ``replica * depth + stage`` (PACK), ``workers_per_node`` slots per node."""
    return (replica * depth + stage) // workers_per_node


# ------------------------------------------------------------------------------------------------
# Cost and memory models


def stage_kind(stage: int, depth: int) -> str:
    if depth == 1:
        return "only"
    return "first" if stage == 0 else "last" if stage == depth - 1 else "middle"


@dataclass(frozen=True)
class StageEstimate:
    """Predicted time per step (seconds) and peak memory (bytes) of one worker of a stage."""

    stage: int
    layers: float
    compute_s: float          # m (F + G) + U
    comm_s: float             # m X + A
    step_s: float             # T_s
    weights: int
    gradients: int
    optimizer: int
    stash: int                # peak stashed activations (trainer.stats()'s peak_stash)
    recompute_working: int    # one microbatch's activations while it is recomputed

    @property
    def memory(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.stash
                + self.recompute_working)


@dataclass(frozen=True)
class Candidate:
    """One configuration the planner considered, with its predictions."""

    depth: int
    width: int
    microbatch_size: int
    num_microbatches: int
    recompute: bool
    layers_per_stage: tuple[int, ...]
    stages: tuple[StageEstimate, ...]
    memory_limit: int

    @property
    def step_s(self) -> float:
        return max(s.step_s for s in self.stages)

    @property
    def samples_per_step(self) -> int:
        return self.width * self.num_microbatches * self.microbatch_size

    @property
    def throughput(self) -> float:
        """Predicted samples per second in steady state."""
        return self.samples_per_step / self.step_s

    @property
    def memory(self) -> int:
        """Predicted peak bytes on the most loaded worker."""
        return max(s.memory for s in self.stages)

    @property
    def fits(self) -> bool:
        return self.memory <= self.memory_limit


def _message_s(nbytes: int, bandwidth: float, latency_s: float) -> float:
    return latency_s + nbytes / bandwidth


def _allreduce_s(nbytes: int, group_size: int, bandwidth: float, latency_s: float) -> float:
    """Ring all-reduce: 2(k-1) steps, each moving 1/k of the bytes."""
    if group_size <= 1 or nbytes == 0:
        return 0.0
    k = group_size
    return 2 * (k - 1) / k * nbytes / bandwidth + 2 * (k - 1) * latency_s


def estimate_stage(profile: ModelProfile, cluster: Cluster, *, stage: int, depth: int,
                   microbatch_size: int, num_microbatches: int, recompute: bool,
                   layers: float) -> StageEstimate:
    """Time per step and peak memory of a worker of ``stage`` holding ``layers`` layers (the
    formulas of the module docstring, linear in ``layers``: a model whose layers split into
    blocks prices a stage holding part of a layer with a fraction)."""
    d, m, n = depth, num_microbatches, layers
    w = cluster.num_workers // d
    net, k = cluster.network, cluster.workers_per_node
    kind = stage_kind(stage, d)
    mb = profile.at(microbatch_size)
    base, layer = mb.base[kind], mb.layer[kind]
    wbase, wlayer = profile.base_weights[kind], profile.layer_weights

    forward = base.forward_s + n * layer.forward_s
    backward = (base.recompute_backward_s + n * layer.recompute_backward_s if recompute
                else base.backward_s + n * layer.backward_s)
    update = wbase.update_s + n * wlayer.update_s
    params = wbase.param_bytes + n * wlayer.param_bytes
    optimizer = wbase.optimizer_bytes + n * wlayer.optimizer_bytes
    full_stash = base.stash_bytes + n * layer.stash_bytes
    stash = (base.recompute_stash_bytes + n * layer.recompute_stash_bytes if recompute
             else full_stash)

    def link_bw(s_from: int) -> float:   # the slowest replica's link between s_from and s_from+1
        same = all(node_of(s_from, r, d, k) == node_of(s_from + 1, r, d, k) for r in range(w))
        return net.intra_node_bandwidth if same else net.inter_node_bandwidth

    def group_bw(stages: Sequence[int]) -> float:
        nodes = {node_of(s, r, d, k) for s in stages for r in range(w)}
        return net.intra_node_bandwidth if len(nodes) == 1 else net.inter_node_bandwidth

    per_microbatch_comm = 0.0
    if stage > 0:
        bw = link_bw(stage - 1)
        per_microbatch_comm += (_message_s(mb.activation_message_bytes, bw, net.latency_s)
                                + _message_s(mb.gradient_message_bytes, bw, net.latency_s))
    if stage < d - 1:
        bw = link_bw(stage)
        per_microbatch_comm += (_message_s(mb.activation_message_bytes, bw, net.latency_s)
                                + _message_s(mb.gradient_message_bytes, bw, net.latency_s))
    eff = net.allreduce_efficiency
    allreduce = _allreduce_s(params, w, eff * group_bw([stage]), net.latency_s)
    if d > 1 and stage in (0, d - 1):
        allreduce += _allreduce_s(profile.tied_bytes, 2 * w, eff * group_bw([0, d - 1]),
                                  net.latency_s)

    compute = m * (forward + backward) + update
    comm = m * per_microbatch_comm + allreduce
    step = max(compute, comm) if net.comm_overlaps_compute else compute + comm
    return StageEstimate(
        stage=stage, layers=n, compute_s=compute, comm_s=comm, step_s=step,
        weights=2 * params, gradients=2 * params, optimizer=optimizer,
        stash=min(d - stage, m) * stash, recompute_working=full_stash if recompute else 0)


def evaluate(profile: ModelProfile, cluster: Cluster, *, layers_per_stage: Sequence[int],
             microbatch_size: int, num_microbatches: int, recompute: bool) -> Candidate:
    """The predictions for one configuration with a given partition."""
    d = len(layers_per_stage)
    check_shape(profile, cluster, d, num_microbatches)
    if sum(layers_per_stage) != profile.num_layers:
        raise PlanError(f"layers_per_stage {list(layers_per_stage)} sums to "
                        f"{sum(layers_per_stage)}, the model has {profile.num_layers} layers")
    stages = tuple(estimate_stage(profile, cluster, stage=s, depth=d,
                                  microbatch_size=microbatch_size,
                                  num_microbatches=num_microbatches, recompute=recompute,
                                  layers=n)
                   for s, n in enumerate(layers_per_stage))
    return Candidate(depth=d, width=cluster.num_workers // d, microbatch_size=microbatch_size,
                     num_microbatches=num_microbatches, recompute=recompute,
                     layers_per_stage=tuple(layers_per_stage), stages=stages,
                     memory_limit=cluster.memory_per_worker)


def check_shape(profile: ModelProfile, cluster: Cluster, depth: int, num_microbatches: int
                ) -> None:
    if depth < 1 or cluster.num_workers % depth:
        raise PlanError(f"depth {depth} does not divide the {cluster.num_workers} workers")
    if depth > profile.num_layers + 2:
        raise PlanError(f"depth {depth} needs at least {depth - 2} layers; the model has "
                        f"{profile.num_layers}")
    if num_microbatches < depth:
        raise PlanError(f"2bw needs num_microbatches >= depth; got {num_microbatches} < {depth}")


def _min_layers(stage: int, depth: int, num_layers: int) -> int:
    """Stages between the first and the last need a layer; the first and last may hold none."""
    if depth == 1:
        return num_layers
    return 0 if stage in (0, depth - 1) else 1


def fastest_partition(profile: ModelProfile, cluster: Cluster, *, depth: int,
                      microbatch_size: int, num_microbatches: int, recompute: bool,
                      respect_memory: bool = True) -> tuple[int, ...] | None:
    """The layers per stage minimising ``max_s T_s`` with every ``M_s`` within memory (or None).

    Exact: ``T_s(n)`` and ``M_s(n)`` never decrease with the layer count ``n``, so a bottleneck
    ``T`` is reachable iff the stages' largest admissible layer counts sum to at least ``L``;
    the least such ``T`` is among the ``T_s(n)`` values. Among partitions reaching it, layers are
    taken away from the slowest stages first, so stages end up as even as the costs allow.
    """
    d, L = depth, profile.num_layers
    check_shape(profile, cluster, d, num_microbatches)
    lows = [_min_layers(s, d, L) for s in range(d)]
    if sum(lows) > L:
        return None
    est = {(s, n): estimate_stage(profile, cluster, stage=s, depth=d,
                                  microbatch_size=microbatch_size,
                                  num_microbatches=num_microbatches, recompute=recompute,
                                  layers=n)
           for s in range(d) for n in range(lows[s], L + 1)}
    limit = cluster.memory_per_worker if respect_memory else math.inf

    def caps(bottleneck: float) -> list[int] | None:
        out = []
        for s in range(d):
            ok = [n for n in range(lows[s], L + 1)
                  if est[s, n].step_s <= bottleneck and est[s, n].memory <= limit]
            if not ok:
                return None
            out.append(max(ok))   # admissible counts are contiguous from lows[s]: monotone costs
        return out if sum(out) >= L else None

    times = sorted({e.step_s for e in est.values()})
    lo, hi = 0, len(times)        # binary search for the least reachable bottleneck
    while lo < hi:
        mid = (lo + hi) // 2
        if caps(times[mid]) is None:
            lo = mid + 1
        else:
            hi = mid
    if lo == len(times):
        return None
    counts = caps(times[lo])
    assert counts is not None
    while sum(counts) > L:
        # take a layer from the slowest stage; on ties the most loaded, then the earliest
        # (earlier stages hold more microbatches in flight)
        s = max((s for s in range(d) if counts[s] > lows[s]),
                key=lambda s: (est[s, counts[s]].step_s, est[s, counts[s]].memory, -s))
        counts[s] -= 1
    return tuple(counts)


def search(profile: ModelProfile, cluster: Cluster, global_batch_size: int,
           microbatch_sizes: Sequence[int] | None = None) -> list[Candidate]:
    """Every configuration considered (see the module docstring), each with its best partition."""
    if global_batch_size < 1:
        raise PlanError(f"global batch size must be >= 1, got {global_batch_size}")
    sizes = profile.microbatch_sizes if microbatch_sizes is None else tuple(microbatch_sizes)
    for b in sizes:
        profile.at(b)
    n, L = cluster.num_workers, profile.num_layers
    out = []
    for d in range(1, n + 1):
        if n % d or d > L + 2:
            continue
        w = n // d
        for b in sizes:
            if global_batch_size % (w * b):
                continue
            m = global_batch_size // (w * b)
            if m < d:
                continue
            for r in (False, True):
                kw = dict(depth=d, microbatch_size=b, num_microbatches=m, recompute=r)
                layers = (fastest_partition(profile, cluster, **kw)
                          or fastest_partition(profile, cluster, respect_memory=False, **kw))
                if layers is None:
                    continue
                out.append(evaluate(profile, cluster, layers_per_stage=layers,
                                    microbatch_size=b, num_microbatches=m, recompute=r))
    return out


def choose(candidates: Sequence[Candidate]) -> Candidate:
    """The fitting candidate with the highest predicted throughput (ties: no recomputation,
    fewer stages, less memory)."""
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        if not candidates:
            raise PlanError("no configuration satisfies the batch arithmetic: the global batch "
                            "size must be a multiple of width x microbatch size with at least "
                            "depth microbatches per replica; change --global_batch_size or "
                            "--microbatch_sizes")
        least = min(candidates, key=lambda c: c.memory)
        raise PlanError(
            f"no configuration fits in {format_bytes(least.memory_limit)} per worker; the "
            f"smallest needs {format_bytes(least.memory)} (depth {least.depth}, microbatch "
            f"{least.microbatch_size}, recompute {'on' if least.recompute else 'off'}); add "
            "workers or memory, or profile smaller microbatch sizes")
    return max(fitting, key=lambda c: (c.throughput, not c.recompute, -c.depth, -c.memory))


def candidate_config(c: Candidate) -> PipelineConfig:
    """The conf.json of a configuration: one module (block range) per stage plus the loss on the
    last, ranks stage-major (stage ``s`` holds ranks ``s*w .. s*w + w-1``)."""
    return PipelineConfig(list(range(c.depth)) + [c.depth - 1],
                          {str(s): list(range(s * c.width, (s + 1) * c.width))
                           for s in range(c.depth)}, source="<planner>")


def format_table(candidates: Sequence[Candidate], chosen: Candidate | None = None) -> str:
    """The configurations considered, fastest first."""
    head = (f"{'':1} {'depth':>5} {'width':>5} {'mbs':>4} {'m':>4} {'recomp':>6}  "
            f"{'layers per stage':<24} {'samples/s':>10} {'step s':>8} {'memory/worker':>14} "
            f"{'fits':>4}")
    rows = [head, "-" * len(head)]
    for c in sorted(candidates, key=lambda c: (not c.fits, -c.throughput)):
        layers = ",".join(map(str, c.layers_per_stage))
        if len(layers) > 24:
            layers = layers[:21] + "..."
        mark = "*" if c is chosen else ""
        rows.append(f"{mark:1} {c.depth:>5} {c.width:>5} {c.microbatch_size:>4} "
                    f"{c.num_microbatches:>4} {'yes' if c.recompute else 'no':>6}  {layers:<24} "
                    f"{c.throughput:>10.2f} {c.step_s:>8.3f} {format_bytes(c.memory):>14} "
                    f"{'yes' if c.fits else 'no':>4}")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------
# Assembling a profile from measurements (a model's profiler measures; see stages/bert_planner.py)


@dataclass(frozen=True)
class _Measured:
    """Medians over repeats for one stage at one microbatch size."""

    forward_s: float
    backward_s: float
    stash_bytes: int


def average_profiles(profiles: Sequence[ModelProfile]) -> ModelProfile:
    """The mean of several profiles of one model: times (fields ending in ``_s``) averaged,
    everything else (bytes, sizes, description) equal in all of them."""
    if not profiles:
        raise PlanError("average_profiles needs at least one profile")

    def merge(values: list, where: str):
        first = values[0]
        if isinstance(first, dict):
            if any(set(v) != set(first) for v in values):
                raise PlanError(f"profiles differ in the keys of {where or 'the profile'}")
            return {k: merge([v[k] for v in values], f"{where}.{k}".lstrip(".")) for k in first}
        if isinstance(first, (list, tuple)):
            if any(len(v) != len(first) for v in values):
                raise PlanError(f"profiles differ in the length of {where}")
            return [merge(list(items), f"{where}[{i}]")
                    for i, items in enumerate(zip(*values))]
        if where.endswith("_s"):
            return sum(values) / len(values)
        if any(v != first for v in values):
            raise PlanError(f"profiles disagree on {where}: {values}; only times may differ")
        return first

    return ModelProfile.from_dict(merge([p.to_dict() for p in profiles], ""),
                                  source="<average_profiles>")


def _less(a: WeightPart, b: WeightPart) -> WeightPart:
    return WeightPart(param_bytes=max(a.param_bytes - b.param_bytes, 0),
                      optimizer_bytes=max(a.optimizer_bytes - b.optimizer_bytes, 0),
                      update_s=max(a.update_s - b.update_s, 0.0))


def _microbatch_profile(b: int, got: Mapping[tuple[str, int, bool], _Measured],
                        act_bytes: int, grad_bytes: int) -> MicrobatchProfile:
    def part(kind: str, n: int) -> Part:
        plain, rc = got[kind, n, False], got[kind, n, True]
        # with recomputation F + G' is what a recomputing stage measures for forward + backward;
        # a difference of two timings, so clamp it at 0 (on a tiny model, where the true value
        # is microseconds, timing noise can make it dip below)
        return Part(forward_s=plain.forward_s,
                    backward_s=plain.backward_s,
                    recompute_backward_s=max(rc.forward_s + rc.backward_s - plain.forward_s,
                                             0.0),
                    stash_bytes=plain.stash_bytes, recompute_stash_bytes=rc.stash_bytes)

    def less(a: Part, b: Part) -> Part:
        return Part(*(max(x - y, type(x)(0)) for x, y in zip(dataclasses.astuple(a),
                                                              dataclasses.astuple(b))))

    layer = {kind: less(part(kind, 2), part(kind, 1)) for kind in KINDS}
    return MicrobatchProfile(microbatch_size=b, layer=layer,
                             base={kind: less(part(kind, 1), layer[kind]) for kind in KINDS},
                             activation_message_bytes=act_bytes,
                             gradient_message_bytes=grad_bytes)
