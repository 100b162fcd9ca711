"""The benchmark harness (bench/): its activation meter against hand-computed bytes and against
the runtime's own accounting, and a seconds-long run that writes the table, JSON and chart."""

import json

import pytest
import torch
from torch import nn

from bench.activation_meter import ActivationMeter, MeteredStage
from bench.measurement import Measurement, StageMemory, steady_period
from bench.report import BenchRun
from bench.targets import checks, paired_ratios
from bench.workloads import BertWorkload, MlpWorkload, make_adam
from pd2bw_ray import PipelineConfig, PipelineTrainer


def test_meter_counts_saved_tensors_inputs_and_outputs_until_backward():
    meter = ActivationMeter()
    stage = MeteredStage(nn.Sequential(nn.Linear(16, 64), nn.ReLU()), meter)
    x = torch.randn(8, 16)
    out = stage(x)
    # Linear saves its input (8x16 floats; its weight is left out), ReLU its output (8x64),
    # which is also the stage output: counted once.
    assert meter.peak_bytes == 4 * (8 * 16 + 8 * 64)
    assert meter.in_flight == 1
    out2 = stage(torch.randn(8, 16))
    assert meter.peak_bytes == 2 * 4 * (8 * 16 + 8 * 64) and meter.peak_in_flight == 2
    out.sum().backward()
    out2.sum().backward()
    assert meter.live_bytes == 0 and meter.in_flight == 0


def test_meter_agrees_with_the_runtime_on_bert_stages():
    """The single-process and torch variants are metered by bench/activation_meter.py, ours by
    the runtime's Stage: both must give the same bytes for the same microbatches in flight."""
    workload = BertWorkload(config_path="configs/bert_config_tiny.json", microbatch_size=2,
                            seq_length=16, partitions=())
    chain = workload.chain(2)
    (step,) = workload.steps(1, 2, seed=3)
    trainer = PipelineTrainer(list(chain.modules), chain.loss_fn,
                              PipelineConfig(list(chain.module_to_stage_map),
                                             {"0": [0], "1": [1]}),
                              make_adam, schedule="flush", num_microbatches=2,
                              tied_parameters=[list(g) for g in chain.tied_parameters],
                              local=True)
    try:
        trainer.train([step])
        stats = trainer.stats()
    finally:
        trainer.shutdown()
    chain = workload.chain(2)   # fresh weights: the same initialisation
    meters = [ActivationMeter(), ActivationMeter()]
    stages = [MeteredStage(mod, meter, holds_outputs=(s == 0))
              for s, (mod, meter) in enumerate(zip(chain.modules, meters))]
    outs = [stages[0](*x) for x, _ in step]          # stage 0 of 1F1B, d=2: 2 in flight
    for h, mask, labels in outs:   # stage 1: 1 in flight (each graph dropped before the next);
        # its stash varies with the microbatch's labelled positions (the masked head): the
        # runtime's peak is the largest
        stages[1](h.detach().requires_grad_(True), mask, labels)
    for s in range(2):
        assert stats[(s, 0)]["memory"]["peak_in_flight"] == meters[s].peak_in_flight == 2 - s
        assert meters[s].peak_bytes == stats[(s, 0)]["memory"]["peak_stash"], s


def test_mlp_workload_splits_its_blocks_evenly_and_trains_with_sgd():
    workload = MlpWorkload(width=8, num_blocks=4, microbatch_size=3)
    whole, halves = workload.chain(1), workload.chain(2)
    x = torch.randn(3, 8)
    # the same initial weights however the blocks are cut
    torch.testing.assert_close(halves.modules[1](halves.modules[0](x)), whole.modules[0](x),
                               rtol=0, atol=0)
    assert [len(m) for m in halves.modules] == [2, 2]
    (step,) = workload.steps(1, 2, seed=0)
    assert [tuple(t.shape) for t in step[0]] == [(3, 8), (3, 8)]
    opt = workload.optimizer(list(whole.modules[0].named_parameters()))
    assert isinstance(opt, torch.optim.SGD)
    with pytest.raises(ValueError, match="split evenly"):
        workload.chain(3)


def test_steady_period_leaves_out_the_first_and_last_step():
    # step 0 ends late (fill), the last step ends early (drain); steps in between take 2 s
    assert steady_period([5.0, 7.0, 9.0, 11.0, 12.0]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least 4"):
        steady_period([1.0, 2.0, 3.0])


def _measured(variant: str, samples_per_s: float) -> Measurement:
    """A BERT d=2 measurement whose steady throughput is ``samples_per_s`` (4 x 1 samples a
    step)."""
    period = 4 / samples_per_s
    return Measurement(workload="bert", variant=variant, framework="test", schedule="-",
                       depth=1 if variant == "single-1t" else 2, threads_total=2,
                       num_microbatches=4, microbatch_size=1,
                       step_ends=tuple(period * i for i in range(1, 6)), call_seconds=1.0,
                       losses=(1.0,), stages=(StageMemory(0, 1, 1, 1, 1, 0),))


def test_ratios_within_each_repeat_pair_the_repeats_in_the_order_taken():
    # three round-robin repeats; the machine slows down from one repeat to the next, so the
    # variants' median repeats (10/20 -> 0.5 here) do not come from the same repeat
    rates = {"single-1t": (12.0, 10.0, 8.0), "pd2bw-2bw": (20.0, 21.0, 13.0),
             "pd2bw-flush": (18.0, 15.0, 14.0), "torch-1F1B": (19.0, 16.0, 12.0),
             "pd2bw-interleaved": (17.0, 20.0, 11.0), "torch-Interleaved1F1B": (16.0, 18.0, 12.0)}
    repeats = [_measured(v, rates[v][r]) for r in range(3) for v in rates]
    run = BenchRun(name="t", started="", command="", machine={}, versions={}, settings={},
                   workloads={}, measurements=tuple(repeats))
    reps = run.representatives()
    two, single = (next(m for m in reps if m.variant == v) for v in ("pd2bw-2bw", "single-1t"))
    assert paired_ratios(repeats, two, single) == pytest.approx((20 / 12, 21 / 10, 13 / 8))
    assert paired_ratios(repeats, two, None) == ()
    got = {c.target: c for c in checks(reps, repeats=repeats)}
    c = got["bert d=2: 2bw / single process (1 thread)"]
    assert c.measured == pytest.approx(20 / 10)            # the median repeats: 20 and 10
    assert c.paired == pytest.approx((20 / 12, 21 / 10, 13 / 8))
    assert c.paired_median == pytest.approx(20 / 12)
    c = got["bert d=2 m=4 v=2: interleaved / torch ScheduleInterleaved1F1B"]
    assert c.paired == pytest.approx((17 / 16, 20 / 18, 11 / 12))
    # 2bw against whichever other schedule was fastest within each repeat
    fastest = next(c for t, c in got.items() if "2bw / the fastest other" in t)
    assert fastest.paired == pytest.approx((20 / 19, 21 / 20, 13 / 14))
    # while 'measured' takes the median repeats: 2bw's 20 against interleaved's 17
    assert "(pd2bw-interleaved)" in fastest.target and fastest.measured == pytest.approx(20 / 17)


def test_quick_run_writes_table_json_and_chart(ray_cluster, tmp_path):
    from bench.pipeline_bench import main

    paths = main(["--quick", "--variants", "single,2bw,torch-1f1b", "--tiny-depth", "2",
                  "--out", str(tmp_path), "--name", "smoke"])
    record = json.loads(open(paths["json"]).read())
    got = {(m["workload"], m["variant"]): m for m in record["measurements"]}
    assert set(got) == {("bert", "single-1t"), ("bert", "single-2t"), ("bert", "pd2bw-2bw"),
                        ("bert", "torch-1F1B"), ("mlp", "single-1t"), ("mlp", "pd2bw-2bw"),
                        ("mlp", "torch-1F1B"), ("tiny", "single-1t"), ("tiny", "pd2bw-2bw"),
                        ("tiny", "torch-1F1B")}
    for m in got.values():
        assert m["samples_per_s"] > 0 and len(m["step_ends"]) >= 4
        assert all(x == x for x in m["losses"])    # finite: every variant trained
    # 1F1B at d=2 holds d - s microbatches on stage s, in both runtimes
    for variant in ("pd2bw-2bw", "torch-1F1B"):
        assert [s["peak_in_flight"] for s in got[("bert", variant)]["stages"]] == [2, 1]
        assert all(s["peak_activations"] > 0 for s in got[("bert", variant)]["stages"])
    ratio = next(c for c in record["checks"] if "2bw / single process" in c["target"])
    assert ratio["measured"] == pytest.approx(
        got[("bert", "pd2bw-2bw")]["samples_per_s"] / got[("bert", "single-1t")]["samples_per_s"])
    assert ratio["paired"] == [pytest.approx(ratio["measured"])]     # one repeat: one pair
    mlp_ratio = next(c for c in record["checks"]
                     if c["target"].startswith("mlp d=2: 2bw / single"))
    assert mlp_ratio["measured"] == pytest.approx(
        got[("mlp", "pd2bw-2bw")]["samples_per_s"] / got[("mlp", "single-1t")]["samples_per_s"])
    # every computation of the timed steps, timed in both runtimes, stage by stage
    for workload in ("bert", "mlp"):
        ours = got[(workload, "pd2bw-2bw")]["extra"]["compute_ms"]
        theirs = got[(workload, "torch-1F1B")]["extra"]["compute_ms"]
        assert set(ours) == set(theirs) == {"0", "1"}
        for s in ("0", "1"):
            assert set(ours[s]) == set(theirs[s]) == {"F", "B"}
            for kind in ("F", "B"):
                assert ours[s][kind]["count"] == theirs[s][kind]["count"] == (
                    len(got[(workload, "pd2bw-2bw")]["step_ends"])
                    * got[(workload, "pd2bw-2bw")]["num_microbatches"])
                assert ours[s][kind]["median_ms"] > 0 and theirs[s][kind]["median_ms"] > 0
    text = open(paths["md"]).read()
    assert "## Targets" in text and "| pd2bw-2bw | pd2bw-ray | 2bw | 2 |" in text
    assert "within each repeat: median [range]" in text
    assert "## `bert`: each computation, pd2bw-ray beside torch (same run)" in text
    assert "| pd2bw-2bw | torch-1F1B | all |" in text
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
