"""Exactness of the interleaved schedule (issue #17): through PipelineTrainer, 4 virtual stages on
2 ranks per pipeline (stage s on the ranks of s % 2, each actor holding 2 stages with their own
weights, optimizer state and stash) equal the single-process reference of vanilla minibatch
training to 1e-10 in float64: SGD and Adam, with and without global-norm clipping and a tied
first/last weight, on one and two replicas, in one call and in split ``train()`` calls."""

import itertools

import pytest
import torch
from torch import nn

from pd2bw_ray import ActorResources, ConfigError, PipelineConfig, PipelineTrainer
from pd2bw_ray.checkpoint import open_checkpoint
from pd2bw_ray.schedule import Kind
from pd2bw_ray.timeline import parse_action
from reference import reference_train
from test_exactness import OPTIMIZERS, TIE, assert_matches, mlp

M, STEPS, B, H = 4, 5, 2, 5
MAP = [0, 1, 2, 3, 3]          # Linear | Tanh | Linear | Tanh, Linear: the tie spans 0 and 3


def conf(w, ranks=2):
    return PipelineConfig(MAP, {str(s): list(range((s % ranks) * w, (s % ranks + 1) * w))
                                for s in range(4)})


def make_steps(w, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(B, H, generator=g, dtype=torch.float64),
              torch.randn(B, H, generator=g, dtype=torch.float64)) for _ in range(M * w)]
            for _ in range(STEPS)]


def run(w, opt, clip, tie, splits=(STEPS,), local=True, ranks=2, **kw):
    steps = make_steps(w)
    tied = TIE if tie else None
    ref_losses, ref_state = reference_train(
        mlp(), nn.MSELoss(), steps, schedule="flush", optimizer_factory=OPTIMIZERS[opt],
        max_grad_norm=clip, tied_parameters=tied)
    trainer = PipelineTrainer(mlp(), nn.MSELoss(), conf(w, ranks), OPTIMIZERS[opt],
                              schedule="interleaved", num_microbatches=M, tied_parameters=tied,
                              max_grad_norm=clip, local=local, **kw)
    try:
        losses, done = [], 0
        for n in splits:
            losses += trainer.train(steps[done:done + n])
            done += n
        state, log, versions = trainer.state_dict(), trainer.action_log(), trainer.versions()
    finally:
        trainer.shutdown()
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-10,
                               atol=1e-12)
    assert_matches(state, ref_state)
    return log, versions


@pytest.mark.parametrize("w,opt,clip,tie", list(itertools.product(
    (1, 2), ("sgd", "adam"), (None, 0.05), (False, True))))
def test_interleaved_matches_minibatch_training(w, opt, clip, tie):
    log, versions = run(w, opt, clip, tie, splits=(2, 3) if tie else (STEPS,))
    assert sorted(log) == [(q, r) for q in range(2) for r in range(w)]   # 2 actors per replica
    for (q, r), events in log.items():   # each actor ran its two stages, q and q + 2
        acts = [parse_action(str(e[1])) for e in events]
        assert {a.stage for a in acts if a.kind is Kind.FORWARD} == {q, q + 2}
    assert all(v == [STEPS] for v in versions.values())


def mlp6():
    torch.manual_seed(0)
    return [nn.Linear(H, H).double(), nn.Tanh(), nn.Linear(H, H).double(), nn.Tanh(),
            nn.Linear(H, H).double(), nn.Tanh(), nn.Linear(H, H).double()]


def run6(local, **kw):
    # 3 ranks x 2 stages: the last rank's first stage sends to the first rank's second stage
    cfg = PipelineConfig([0, 1, 2, 3, 4, 5, 5], {str(s): [s % 3] for s in range(6)})
    g = torch.Generator().manual_seed(4)
    steps = [[(torch.randn(B, H, generator=g, dtype=torch.float64),
               torch.randn(B, H, generator=g, dtype=torch.float64)) for _ in range(6)]
             for _ in range(3)]
    tie = [["0.weight", "6.weight"]]
    _, ref = reference_train(mlp6(), nn.MSELoss(), steps, schedule="flush",
                             optimizer_factory=OPTIMIZERS["adam"], max_grad_norm=0.05,
                             tied_parameters=tie)
    trainer = PipelineTrainer(mlp6(), nn.MSELoss(), cfg, OPTIMIZERS["adam"],
                              schedule="interleaved", num_microbatches=6, tied_parameters=tie,
                              max_grad_norm=0.05, local=local, **kw)
    try:
        trainer.train(steps[:1])
        trainer.train(steps[1:])
        assert_matches(trainer.state_dict(), ref)
    finally:
        trainer.shutdown()


def test_interleaved_on_three_ranks_with_two_stages_each():
    run6(local=True)


def test_interleaved_on_one_rank_per_pipeline():
    # d = 1: all 4 stages on one actor, activations and gradients handed over in place
    run(1, "adam", 0.05, False, ranks=1)


def test_virtual_stages_refuse_what_is_not_supported():
    with pytest.raises(ConfigError, match="share ranks"):
        PipelineTrainer(mlp(), nn.MSELoss(), PipelineConfig(MAP, {"0": [0], "1": [1], "2": [0],
                                                                  "3": [1]}),
                        OPTIMIZERS["sgd"], schedule="interleaved", num_microbatches=M,
                        tied_parameters=[["0.weight", "2.weight"]], local=True)
    with pytest.raises(ConfigError, match=r"rank 0 is used twice \(stage 0 and stage 2\); under "
                                          "schedule 'flush' each rank runs exactly one stage"):
        PipelineTrainer(mlp(), nn.MSELoss(), conf(1), OPTIMIZERS["sgd"], schedule="flush",
                        num_microbatches=M, local=True)
    with pytest.raises(ConfigError, match="multiple of 2; got m=3"):
        PipelineTrainer(mlp(), nn.MSELoss(), conf(1), OPTIMIZERS["sgd"], schedule="interleaved",
                        num_microbatches=3, local=True)


def test_interleaved_resumes_from_a_checkpoint_as_if_uninterrupted(tmp_path):
    steps = make_steps(2)
    _, ref = reference_train(mlp(), nn.MSELoss(), steps, schedule="flush",
                             optimizer_factory=OPTIMIZERS["adam"], max_grad_norm=0.05,
                             tied_parameters=TIE)
    kw = dict(tied_parameters=TIE, max_grad_norm=0.05, local=True)
    first = PipelineTrainer(mlp(), nn.MSELoss(), conf(2), OPTIMIZERS["adam"],
                            schedule="interleaved", num_microbatches=M, **kw)
    try:
        first.train(steps[:2])
        path = first.checkpoint(str(tmp_path))
    finally:
        first.shutdown()
    ck = open_checkpoint(path)
    assert [info["stage"] for info in ck.manifest["stages"]] == [0, 1, 2, 3]
    torch.manual_seed(123)   # other initial weights: everything must come from the checkpoint
    fresh = [nn.Linear(H, H).double(), nn.Tanh(), nn.Linear(H, H).double(), nn.Tanh(),
             nn.Linear(H, H).double()]
    resumed = PipelineTrainer.from_checkpoint(str(tmp_path), fresh, nn.MSELoss(),
                                              OPTIMIZERS["adam"], **kw)
    try:
        assert resumed.step == 2 and resumed.schedule == "interleaved"
        assert resumed.config.stages_per_rank == 2
        resumed.train(steps[2:])
        assert_matches(resumed.state_dict(), ref)
        stats = resumed.stats()
        assert sorted(stats) == [(q, r) for q in range(2) for r in range(2)]
        assert all(s["memory"]["weight_versions"] == 1 for s in stats.values())
    finally:
        resumed.shutdown()


def test_conf_with_virtual_stages():
    c = conf(2)
    assert (c.num_stages, c.ranks_per_pipeline, c.stages_per_rank, c.world_size) == (4, 2, 2, 4)
    assert c.rank(3, 1) == c.rank(1, 1) == 3
    plain = PipelineConfig(MAP, {str(s): [s] for s in range(4)})
    assert (plain.ranks_per_pipeline, plain.stages_per_rank, plain.world_size) == (4, 1, 4)
    assert PipelineConfig.from_dict(c.to_dict()) == c
    for bad in ({"0": [0], "1": [1], "2": [0], "3": [2]}, {"0": [0], "1": [1], "2": [1],
                                                             "3": [0]}):
        with pytest.raises(ConfigError, match="rank . is used twice .* stage s and s . p"):
            PipelineConfig(MAP, bad)


@pytest.mark.parametrize("w,opt,clip,tie", [(2, "adam", 0.05, True), (1, "sgd", None, False)])
def test_interleaved_on_ray_actors_matches_minibatch_training(ray_cluster, w, opt, clip, tie):
    run(w, opt, clip, tie, splits=(3, 2), local=False, resources=ActorResources(num_cpus=0.5))


def test_interleaved_on_three_ray_actors_with_two_stages_each(ray_cluster):
    run6(local=False, resources=ActorResources(num_cpus=0.5))


def test_zero_bubble_over_virtual_stages_matches_minibatch_training():
    # zb-h1 on the interleaved layout: the split backward on every virtual stage
    steps = make_steps(2)
    _, ref = reference_train(mlp(), nn.MSELoss(), steps, schedule="flush",
                             optimizer_factory=OPTIMIZERS["adam"], max_grad_norm=0.05,
                             tied_parameters=TIE)
    trainer = PipelineTrainer(mlp(), nn.MSELoss(), conf(2), OPTIMIZERS["adam"], schedule="zb-h1",
                              num_microbatches=M, tied_parameters=TIE, max_grad_norm=0.05,
                              local=True)
    try:
        trainer.train(steps[:3])
        trainer.train(steps[3:])
        assert_matches(trainer.state_dict(), ref)
        kinds = {a.kind for events in trainer.action_log().values() for _, a, *_ in events}
        assert Kind.BACKWARD_WEIGHT in kinds and Kind.BACKWARD not in kinds
    finally:
        trainer.shutdown()
