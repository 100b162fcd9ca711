"""`BertAdamW` against AdamW written out by hand (float64), and its fused fast path."""

from __future__ import annotations

import io
import math

import torch

from stages.bert import build_bert_pipeline
from stages.bert_optim import NO_DECAY, BertAdamW
from stages.partition import BertPartition
from test_bert_training import TINY


def named_float64_params(seed: int = 0) -> list[tuple[str, torch.nn.Parameter]]:
    (stage,) = build_bert_pipeline(TINY, BertPartition((TINY.num_hidden_layers,)),
                                   seed=seed).modules
    stage.double()
    return list(stage.named_parameters())


def adamw_by_hand(named, grads_per_step, *, lr, weight_decay, betas, eps):
    """Decoupled weight decay (Loshchilov & Hutter), bias-corrected moments, as torch documents
    AdamW: p <- p (1 - lr wd); p <- p - lr m_hat / (sqrt(v_hat) + eps)."""
    b1, b2 = betas
    p = {n: t.detach().clone() for n, t in named}
    m = {n: torch.zeros_like(t) for n, t in p.items()}
    v = {n: torch.zeros_like(t) for n, t in p.items()}
    for t, grads in enumerate(grads_per_step, start=1):
        for n in p:
            g = grads[n]
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
            wd = 0.0 if n.endswith(NO_DECAY) else weight_decay
            p[n] = p[n] * (1 - lr * wd)
            p[n] = p[n] - lr * (m[n] / (1 - b1 ** t)) / ((v[n] / (1 - b2 ** t)).sqrt() + eps)
    return p


def random_grads(named, steps: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(t.shape, generator=gen, dtype=t.dtype) for n, t in named}
            for _ in range(steps)]


def test_bert_adamw_is_adamw_with_berts_decay_groups():
    named = named_float64_params()
    factory = BertAdamW(lr=1e-3, weight_decay=0.1)
    grads = random_grads(named, 5)
    want = adamw_by_hand(named, grads, lr=factory.lr, weight_decay=factory.weight_decay,
                         betas=factory.betas, eps=factory.eps)
    opt = factory(named)
    assert opt.defaults["fused"] is True           # the fast path on CPU
    for step in grads:
        for n, t in named:
            t.grad = step[n].clone()
        opt.step()
    worst = max(((t.detach() - want[n]).abs() / want[n].abs().clamp_min(1e-3)).max().item()
                for n, t in named)
    assert worst < 1e-12, worst
    # the groups: every bias and LayerNorm parameter undecayed, everything else decayed
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for n, t in named:
        assert (id(t) in decayed) == (not n.endswith(NO_DECAY)), n


def test_state_of_the_per_tensor_loop_resumes_in_bert_adamw():
    """A checkpoint's optimizer state written by the per-tensor AdamW (runs from before the
    fused kernel) continues in `BertAdamW` as it would have in the loop."""
    factory = BertAdamW(lr=1e-3)
    loop_named, fused_named = named_float64_params(), named_float64_params()
    grads = random_grads(loop_named, 4)
    groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")}
              for g in factory(loop_named).param_groups]        # BERT's groups, unfused
    loop = torch.optim.AdamW(groups, foreach=False)
    assert not loop.defaults["fused"]
    for step in grads[:2]:
        for n, t in loop_named:
            t.grad = step[n].clone()
        loop.step()
    with torch.no_grad():
        for (_, a), (_, b) in zip(loop_named, fused_named):
            b.copy_(a)
    fused = factory(fused_named)
    saved = io.BytesIO()                 # as a checkpoint holds it: no tensor shared
    torch.save(loop.state_dict(), saved)
    saved.seek(0)
    fused.load_state_dict(torch.load(saved))
    for step in grads[2:]:
        for named, opt in ((loop_named, loop), (fused_named, fused)):
            for n, t in named:
                t.grad = step[n].clone()
            opt.step()
    for (n, a), (_, b) in zip(loop_named, fused_named):
        assert torch.allclose(a, b, rtol=1e-12, atol=0), n


def test_parameters_the_fused_kernel_cannot_take_use_the_loop():
    meta = [("w", torch.nn.Parameter(torch.empty(3, 3, device="meta")))]
    assert not BertAdamW()(meta).defaults["fused"]
    assert math.isclose(BertAdamW(lr=2e-5)(named_float64_params()).defaults["lr"], 2e-5)
