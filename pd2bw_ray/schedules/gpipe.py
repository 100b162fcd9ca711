"""GPipe: all forwards of a step, then all its backwards, drained before the update."""

from __future__ import annotations

from .ir import Action, Kind, Schedule


class GPipe(Schedule):
    name = "gpipe"

    def step_order(self, rank: int, num_ranks: int, num_microbatches: int, step: int,
                   stages_per_rank: int = 1) -> list[Action]:
        return ([Action(Kind.FORWARD, step, i, stage=rank) for i in range(num_microbatches)]
                + [Action(Kind.BACKWARD, step, i, stage=rank) for i in range(num_microbatches)])
