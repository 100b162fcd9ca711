"""PipeDream-Flush: 1F1B within each step, drained before the update (flush semantics)."""

from __future__ import annotations

from typing import Sequence, TypeVar

from .ir import Action, Kind, Schedule

T = TypeVar("T")


def one_f_one_b(ids: Sequence[T], warm: int) -> list[tuple[Kind, T]]:
    """1F1B over ``ids``: ``warm`` forwards, then a forward and a backward alternately, then the
    backwards left. A stage ``s`` of ``d`` warms up with ``d - s - 1`` forwards."""
    warm = min(warm, len(ids))
    order = [(Kind.FORWARD, k) for k in ids[:warm]]
    for j in range(warm, len(ids)):
        order.append((Kind.FORWARD, ids[j]))
        order.append((Kind.BACKWARD, ids[j - warm]))
    order.extend((Kind.BACKWARD, k) for k in ids[len(ids) - warm:])
    return order


class Flush(Schedule):
    name = "flush"

    def step_order(self, rank: int, num_ranks: int, num_microbatches: int, step: int,
                   stages_per_rank: int = 1) -> list[Action]:
        return [Action(kind, step, i, stage=rank)
                for kind, i in one_f_one_b(range(num_microbatches), num_ranks - rank - 1)]
