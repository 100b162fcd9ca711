"""Our runtime under measurement: ``PipelineTrainer`` with any of its schedules, one Ray actor per
pipeline rank, one replica. A rank holds one stage, or (``virtual`` = v > 1, the ``interleaved``
schedule) v virtual stages: stage s on rank s % d.

A warm-up ``train()`` call first; then one timed call. The step end times come from the first
rank's action log (the end of its last computation of each step: a backward, or with zb-h1 a
weight-gradient pass), the memory from ``stats()``: its
exact activation accounting (``peak_stash``, reset after the warm-up), the weight versions and the
optimizer state it holds, and its process's peak RSS before and after. The action log also gives
where each stage's time went (`action_costs`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Sequence

from bench.measurement import Measurement, StageMemory, compute_medians
from bench.workloads import Microbatch, Workload
from pd2bw_ray.executor import Event
from pd2bw_ray.schedules.ir import COMPUTE

KIND_NAMES = {"F": "forward", "B": "backward", "I": "backward input", "W": "backward weight",
              "SA": "send act", "RA": "recv act", "SG": "send grad", "RG": "recv grad",
              "R": "reduce", "U": "update"}


def step_ends(events: Sequence[Event], steps: Sequence[int], t0: float) -> list[float]:
    """End time (relative to ``t0``) of each step's last computation on this rank: on the
    first rank, the backward (B, or with a split backward its W) that completes the step."""
    ends: dict[int, float] = {}
    for e in events:
        if e.action.kind in COMPUTE:
            ends[e.action.step] = max(ends.get(e.action.step, e.end - t0), e.end - t0)
    missing = [s for s in steps if s not in ends]
    if missing:
        raise RuntimeError(f"the first stage's action log has no computation for steps "
                           f"{missing}")
    return [ends[s] for s in steps]


def action_costs(events: Sequence[Event]) -> dict[str, Any]:
    """Per action kind: count, mean milliseconds and share of the stage's span; plus the share
    of the span spent between actions (waiting for the next chunk, or scheduling it)."""
    if not events:
        return {}
    span = max(e[3] for e in events) - min(e[2] for e in events)
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for e in events:
        kind = e.action.kind.value
        total[kind] += e.end - e.start
        count[kind] += 1
    out: dict[str, Any] = {
        KIND_NAMES.get(k, k): {"count": count[k], "mean_ms": 1e3 * total[k] / count[k],
                               "share": total[k] / span if span > 0 else 0.0}
        for k in sorted(total, key=lambda k: -total[k])}
    out["between actions"] = {"share": max(0.0, 1.0 - sum(total.values()) / span)
                              if span > 0 else 0.0}
    out["span_s"] = span
    return out


def measure(workload: Workload, depth: int, schedule: str, warm: list[list[Microbatch]],
            timed: list[list[Microbatch]], *, threads_per_stage: int, num_cpus: float,
            device: str = "cpu", virtual: int = 1) -> Measurement:
    """Train ``warm`` then ``timed`` steps through ``PipelineTrainer`` (Ray must be running),
    ``depth`` ranks each holding ``virtual`` stages."""
    from pd2bw_ray import ActorResources, PipelineConfig, PipelineTrainer

    chain = workload.chain(depth * virtual)
    m = len(timed[0])
    config = PipelineConfig(list(chain.module_to_stage_map),
                            {str(s): [s % depth] for s in range(depth * virtual)},
                            source=f"<bench d={depth} v={virtual}>")
    trainer = PipelineTrainer(
        list(chain.modules), chain.loss_fn, config, workload.optimizer, schedule=schedule,
        num_microbatches=m, tied_parameters=[list(g) for g in chain.tied_parameters] or None,
        resources=ActorResources(num_cpus=num_cpus, num_gpus=1 if device == "cuda" else 0,
                                 torch_threads=threads_per_stage))
    try:
        before = trainer.stats()
        trainer.train(warm)
        trainer.stats(reset_peaks=True)
        first = trainer.step
        t0 = time.time()
        losses = trainer.train(timed)
        call = time.time() - t0
        log = trainer.action_log()
        after = trainer.stats()
    finally:
        trainer.shutdown()
    stages = []
    for s in range(depth):
        mem = after[(s, 0)]["memory"]
        stages.append(StageMemory(
            s, mem["weights"], mem["optimizer"], mem["peak_stash"], mem["peak_in_flight"],
            mem["process_peak_rss"] - before[(s, 0)]["memory"]["process_peak_rss"]))
    first_events = log[(0, 0)]
    extra: dict[str, Any] = {
        "actions": {s: action_costs(log[(s, 0)]) for s in range(depth)},
        "compute_ms": compute_medians(
            (s if e.action.stage is None else e.action.stage, e.action.kind.value,
             e.end - e.start)
            for s in range(depth) for e in log[(s, 0)] if e.action.kind in COMPUTE),
        "time_fractions": {s: after[(s, 0)]["time"] for s in range(depth)},
        "first_action_after_s": (min(e[2] for e in first_events) - t0) if first_events else None,
        "virtual_stages": virtual,
    }
    if device == "cuda":
        extra["cuda_peak_allocated"] = [after[(s, 0)]["memory"].get("cuda_peak_allocated")
                                        for s in range(depth)]
    return Measurement(
        workload=workload.name, variant=f"pd2bw-{schedule}", framework="pd2bw-ray",
        schedule=schedule, depth=depth, threads_total=threads_per_stage * depth,
        num_microbatches=m, microbatch_size=getattr(workload, "microbatch_size", 1),
        step_ends=tuple(step_ends(first_events, range(first, first + len(timed)), t0)),
        call_seconds=call, losses=tuple(losses), stages=tuple(stages), extra=extra)
