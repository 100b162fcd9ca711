"""The baseline: one process trains the whole model, the stage modules called in sequence.

Each step accumulates the gradients of its ``m`` microbatches (each loss divided by ``m``, as the
pipelines do) and applies one step of the workload's optimizer; tied weights are one shared
parameter, as in ``BertForPreTraining``. It runs in a freshly spawned process with ``torch.set_num_threads(n)``, so
its threads are exactly the ones asked for. `profile_stages` times each stage's forward and
backward separately (the stage boundaries cut as the pipelines cut them), to show how well the
partition balances the stages; `corun_profile` runs each stage in its own process, all at once
and without communication: what each stage of a ``d``-stage pipeline gets from a machine whose
cores share caches and memory bandwidth.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any, Sequence

import torch
from torch import nn

from bench.activation_meter import ActivationMeter, MeteredStage
from bench.measurement import Measurement, StageMemory, peak_rss_bytes
from bench.workloads import Microbatch, StageChain, Workload


class Chain(nn.Module):
    """The stage modules in sequence (a tuple output is unpacked into the next one's inputs)."""

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__()
        self.stages = nn.ModuleList(modules)

    def forward(self, *x: Any) -> Any:
        for mod in self.stages:
            x = mod(*(x if isinstance(x, tuple) else (x,)))
        return x


def tie(chain: StageChain) -> None:
    """Make each tied group one Parameter: the first name's."""
    for group in chain.tied_parameters:
        shared = chain.parameter(group[0])
        for name in group[1:]:
            k, _, local = name.partition(".")
            owner, _, attr = local.rpartition(".")
            module = chain.modules[int(k)]
            setattr(module.get_submodule(owner) if owner else module, attr, shared)


def to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    return type(x)(to_device(v, device) for v in x)


def as_args(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def measure(workload: Workload, depth: int, warm: list[list[Microbatch]],
            timed: list[list[Microbatch]], threads: int, device: str = "cpu",
            profile: bool = False) -> Measurement:
    """Train ``warm`` then ``timed`` steps in this process (call it in a fresh one: `run`)."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    chain = workload.chain(depth)
    tie(chain)
    model = Chain(chain.modules).to(dev)
    meter = ActivationMeter()
    metered = MeteredStage(model, meter, holds_outputs=False)   # its outputs go to the loss
    optimizer = workload.optimizer(list(model.named_parameters()))
    m = len(timed[0])
    rss0 = peak_rss_bytes()
    ends: list[float] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    for i, microbatches in enumerate(list(warm) + list(timed)):
        if i == len(warm):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            meter.reset_peak()
            t0 = time.perf_counter()
        total = torch.zeros((), device=dev)
        for x, y in microbatches:
            out = metered(*as_args(to_device(x, dev)))
            loss = chain.loss_fn(out, to_device(y, dev))
            (loss / m).backward()
            total += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= len(warm):
            losses.append(float(total) / m)   # float() waits for the device
            ends.append(time.perf_counter() - t0)
    call = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    optim = sum(v.numel() * v.element_size() for st in optimizer.state.values()
                for v in st.values() if isinstance(v, torch.Tensor))
    extra: dict[str, Any] = {}
    if dev.type == "cuda":
        extra["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(dev)
    if profile:
        extra["stage_compute_ms"] = profile_stages(chain, _profile_microbatches(timed), dev)
    mem = StageMemory(0, weights, optim, meter.peak_bytes, meter.peak_in_flight,
                      peak_rss_bytes() - rss0)
    return Measurement(
        workload=workload.name, variant=f"single-{threads}t", framework="single process",
        schedule="-", depth=1, threads_total=threads, num_microbatches=m,
        microbatch_size=getattr(workload, "microbatch_size", 1), step_ends=tuple(ends),
        call_seconds=call, losses=tuple(losses), stages=(mem,), extra=extra)


def profile_stages(chain: StageChain, microbatches: list[Microbatch], device: torch.device,
                   ) -> list[dict[str, float]]:
    """Mean forward and backward milliseconds of each stage (the first microbatch is a warm-up,
    the rest are timed), the stages cut apart at their boundaries like the pipeline's."""
    d = chain.depth
    sums = [{"forward_ms": 0.0, "backward_ms": 0.0} for _ in range(d)]
    timed = microbatches[1:] or microbatches

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for n, (x, y) in enumerate([microbatches[0]] + list(timed)):
        acts: Any = as_args(to_device(x, device))
        kept = []
        for s, mod in enumerate(chain.modules):
            inputs = tuple(a.detach().requires_grad_(a.is_floating_point()) for a in acts)
            sync()
            t = time.perf_counter()
            out = mod(*inputs)
            if s == d - 1:
                out = chain.loss_fn(out, to_device(y, device))
            sync()
            if n:
                sums[s]["forward_ms"] += (time.perf_counter() - t) * 1e3 / len(timed)
            kept.append((inputs, out))
            acts = as_args(out)
        grads = None
        for s in reversed(range(d)):
            inputs, out = kept[s]
            sync()
            t = time.perf_counter()
            if s == d - 1:
                out.backward()
            else:
                floats = [o for o in as_args(out) if o.is_floating_point()]
                torch.autograd.backward(floats, grads)
            sync()
            if n:
                sums[s]["backward_ms"] += (time.perf_counter() - t) * 1e3 / len(timed)
            grads = [a.grad for a in inputs if a.is_floating_point()]
    for mod in chain.modules:
        mod.zero_grad(set_to_none=True)
    return sums


def _profile_microbatches(timed: list[list[Microbatch]]) -> list[Microbatch]:
    return [mb for step in timed[:2] for mb in step]


def _stage_inputs(chain: StageChain, stage: int, microbatches: list[Microbatch],
                  device: torch.device) -> list[tuple[tuple, Any]]:
    """Each microbatch's inputs to ``stage`` (earlier stages run without grad) and targets."""
    out = []
    with torch.no_grad():
        for x, y in microbatches:
            acts: Any = as_args(to_device(x, device))
            for mod in chain.modules[:stage]:
                acts = as_args(mod(*acts))
            out.append((acts, to_device(y, device)))
    return out


def _stage_timeline(chain: StageChain, stage: int, inputs: list[tuple[tuple, Any]],
                    ) -> list[tuple[float, float, float]]:
    """``(start, forward end, backward end)`` wall times of each microbatch through ``stage``
    alone; the gradient of its outputs is ones (the values do not change the cost)."""
    last = stage == chain.depth - 1
    times = []
    for acts, y in inputs:
        acts = tuple(a.detach().requires_grad_(a.is_floating_point()) for a in acts)
        t0 = time.time()
        out = chain.modules[stage](*acts)
        if last:
            out = chain.loss_fn(out, y)
        t1 = time.time()
        if last:
            out.backward()
        else:
            floats = [o for o in as_args(out) if o.is_floating_point()]
            torch.autograd.backward(floats, [torch.ones_like(o) for o in floats])
        times.append((t0, t1, time.time()))
    return times


def _corun_one(workload: Workload, depth: int, stage: int, microbatches: list[Microbatch],
               threads: int, barrier: Any, results: Any) -> None:
    torch.set_num_threads(threads)
    chain = workload.chain(depth)
    inputs = _stage_inputs(chain, stage, microbatches, torch.device("cpu"))
    barrier.wait()
    results.put((stage, _stage_timeline(chain, stage, inputs)))


def corun_profile(workload: Workload, depth: int, timed: list[list[Microbatch]],
                  threads: int = 1) -> list[dict[str, float]]:
    """Each stage's forward and backward in its own process, all ``depth`` started together
    (no communication): mean milliseconds over the microbatches that ran while every stage
    was still running (the first one left out as a warm-up)."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(depth), ctx.Queue()
    mbs = _profile_microbatches(timed)
    procs = [ctx.Process(target=_corun_one, args=(workload, depth, s, mbs, threads, barrier,
                                                  results)) for s in range(depth)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=600) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    start = max(times[1][0] for times in got.values())   # after every warm-up microbatch
    end = min(times[-1][2] for times in got.values())
    out = []
    for s in range(depth):
        inside = [t for t in got[s] if t[0] >= start and t[2] <= end] or got[s][1:2]
        out.append({"forward_ms": 1e3 * sum(t[1] - t[0] for t in inside) / len(inside),
                    "backward_ms": 1e3 * sum(t[2] - t[1] for t in inside) / len(inside),
                    "microbatches": len(inside)})
    return out


def run(workload: Workload, depth: int, warm: list[list[Microbatch]],
        timed: list[list[Microbatch]], threads: int, device: str = "cpu",
        profile: bool = False) -> Measurement:
    """`measure` in a freshly spawned process."""
    with mp.get_context("spawn").Pool(1) as pool:
        m = pool.apply(measure, (workload, depth, warm, timed, threads, device, profile))
    if profile and depth > 1 and device == "cpu":
        m.extra["stage_compute_ms_corun"] = corun_profile(workload, depth, timed, threads)
    return m
