"""Exactness of Zero Bubble H1 (issue #17): through PipelineTrainer, zb-h1 on 2 and 3 stages equals
the single-process reference of vanilla minibatch training (``W(t+1) = W(t) - update(g(W(t)))``)
to 1e-10 in float64, with SGD and Adam, with and without global-norm clipping and a tied first/last
weight, on one and two replicas, in one call and in split ``train()`` calls."""

import itertools

import pytest
import torch
from torch import nn

from pd2bw_ray import ActorResources, PipelineConfig, PipelineTrainer, StageOptions
from reference import reference_train
from test_exactness import OPTIMIZERS, TIE, assert_matches, make_steps, mlp

M = 3
MAPS = {2: [0, 0, 1, 1, 1], 3: [0, 0, 1, 1, 2]}   # the tie (modules 0 and 4) spans first and last


def conf(d, w):
    return PipelineConfig(MAPS[d], {str(s): list(range(s * w, (s + 1) * w)) for s in range(d)})


def run(d, w, opt, clip, tie, splits=(6,), local=True, **kw):
    steps = make_steps(w)
    tied = TIE if tie else None
    ref_losses, ref_state = reference_train(
        mlp(), nn.MSELoss(), steps, schedule="flush", optimizer_factory=OPTIMIZERS[opt],
        max_grad_norm=clip, tied_parameters=tied)
    trainer = PipelineTrainer(mlp(), nn.MSELoss(), conf(d, w), OPTIMIZERS[opt], schedule="zb-h1",
                              num_microbatches=M, tied_parameters=tied, max_grad_norm=clip,
                              local=local, **kw)
    try:
        losses, done = [], 0
        for n in splits:
            losses += trainer.train(steps[done:done + n])
            done += n
        assert done == len(steps)
        state, log = trainer.state_dict(), trainer.action_log()
    finally:
        trainer.shutdown()
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-10,
                               atol=1e-12)
    assert_matches(state, ref_state)
    return log


@pytest.mark.parametrize("d,w,opt,clip,tie", list(itertools.product(
    (2, 3), (1, 2), ("sgd", "adam"), (None, 0.05), (False, True))))
def test_zb_h1_matches_minibatch_training(d, w, opt, clip, tie):
    splits = (2, 4) if tie else (6,)
    log = run(d, w, opt, clip, tie, splits=splits)
    # the backward really ran split: I and W on every stage, W deferred on the later stages
    for (s, r), events in log.items():
        kinds = [str(e[1])[0] for e in events]
        assert "B" not in kinds
        assert kinds.count("I") == kinds.count("W") == M * splits[-1]   # the last call's
        first_w = kinds.index("W")
        assert kinds[:first_w].count("I") == min(s + 1, M)


def test_zb_h1_resumes_from_a_checkpoint_as_if_uninterrupted(tmp_path):
    steps = make_steps(1)
    _, ref = reference_train(mlp(), nn.MSELoss(), steps, schedule="flush",
                             optimizer_factory=OPTIMIZERS["adam"], max_grad_norm=0.05,
                             tied_parameters=TIE)
    kw = dict(tied_parameters=TIE, max_grad_norm=0.05, local=True)
    first = PipelineTrainer(mlp(), nn.MSELoss(), conf(3, 1), OPTIMIZERS["adam"],
                            schedule="zb-h1", num_microbatches=M, **kw)
    try:
        first.train(steps[:4])
        first.checkpoint(str(tmp_path))
    finally:
        first.shutdown()
    torch.manual_seed(123)   # other initial weights: everything must come from the checkpoint
    fresh = [nn.Linear(5, 5).double(), nn.Tanh(), nn.Linear(5, 5).double(), nn.Tanh(),
             nn.Linear(5, 5).double()]
    resumed = PipelineTrainer.from_checkpoint(str(tmp_path), fresh, nn.MSELoss(),
                                              OPTIMIZERS["adam"], **kw)
    try:
        assert resumed.step == 4 and resumed.schedule == "zb-h1"
        resumed.train(steps[4:])
        assert_matches(resumed.state_dict(), ref)
    finally:
        resumed.shutdown()


def test_zb_h1_with_recomputation_matches_minibatch_training():
    run(3, 1, "adam", 0.05, True, splits=(3, 3), stage_options=StageOptions(recompute=(0, 1, 2)))


@pytest.mark.parametrize("d,w,opt,clip,tie", [(3, 2, "adam", 0.05, True), (2, 1, "sgd", None,
                                                                           False)])
def test_zb_h1_on_ray_actors_matches_minibatch_training(ray_cluster, d, w, opt, clip, tie):
    run(d, w, opt, clip, tie, splits=(4, 2), local=False,
        resources=ActorResources(num_cpus=0.5))
