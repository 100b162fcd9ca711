"""Megatron-LM's interleaved 1F1B over virtual stages (Narayanan et al., SC'21), flush semantics.

Each of the ``d`` ranks of a pipeline holds ``v`` stages: rank ``r`` holds stages ``r, r + d, ...,
r + (v-1)d`` (chunks ``0..v-1``), so a microbatch passes every rank ``v`` times and the pipeline's
fill and drain shrink by ``v`` (bubble ``(d-1)/(v m)`` of the ideal time instead of ``(d-1)/m``).
Microbatches run in groups of ``d`` per chunk: forwards go chunk 0 for microbatches ``0..d-1``,
chunk 1 for the same group, ..., then the next group; backwards visit the chunks in reverse.
Rank ``r`` warms up with ``2 (d - r - 1) + (v - 1) d`` forwards, then alternates one forward and one
backward, then runs the backwards left. With ``v = 1`` this is plain 1F1B (``flush``).

Shape rule (Megatron's): with ``v > 1`` the number of microbatches per step is a multiple of ``d``.
"""

from __future__ import annotations

from ..config import ConfigError
from .flush import Flush, one_f_one_b
from .ir import Action, Kind, Schedule


class Interleaved(Schedule):
    name = "interleaved"
    virtual = True

    def check_shape(self, num_ranks: int, num_microbatches: int, stages_per_rank: int = 1) -> None:
        super().check_shape(num_ranks, num_microbatches, stages_per_rank)
        d, m, v = num_ranks, num_microbatches, stages_per_rank
        if v > 1 and m % d:
            lower, upper = max(d, m - m % d), m + d - m % d
            raise ConfigError(
                f"schedule 'interleaved' with {v} stages per rank runs microbatches in groups of "
                f"d={d} (the ranks of a pipeline), so num_microbatches (m) must be a multiple of "
                f"{d}; got m={m}. Use m={lower} or m={upper}, or one stage per rank.")

    @staticmethod
    def warmup(rank: int, num_ranks: int, num_microbatches: int, stages_per_rank: int) -> int:
        """Forwards rank ``rank`` runs before its first backward."""
        d, v = num_ranks, stages_per_rank
        if v == 1:
            return min(d - rank - 1, num_microbatches)
        return min(2 * (d - rank - 1) + (v - 1) * d, num_microbatches * v)

    def step_order(self, rank: int, num_ranks: int, num_microbatches: int, step: int,
                   stages_per_rank: int = 1) -> list[Action]:
        d, m, v = num_ranks, num_microbatches, stages_per_rank
        if v == 1:
            return Flush().step_order(rank, d, m, step)

        def place(k: int, forward: bool) -> Action:
            # the k-th forward (backward) of the rank: group k // (d v), chunk, microbatch
            group, within = divmod(k, d * v)
            chunk = within // d if forward else v - 1 - within // d
            return Action(Kind.FORWARD if forward else Kind.BACKWARD, step,
                          group * d + within % d, stage=chunk * d + rank)

        warm = self.warmup(rank, d, m, v)
        return [place(k, kind is Kind.FORWARD) for kind, k in one_f_one_b(range(m * v), warm)]
