"""The same stages under PyTorch's own pipelining: ``torch.distributed.pipelining.PipelineStage``
with ``Schedule1F1B``, ``ScheduleGPipe``, ``ScheduleInterleaved1F1B`` or
``ScheduleInterleavedZeroBubble``, one spawned process per pipeline rank, GLOO (NCCL on GPUs).

A rank holds one stage, or (``virtual`` = v > 1, the interleaved schedules) v stages: stage s on
rank s % d, as torch's looped placement and pd2bw-ray's virtual stages both place them.
``InterleavedZB`` with one stage per rank is torch's zero-bubble schedule (ZB1P) in the shape of
ZB-H1; with v stages per rank, its interleaved form.

Each rank builds the workload's stage chain (same seed, same initial weights) and keeps its own
stage, wrapped in a `MeteredStage` so its activations are counted as pd2bw-ray counts them. A
step is ``schedule.step`` on the step's microbatches concatenated along the batch dimension (the
schedule cuts them back into exactly the same microbatches), then, for weights tied across stages
(BERT's word embedding and MLM decoder), an all-reduce of their gradients between the holders, as
pd2bw-ray does, and ``optimizer.step()``. Torch's schedules flush the pipeline in every step.

Every computation of the timed steps is timed around the stage's ``forward_one_chunk``,
``backward_one_chunk`` and ``backward_weight_one_chunk`` (`_time_computations`), so that the report
can set each beside pd2bw-ray's action log. Torch computes the loss outside
``forward_one_chunk`` (pd2bw-ray's last-stage forward includes it); both count its backward in the
last stage's backward.
"""

from __future__ import annotations

import datetime
import math
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from typing import Any

import torch
from torch import nn

from bench.activation_meter import ActivationMeter, MeteredStage
from bench.measurement import Measurement, StageMemory, compute_medians, peak_rss_bytes
from bench.single_process import as_args
from bench.workloads import Microbatch, Workload

SCHEDULES = ("1F1B", "GPipe", "Interleaved1F1B", "InterleavedZB")
MULTI_STAGE = ("Interleaved1F1B", "InterleavedZB")   # PipelineScheduleMulti: a list of stages


class PackedTargetLoss(nn.Module):
    """``loss_fn`` on targets that travel packed in one tensor: the schedule splits a step's
    target along dim 0 and takes one tensor, so a tuple of targets (BERT's MLM labels and NSP
    label) is flattened per sample and concatenated along dim 1 (`pack_targets`)."""

    def __init__(self, loss_fn: nn.Module, shapes: list[tuple[int, ...]] | None):
        super().__init__()
        self.loss_fn = loss_fn
        self.shapes = shapes     # per-sample shapes of the tuple's tensors; None: one tensor
        self.first_call = True

    def forward(self, output: Any, packed: torch.Tensor) -> torch.Tensor:
        if self.first_call:
            self.first_call = False
            try:
                return self._loss(output, packed)
            except ValueError:
                # torch's schedule infers the gradients' metadata once, before the first real
                # microbatch, from a forward on stand-in inputs (zeros) with the real targets.
                # BERT's labels travel with the inputs, so that pass scores other positions than
                # its targets label and the loss refuses it; any scalar that depends on every
                # output gives torch the metadata it needs.
                outputs = output if isinstance(output, tuple) else (output,)
                return sum(o.float().sum() * 0 for o in outputs)
        return self._loss(output, packed)

    def _loss(self, output: Any, packed: torch.Tensor) -> torch.Tensor:
        if self.shapes is None:
            return self.loss_fn(output, packed)
        parts, off = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            parts.append(packed[:, off:off + n].reshape(packed.shape[0], *shape))
            off += n
        return self.loss_fn(output, tuple(parts))


def pack_targets(targets: Any) -> tuple[torch.Tensor, list[tuple[int, ...]] | None]:
    if isinstance(targets, torch.Tensor):
        return targets, None
    shapes = [tuple(t.shape[1:]) for t in targets]
    return torch.cat([t.reshape(t.shape[0], -1) for t in targets], dim=1), shapes


def _batch(microbatches: list[Microbatch]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor,
                                                    list[tuple[int, ...]] | None]:
    """A step's inputs (concatenated per argument) and its packed targets."""
    inputs = [as_args(x) for x, _ in microbatches]
    args = tuple(torch.cat([mb[j] for mb in inputs]) for j in range(len(inputs[0])))
    packed = [pack_targets(y) for _, y in microbatches]
    return args, torch.cat([p for p, _ in packed]), packed[0][1]


def _rank_main(rank: int, depth: int, virtual: int, port: int, workload: Workload,
               schedule: str, warm: list[list[Microbatch]], timed: list[list[Microbatch]],
               threads: int, device: str, results: Any) -> None:
    try:
        results.put((rank, _train_rank(rank, depth, virtual, port, workload, schedule, warm,
                                       timed, threads, device)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, traceback.format_exc()))


def _schedule_class(schedule: str):
    from torch.distributed import pipelining as pp

    return {"1F1B": pp.Schedule1F1B, "GPipe": pp.ScheduleGPipe,
            "Interleaved1F1B": pp.ScheduleInterleaved1F1B,
            "InterleavedZB": pp.ScheduleInterleavedZeroBubble}[schedule]


def _time_computations(stage: Any, records: list, timing: list[bool], device: torch.device
                       ) -> None:
    """Wrap ``stage``'s computations (instance attributes, which the schedules call) so each
    appends ``(stage index, kind, seconds)`` to ``records`` while ``timing[0]`` is set: ``F``, a
    whole backward ``B``, or a split backward's input pass ``I`` and weight pass ``W``."""
    def wrap(name: str, kind_of) -> None:
        inner = getattr(stage, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            if timing[0]:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                records.append((stage.stage_index, kind_of(kwargs), time.perf_counter() - t0))
            return out
        setattr(stage, name, timed)

    wrap("forward_one_chunk", lambda kw: "F")
    wrap("backward_one_chunk", lambda kw: "B" if kw.get("full_backward", True) else "I")
    wrap("backward_weight_one_chunk", lambda kw: "W")


def _train_rank(rank, depth, virtual, port, workload, schedule, warm, timed, threads, device):
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage

    torch.set_num_threads(threads)
    if device == "cuda":
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
    else:
        dev = torch.device("cpu")
    dist.init_process_group("nccl" if device == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=depth, timeout=datetime.timedelta(seconds=300))
    try:
        num_stages = depth * virtual
        chain = workload.chain(num_stages)
        local = [rank + k * depth for k in range(virtual)]     # stage s on rank s % depth
        meters = {s: ActivationMeter() for s in local}
        modules = {}
        for s in local:
            modules[s] = MeteredStage(chain.modules[s], meters[s],
                                      holds_outputs=s < num_stages - 1).to(dev)
            meters[s].exclude(modules[s])   # after .to(): on a GPU the weights moved
        _, _, shapes = _batch(timed[0])
        loss_fn = PackedTargetLoss(chain.loss_fn, shapes)
        stages = [PipelineStage(modules[s], s, num_stages, dev) for s in local]
        records: list[tuple[int, str, float]] = []
        timing = [False]
        for stage in stages:
            _time_computations(stage, records, timing, dev)
        m = len(timed[0])
        cls = _schedule_class(schedule)
        # every rank runs backward on all its microbatches
        sched = (cls(stages, n_microbatches=m, loss_fn=loss_fn) if schedule in MULTI_STAGE
                 else cls(stages[0], n_microbatches=m, loss_fn=loss_fn))
        params = [(f"{s}.{n}", p) for s in local for n, p in modules[s].named_parameters()]
        optimizer = workload.optimizer(params)
        ties = []   # (group, this rank's copy) for weights tied across stages
        for group in chain.tied_parameters:
            stage_of = {name: int(name.split(".", 1)[0]) for name in group}
            holders = sorted({s % depth for s in stage_of.values()})
            pg = dist.new_group(holders)       # every rank creates every group
            mine = [n for n in group if stage_of[n] % depth == rank]
            if len(mine) > 1:
                raise ValueError(f"tied weights {mine} would sit on one rank twice; this "
                                 "benchmark all-reduces one copy per rank")
            if len(holders) > 1 and mine:
                ties.append((pg, chain.parameter(mine[0])))
        first, last = 0 in local, num_stages - 1 in local
        rss0 = peak_rss_bytes()
        ends: list[float] = []
        losses: list[float] = []
        t0 = time.perf_counter()
        for i, microbatches in enumerate(list(warm) + list(timed)):
            if i == len(warm):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                for meter in meters.values():
                    meter.reset_peak()
                timing[0] = True
                t0 = time.perf_counter()
            args, target, _ = _batch(microbatches)
            step_losses: list[torch.Tensor] = []
            kwargs: dict[str, Any] = {"return_outputs": False}
            if last:
                kwargs.update(target=target.to(dev), losses=step_losses)
            sched.step(*((a.to(dev) for a in args) if first else ()), **kwargs)
            for pg, p in ties:
                dist.all_reduce(p.grad, group=pg)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= len(warm):
                if step_losses:
                    losses.append(sum(float(x.detach()) for x in step_losses) / m)
                elif dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                ends.append(time.perf_counter() - t0)
        weights = sum(p.numel() * p.element_size() for _, p in params)
        optim = sum(v.numel() * v.element_size() for st in optimizer.state.values()
                    for v in st.values() if isinstance(v, torch.Tensor))
        # like pd2bw-ray's virtual stages: each stage's accounting, summed over the rank's stages
        out = {"ends": ends, "losses": losses, "computations": records,
               "memory": StageMemory(rank, weights, optim,
                                     sum(mt.peak_bytes for mt in meters.values()),
                                     sum(mt.peak_in_flight for mt in meters.values()),
                                     peak_rss_bytes() - rss0)}
        if dev.type == "cuda":
            out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(dev)
        return out
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(workload: Workload, depth: int, schedule: str, warm: list[list[Microbatch]],
        timed: list[list[Microbatch]], threads_per_stage: int, device: str = "cpu",
        timeout_s: float = 600.0, virtual: int = 1) -> Measurement:
    """Train ``warm`` then ``timed`` steps with ``depth`` spawned ranks, each holding
    ``virtual`` stages; the first rank's step end times give the throughput."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if virtual != 1 and schedule not in MULTI_STAGE:
        raise ValueError(f"torch's {schedule} runs one stage per rank, not {virtual}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    env_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads_per_stage)   # inherited by the spawned ranks
    try:
        procs = [ctx.Process(target=_rank_main, name=f"torch-pp-rank{r}",
                             args=(r, depth, virtual, port, workload, schedule, warm, timed,
                                   threads_per_stage, device, results))
                 for r in range(depth)]
        for p in procs:
            p.start()
    finally:
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_before
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < depth:
            try:
                rank, res = results.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"torch.distributed.pipelining {schedule}: ranks "
                                   f"{sorted(set(range(depth)) - set(got))} did not report "
                                   f"within {timeout_s:.0f} s") from None
            if isinstance(res, str):
                # one rank's crash closes its peers' connections: report every rank's error,
                # the root cause among them
                errors = {rank: res}
                while len(errors) + len(got) < depth:
                    try:
                        other, res = results.get(timeout=10)
                    except queue.Empty:
                        break
                    if isinstance(res, str):
                        errors[other] = res
                raise RuntimeError("\n".join(
                    f"torch.distributed.pipelining {schedule} rank {r} failed:\n{e}"
                    for r, e in sorted(errors.items())))
            got[rank] = res
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    last = got[depth - 1]
    extra: dict[str, Any] = {}
    if device == "cuda":
        extra["cuda_peak_allocated"] = [got[r]["cuda_peak_allocated"] for r in range(depth)]
    return Measurement(
        workload=workload.name, variant=f"torch-{schedule}", framework="torch.distributed."
        "pipelining", schedule=schedule, depth=depth, threads_total=threads_per_stage * depth,
        num_microbatches=len(timed[0]), microbatch_size=getattr(workload, "microbatch_size", 1),
        step_ends=tuple(got[0]["ends"]), call_seconds=got[0]["ends"][-1],
        losses=tuple(last["losses"]), stages=tuple(got[r]["memory"] for r in range(depth)),
        extra={**extra, "virtual_stages": virtual,
               "compute_ms": compute_medians(x for r in range(depth)
                                             for x in got[r]["computations"])})
