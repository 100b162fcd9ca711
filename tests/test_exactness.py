"""Exactness: the pipeline's weights equal the single-process reference of each schedule's formula.

float64 MLP (Linear, Tanh, Linear, Tanh, Linear; MSE), d=3, m=3, 6 steps; w in {1, 2}; SGD and
Adam; with and without max_grad_norm; with and without a tied parameter across stages 0 and 2.
"""

import itertools

import pytest
import torch
from torch import nn

from pd2bw_ray import ActorResources, PipelineConfig, PipelineTrainer
from reference import reference_train

D, M, STEPS, B, H = 3, 3, 6, 2, 5
OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01),
}
TIE = [["0.weight", "4.weight"]]


def mlp():
    torch.manual_seed(0)
    return [nn.Linear(H, H).double(), nn.Tanh(), nn.Linear(H, H).double(), nn.Tanh(),
            nn.Linear(H, H).double()]


def make_steps(w, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(B, H, generator=g, dtype=torch.float64),
              torch.randn(B, H, generator=g, dtype=torch.float64)) for _ in range(M * w)]
            for _ in range(STEPS)]


def conf(w):
    return PipelineConfig([0, 0, 1, 1, 2],
                          {str(s): list(range(s * w, (s + 1) * w)) for s in range(D)})


def assert_matches(state, ref_state, tol=1e-10):
    assert set(state) == set(ref_state)
    for k in ref_state:
        torch.testing.assert_close(state[k], ref_state[k], rtol=tol, atol=tol, msg=k)


def run_case(schedule, w, opt, clip, tie, local, **kw):
    steps = make_steps(w)
    tied = TIE if tie else None
    ref_losses, ref_state = reference_train(
        mlp(), nn.MSELoss(), steps, schedule=schedule, optimizer_factory=OPTIMIZERS[opt],
        max_grad_norm=clip, tied_parameters=tied)
    trainer = PipelineTrainer(mlp(), nn.MSELoss(), conf(w), OPTIMIZERS[opt], schedule=schedule,
                              num_microbatches=M, tied_parameters=tied, max_grad_norm=clip,
                              local=local, **kw)
    try:
        losses = trainer.train(steps)
        state = trainer.state_dict()
    finally:
        trainer.shutdown()
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-10,
                               atol=1e-12)
    assert_matches(state, ref_state)
    return ref_state


CASES = list(itertools.product(("2bw", "flush", "gpipe"), (1, 2), ("sgd", "adam"),
                               (None, 0.05), (False, True)))


def test_clipping_is_active_in_these_cases():
    # max_grad_norm=0.05 must actually clip, or the "with clipping" cases test nothing.
    model = nn.Sequential(*mlp())
    x, y = make_steps(1)[0][0]
    nn.MSELoss()(model(x), y).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    assert norm > 0.2


def test_schedules_differ_from_each_other():
    # The 2bw reference really is a different trajectory from flush (staleness of one).
    steps = make_steps(1)
    _, a = reference_train(mlp(), nn.MSELoss(), steps, schedule="2bw",
                           optimizer_factory=OPTIMIZERS["sgd"])
    _, b = reference_train(mlp(), nn.MSELoss(), steps, schedule="flush",
                           optimizer_factory=OPTIMIZERS["sgd"])
    assert (a["0.weight"] - b["0.weight"]).abs().max() > 1e-4


@pytest.mark.parametrize("schedule,w,opt,clip,tie", CASES)
def test_in_process_pipeline_matches_reference(schedule, w, opt, clip, tie):
    run_case(schedule, w, opt, clip, tie, local=True)
