"""Schedules are pure functions: checked here without any process."""

import pytest

from pd2bw_ray.config import ConfigError
from pd2bw_ray.schedule import (Action, Kind, ScheduleError, call_actions, simulate,
                                stage_actions, step_actions, weight_version)

SCHEDULES = ("2bw", "flush", "gpipe")


def compute_events(actions):
    return [(a.kind.value, a.step, a.microbatch) for a in actions
            if a.kind in (Kind.FORWARD, Kind.BACKWARD)]


def all_stages(schedule, d, m, n, first=0):
    return [stage_actions(schedule, s, d, m, n, first) for s in range(d)]


def test_weight_version_rule():
    # 2bw: W(t+1) = W(t) - lr * grad f(W(t-1)), W(-1) = W(0)
    assert [weight_version("2bw", t) for t in range(5)] == [0, 0, 1, 2, 3]
    assert [weight_version("flush", t) for t in range(4)] == [0, 1, 2, 3]
    assert [weight_version("gpipe", t) for t in range(4)] == [0, 1, 2, 3]


def test_one_f_one_b_order_by_hand():
    # d=3, m=3, 2 steps, stage 0: 2 warm-up forwards, then F/B alternate, then 2 cool-down B.
    ev = compute_events(stage_actions("2bw", 0, 3, 3, 2))
    ids = [(k, t * 3 + i) for k, t, i in ev]
    assert ids == [("F", 0), ("F", 1), ("F", 2), ("B", 0), ("F", 3), ("B", 1), ("F", 4),
                   ("B", 2), ("F", 5), ("B", 3), ("B", 4), ("B", 5)]
    last = compute_events(stage_actions("2bw", 2, 3, 3, 2))
    assert [(k, t * 3 + i) for k, t, i in last] == [
        (k, j) for j in range(6) for k in ("F", "B")]


def test_gpipe_and_flush_order_by_hand():
    ev = compute_events(stage_actions("gpipe", 1, 3, 3, 2))
    assert ev == [("F", 0, 0), ("F", 0, 1), ("F", 0, 2), ("B", 0, 0), ("B", 0, 1), ("B", 0, 2),
                  ("F", 1, 0), ("F", 1, 1), ("F", 1, 2), ("B", 1, 0), ("B", 1, 1), ("B", 1, 2)]
    # flush = 1F1B inside each step, drained: stage 0 of d=3 warms up with 2 forwards per step.
    ev = compute_events(stage_actions("flush", 0, 3, 3, 2))
    assert ev == [("F", 0, 0), ("F", 0, 1), ("F", 0, 2), ("B", 0, 0), ("B", 0, 1), ("B", 0, 2),
                  ("F", 1, 0), ("F", 1, 1), ("F", 1, 2), ("B", 1, 0), ("B", 1, 1), ("B", 1, 2)]
    ev = compute_events(stage_actions("flush", 1, 3, 4, 1))
    assert ev == [("F", 0, 0), ("F", 0, 1), ("B", 0, 0), ("F", 0, 2), ("B", 0, 1), ("F", 0, 3),
                  ("B", 0, 2), ("B", 0, 3)]


@pytest.mark.parametrize("schedule", ["2bw", "flush"])
def test_one_f_one_b_alternates_in_steady_state(schedule):
    d, m, n = 4, 6, 3
    for s in range(d):
        kinds = "".join(k for k, _, _ in compute_events(stage_actions(schedule, s, d, m, n)))
        warm = d - s - 1
        if schedule == "2bw":
            steady = kinds[warm:len(kinds) - warm]
            assert steady == "FB" * (n * m - warm), (s, kinds)
        else:
            per_step = kinds[: 2 * m]
            assert per_step[warm:2 * m - warm] == "FB" * (m - warm)
            assert kinds == per_step * n


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_in_flight_bounds_and_versions(schedule):
    for d in range(1, 7):
        for m in range(d, 2 * d + 1):
            res = simulate(schedule, all_stages(schedule, d, m, 4), m)
            for s in range(d):
                bound = m if schedule == "gpipe" else d - s
                assert res.max_in_flight[s] <= bound, (schedule, d, m, s, res.max_in_flight)
                assert res.max_live_versions[s] <= 2
            if schedule != "gpipe":
                assert res.max_in_flight[0] == min(d, m)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_no_deadlock_every_send_meets_its_recv(schedule):
    # d in 1..8, m in d..3d: the simulation runs every stage's list against the others and
    # checks message matching, versions and drain.
    for d in range(1, 9):
        for m in range(d, 3 * d + 1):
            for n in (1, 3):
                simulate(schedule, all_stages(schedule, d, m, n), m)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_later_call_continues_from_earlier_versions(schedule):
    d, m = 3, 4
    simulate(schedule, all_stages(schedule, d, m, 3, first=5), m, first_step=5)


def test_2bw_uses_stale_version_and_never_drains_between_steps():
    d, m, n = 3, 3, 4
    lists = all_stages("2bw", d, m, n)
    for s, acts in enumerate(lists):
        for a in acts:
            if a.kind in (Kind.FORWARD, Kind.BACKWARD):
                assert a.version == max(a.step - 1, 0)
        # no drain: the first forward of step t+1 comes before the last backward of step t
        for t in range(n - 1):
            first_f = next(i for i, a in enumerate(acts)
                           if a.kind is Kind.FORWARD and a.step == t + 1)
            last_b = max(i for i, a in enumerate(acts)
                         if a.kind is Kind.BACKWARD and a.step == t)
            if s < d - 1:
                assert first_f < last_b, (s, t)
        # UPDATE(t) creates W(t+1) before the first forward of step t+2 and after REDUCE(t)
        for t in range(n):
            u = next(i for i, a in enumerate(acts) if a.kind is Kind.UPDATE and a.step == t)
            r = next(i for i, a in enumerate(acts) if a.kind is Kind.REDUCE and a.step == t)
            assert r < u and acts[u].version == t + 1
            if t + 2 < n:
                f = next(i for i, a in enumerate(acts) if a.kind is Kind.FORWARD
                         and a.step == t + 2)
                assert u < f


def test_flush_and_gpipe_drain_before_update():
    for schedule in ("flush", "gpipe"):
        acts = stage_actions(schedule, 0, 3, 3, 2)
        u0 = next(i for i, a in enumerate(acts) if a.kind is Kind.UPDATE and a.step == 0)
        assert all(a.step == 0 for a in acts[:u0])
        assert all(a.step == 1 for a in acts[u0 + 1:])


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_chunks_streamed_one_step_at_a_time_equal_the_whole_call(schedule):
    for d in (1, 2, 3, 5):
        for m in (d, d + 2):
            for n in (1, 2, 3, 6):
                for first in (0, 4):
                    for s in range(d):
                        whole = call_actions(schedule, s, d, m, first, first + n - 1)
                        for t in range(first, first + n):
                            got = step_actions(schedule, s, d, m, t, first,
                                               is_last=(t == first + n - 1))
                            assert got == whole[t - first], (schedule, d, m, n, first, s, t)


def test_chunk_t_needs_only_its_own_step_data_on_the_first_and_last_stage():
    d, m, n = 4, 5, 4
    for schedule in SCHEDULES:
        for s in (0, d - 1):
            for t, chunk in enumerate(call_actions(schedule, s, d, m, 0, n - 1)):
                fwd_steps = {a.step for a in chunk if a.kind is Kind.FORWARD}
                assert fwd_steps <= {t}


def test_bad_shapes_are_rejected_with_a_message():
    with pytest.raises(ConfigError, match="num_microbatches .m. >= number of stages"):
        stage_actions("2bw", 0, 4, 3, 1)
    with pytest.raises(ConfigError, match="unknown schedule"):
        stage_actions("1f1b-ish", 0, 2, 2, 1)
    # flush and gpipe work with m < d
    simulate("flush", all_stages("flush", 4, 2, 2), 2)


def test_simulator_catches_broken_schedules():
    good = all_stages("2bw", 2, 2, 1)
    # swap the order of two receives on stage 1: messages no longer match
    broken = [list(good[0]), list(good[1])]
    ra = [i for i, a in enumerate(broken[1]) if a.kind is Kind.RECV_ACT]
    broken[1][ra[0]], broken[1][ra[1]] = broken[1][ra[1]], broken[1][ra[0]]
    with pytest.raises(ScheduleError, match="sent step 0 microbatch 0 first"):
        simulate("2bw", broken, 2)
    # stage 0 waits for a gradient before sending the activation it depends on: deadlock
    dead = [[Action(Kind.RECV_GRAD, 0, 0, peer=1), Action(Kind.FORWARD, 0, 0, version=0),
             Action(Kind.SEND_ACT, 0, 0, peer=1)],
            [Action(Kind.RECV_ACT, 0, 0, peer=0), Action(Kind.FORWARD, 0, 0, version=0),
             Action(Kind.BACKWARD, 0, 0, version=0), Action(Kind.SEND_GRAD, 0, 0, peer=0)]]
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate("2bw", dead, 1)
    # a forward on a version that does not exist yet
    early = [[Action(Kind.FORWARD, 0, 0, version=1), Action(Kind.BACKWARD, 0, 0, version=1)]]
    with pytest.raises(ScheduleError, match="needs weight version 1"):
        simulate("2bw", early, 1)
