"""Independent single-process references for the pipeline's update rules (used by the tests).

Written from the formulas, not from the runtime: one ordinary model (tied weights are one shared
nn.Parameter), one loss over all of a step's microbatches, torch's own clip_grad_norm_ and
optimizer.step().
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def tied_model(modules, tied_parameters):
    """nn.Sequential of copies of ``modules`` where every tied group is one shared Parameter
    (the first name's)."""
    model = nn.Sequential(*[copy.deepcopy(m) for m in modules])
    for group in tied_parameters or []:
        k0, n0 = group[0].split(".", 1)
        shared = model[int(k0)].get_parameter(n0)
        for name in group[1:]:
            k, n = name.split(".", 1)
            owner_path, _, attr = n.rpartition(".")
            owner = model[int(k)].get_submodule(owner_path) if owner_path else model[int(k)]
            setattr(owner, attr, shared)
    return model


def chain(model, inputs):
    x = inputs
    for mod in model:
        x = mod(*(x if isinstance(x, tuple) else (x,)))
    return x


def mean_loss_grads(model, loss_fn, microbatches):
    """Gradient of the mean over microbatches of each microbatch's loss."""
    model.zero_grad(set_to_none=True)
    losses = [loss_fn(chain(model, x if isinstance(x, tuple) else (x,)), y)
              for x, y in microbatches]
    total = torch.stack(losses).mean()
    total.backward()
    return total.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def reference_train(modules, loss_fn, steps, *, schedule, optimizer_factory,
                    max_grad_norm=None, tied_parameters=None, lr_schedule=None):
    """Train per the schedule's formula; returns (losses, final state_dict with keys
    '<module>.<name>' for every name, tied aliases included).

    flush/gpipe: W(t+1) = W(t) - update(g(W(t)))
    2bw:         W(t+1) = W(t) - update(g(W(t-1))),  W(-1) = W(0)
    """
    model = tied_model(modules, tied_parameters)
    shadow = tied_model(modules, tied_parameters)   # holds W(t-1) under 2bw
    params = dict(model.named_parameters())
    opt = optimizer_factory(list(params.items()))
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule)
             if lr_schedule is not None else None)
    losses = []
    for t, microbatches in enumerate(steps):
        if schedule == "2bw":
            # shadow holds W(t-1) (W(0) at t = 0: it starts as a copy of the same modules)
            loss, grads = mean_loss_grads(shadow, loss_fn, microbatches)
            shadow.load_state_dict(model.state_dict())    # W(t), used by step t+1
        else:
            loss, grads = mean_loss_grads(model, loss_fn, microbatches)
        losses.append(loss)
        for n, p in params.items():
            p.grad = grads[n]
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
    state = {}
    for k, mod in enumerate(model):
        for n, p in mod.named_parameters(remove_duplicate=False):
            state[f"{k}.{n}"] = p.detach().clone()
    return losses, state
