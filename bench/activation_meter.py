"""Activation memory of models run outside pd2bw-ray, counted the way pd2bw-ray's Stage counts it.

pd2bw-ray's ``Stage.memory()["peak_stash"]`` is, at the end of each forward, the bytes of the
distinct storages autograd saved for backward (parameters left out) plus the stage's inputs and
(except on the last stage) outputs, told apart within a microbatch and summed over the
microbatches in flight; its peak over a call. The loss function runs outside that count.

`ActivationMeter` measures the same quantity for the single-process baseline and for
``torch.distributed.pipelining`` stages: a `MeteredStage` wraps a stage module, saved tensors are
packed into holders whose lifetime is the saved tensor's (autograd drops them when the
microbatch's backward has used them), and the stage's inputs and outputs are saved for backward
by an identity node (`_HeldUntilBackward`) so that they count until the backward reaches them,
as the runtime's stash holds them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _Held:
    """A saved tensor as autograd keeps it; counts its storage while alive. It keeps the tensor
    detached: holding an output with its ``grad_fn`` would make a reference cycle through the
    node that saved it, and a graph never run backward (torch's pipelining runs one forward to
    infer shapes) would never be freed."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor: torch.Tensor, meter: "ActivationMeter", key: tuple[int, int]):
        self.tensor = tensor
        self.meter = meter
        self.key = key

    def __del__(self) -> None:
        self.meter._release(self.key)


class ActivationMeter:
    """Live bytes of activations held for backward, and their peak sampled after each forward.

    Like the runtime, storages are told apart within one forward (one microbatch) and summed
    over microbatches: a buffer that several microbatches save counts once per microbatch."""

    def __init__(self) -> None:
        self._live: dict[tuple[int, int], list[int]] = {}  # (forward, storage) -> [holders, bytes]
        self._forward = 0
        self._excluded: set[int] = set()
        self.peak_bytes = 0
        self.in_flight = 0
        self.peak_in_flight = 0

    def exclude(self, module: nn.Module) -> None:
        """Leave ``module``'s parameters out (they belong to the weights). Buffers count, as in
        the runtime (BERT's position-id buffer, saved by the embedding: 8 bytes a position)."""
        for t in module.parameters():
            self._excluded.add(t.untyped_storage().data_ptr())

    @property
    def live_bytes(self) -> int:
        return sum(n for _, n in self._live.values())

    def _pack(self, t: torch.Tensor) -> Any:
        if t.device.type == "meta":
            return t
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._excluded:
            return t
        key = (self._forward, ptr)
        entry = self._live.setdefault(key, [0, storage.nbytes()])
        entry[0] += 1
        return _Held(t.detach(), self, key)

    @staticmethod
    def _unpack(x: Any) -> torch.Tensor:
        return x.tensor if isinstance(x, _Held) else x

    def _release(self, key: tuple[int, int]) -> None:
        entry = self._live.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                del self._live[key]

    def hooks(self):
        """Count what autograd saves inside this context (one microbatch's forward)."""
        self._forward += 1
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def sample(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes
        self.peak_in_flight = self.in_flight


class _InFlight:
    """One microbatch in flight: from its forward until its backward reaches the stage, or
    until its graph is dropped without a backward."""

    __slots__ = ("meter", "done")

    def __init__(self, meter: ActivationMeter):
        self.meter = meter
        self.done = False
        meter.in_flight += 1

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.meter.in_flight -= 1

    __del__ = finish


class _HeldUntilBackward(torch.autograd.Function):
    """Identity on a stage's floating outputs that saves the stage's inputs (and, unless it is
    the last stage, its outputs) for backward through the meter's hooks, and counts the
    microbatch in flight until its backward reaches this node."""

    @staticmethod
    def forward(ctx, meter, num_kept, save_passed, *tensors):
        ctx.save_for_backward(*(tensors if save_passed else tensors[:num_kept]))
        ctx.in_flight = _InFlight(meter)
        ctx.num_kept = num_kept
        return tuple(t.view_as(t) for t in tensors[num_kept:])

    @staticmethod
    def backward(ctx, *grads):
        ctx.in_flight.finish()
        return (None, None, None) + (None,) * ctx.num_kept + grads


class MeteredStage(nn.Module):
    """``inner`` with its activations counted by ``meter`` (parameters are ``inner``'s, so an
    optimizer or a pipeline stage built on this module trains the same tensors).

    ``holds_outputs``: whether the stage's outputs count until its backward, as on every stage
    but the last in the runtime (there the outputs go into the loss, whose own saved tensors are
    not counted, and are not held by the stage)."""

    def __init__(self, inner: nn.Module, meter: ActivationMeter, holds_outputs: bool = True):
        super().__init__()
        self.inner = inner
        self.meter = meter
        self.holds_outputs = holds_outputs
        meter.exclude(inner)

    def forward(self, *inputs: torch.Tensor):
        # A microbatch cut out of a step's batch (torch's schedules split the batch into views)
        # becomes a tensor of its own, as the runtime's inputs are: otherwise it would count as
        # the whole batch's storage.
        inputs = tuple(x.clone() if isinstance(x, torch.Tensor) and not x.requires_grad
                       and x.untyped_storage().nbytes() > x.numel() * x.element_size() else x
                       for x in inputs)
        with self.meter.hooks():
            out = self.inner(*inputs)
            outs = out if isinstance(out, tuple) else (out,)
            flowing = [o for o in outs if o.is_floating_point() and o.requires_grad]
            kept = [x for x in inputs if isinstance(x, torch.Tensor)]
            if self.holds_outputs:
                kept += [o for o in outs if not any(o is f for f in flowing)]
            passed = iter(_HeldUntilBackward.apply(self.meter, len(kept), self.holds_outputs,
                                                   *kept, *flowing))
        new = tuple(next(passed) if any(o is f for f in flowing) else o for o in outs)
        self.meter.sample()
        return new if isinstance(out, tuple) else new[0]
