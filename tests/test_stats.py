"""Per-stage statistics: memory accounting and time fractions (in-process pipeline)."""

import pytest
import torch
from torch import nn

from pd2bw_ray import PipelineConfig, PipelineTrainer
from pd2bw_ray.driver import time_fractions

D, M = 3, 6


def run(schedule, recompute=(), m2s=(0, 0, 1, 1, 2)):
    from pd2bw_ray import StageOptions

    torch.manual_seed(0)
    mods = [nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)]
    steps = [[(torch.randn(8, 16), torch.randn(8, 16)) for _ in range(M)] for _ in range(3)]
    trainer = PipelineTrainer(mods, nn.MSELoss(),
                              PipelineConfig(list(m2s), {str(i): [i] for i in range(m2s[-1] + 1)}),
                              lambda p: torch.optim.Adam(p), schedule=schedule,
                              num_microbatches=M, local=True,
                              stage_options=StageOptions(recompute=recompute))
    try:
        trainer.train(steps)
        return trainer.stats()
    finally:
        trainer.shutdown()


def test_memory_follows_the_schedule():
    got = {s: run(s) for s in ("2bw", "flush", "gpipe")}
    for s in range(D):
        assert got["2bw"][(s, 0)]["memory"]["peak_in_flight"] == D - s
        assert got["flush"][(s, 0)]["memory"]["peak_in_flight"] == D - s
        assert got["gpipe"][(s, 0)]["memory"]["peak_in_flight"] == M
        assert got["2bw"][(s, 0)]["memory"]["weight_versions"] == 2
        assert got["flush"][(s, 0)]["memory"]["weight_versions"] == 1
        assert got["gpipe"][(s, 0)]["memory"]["weight_versions"] == 1
        w2, w1 = (got[k][(s, 0)]["memory"]["weights"] for k in ("2bw", "flush"))
        assert w2 == 2 * w1
    # stage 0 of gpipe stashes all m microbatches, 1F1B only d of them
    g, f = (got[k][(0, 0)]["memory"]["peak_stash"] for k in ("gpipe", "flush"))
    assert g == pytest.approx(f * M / D, rel=0.01)
    # stage 0 (Linear, ReLU) by hand: per microbatch its input (8x16 floats, saved by Linear) and
    # the ReLU's output (8x64, saved by ReLU; it is also the stage output), 3 in flight
    per_mb = 4 * (8 * 16 + 8 * 64)
    assert got["flush"][(0, 0)]["memory"]["peak_stash"] == D * per_mb
    # Adam keeps two moments and a step count per parameter
    assert got["flush"][(0, 0)]["memory"]["optimizer"] >= 2 * w1


def test_recomputation_stashes_only_inputs_and_outputs():
    # stage 0 = Linear, ReLU, Linear, ReLU: it saves its input and both ReLU outputs (8x64 each)
    m2s = (0, 0, 0, 0, 1)
    plain = run("flush", m2s=m2s)[(0, 0)]["memory"]["peak_stash"]
    recomputed = run("flush", recompute=(0,), m2s=m2s)[(0, 0)]["memory"]["peak_stash"]
    assert plain == 2 * 4 * (8 * 16 + 2 * 8 * 64)       # 2 in flight on stage 0 of 2
    assert recomputed == 2 * 4 * (8 * 16 + 8 * 64)      # only its input and its output


def test_time_fractions_sum_to_one():
    got = run("2bw")
    for v in got.values():
        t = v["time"]
        assert t["compute"] > 0 and t["seconds"] > 0
        assert t["compute"] + t["comm"] + t["wait"] + t["idle"] == pytest.approx(1.0)
    fr = time_fractions([("compute", "F", 0.0, 1.0), ("wait", "RA", 2.0, 4.0)])
    assert fr["compute"] == pytest.approx(0.25) and fr["wait"] == pytest.approx(0.5)
    assert fr["idle"] == pytest.approx(0.25)
