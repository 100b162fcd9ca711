"""Zero Bubble ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024), flush semantics.

The backward is split in two: ``I`` computes the input gradient, which goes upstream at once, and
``W`` the weight gradients, which no other stage waits for. The order is 1F1B's with ``B`` replaced
by ``I`` (so gradients travel upstream as soon as they can), and stage ``s`` of ``d`` defers its
weight gradients by ``s`` microbatches: its ``W`` of microbatch ``j`` follows the ``I`` of
microbatch ``j + s``, and the deferred ones fill the cool-down bubble. Activations kept for ``I``
are 1F1B's (at most ``d - s`` microbatches between F and I); those kept until ``W`` are at most
``d`` microbatches on every stage, 1F1B's peak (its first stage's), as in the paper.
"""

from __future__ import annotations

from .ir import Action, Kind, Schedule


class ZeroBubbleH1(Schedule):
    name = "zb-h1"
    split_backward = True

    def step_order(self, rank: int, num_ranks: int, num_microbatches: int, step: int,
                   stages_per_rank: int = 1) -> list[Action]:
        m, s = num_microbatches, rank
        warm = min(num_ranks - s - 1, m)

        def act(kind: Kind, i: int) -> Action:
            return Action(kind, step, i, stage=s)

        order = [act(Kind.FORWARD, i) for i in range(warm)]
        weights = 0
        for j in range(m):
            if j + warm < m:
                order.append(act(Kind.FORWARD, j + warm))
            order.append(act(Kind.BACKWARD_INPUT, j))
            if j >= s:
                order.append(act(Kind.BACKWARD_WEIGHT, weights))
                weights += 1
        order += [act(Kind.BACKWARD_WEIGHT, i) for i in range(weights, m)]
        return order
