"""Zero Bubble ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024), flush semantics.

The backward is split in two: ``I`` computes the input gradient, which goes upstream at once, and
``W`` the weight gradients, which no other stage waits for. The order is 1F1B's with ``B`` replaced
by ``I`` (so gradients travel upstream as soon as they can), and rank ``r`` defers its weight
gradients by ``r`` backwards: the ``W`` of its ``j``-th ``I`` follows its ``(j + r)``-th ``I``, and the
deferred ones fill the cool-down bubble. Activations kept for ``I`` are 1F1B's (at most ``d - s``
microbatches between F and I on stage ``s``); those kept until ``W`` are at most ``d`` microbatches
on every stage, 1F1B's peak (its first stage's), as in the paper.

With ``v`` stages per rank the same split and deferral apply to Megatron's interleaved order
(``interleaved``, whose shape rule holds), as torch's ``ScheduleInterleavedZeroBubble`` does.
"""

from __future__ import annotations

from .interleaved import Interleaved
from .ir import Action, Kind, Schedule


class ZeroBubbleH1(Schedule):
    name = "zb-h1"
    split_backward = True
    virtual = True

    def check_shape(self, num_ranks: int, num_microbatches: int, stages_per_rank: int = 1) -> None:
        Interleaved().check_shape(num_ranks, num_microbatches, stages_per_rank)

    def step_order(self, rank: int, num_ranks: int, num_microbatches: int, step: int,
                   stages_per_rank: int = 1) -> list[Action]:
        order: list[Action] = []
        inputs_done: list[Action] = []     # the I computed so far, in order
        weights = 0
        for a in Interleaved().step_order(rank, num_ranks, num_microbatches, step,
                                          stages_per_rank):
            if a.kind is Kind.FORWARD:
                order.append(a)
                continue
            order.append(Action(Kind.BACKWARD_INPUT, a.step, a.microbatch, stage=a.stage))
            inputs_done.append(a)
            if len(inputs_done) > rank:
                w = inputs_done[weights]
                order.append(Action(Kind.BACKWARD_WEIGHT, w.step, w.microbatch, stage=w.stage))
                weights += 1
        order += [Action(Kind.BACKWARD_WEIGHT, w.step, w.microbatch, stage=w.stage)
                  for w in inputs_done[weights:]]
        return order
