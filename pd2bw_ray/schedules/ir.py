"""The schedule IR: what a stage does (``Kind``, ``Action``) and what a schedule is (``Schedule``).

A schedule emits only computations, per rank and in order: ``F``, ``B``, or a split backward
``I`` (input gradient) and ``W`` (weight gradients), each naming its step, microbatch and
(virtual) stage. ``pd2bw_ray.schedule.call_actions`` lowers that order, in one pass, to the full
lists the executor runs: receives before and sends after each computation, a reduction and an
update per step, and the chunks the driver hands out.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from ..config import ConfigError


class Kind(str, Enum):
    FORWARD = "F"
    BACKWARD = "B"           # the whole backward: input and weight gradients
    BACKWARD_INPUT = "I"     # split backward, part 1: the input gradient, sent upstream at once
    BACKWARD_WEIGHT = "W"    # split backward, part 2: the weight gradients, after its I
    SEND_ACT = "SA"      # send this microbatch's output activations to stage peer (= s + 1)
    RECV_ACT = "RA"      # receive this microbatch's input activations from stage peer (= s - 1)
    SEND_GRAD = "SG"     # send the gradient of this microbatch's inputs to stage peer (= s - 1)
    RECV_GRAD = "RG"     # receive the gradient of this microbatch's outputs from peer (= s + 1)
    REDUCE = "R"         # start averaging the step's gradients (replicas, tied copies, norm)
    UPDATE = "U"         # wait for the reduction, apply the optimizer: creates version `version`


COMPUTE = frozenset({Kind.FORWARD, Kind.BACKWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT})
MESSAGES = frozenset({Kind.SEND_ACT, Kind.RECV_ACT, Kind.SEND_GRAD, Kind.RECV_GRAD})


@dataclass(frozen=True)
class Action:
    """One thing a rank does. ``microbatch`` is the index within ``step`` (-1 for REDUCE/UPDATE);
    ``version`` is the weight version used (F/B/I/W) or created (UPDATE); ``peer`` the other
    stage. ``stage`` is the (virtual) stage of a computation or message when the rank holds
    several stages (stage ``s`` lives on pipeline rank ``s % d``); it is None where the rank holds
    one stage, which is then implied. REDUCE and UPDATE cover every stage of the rank."""

    kind: Kind
    step: int
    microbatch: int = -1
    version: int = -1
    peer: int | None = None
    stage: int | None = None

    def __str__(self) -> str:
        where = "" if self.stage is None else f"s{self.stage}:"
        if self.kind in COMPUTE:
            return f"{where}{self.kind.value}{self.step}.{self.microbatch}@v{self.version}"
        if self.kind in MESSAGES:
            return f"{where}{self.kind.value}{self.step}.{self.microbatch}:{self.peer}"
        if self.kind is Kind.UPDATE:
            return f"U{self.step}->v{self.version}"
        return f"{self.kind.value}{self.step}"


class Schedule:
    """A pipeline schedule: the order of computations on each rank, and its version rule.

    ``version_lag`` states the version rule (applied by ``schedule.weight_version``): 0 for
    synchronous schedules, ``W(t+1) = W(t) - update(grad f(W(t)))``, whose steps drain before the
    update; 1 for PipeDream-2BW. ``virtual``: whether a rank may hold several stages.
    ``split_backward``: whether backwards are I + W rather than B.
    Subclasses set ``name`` and implement ``step_order`` (or ``compute_order`` for a schedule
    whose steps overlap). Instances hold no state.
    """

    name: str = ""
    version_lag: int = 0
    virtual: bool = False
    split_backward: bool = False

    def check_shape(self, num_ranks: int, num_microbatches: int, stages_per_rank: int = 1) -> None:
        """Raise ConfigError unless the schedule runs ``num_ranks`` ranks per pipeline, each
        holding ``stages_per_rank`` stages, with ``num_microbatches`` microbatches per step."""
        if num_ranks < 1:
            raise ConfigError(f"need at least one stage, got {num_ranks}")
        if num_microbatches < 1:
            raise ConfigError(f"num_microbatches must be >= 1, got {num_microbatches}")
        if stages_per_rank < 1:
            raise ConfigError(f"stages_per_rank must be >= 1, got {stages_per_rank}")
        if stages_per_rank > 1 and not self.virtual:
            raise ConfigError(f"schedule {self.name!r} runs one stage per rank, got "
                              f"{stages_per_rank} stages per rank; use 'interleaved' for virtual "
                              "stages, or give each stage its own ranks")

    def compute_order(self, rank: int, num_ranks: int, num_microbatches: int, first_step: int,
                      num_steps: int, stages_per_rank: int = 1) -> list[Action]:
        """Every computation of ``rank`` in a call of ``num_steps`` steps from ``first_step``,
        in order. The default runs the steps one after the other (drained in between)."""
        order: list[Action] = []
        for t in range(first_step, first_step + num_steps):
            order += self.step_order(rank, num_ranks, num_microbatches, t, stages_per_rank)
        return order

    def step_order(self, rank: int, num_ranks: int, num_microbatches: int, step: int,
                   stages_per_rank: int = 1) -> list[Action]:
        raise NotImplementedError(f"schedule {self.name!r} defines no step order")

    def __repr__(self) -> str:
        return f"<schedule {self.name!r}>"
