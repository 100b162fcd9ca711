"""The runtime on real Ray actors (GLOO): exactness, no drain, failures, bad configs."""

import time

import pytest
import torch
from torch import nn

from pd2bw_ray import (ActorResources, CommConfig, ConfigError, PipelineConfig, PipelineFailure,
                       PipelineTrainer)
from pd2bw_ray.schedule import Kind
from pipeline_helpers import DieAfter, HangAfter
from test_exactness import M, OPTIMIZERS, TIE, assert_matches, conf, make_steps, mlp, run_case
from reference import reference_train

RES = ActorResources(num_cpus=0.5)


def pd2bw_actors(ray):
    return [a for a in ray.util.list_named_actors(all_namespaces=True)
            if "pd2bw" in a["name"]]


@pytest.mark.parametrize("schedule", ["2bw", "flush", "gpipe"])
@pytest.mark.parametrize("w,opt,clip,tie", [(2, "adam", 0.05, True), (1, "sgd", None, False)])
def test_ray_pipeline_matches_reference(ray_cluster, schedule, w, opt, clip, tie):
    run_case(schedule, w, opt, clip, tie, local=False, resources=RES)


def parse(action):
    """(kind, step, microbatch, version) of a logged forward or backward, else None."""
    if action.kind in (Kind.FORWARD, Kind.BACKWARD):
        return action.kind.value, action.step, action.microbatch, action.version
    return None


def test_2bw_never_drains_between_steps_and_calls_split_anywhere(ray_cluster):
    steps = make_steps(1)
    trainer = PipelineTrainer(mlp(), nn.MSELoss(), conf(1), OPTIMIZERS["adam"], schedule="2bw",
                              num_microbatches=M, tied_parameters=TIE, resources=RES)
    try:
        first = trainer.train(steps[:3])
        log = trainer.action_log()
        second = trainer.train(steps[3:])
        split_state = trainer.state_dict()
        versions = trainer.versions()
    finally:
        trainer.shutdown()
    # From the executed log: step t+1's first forward (stage 0) starts before step t's last
    # backward (stage 0, the last to finish a step) ends.
    events = [(parse(lbl), t0, t1) for _, lbl, t0, t1 in log[(0, 0)] if parse(lbl)]
    for t in range(2):
        first_f = min(t0 for (k, st, _, _), t0, _ in events if k == "F" and st == t + 1)
        last_b = max(t1 for (k, st, _, _), _, t1 in events if k == "B" and st == t)
        assert first_f < last_b, (t, first_f, last_b)
    # every forward/backward ran on version max(t-1, 0)
    for s, r in log:
        for _, lbl, _, _ in log[(s, r)]:
            p = parse(lbl)
            if p:
                assert p[3] == max(p[1] - 1, 0), lbl
    # two calls of 3 steps == one call of 6 == the reference
    losses, ref = reference_train(mlp(), nn.MSELoss(), steps, schedule="2bw",
                                  optimizer_factory=OPTIMIZERS["adam"], tied_parameters=TIE)
    torch.testing.assert_close(torch.tensor(first + second), torch.tensor(losses), rtol=1e-10,
                               atol=1e-12)
    assert_matches(split_state, ref)
    # at most two versions alive: W(5) (used by the next step) and W(6)
    assert all(v == [5, 6] for v in versions.values()), versions


def test_activations_whose_shapes_change_between_microbatches(ray_cluster):
    """GLOO sends an activation with its header in one message while the link's layout stays
    the same; here the microbatch size changes within and across steps (grows, shrinks, comes
    back), so both ends must switch to the two-message form and back at the same microbatch."""
    g = torch.Generator().manual_seed(3)
    sizes = [[2, 2, 2], [2, 5, 5], [1, 5, 2], [2, 2, 2], [3, 3, 1], [1, 1, 1]]
    steps = [[(torch.randn(b, 5, generator=g, dtype=torch.float64),
               torch.randn(b, 5, generator=g, dtype=torch.float64)) for b in step]
             for step in sizes]
    trainer = PipelineTrainer(mlp(), nn.MSELoss(), conf(1), OPTIMIZERS["adam"], schedule="2bw",
                              num_microbatches=M, resources=RES)
    try:
        losses = trainer.train(steps[:4]) + trainer.train(steps[4:])
        state = trainer.state_dict()
    finally:
        trainer.shutdown()
    ref_losses, ref = reference_train(mlp(), nn.MSELoss(), steps, schedule="2bw",
                                      optimizer_factory=OPTIMIZERS["adam"])
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-10,
                               atol=1e-12)
    assert_matches(state, ref)


def test_replicas_and_tied_copies_stay_bit_identical(ray_cluster):
    steps = make_steps(2)
    trainer = PipelineTrainer(mlp(), nn.MSELoss(), conf(2), OPTIMIZERS["adam"], schedule="2bw",
                              num_microbatches=M, tied_parameters=TIE, max_grad_norm=0.05,
                              resources=RES)
    try:
        trainer.train(steps)
        per = trainer.replica_state_dicts()
        placement = trainer.placement()
    finally:
        trainer.shutdown()
    for s in range(3):
        for k, v in per[(s, 0)].items():
            assert torch.equal(v, per[(s, 1)][k]), (s, k)
    for r in range(2):
        assert torch.equal(per[(0, r)]["0.weight"], per[(2, r)]["4.weight"])
    assert len({p["pid"] for p in placement.values()}) == 6


def failing_modules(bad):
    torch.manual_seed(0)
    return [nn.Linear(5, 5).double(), bad, nn.Linear(5, 5).double()]


@pytest.mark.parametrize("bad,expect", [
    (HangAfter(4), r"stage 2 replica 0: no activation .* from stage 1 replica 0 .* within 4 s"),
    (DieAfter(4), r"stage 1 replica 0 died"),
])
def test_dead_or_hung_peer_is_named_within_the_timeout(ray_cluster, bad, expect):
    trainer = PipelineTrainer(failing_modules(bad), nn.MSELoss(),
                              PipelineConfig([0, 1, 2], {"0": [0], "1": [1], "2": [2]}),
                              OPTIMIZERS["sgd"], num_microbatches=3, resources=RES,
                              comm=CommConfig(timeout_s=4))
    t0 = time.time()
    with pytest.raises(PipelineFailure, match=expect):
        trainer.train(make_steps(1))
    assert time.time() - t0 < 30
    with pytest.raises(PipelineFailure, match="stopped after a failure"):
        trainer.train(make_steps(1))
    trainer.shutdown()
    time.sleep(1)
    assert not pd2bw_actors(ray_cluster)


BAD_CONFIGS = [
    (dict(config=PipelineConfig([0, 0, 1, 1], {"0": [0], "1": [1]})),
     "module_to_stage_map has 4 entries but there are 5 modules"),
    (dict(config={"module_to_stage_map": [0, 0, 2, 2, 2], "stage_to_rank_map": {}}),
     "contiguous"),
    (dict(config={"module_to_stage_map": [1, 1, 1, 1, 1], "stage_to_rank_map": {"0": [0]}}),
     "must start at stage 0"),
    (dict(config={"module_to_stage_map": [0, 0, 1, 1, 1], "stage_to_rank_map": {"0": [0]}}),
     "stage 1 has no ranks"),
    (dict(config={"module_to_stage_map": [0, 0, 1, 1, 1],
                  "stage_to_rank_map": {"0": [0], "1": [0]}}), "rank 0 is used twice"),
    (dict(config={"module_to_stage_map": [0, 0, 1, 1, 1],
                  "stage_to_rank_map": {"0": [0, 1], "1": [2]}}), "same number of replicas"),
    (dict(num_microbatches=2), r"needs num_microbatches \(m\) >= number of stages \(d\)"),
    (dict(resources=ActorResources(num_gpus=1)), r"asks for 3 GPUs .* cluster has 0"),
    (dict(resources=ActorResources(num_cpus=3)), r"asks for 9 CPUs"),
    (dict(tied_parameters=[["0.weight", "4.wieght"]]), "'4.wieght' is not a parameter"),
    (dict(tied_parameters=[["0.weight", "4.bias"]]), "shapes differ"),
    (dict(schedule="1f1b"), "unknown schedule"),
    (dict(initial_state_dict={"0.weight": torch.zeros(5, 5)}), "missing keys"),
]


@pytest.mark.parametrize("kwargs,message", BAD_CONFIGS)
def test_bad_configs_fail_before_any_actor_starts(ray_cluster, kwargs, message):
    args = dict(modules=mlp(), loss_fn=nn.MSELoss(), config=conf(1),
                optimizer_factory=OPTIMIZERS["sgd"], num_microbatches=3, resources=RES)
    args.update(kwargs)
    before = len(pd2bw_actors(ray_cluster))
    with pytest.raises(ConfigError, match=message):
        PipelineTrainer(**args)
    assert len(pd2bw_actors(ray_cluster)) == before == 0


def test_bad_step_data_is_reported_with_its_position(ray_cluster):
    trainer = PipelineTrainer(mlp(), nn.MSELoss(), conf(1), OPTIMIZERS["sgd"],
                              num_microbatches=M, local=True)
    try:
        with pytest.raises(ConfigError, match=r"step 0 .*expected a list of .* = 3 .*got 2 items"):
            trainer.train([make_steps(1)[0][:2]])
    finally:
        trainer.shutdown()


def test_a_bad_step_mid_stream_drains_cleanly_and_training_can_continue():
    steps = make_steps(1)
    trainer = PipelineTrainer(mlp(), nn.MSELoss(), conf(1), OPTIMIZERS["adam"], schedule="2bw",
                              num_microbatches=M, tied_parameters=TIE, local=True)

    def feed():
        yield from steps[:3]
        yield steps[3][:1]          # malformed: 1 microbatch instead of 3

    try:
        with pytest.raises(ConfigError, match="step 3 .*got 1 items"):
            trainer.train(feed())
        assert trainer.step == 3
        trainer.train(steps[3:])
        state = trainer.state_dict()
    finally:
        trainer.shutdown()
    _, ref = reference_train(mlp(), nn.MSELoss(), steps, schedule="2bw",
                             optimizer_factory=OPTIMIZERS["adam"], tied_parameters=TIE)
    assert_matches(state, ref)


def test_checkpoint_and_resume_on_ray_actors(ray_cluster, tmp_path):
    steps = make_steps(2)
    _, ref = reference_train(mlp(), nn.MSELoss(), steps, schedule="2bw",
                             optimizer_factory=OPTIMIZERS["adam"], tied_parameters=TIE,
                             max_grad_norm=0.05)
    kw = dict(tied_parameters=TIE, max_grad_norm=0.05, resources=RES)
    a = PipelineTrainer(mlp(), nn.MSELoss(), conf(2), OPTIMIZERS["adam"], num_microbatches=M,
                        **kw)
    try:
        a.train(steps[:3])
        a.checkpoint(str(tmp_path))
    finally:
        a.shutdown()
    b = PipelineTrainer.from_checkpoint(str(tmp_path), mlp(), nn.MSELoss(), OPTIMIZERS["adam"],
                                        **kw)
    try:
        b.train(steps[3:])
        assert_matches(b.state_dict(), ref)
    finally:
        b.shutdown()
