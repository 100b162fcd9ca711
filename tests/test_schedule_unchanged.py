"""The lowering of issue #17 leaves the action lists of 2bw, flush and gpipe exactly as they were.

``_frozen_*`` below are the pre-#17 implementation of ``pd2bw_ray/schedule.py`` (commit 7df7e3a:
one function interleaving the 1F1B/GPipe order with the sends, receives, reductions and updates),
copied here unchanged apart from names, so that the runtime's lists can be compared with it for
every shape the runtime accepts. They build the live ``Action`` class, whose new fields keep their
defaults for these schedules.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import pytest

from pd2bw_ray.schedule import Action, Kind, call_actions, stage_actions, step_actions


def _frozen_weight_version(schedule: str, step: int) -> int:
    return max(step - 1, 0) if schedule == "2bw" else step


def _frozen_compute_order(schedule: str, stage: int, d: int, m: int,
                          n_steps: int) -> list[tuple[str, int]]:
    order: list[tuple[str, int]] = []

    def one_f_one_b(ids: Sequence[int]) -> None:
        warm = min(d - stage - 1, len(ids))
        order.extend(("F", k) for k in ids[:warm])
        for j in range(warm, len(ids)):
            order.append(("F", ids[j]))
            order.append(("B", ids[j - warm]))
        order.extend(("B", k) for k in ids[len(ids) - warm:])

    if schedule == "2bw":
        one_f_one_b(list(range(n_steps * m)))
    else:
        for t in range(n_steps):
            ids = list(range(t * m, (t + 1) * m))
            if schedule == "flush":
                one_f_one_b(ids)
            else:  # gpipe
                order.extend(("F", k) for k in ids)
                order.extend(("B", k) for k in ids)
    return order


def _frozen_call_actions(schedule: str, stage: int, num_stages: int, num_microbatches: int,
                         first_step: int, last_step: int) -> list[list[Action]]:
    d, m, s = num_stages, num_microbatches, stage
    n = last_step - first_step + 1
    chunks: list[list[Action]] = [[] for _ in range(n)]
    chunk = 0
    pending_updates: deque[int] = deque()
    backwards_done = [0] * n

    def mb(k: int) -> tuple[int, int]:
        return first_step + k // m, k % m

    for kind, k in _frozen_compute_order(schedule, s, d, m, n):
        step, i = mb(k)
        v = _frozen_weight_version(schedule, step)
        if kind == "F":
            if schedule == "2bw" and i == 0:
                while pending_updates and pending_updates[0] <= step - 2:
                    u = pending_updates.popleft()
                    chunks[chunk].append(Action(Kind.UPDATE, u, version=u + 1))
            if s > 0:
                chunks[chunk].append(Action(Kind.RECV_ACT, step, i, peer=s - 1))
            chunks[chunk].append(Action(Kind.FORWARD, step, i, version=v))
            if s < d - 1:
                chunks[chunk].append(Action(Kind.SEND_ACT, step, i, peer=s + 1))
            if schedule == "2bw" and i == m - 1 and step - first_step < n - 1:
                chunk += 1
        else:
            if s < d - 1:
                chunks[chunk].append(Action(Kind.RECV_GRAD, step, i, peer=s + 1))
            chunks[chunk].append(Action(Kind.BACKWARD, step, i, version=v))
            if s > 0:
                chunks[chunk].append(Action(Kind.SEND_GRAD, step, i, peer=s - 1))
            backwards_done[step - first_step] += 1
            if backwards_done[step - first_step] == m:
                chunks[chunk].append(Action(Kind.REDUCE, step))
                if schedule == "2bw":
                    pending_updates.append(step)
                else:
                    chunks[chunk].append(Action(Kind.UPDATE, step, version=step + 1))
                    if step - first_step < n - 1:
                        chunk += 1
    for u in pending_updates:
        chunks[-1].append(Action(Kind.UPDATE, u, version=u + 1))
    return chunks


def _frozen_step_actions(schedule: str, stage: int, num_stages: int, num_microbatches: int,
                         step: int, first_step: int, is_last: bool) -> list[Action]:
    window_first = max(first_step, step - 2) if schedule == "2bw" else step
    last = step if is_last else step + 1
    return _frozen_call_actions(schedule, stage, num_stages, num_microbatches,
                                window_first, last)[step - window_first]


def _frozen_stage_actions(schedule: str, stage: int, num_stages: int, num_microbatches: int,
                          num_steps: int, first_step: int = 0) -> list[Action]:
    chunks = _frozen_call_actions(schedule, stage, num_stages, num_microbatches,
                                  first_step, first_step + num_steps - 1)
    return [a for c in chunks for a in c]


@pytest.mark.parametrize("schedule", ["2bw", "flush", "gpipe"])
def test_existing_schedules_lower_to_the_same_lists(schedule):
    for d in range(1, 9):
        for m in range(d, 3 * d + 1):
            for n, first in ((1, 0), (3, 0), (2, 5)):
                last = first + n - 1
                for s in range(d):
                    want = _frozen_call_actions(schedule, s, d, m, first, last)
                    assert call_actions(schedule, s, d, m, first, last) == want, \
                        (schedule, d, m, n, first, s)
                    assert stage_actions(schedule, s, d, m, n, first) == \
                        _frozen_stage_actions(schedule, s, d, m, n, first)
                    for t in range(first, last + 1):
                        is_last = t == last
                        assert step_actions(schedule, s, d, m, t, first, is_last) == \
                            _frozen_step_actions(schedule, s, d, m, t, first, is_last), \
                            (schedule, d, m, n, first, s, t)
                    # and their rendering, which the timeline and the logs parse
                    assert [str(a) for c in want for a in c] == \
                        [str(a) for a in stage_actions(schedule, s, d, m, n, first)]


def test_flush_and_gpipe_below_d_microbatches_lower_to_the_same_lists():
    for schedule in ("flush", "gpipe"):
        for d in range(2, 7):
            for m in range(1, d):
                for s in range(d):
                    assert call_actions(schedule, s, d, m, 3, 5) == \
                        _frozen_call_actions(schedule, s, d, m, 3, 5)
