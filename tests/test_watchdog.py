"""The driver's watchdog: a stage replica that hangs where no peer waits on it (compute with
d = 1, the drain with w = 1 and no clipping or ties, export_state, memory) or hangs while its peer
waits in a collective is reported, naming the stage and replica, within CommConfig.timeout_s plus
REPORT_MARGIN_S; then every actor of the pipeline is stopped, as after a dead actor."""

from __future__ import annotations

import re
import time

import psutil
import pytest
import torch
from torch import nn

from pd2bw_ray import CommConfig, PipelineConfig, PipelineTrainer
from pd2bw_ray.executor import PipelineFailure
from pd2bw_ray.watchdog import REPORT_MARGIN_S, Activity, Heartbeat, Watchdog
from pipeline_helpers import (HangAfter, HangingStateDictSGD, HangingStateSGD, HangingStepSGD,
                              HangOnRankAfter)

TIMEOUT = 3.0
H, B = 4, 2


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def steps(n, m, w=1):
    g = torch.Generator().manual_seed(0)
    return [[(torch.randn(B, H, generator=g), torch.randn(B, H, generator=g))
             for _ in range(m * w)] for _ in range(n)]


def conf(d, w):
    """Two modules on d = 1 or 2 stages of w replicas."""
    return PipelineConfig([k * d // 2 for k in range(2)],
                          {str(s): list(range(s * w, (s + 1) * w)) for s in range(d)})


def run_until_failure(ray, modules, d, w, m, optimizer_factory, what):
    """Start a pipeline, run ``what(trainer)``; returns (error text, seconds the call took)
    after checking that no actor of the pipeline is left."""
    trainer = PipelineTrainer(modules, nn.MSELoss(), conf(d, w), optimizer_factory,
                              schedule="2bw", num_microbatches=m,
                              comm=CommConfig(timeout_s=TIMEOUT))
    pids = [p["pid"] for p in trainer.placement().values()]
    t0 = time.monotonic()
    try:
        with pytest.raises(PipelineFailure) as info:
            what(trainer)
        took = time.monotonic() - t0
        print(f"reported {took:.1f} s after the call began (timeout_s {TIMEOUT:g} s)")
    finally:
        trainer.shutdown()
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    assert not [n for n in names if n.startswith(trainer.name)], names
    deadline = time.monotonic() + 15
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [p for p in pids if psutil.pid_exists(p) and
             psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"stage processes still running: {alive}"
    return str(info.value), took


def test_a_hung_compute_with_one_stage_is_reported(ray_cluster):
    text, took = run_until_failure(
        ray_cluster, [HangAfter(3), nn.Linear(H, H)], 1, 1, 2, sgd,
        lambda t: t.train(steps(4, 2)))
    assert "stage 0 replica 0 hung: run at F1.1@v0 made no progress for" in text, text
    assert took <= TIMEOUT + REPORT_MARGIN_S, took


def test_a_stage_hung_while_its_replica_waits_in_a_collective_is_reported(ray_cluster):
    text, took = run_until_failure(
        ray_cluster, [HangOnRankAfter(2, rank=1), nn.Linear(H, H)], 1, 2, 2, sgd,
        lambda t: t.train(steps(3, 2, w=2)))
    assert ("stage 0 replica 0: no all-reduce over replicas:0 from the other members "
            "(ranks [0, 1]) within 3 s") in text, text
    assert re.search(r"stage 0 replica 1 (hung|was still busy): run at F1.0@v0", text), text
    assert took <= TIMEOUT + REPORT_MARGIN_S, took


def test_a_hang_in_the_drain_is_reported(ray_cluster):
    # w = 1, no clipping, no ties: the last updates wait on no one; the 2nd update hangs
    text, took = run_until_failure(
        ray_cluster, [nn.Linear(H, H), nn.Linear(H, H)], 2, 1, 2,
        lambda params: HangingStepSGD(params, n=1), lambda t: t.train(steps(3, 2)))
    for s in (0, 1):
        assert f"stage {s} replica 0 hung: run at U1->v2 made no progress for" in text, text
    assert took <= TIMEOUT + REPORT_MARGIN_S, took


def test_a_hang_in_export_state_is_reported(ray_cluster, tmp_path):
    text, took = run_until_failure(
        ray_cluster, [nn.Linear(H, H), nn.Linear(H, H)], 2, 1, 2, HangingStateDictSGD.wrap,
        lambda t: t.checkpoint(str(tmp_path)))
    assert "stage 0 replica 0 hung: export_state made no progress for" in text, text
    assert took <= TIMEOUT + REPORT_MARGIN_S, took


def test_a_hang_in_memory_is_reported(ray_cluster):
    text, took = run_until_failure(
        ray_cluster, [nn.Linear(H, H), nn.Linear(H, H)], 2, 1, 2, HangingStateSGD,
        lambda t: t.stats())
    assert "stage 1 replica 0 hung: memory made no progress for" in text, text
    assert took <= TIMEOUT + REPORT_MARGIN_S, took


def test_a_hung_thread_is_reported_in_local_mode():
    trainer = PipelineTrainer([HangAfter(3), nn.Linear(H, H)], nn.MSELoss(), conf(1, 1), sgd,
                              schedule="2bw", num_microbatches=2, local=True,
                              comm=CommConfig(timeout_s=TIMEOUT))
    t0 = time.monotonic()
    try:
        with pytest.raises(PipelineFailure, match="stage 0 replica 0 hung: run at F1.1@v0"):
            trainer.train(steps(4, 2))
        assert time.monotonic() - t0 <= TIMEOUT + REPORT_MARGIN_S
    finally:
        trainer.shutdown()


def test_the_watchdog_judges_heartbeats():
    dog = Watchdog(timeout_s=3.0, interval_s=0.5)
    assert dog.stalled("stage 1 replica 0", Heartbeat("run", "F0.1@v0", 4.9)) is None
    why = dog.stalled("stage 1 replica 0", Heartbeat("run", "F0.1@v0", 5.1))
    assert why.startswith("stage 1 replica 0 hung: run at F0.1@v0 made no progress for 5 s")
    assert dog.stalled("stage 1 replica 0", Heartbeat(None, None, 100.0)) is None
    assert dog.not_started("stage 1 replica 0", 5.1).endswith("did not start for 5 s")
    assert dog.silent("stage 0 replica 1", 5.1, answered_before=True)
    assert dog.silent("stage 0 replica 1", 5.1, answered_before=False) is None   # starting
    a = Activity()
    a.begin("run")
    a.progress("F0.0@v0")
    beat = a.heartbeat()
    assert (beat.method, beat.detail) == ("run", "F0.0@v0") and beat.stalled_s < 1.0
    a.end()
    assert a.heartbeat().method is None
