"""PipeDream-2BW: 1F1B over the whole call, never drained between steps.

Step ``t`` runs on ``W(t-1)`` (version lag 1, ``schedule.weight_version``); the lowering places
``UPDATE(t)`` just before the first forward that needs ``W(t+1)``, the first of step ``t+2``, so
the step's gradient reduction has a whole step to complete.
"""

from __future__ import annotations

from .flush import one_f_one_b
from ..config import ConfigError
from .ir import Action, Schedule


class PipeDream2BW(Schedule):
    name = "2bw"
    version_lag = 1

    def check_shape(self, num_ranks: int, num_microbatches: int, stages_per_rank: int = 1) -> None:
        super().check_shape(num_ranks, num_microbatches, stages_per_rank)
        if num_microbatches < num_ranks:
            raise ConfigError(
                f"schedule '2bw' needs num_microbatches (m) >= number of stages (d) so that a "
                f"stage never needs a third weight version; got m={num_microbatches} < "
                f"d={num_ranks}. Raise num_microbatches (e.g. --gradient_accumulation_steps) to "
                f"at least {num_ranks}, or use fewer stages.")

    def compute_order(self, rank: int, num_ranks: int, num_microbatches: int, first_step: int,
                      num_steps: int, stages_per_rank: int = 1) -> list[Action]:
        m = num_microbatches
        ids = [(first_step + k // m, k % m) for k in range(num_steps * m)]
        return [Action(kind, t, i, stage=rank)
                for kind, (t, i) in one_f_one_b(ids, num_ranks - rank - 1)]
