"""Exactness: the pipeline's weights equal the single-process reference of each schedule's formula.

float64 MLP (Linear, Tanh, Linear, Tanh, Linear; MSE), d=3, m=3, 6 steps; w in {1, 2}; SGD and
Adam; with and without max_grad_norm; with and without a tied parameter across stages 0 and 2.
"""

import itertools

import pytest
import torch
from torch import nn

from pd2bw_ray import PipelineConfig, PipelineTrainer
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


def test_recomputation_changes_nothing():
    from pd2bw_ray import StageOptions

    ref = run_case("2bw", 1, "adam", 0.05, True, local=True)
    steps = make_steps(1)
    trainer = PipelineTrainer(mlp(), nn.MSELoss(), conf(1), OPTIMIZERS["adam"], schedule="2bw",
                              num_microbatches=M, tied_parameters=TIE, max_grad_norm=0.05,
                              stage_options=StageOptions(recompute=(0, 1, 2)), local=True)
    try:
        trainer.train(steps)
        assert_matches(trainer.state_dict(), ref, tol=1e-12)
    finally:
        trainer.shutdown()


def test_bf16_autocast_keeps_fp32_master_weights():
    from pd2bw_ray import StageOptions

    torch.manual_seed(0)
    mods = [nn.Linear(H, 16), nn.Tanh(), nn.Linear(16, H)]
    steps = [[(torch.randn(4, H), torch.randn(4, H)) for _ in range(2)] for _ in range(3)]
    results = {}
    for bf16 in (False, True):
        trainer = PipelineTrainer([m for m in mods], nn.MSELoss(),
                                  PipelineConfig([0, 0, 1], {"0": [0], "1": [1]}),
                                  OPTIMIZERS["sgd"], schedule="flush", num_microbatches=2,
                                  stage_options=StageOptions(autocast_bf16=bf16), local=True)
        try:
            results[bf16] = (trainer.train(steps), trainer.state_dict())
        finally:
            trainer.shutdown()
    (l32, s32), (l16, s16) = results[False], results[True]
    assert all(v.dtype == torch.float32 for v in s16.values())
    assert l16 != l32                                  # bf16 really ran
    torch.testing.assert_close(torch.tensor(l16), torch.tensor(l32), rtol=3e-2, atol=3e-2)


def warmup_then_decay(step):
    return min(1.0, (step + 1) / 3) * max(0.0, 1 - step / 8)


@pytest.mark.parametrize("schedule", ["2bw", "flush"])
def test_lr_schedule_matches_torch_lambda_lr(schedule):
    steps = make_steps(1)
    _, ref = reference_train(mlp(), nn.MSELoss(), steps, schedule=schedule,
                             optimizer_factory=OPTIMIZERS["adam"], tied_parameters=TIE,
                             lr_schedule=warmup_then_decay)
    trainer = PipelineTrainer(mlp(), nn.MSELoss(), conf(1), OPTIMIZERS["adam"], schedule=schedule,
                              num_microbatches=M, tied_parameters=TIE,
                              lr_schedule=warmup_then_decay, local=True)
    try:
        trainer.train(steps[:2])
        trainer.train(steps[2:])
        assert_matches(trainer.state_dict(), ref)
        assert trainer.lr() == pytest.approx(0.01 * warmup_then_decay(STEPS - 1))
    finally:
        trainer.shutdown()
