"""A stage's optimizer state through export and import: the recorded moments and step counts
continue, and the kernel that runs the update is the one the stage's optimizer was built with
(a checkpoint of torch's per-tensor Adam resumes on its fused kernel, and the other way round)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pd2bw_ray.stage import Stage


def adam(fused: bool):
    def factory(named):
        return torch.optim.Adam([p for _, p in named], lr=1e-2, fused=fused or None,
                                foreach=False if not fused else None)
    return factory


def last_stage(fused: bool) -> Stage:
    torch.manual_seed(0)
    return Stage(stage=0, num_stages=1, modules={0: nn.Linear(8, 4).double()},
                 optimizer_factory=adam(fused),
                 loss_fn=lambda out, target: ((out - target) ** 2).mean())


def train(stage: Stage, steps: range) -> None:
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 8, generator=g, dtype=torch.float64),
                torch.randn(3, 4, generator=g, dtype=torch.float64)) for _ in range(10)]
    for step in steps:
        x, y = batches[step]
        stage.forward(step, 0, stage.newest_version, [x], y)
        stage.backward(step, 0)
        stage.apply_update(step, stage.take_grads(step))


@pytest.mark.parametrize("saved_fused, resumed_fused", [(False, True), (True, False)])
def test_optimizer_state_resumes_on_the_kernel_the_stage_was_built_with(saved_fused,
                                                                         resumed_fused):
    straight = last_stage(saved_fused)
    train(straight, range(5))
    first = last_stage(saved_fused)
    train(first, range(2))
    state = first.export_state()
    assert all(g["fused"] == (saved_fused or None) for g in state["optimizer"]["param_groups"])
    resumed = last_stage(resumed_fused)
    resumed.import_state(state)
    assert all(bool(g["fused"]) == resumed_fused for g in resumed.optimizer.param_groups)
    train(resumed, range(2, 5))
    for n, want in straight.named_weights().items():
        torch.testing.assert_close(resumed.named_weights()[n], want, rtol=1e-12, atol=0)
