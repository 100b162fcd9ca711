"""The planner: cost and memory models on hand-made profiles (checked against hand-computed
values and a brute-force search), and the memory model against the runtime's own accounting."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest

from pd2bw_ray import PipelineConfig, PipelineTrainer, StageOptions
from pd2bw_ray.planner import (KINDS, Cluster, MicrobatchProfile, ModelProfile, Network, Part,
                               PlanError, WeightPart, average_profiles, choose, evaluate,
                               fastest_partition, parse_bytes, parse_rate, parse_seconds, search)
from stages.bert_planner import (default_optimizer, module_spec, plan_for_job, profile_bert,
                                 profile_bert_concurrently)
from stages.plan import main as plan_main
from stages import BertModelConfig, BertPartition, build_bert_pipeline, pipeline_conf
from stages.bert_batches import expected_labels_per_sequence, random_pretraining_steps

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = BertModelConfig.from_json(CONFIGS / "bert_config_tiny.json")


def hand_profile(*, num_layers=4, sizes=(1, 2, 4), layer=(1.0, 2.0, 3.0, 100, 0),
                 first=(0.0, 0.0, 0.0, 10, 15), middle=(0.0, 0.0, 0.0, 0, 20),
                 last=(0.5, 1.0, 1.5, 30, 10), only=None,
                 layer_weights=(1000, 2000, 0.1), first_weights=(500, 1000, 0.2),
                 last_weights=(700, 1400, 0.3), messages=(64, 48), tied_bytes=400
                 ) -> ModelProfile:
    """Per-sample times (s) and bytes, scaled by the microbatch size: ``(forward, backward,
    recomputing backward, stash, recomputation stash)`` per part; ``(param, optimizer bytes,
    update s)`` per weight part; ``only`` defaults to first + last."""
    if only is None:
        only = tuple(a + b for a, b in zip(first, last))

    def part(values, b):
        f, g, gr, a, ar = values
        return Part(f * b, g * b, gr * b, a * b, ar * b)

    microbatches = tuple(MicrobatchProfile(
        microbatch_size=b, layer={k: part(layer, b) for k in KINDS},
        base={"first": part(first, b), "middle": part(middle, b), "last": part(last, b),
              "only": part(only, b)},
        activation_message_bytes=messages[0] * b, gradient_message_bytes=messages[1] * b)
        for b in sizes)
    only_weights = tuple(a + b for a, b in zip(first_weights, last_weights))
    return ModelProfile(
        num_layers=num_layers, seq_length=8, layer_weights=WeightPart(*layer_weights),
        base_weights={"first": WeightPart(*first_weights), "middle": WeightPart(0, 0, 0.0),
                      "last": WeightPart(*last_weights), "only": WeightPart(*only_weights)},
        microbatches=microbatches, tied_bytes=tied_bytes)


# ------------------------------------------------------------------------------------------------
# the formulas, by hand


def test_stage_estimates_match_the_formulas_by_hand():
    # 4 workers, 2 per node: pipeline r (stages 0 and 1) sits on node r, so activations stay on
    # a node (1000 B/s) and each stage's all-reduce crosses nodes (100 B/s, half of it achieved)
    net = Network(intra_node_bandwidth=1000.0, inter_node_bandwidth=100.0, latency_s=0.01,
                  allreduce_efficiency=0.5, comm_overlaps_compute=False)
    cluster = Cluster(num_workers=4, workers_per_node=2, memory_per_worker=10**6, network=net)
    c = evaluate(hand_profile(), cluster, layers_per_stage=(3, 1), microbatch_size=2,
                 num_microbatches=4, recompute=False)
    s0, s1 = c.stages
    # stage 0: embeddings (free) + 3 layers; F = 3*2, G = 3*4 per microbatch; U = 0.2 + 3*0.1
    assert s0.compute_s == pytest.approx(4 * (6 + 12) + 0.5)
    # per microbatch: activation 128 B out, gradient 96 B in, at 1000 B/s + 0.01 s each;
    # all-reduce of 3500 B over 2 replicas at 50 B/s, tied 400 B over 4 holders at 50 B/s
    x = (128 / 1000 + 0.01) + (96 / 1000 + 0.01)
    ar0 = (2 * 1 / 2 * 3500 / 50 + 2 * 0.01) + (2 * 3 / 4 * 400 / 50 + 2 * 3 * 0.01)
    assert s0.comm_s == pytest.approx(4 * x + ar0)
    assert s0.step_s == pytest.approx(72.5 + 4 * x + ar0)
    # stage 1: 1 layer + heads; F = 2 + 1, G = 4 + 2; U = 0.3 + 0.1; P = 700 + 1000
    ar1 = (2 * 1 / 2 * 1700 / 50 + 2 * 0.01) + (2 * 3 / 4 * 400 / 50 + 2 * 3 * 0.01)
    assert s1.compute_s == pytest.approx(4 * 9 + 0.4)
    assert s1.step_s == pytest.approx(36.4 + 4 * x + ar1)
    assert c.throughput == pytest.approx(2 * 4 * 2 / s0.step_s)
    # memory: 2 versions, 2 steps of gradients, Adam-like optimizer state, d - s in flight
    assert (s0.weights, s0.gradients, s0.optimizer) == (7000, 7000, 7000)
    assert s0.stash == 2 * (20 + 3 * 200) and s0.recompute_working == 0
    assert (s1.weights, s1.gradients, s1.optimizer, s1.stash) == (3400, 3400, 3400, 260)
    assert c.memory == 7000 * 3 + 1240

    overlapped = evaluate(hand_profile(), Cluster(
        num_workers=4, workers_per_node=2, memory_per_worker=10**6,
        network=Network(1000.0, 100.0, 0.01, 0.5, comm_overlaps_compute=True)),
        layers_per_stage=(3, 1), microbatch_size=2, num_microbatches=4, recompute=False)
    assert overlapped.stages[0].step_s == pytest.approx(max(72.5, 4 * x + ar0))

    rc = evaluate(hand_profile(), cluster, layers_per_stage=(3, 1), microbatch_size=2,
                  num_microbatches=4, recompute=True).stages[0]
    assert rc.compute_s == pytest.approx(4 * (6 + 3 * 6) + 0.5)    # G' = 3 per sample per layer
    assert rc.stash == 2 * 30 and rc.recompute_working == 20 + 3 * 200


def test_all_on_one_node_uses_the_intra_node_bandwidth():
    net = Network(intra_node_bandwidth=1000.0, inter_node_bandwidth=1.0, latency_s=0.0,
                  comm_overlaps_compute=False)
    one = Cluster(num_workers=2, memory_per_worker=10**6, network=net)
    two = Cluster(num_workers=2, workers_per_node=1, memory_per_worker=10**6, network=net)
    kw = dict(layers_per_stage=(4,), microbatch_size=1, num_microbatches=2, recompute=False)
    p = hand_profile()
    params = 500 + 700 + 4 * 1000
    assert evaluate(p, one, **kw).stages[0].comm_s == pytest.approx(params / 1000)
    assert evaluate(p, two, **kw).stages[0].comm_s == pytest.approx(params / 1.0)


# ------------------------------------------------------------------------------------------------
# what the search guarantees


def _sweep_limits():
    return [int(20_000 * 1.25 ** k) for k in range(30)]


def _profile_with_costly_memory():
    # large activations: small microbatches or recomputation are needed when memory is short
    return hand_profile(num_layers=6, sizes=(1, 2, 4, 8), layer=(1.0, 2.0, 3.2, 4000, 0),
                        first=(0.1, 0.2, 0.3, 50, 400), last=(1.5, 3.0, 4.4, 900, 400))


def test_a_configuration_that_does_not_fit_is_never_chosen():
    p = _profile_with_costly_memory()
    net = Network(1e4, 1e3, 1e-3, comm_overlaps_compute=False)
    fastest_misfits = 0
    for limit in _sweep_limits():
        cands = search(p, Cluster(num_workers=4, memory_per_worker=limit, network=net), 32)
        try:
            best = choose(cands)
        except PlanError:
            assert not any(c.fits for c in cands)
            continue
        assert best.fits and all(s.memory <= limit for s in best.stages)
        fastest = max(cands, key=lambda c: c.throughput)
        fastest_misfits += not fastest.fits
    assert fastest_misfits > 0   # the sweep does exclude faster configurations


def test_more_memory_never_lowers_predicted_throughput():
    p = _profile_with_costly_memory()
    net = Network(1e4, 1e3, 1e-3, comm_overlaps_compute=False)
    best = []
    for limit in _sweep_limits():
        cands = search(p, Cluster(num_workers=4, memory_per_worker=limit, network=net), 32)
        best.append(max((c.throughput for c in cands if c.fits), default=0.0))
    assert all(b >= a for a, b in zip(best, best[1:]))
    assert len(set(best)) >= 4   # memory mattered along the sweep


def test_with_zero_communication_cost_the_best_depth_balances_the_stages():
    # 6 equal layers (3 s per sample), nothing else costs time, 4 workers; a worker holds at
    # most 3 layers' state, so d = 1 does not fit; d = 2 splits 3 + 3, d = 4 at best 2,2,1,1
    free = Network(1e30, 1e30, 0.0, comm_overlaps_compute=False)
    p = hand_profile(num_layers=6, sizes=(1,), layer=(1.0, 2.0, 3.0, 100, 0),
                     first=(0, 0, 0, 0, 0), last=(0, 0, 0, 0, 0), messages=(0, 0),
                     layer_weights=(1000, 2000, 0.0), first_weights=(0, 0, 0.0),
                     last_weights=(0, 0, 0.0), tied_bytes=0)
    cluster = Cluster(num_workers=4, memory_per_worker=20_000, network=free)
    cands = search(p, cluster, global_batch_size=8)
    best = choose(cands)
    assert (best.depth, best.layers_per_stage, best.recompute) == (2, (3, 3), False)
    assert len({s.step_s for s in best.stages}) == 1
    # balanced stages reach the bound n * b / (time of the whole model per sample)
    assert best.throughput == pytest.approx(4 / 18)
    d4 = max((c for c in cands if c.depth == 4), key=lambda c: c.throughput)
    assert d4.throughput == pytest.approx(8 / (8 * 2 * 3))   # the 2-layer stage sets the pace
    assert not any(c.fits for c in cands if c.depth == 1)

    # with a costly head, the fastest d = 2 partition moves layers off the last stage until
    # both stages take equally long: 4 layers vs 2 layers + a head worth 2 layers
    heavy = hand_profile(num_layers=6, sizes=(1,), layer=(1.0, 2.0, 3.0, 100, 0),
                         first=(0, 0, 0, 0, 0), last=(2.0, 4.0, 6.0, 0, 0), messages=(0, 0),
                         layer_weights=(1000, 2000, 0.0), first_weights=(0, 0, 0.0),
                         last_weights=(0, 0, 0.0), tied_bytes=0)
    roomy = Cluster(num_workers=2, memory_per_worker=10**9, network=free)
    layers = fastest_partition(heavy, roomy, depth=2, microbatch_size=1, num_microbatches=4,
                               recompute=False)
    assert layers == (4, 2)
    c = evaluate(heavy, roomy, layers_per_stage=layers, microbatch_size=1, num_microbatches=4,
                 recompute=False)
    assert c.stages[0].step_s == pytest.approx(c.stages[1].step_s)


@pytest.mark.parametrize("seed", range(4))
def test_fastest_partition_equals_a_brute_force_search(seed):
    rng = random.Random(seed)
    L = rng.randint(3, 7)
    p = hand_profile(num_layers=L, sizes=(2,),
                     layer=(rng.uniform(0.5, 2), rng.uniform(1, 3), 4.0, rng.randint(50, 200), 0),
                     first=(rng.uniform(0, 3), rng.uniform(0, 3), 3.0, rng.randint(0, 300), 30),
                     last=(rng.uniform(0, 5), rng.uniform(0, 5), 6.0, rng.randint(0, 300), 20))
    net = Network(1e4, 1e3, 1e-3, comm_overlaps_compute=bool(seed % 2))
    for d, limit in itertools.product((1, 2, 4), (12_000, 20_000, 40_000, 10**9)):
        cluster = Cluster(num_workers=4, memory_per_worker=limit, network=net)
        kw = dict(microbatch_size=2, num_microbatches=4, recompute=False)
        lows = [0] + [1] * (d - 2) + [0] if d > 1 else [L]
        best = math.inf
        for counts in itertools.product(range(L + 1), repeat=d):
            if sum(counts) != L or any(n < lo for n, lo in zip(counts, lows)):
                continue
            c = evaluate(p, cluster, layers_per_stage=counts, **kw)
            if c.fits:
                best = min(best, c.step_s)
        got = fastest_partition(p, cluster, depth=d, **kw)
        if best == math.inf:
            assert got is None
        else:
            c = evaluate(p, cluster, layers_per_stage=got, **kw)
            assert c.fits and c.step_s == pytest.approx(best)


def test_nothing_fits_names_the_smallest_configuration():
    cands = search(hand_profile(), Cluster(num_workers=2, memory_per_worker=100), 8)
    with pytest.raises(PlanError, match="no configuration fits in .* per worker; the smallest"):
        choose(cands)
    with pytest.raises(PlanError, match="batch arithmetic"):
        choose(search(hand_profile(sizes=(4,)), Cluster(num_workers=2, memory_per_worker=1), 6))


# ------------------------------------------------------------------------------------------------
# inputs and outputs


def test_sizes_rates_and_durations_as_people_write_them():
    assert parse_bytes("16GiB") == 16 * 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_rate("12.5GB/s") == 12.5e9
    assert parse_seconds("20us") == pytest.approx(20e-6)
    for bad in ("16 GiBs", "-1GB", "lots"):
        with pytest.raises(PlanError, match="is not a size"):
            parse_bytes(bad)
    with pytest.raises(PlanError, match="is not a rate"):
        parse_rate("12.5GB")


def test_profiles_are_validated_and_survive_json(tmp_path):
    p = hand_profile()
    path = tmp_path / "profile.json"
    p.save(path)
    assert ModelProfile.load(path) == p
    with pytest.raises(PlanError, match="stage kind"):
        MicrobatchProfile(microbatch_size=1, layer={k: Part(0, 0, 0, 0, 0) for k in KINDS},
                          base={k: Part(0, 0, 0, 0, 0) for k in KINDS[:2]},
                          activation_message_bytes=0, gradient_message_bytes=0)
    with pytest.raises(PlanError, match="forward_s must be a finite number >= 0"):
        Part(-1.0, 0, 0, 0, 0)
    with pytest.raises(PlanError, match="was not profiled"):
        p.at(3)


def test_averaged_profiles_average_times_and_keep_bytes():
    slow = hand_profile(layer=(3.0, 6.0, 9.0, 100, 0), layer_weights=(1000, 2000, 0.3))
    fast = hand_profile(layer=(1.0, 2.0, 3.0, 100, 0), layer_weights=(1000, 2000, 0.1))
    mean = average_profiles([slow, fast])
    assert mean == hand_profile(layer=(2.0, 4.0, 6.0, 100, 0), layer_weights=(1000, 2000, 0.2))
    with pytest.raises(PlanError, match="disagree on .*stash_bytes"):
        average_profiles([slow, hand_profile(layer=(3.0, 6.0, 9.0, 101, 0))])


def test_module_spec_names_balanced_partitions_by_depth():
    assert module_spec((3, 3, 3, 3, 3, 3, 3, 3)) == "models.bert24.depth=8"
    assert module_spec((2, 3, 3, 2)) == "models.bert10.depth=4"
    assert module_spec((4, 2)) == "models.bert6.layers=4,2"


# ------------------------------------------------------------------------------------------------
# against the runtime


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("planner") / "tiny.profile.json"
    profile = profile_bert(TINY, seq_length=16, microbatch_sizes=(1, 2), repeats=1)
    profile.save(path)
    return profile, path


def test_concurrent_profiles_measure_the_same_bytes(tiny_profile):
    profile, _ = tiny_profile
    both = profile_bert_concurrently(TINY, concurrency=2, seq_length=16, microbatch_sizes=(1, 2),
                                     repeats=1)
    assert both.description["concurrency"] == 2
    for one, two in zip(profile.microbatches, both.microbatches):
        for kind in KINDS:
            assert one.base[kind].stash_bytes == two.base[kind].stash_bytes
            assert one.layer[kind].stash_bytes == two.layer[kind].stash_bytes
    assert both.layer_weights.param_bytes == profile.layer_weights.param_bytes


@pytest.mark.parametrize("layers, m, recompute", [((3, 1), 4, False), ((4,), 2, False),
                                                  ((1, 2, 1), 3, False), ((0, 4, 0), 5, True)])
def test_memory_model_matches_the_runtimes_accounting(tiny_profile, layers, m, recompute):
    """Weights, optimizer state and peak stash per stage, as trainer.stats() reports them, for
    partitions the profile never ran (its stages have one or two layers)."""
    profile, _ = tiny_profile
    d = len(layers)
    predicted = evaluate(profile, Cluster(num_workers=d, memory_per_worker=2**40),
                         layers_per_stage=layers, microbatch_size=2, num_microbatches=m,
                         recompute=recompute)
    model = build_bert_pipeline(TINY, BertPartition(layers), seed=0)
    trainer = PipelineTrainer(
        list(model.modules), model.loss_fn, pipeline_conf(d, 1), default_optimizer,
        schedule="2bw", num_microbatches=m, local=True,
        tied_parameters=[list(g) for g in model.tied_parameters],
        stage_options=StageOptions(recompute=tuple(range(d)) if recompute else ()))
    try:
        # other data than the profile's, labelled like it (the masked head's stash grows with
        # the labelled positions)
        trainer.train(random_pretraining_steps(
            num_steps=3, num_microbatches=m, microbatch_size=2, seq_length=16,
            vocab_size=TINY.vocab_size, seed=1,
            labels_per_sequence=expected_labels_per_sequence(16)))
        stats = trainer.stats()
    finally:
        trainer.shutdown()
    for s, est in enumerate(predicted.stages):
        got = stats[(s, 0)]["memory"]
        assert got["weights"] == est.weights
        assert got["optimizer"] == est.optimizer
        assert got["peak_stash"] == est.stash
        assert got["peak_in_flight"] == min(d - s, m)


def test_plan_for_job_returns_what_the_job_needs(tiny_profile, tmp_path):
    _, path = tiny_profile
    plan = plan_for_job(TINY, module_spec="models.bert4.depth=auto", num_workers=2,
                        memory_per_worker="64MiB", global_batch_size=8, max_seq_length=16,
                        microbatch_sizes=(1, 2), profile_path=str(path))
    assert isinstance(plan.pipeline_config, PipelineConfig)
    assert plan.pipeline_config.world_size == 2
    assert plan.candidate.fits and plan.candidate is choose(plan.candidates)
    assert plan.microbatch_size * plan.num_microbatches * plan.pipeline_config.num_replicas == 8
    partition = BertPartition(plan.candidate.layers_per_stage)
    assert plan.module_spec == module_spec(partition.layers_per_stage)
    assert plan.recompute_stages == (tuple(range(partition.num_stages)) if plan.recompute
                                     else ())
    with pytest.raises(PlanError, match="names a 24-layer BERT"):
        plan_for_job(TINY, module_spec="models.bert24.depth=auto", num_workers=2,
                     memory_per_worker="64MiB", global_batch_size=8, max_seq_length=16,
                     profile_path=str(path))
    with pytest.raises(PlanError, match="was profiled for"):   # another sequence length
        plan_for_job(TINY, module_spec="models.bert4.depth=auto", num_workers=2,
                     memory_per_worker="64MiB", global_batch_size=8, max_seq_length=32,
                     microbatch_sizes=(1, 2), profile_path=str(path))


def test_the_command_writes_conf_and_job_flags(tiny_profile, tmp_path, capsys):
    _, path = tiny_profile
    args = ["--bert_config_path", str(CONFIGS / "bert_config_tiny.json"), "--num_workers", "2",
            "--max_seq_length", "16", "--global_batch_size", "8", "--microbatch_sizes", "1,2",
            "--profile_path", str(path), "--output_dir", str(tmp_path)]
    assert plan_main(args + ["--memory_per_worker", "64MiB"]) == 0
    out = capsys.readouterr().out
    assert "samples/s" in out and "job flags: --module models.bert4." in out
    conf = PipelineConfig.from_json(tmp_path / "conf.json")
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert conf.num_stages == plan["chosen"]["depth"]
    assert conf.world_size == 2
    flags = (tmp_path / "job_flags.txt").read_text()
    assert f"--train_batch_size {plan['chosen']['microbatch_size']}" in flags
    assert plan_main(args + ["--memory_per_worker", "1KiB"]) == 2
    assert "no configuration fits" in capsys.readouterr().err


def test_the_generic_command_plans_from_a_saved_profile(tiny_profile, tmp_path, capsys):
    """`python -m pd2bw_ray.plan` needs no BERT code: a profile, a cluster, a batch."""
    from pd2bw_ray.plan import main as generic_main

    profile, path = tiny_profile
    args = ["--profile_path", str(path), "--num_workers", "2", "--global_batch_size", "8",
            "--memory_per_worker", "64MiB", "--output_dir", str(tmp_path)]
    assert generic_main(args) == 0
    out = capsys.readouterr().out
    best = choose(search(profile, Cluster(num_workers=2, memory_per_worker=64 * 2**20,
                                          network=Network()), 8))
    assert (f"chosen: depth {best.depth} x width {best.width}, layers per stage "
            f"{list(best.layers_per_stage)}, microbatch {best.microbatch_size}, "
            f"m = {best.num_microbatches}") in out
    conf = PipelineConfig.from_json(tmp_path / "conf.json")
    assert (conf.num_stages, conf.num_replicas) == (best.depth, best.width)
    assert json.loads((tmp_path / "plan.json").read_text())["chosen"]["depth"] == best.depth
    assert generic_main(args + ["--microbatch_sizes", "1,64"]) == 2
    assert "has no measurements for [64]" in capsys.readouterr().err


def test_the_library_imports_nothing_from_the_repo_only_packages():
    """The wheel ships pd2bw_ray alone, so pd2bw_ray may not import stages/, data/, jobs/ or
    bench/ (BERT's planning lives in stages/bert_planner.py)."""
    import ast

    library = Path(__file__).resolve().parents[1] / "pd2bw_ray"
    for path in sorted(library.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [])
            for name in names:
                assert name.split(".")[0] not in {"stages", "data", "jobs", "bench", "tests"}, \
                    f"{path.name}:{node.lineno} imports {name}"


def test_timing_noise_never_makes_a_negative_time():
    """Per-layer and recomputation times are differences of measured times; where the true value
    is ~0, noise can make the difference negative. The profile clamps them at 0 (a measured
    recomputing stage faster than the plain forward once crashed the profiler)."""
    from pd2bw_ray.planner import _Measured, _microbatch_profile

    got = {}
    for kind in KINDS:
        for n in (1, 2):
            got[kind, n, False] = _Measured(forward_s=1e-3 * n, backward_s=2e-3 * n,
                                            stash_bytes=100 * n)
            # recomputation measured faster than the plain forward: noise
            got[kind, n, True] = _Measured(forward_s=2e-4, backward_s=3e-4, stash_bytes=10)
    mp = _microbatch_profile(1, got, act_bytes=64, grad_bytes=64)
    for kind in KINDS:
        for part in (mp.base[kind], mp.layer[kind]):
            assert part.recompute_backward_s == 0.0
            assert part.forward_s >= 0 and part.backward_s >= 0
        assert mp.layer[kind].forward_s == pytest.approx(1e-3)
        assert mp.layer[kind].stash_bytes == 100
