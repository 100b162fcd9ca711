"""Stage outputs that are floating but need no gradient (a mask, a detached scale) placed before
outputs that do: each gradient received must reach the output it belongs to.

The gradient message has one tensor per floating output (``Stage.grad_layout``), whatever the
output's ``requires_grad``; the downstream stage answers each floating input. References: plain
autograd on the same module, and the single-process reference of the whole pipeline."""

import torch
from torch import nn

from pd2bw_ray import PipelineConfig, PipelineTrainer
from pd2bw_ray.stage import Stage
from reference import reference_train
from test_exactness import OPTIMIZERS, assert_matches

H, B, M = 4, 3, 2


class ScaleThenHidden(nn.Module):
    """Outputs (a float scale with no grad, an integer count, the hidden state with grad)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(H, H).double()

    def forward(self, x):
        scale = (x.abs() + 1.0).detach()     # same shape as the hidden state: a wrong pairing
                                              # would go unnoticed by autograd
        count = torch.full((x.shape[0],), 3, dtype=torch.int64)
        return scale, count, self.lin(x)


class UseBoth(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(H, H).double()

    def forward(self, scale, count, h):
        return self.lin(torch.tanh(h) * scale * count.unsqueeze(1).double())


def modules():
    torch.manual_seed(0)
    return [ScaleThenHidden(), UseBoth()]


def test_the_gradient_of_each_output_reaches_that_output():
    mod = modules()[0]
    stage = Stage(stage=0, num_stages=2, modules={0: mod},
                  optimizer_factory=OPTIMIZERS["sgd"])
    x = torch.randn(B, H, dtype=torch.float64)
    outs = stage.forward(0, 0, 0, [x])
    layout = Stage.grad_layout(outs)
    assert [dt for dt, _ in layout] == [torch.float64, torch.float64]   # scale and hidden
    g_scale = torch.randn(B, H, dtype=torch.float64)
    g_hidden = torch.randn(B, H, dtype=torch.float64)
    stage.backward(0, 0, [g_scale, g_hidden])
    got = dict(zip(stage.param_names, stage.take_grads(0)))

    ref = modules()[0]
    _, _, h = ref(x)
    h.backward(g_hidden)
    torch.testing.assert_close(got["0.lin.weight"], ref.lin.weight.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(got["0.lin.bias"], ref.lin.bias.grad, rtol=0, atol=1e-12)


def test_pipeline_with_a_no_grad_float_output_matches_the_reference():
    g = torch.Generator().manual_seed(2)
    steps = [[(torch.randn(B, H, generator=g, dtype=torch.float64),
               torch.randn(B, H, generator=g, dtype=torch.float64)) for _ in range(M)]
             for _ in range(4)]
    ref_losses, ref_state = reference_train(modules(), nn.MSELoss(), steps, schedule="2bw",
                                            optimizer_factory=OPTIMIZERS["adam"])
    trainer = PipelineTrainer(modules(), nn.MSELoss(), PipelineConfig([0, 1], {"0": [0], "1": [1]}),
                              OPTIMIZERS["adam"], schedule="2bw", num_microbatches=M, local=True)
    try:
        losses = trainer.train(steps)
        state = trainer.state_dict()
    finally:
        trainer.shutdown()
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-10,
                               atol=1e-12)
    assert_matches(state, ref_state)
