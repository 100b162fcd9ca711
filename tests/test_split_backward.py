"""The split backward (pd2bw_ray/split_backward.py) against one plain autograd backward: the same
input and weight gradients, and the weight pass never runs the input-gradient chain again."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pd2bw_ray.split_backward import plan_split


class Counted(torch.autograd.Function):
    """Identity that counts how often its backward runs."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        Counted.calls += 1
        return g


def reference(fn, inputs, weights, root_grads=None):
    """Input and weight gradients of one ordinary backward."""
    xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    roots = fn(*xs)
    got = torch.autograd.grad(roots, [x for x in xs if x.requires_grad] + list(weights),
                              root_grads, allow_unused=True)
    n = sum(x.requires_grad for x in xs)
    return list(got[:n]), list(got[n:])


def split(fn, inputs, weights, root_grads=None):
    xs = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    roots = fn(*xs)
    floating = [x for x in xs if x.requires_grad]
    plan = plan_split(roots, root_grads, floating, list(weights))
    dx = plan.input_pass(floating)
    calls_after_input = Counted.calls
    held = plan.recorded_bytes()     # what the stage's stash accounting adds until W
    recorded = sum(g.untyped_storage().nbytes() for group in plan.groups
                   for grads in group.grads.values() for g in grads if g is not None)
    assert held <= recorded and (held > 0) == (recorded > 0)
    dw = plan.weight_pass(list(weights))
    assert plan.recorded_bytes() == 0
    return dx, dw, plan, Counted.calls - calls_after_input


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None
        else:
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_an_mlp_splits_into_input_and_weight_passes_without_recomputing_the_chain():
    torch.manual_seed(0)
    l1, l2 = nn.Linear(8, 16).double(), nn.Linear(16, 4).double()
    weights = list(l1.parameters()) + list(l2.parameters())

    def fn(x):
        return [l2(torch.nn.functional.gelu(Counted.apply(l1(x))))]

    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    g = [torch.randn(5, 4, dtype=torch.float64)]
    ref_dx, ref_dw = reference(fn, [x], weights, g)
    dx, dw, plan, extra_calls = split(fn, [x], weights, g)
    assert_same(dx, ref_dx)
    assert_same(dw, ref_dw)
    assert extra_calls == 0                 # W ran below the boundaries only
    assert not plan.from_roots and len(plan.groups) == 2   # (l1.weight, l1.bias), (l2.*)


def test_a_weight_used_twice_is_counted_once_per_use():
    """One Linear applied twice: its weight meets the input side at two nodes, one above the
    other; the lower node's recorded gradient is used as it is."""
    torch.manual_seed(1)
    lin = nn.Linear(6, 6).double()
    weights = list(lin.parameters())

    def fn(x):
        return [lin(torch.tanh(Counted.apply(lin(x)))).sum(0) * 3]

    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    g = [torch.randn(6, dtype=torch.float64)]
    ref_dx, ref_dw = reference(fn, [x], weights, g)
    dx, dw, plan, _ = split(fn, [x], weights, g)
    assert_same(dx, ref_dx)
    assert_same(dw, ref_dw)
    assert len(plan.groups) == 1 and len(plan.groups[0].boundaries) >= 2


def test_weights_off_the_input_side_and_a_first_stage_take_their_gradients_from_the_roots():
    torch.manual_seed(2)
    lin = nn.Linear(3, 3).double()
    p = nn.Parameter(torch.randn(3, dtype=torch.float64))
    unused = nn.Parameter(torch.randn(2, dtype=torch.float64))
    weights = list(lin.parameters()) + [p, unused]

    def fn(x):   # a second output that depends on p alone
        return [lin(x) * p, (p * p).sum()]

    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    g = [torch.randn(2, 3, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)]
    ref_dx, ref_dw = reference(fn, [x], weights, g)
    dx, dw, plan, _ = split(fn, [x], weights, g)
    assert_same(dx, ref_dx)
    assert_same(dw, ref_dw)
    assert plan.from_roots == [2] and dw[3] is None

    emb = nn.Embedding(10, 3).double()      # a first stage: no input needs a gradient
    ids = torch.tensor([1, 4, 4, 9])

    def first(i):
        return [lin(emb(i)).pow(2).sum()]

    ref_dx, ref_dw = reference(first, [ids], list(emb.parameters()) + list(lin.parameters()))
    dx, dw, plan, _ = split(first, [ids], list(emb.parameters()) + list(lin.parameters()))
    assert dx == [] and plan.from_roots == [0, 1, 2]
    assert_same(dw, ref_dw)


@pytest.mark.parametrize("is_last", [False, True])
def test_bert_stages_split_exactly(is_last):
    """A middle and a last BERT stage (attention, LayerNorm, GELU; on the last the masked MLM
    head, the NSP head and the loss) in float64, against one plain backward."""
    from stages.bert import build_bert_pipeline
    from stages.bert_batches import random_pretraining_steps
    from stages.bert_config import BertModelConfig
    from stages.partition import BertPartition

    cfg = BertModelConfig.from_json("configs/bert_config_tiny.json")
    n = cfg.num_hidden_layers
    model = build_bert_pipeline(cfg, BertPartition((1, 1, n - 2)), seed=3)
    first, middle, last = (m.double().eval() for m in model.modules)
    (step,) = random_pretraining_steps(num_steps=1, num_microbatches=1, microbatch_size=2,
                                       seq_length=16, vocab_size=cfg.vocab_size, seed=4)
    (inputs, targets), = step
    with torch.no_grad():
        h, mask, labels = first(*inputs)
    h.requires_grad_(True)      # a received activation
    stage = last if is_last else middle
    weights = list(stage.parameters())
    if is_last:
        def fn(h):
            return [model.loss_fn(stage(h, mask, labels), targets)]
        g = None
    else:
        def fn(h):
            return [stage(h, mask, labels)[0]]
        g = [torch.randn(h.shape, dtype=torch.float64)]
    ref_dx, ref_dw = reference(fn, [h], weights, g)
    dx, dw, plan, _ = split(fn, [h], weights, g)
    assert_same(dx, ref_dx)
    assert_same(dw, ref_dw)
    assert len(dx) == 1 and len(plan.groups) > 4 and all(w is not None for w in dw)


@pytest.mark.parametrize("num_stages", [1, 2])
def test_a_first_stage_leaves_its_whole_backward_to_w(num_stages, monkeypatch):
    """The first stage has no input to differentiate: its I computes nothing (not even the
    graph walk), and its W runs one whole backward, giving the gradients an unsplit backward
    gives, bit for bit (microbatches accumulating in the same order)."""
    from pd2bw_ray.stage import Stage

    def stage():
        torch.manual_seed(0)
        mod = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double()
        return Stage(stage=0, num_stages=num_stages, modules={0: mod},
                     loss_fn=nn.MSELoss() if num_stages == 1 else None,
                     optimizer_factory=lambda p: torch.optim.SGD([q for _, q in p], lr=0.1))

    torch.manual_seed(1)
    xs = [torch.randn(3, 5, dtype=torch.float64) for _ in range(2)]
    ts = [torch.randn(3, 4, dtype=torch.float64) for _ in range(2)]
    gs = [torch.randn(3, 4, dtype=torch.float64) for _ in range(2)]
    whole, split = stage(), stage()

    def walked(*args):
        raise AssertionError("the first stage's I walked the graph")

    monkeypatch.setattr("pd2bw_ray.stage.plan_split", walked)
    for k in range(2):
        for st in (whole, split):
            st.forward(0, k, 0, [xs[k]], ts[k] if num_stages == 1 else None)
        out_grads = None if num_stages == 1 else [gs[k]]
        whole.backward(0, k, out_grads)
        before = [g.clone() if g is not None else None
                  for g in split._grads.get(0, {}).values()]
        assert split.backward_input(0, k, out_grads) == []
        after = list(split._grads.get(0, {}).values())             # nothing computed yet
        assert len(after) == len(before) and all(
            (a is None and b is None) or torch.equal(a, b) for a, b in zip(after, before))
        assert split.in_flight() == [(0, k)]                             # held until W
        split.backward_weight(0, k)
        assert split.in_flight() == []
    for a, b in zip(whole.take_grads(0), split.take_grads(0)):
        assert torch.equal(a, b)
    with pytest.raises(Exception, match="before its input-gradient backward"):
        split.backward_weight(0, 0)
