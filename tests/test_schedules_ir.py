"""Schedules as data (issue #17): the registry, the one lowering pass, and the simulator proving the
interleaved and Zero Bubble schedules deadlock-free within their memory bounds. No processes."""

from __future__ import annotations

import dataclasses

import pytest

from pd2bw_ray import config, schedules
from pd2bw_ray.config import ConfigError
from pd2bw_ray.schedule import (Action, Kind, ScheduleError, call_actions, check_shape, simulate,
                                stage_actions, step_actions, weight_version)

COMPUTE = (Kind.FORWARD, Kind.BACKWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT)


def all_ranks(schedule, d, m, n, first=0, v=1):
    return [stage_actions(schedule, r, d, m, n, first, stages_per_rank=v) for r in range(d)]


def compute_events(actions):
    return [(a.kind.value, a.stage, a.step, a.microbatch) for a in actions if a.kind in COMPUTE]


def interleaved_shapes():
    """(d, m, v) for d in 1..8, m in d..3d, v in 1..4, split by Megatron's shape rule."""
    ok, refused = [], []
    for d in range(1, 9):
        for m in range(d, 3 * d + 1):
            for v in range(1, 5):
                (ok if v == 1 or m % d == 0 else refused).append((d, m, v))
    return ok, refused


# ---------------------------------------------------------------- registry and version rules


def test_registry_is_a_constant_mapping_of_every_schedule():
    assert set(schedules.REGISTRY) == {"2bw", "flush", "gpipe", "interleaved", "zb-h1"}
    for name, sched in schedules.REGISTRY.items():
        assert sched.name == name and schedules.get(name) is sched
    with pytest.raises(TypeError):
        schedules.REGISTRY["mine"] = schedules.REGISTRY["flush"]   # type: ignore[index]
    with pytest.raises(ConfigError, match="unknown schedule 'zb-h2'; choose one of"):
        schedules.get("zb-h2")
    # what the runtime validates against is a subset of what has action lists
    assert set(config.SCHEDULES) <= set(schedules.REGISTRY)


def test_each_schedule_states_its_version_rule():
    # 2bw: W(t+1) = W(t) - lr * grad f(W(t-1)), W(-1) = W(0); the others plain minibatch SGD
    assert [weight_version("2bw", t) for t in range(5)] == [0, 0, 1, 2, 3]
    for name in ("flush", "gpipe", "interleaved", "zb-h1"):
        assert [weight_version(name, t) for t in range(4)] == [0, 1, 2, 3], name
    for name in ("interleaved", "zb-h1"):
        for a in stage_actions(name, 1, 3, 3, 3, first_step=2):
            if a.kind in COMPUTE:
                assert a.version == a.step
            if a.kind is Kind.UPDATE:
                assert a.version == a.step + 1


def test_schedules_emit_computations_only_each_exactly_once():
    cases = [("2bw", 4, 5, 1), ("flush", 4, 3, 1), ("gpipe", 3, 4, 1), ("interleaved", 3, 6, 3),
             ("zb-h1", 4, 6, 1), ("zb-h1", 2, 4, 3)]
    for name, d, m, v in cases:
        sched = schedules.get(name)
        for r in range(d):
            order = sched.compute_order(r, d, m, 7, 2, v)
            assert all(a.kind in COMPUTE and a.peer is None and a.version == -1 for a in order)
            want_kinds = (["F", "I", "W"] if sched.split_backward else ["F", "B"])
            seen = sorted((a.stage, a.step, a.microbatch, a.kind.value) for a in order)
            assert seen == sorted((r + c * d, t, i, k) for c in range(v) for t in (7, 8)
                                  for i in range(m) for k in want_kinds), (name, r)


# ---------------------------------------------------------------- the lowering


def test_lowering_adds_messages_around_computations():
    # zb-h1, d=3, m=2, middle stage: I takes the output gradient and sends the input gradient
    # at once; W has no message; one reduction and update after the last weight gradient
    got = [str(a) for a in stage_actions("zb-h1", 1, 3, 2, 1)]
    assert got == ["RA0.0:0", "F0.0@v0", "SA0.0:2", "RA0.1:0", "F0.1@v0", "SA0.1:2",
                   "RG0.0:2", "I0.0@v0", "SG0.0:0", "RG0.1:2", "I0.1@v0", "SG0.1:0",
                   "W0.0@v0", "W0.1@v0", "R0", "U0->v1"]
    # interleaved, d=2, v=2: the last stage (3, on rank 1) needs no gradient from downstream and
    # stage 2 on rank 0 receives from stage 1 on rank 1
    r1 = stage_actions("interleaved", 1, 2, 2, 1, stages_per_rank=2)
    assert [str(a) for a in r1[:8]] == ["s1:RA0.0:0", "s1:F0.0@v0", "s1:SA0.0:2", "s1:RA0.1:0",
                                         "s1:F0.1@v0", "s1:SA0.1:2", "s3:RA0.0:2", "s3:F0.0@v0"]
    assert str(r1[8]) == "s3:B0.0@v0" and str(r1[9]) == "s3:SG0.0:2"
    r0 = stage_actions("interleaved", 0, 2, 2, 1, stages_per_rank=2)
    assert str(r0[4]) == "s2:RA0.0:1"
    assert all(a.stage is None for a in r0 if a.kind in (Kind.REDUCE, Kind.UPDATE))


def test_interleaved_order_by_hand():
    # Megatron's interleaved 1F1B, d=2, v=2, m=4, rank 0 (stages 0 and 2): forwards in groups of
    # d=2 microbatches per chunk, 2(d-r-1) + (v-1)d = 4 warm-up forwards, backwards from the
    # last chunk first
    ev = compute_events(stage_actions("interleaved", 0, 2, 4, 1, stages_per_rank=2))
    F, B = "F", "B"
    assert ev == [(F, 0, 0, 0), (F, 0, 0, 1), (F, 2, 0, 0), (F, 2, 0, 1),
                  (F, 0, 0, 2), (B, 2, 0, 0), (F, 0, 0, 3), (B, 2, 0, 1),
                  (F, 2, 0, 2), (B, 0, 0, 0), (F, 2, 0, 3), (B, 0, 0, 1),
                  (B, 2, 0, 2), (B, 2, 0, 3), (B, 0, 0, 2), (B, 0, 0, 3)]
    # the last rank warms up with (v-1)d = 2 forwards
    ev = compute_events(stage_actions("interleaved", 1, 2, 4, 1, stages_per_rank=2))
    assert [k for k, *_ in ev[:4]] == [F, F, F, B] and ev[3] == (B, 3, 0, 0)


def test_zb_h1_defers_weight_gradients_by_the_stage_index():
    d, m = 4, 8
    for s in range(d):
        ev = [(k, i) for k, _, _, i in compute_events(stage_actions("zb-h1", s, d, m, 1))]
        kinds = "".join(k for k, _ in ev)
        warm = d - s - 1
        assert kinds.startswith("F" * warm + "FI")
        for j in range(m):
            pos_w = ev.index(("W", j))
            assert pos_w > ev.index(("I", j))
            if j + s < m:   # W(j) right after I(j + s): the first s are deferred
                assert ev[pos_w - 1] == ("I", j + s), (s, j, kinds)
        # the I order is 1F1B's B order
        fb = [(k, i) for k, _, _, i in compute_events(stage_actions("flush", s, d, m, 1))]
        assert [x for x in ev if x[0] != "W"] == [("I" if k == "B" else k, i) for k, i in fb]


def test_stage_field_and_rendering_only_where_a_rank_holds_several_stages():
    for name, v in (("2bw", 1), ("flush", 1), ("gpipe", 1), ("zb-h1", 1), ("interleaved", 1)):
        assert all(a.stage is None for a in stage_actions(name, 1, 3, 3, 2, stages_per_rank=v))
    acts = stage_actions("interleaved", 1, 3, 3, 2, stages_per_rank=2)
    assert {a.stage for a in acts if a.kind not in (Kind.REDUCE, Kind.UPDATE)} == {1, 4}
    a = Action(Kind.BACKWARD_WEIGHT, 3, 1, version=3, stage=4)
    assert str(a) == "s4:W3.1@v3" and str(dataclasses.replace(a, stage=None)) == "W3.1@v3"


@pytest.mark.parametrize("name,v", [("interleaved", 2), ("interleaved", 1), ("zb-h1", 1),
                                    ("zb-h1", 3)])
def test_chunks_are_drained_steps_and_stream_one_step_at_a_time(name, v):
    for d in (1, 2, 3):
        for m in (d, 2 * d):
            for first in (0, 3):
                for r in range(d):
                    whole = call_actions(name, r, d, m, first, first + 2, stages_per_rank=v)
                    for k, chunk in enumerate(whole):
                        assert {a.step for a in chunk} == {first + k}
                        assert chunk[-2:] == [Action(Kind.REDUCE, first + k),
                                              Action(Kind.UPDATE, first + k,
                                                     version=first + k + 1)]
                        assert step_actions(name, r, d, m, first + k, first, k == 2,
                                            stages_per_rank=v) == chunk


# ---------------------------------------------------------------- shape rules


def test_shape_rules_are_config_errors_with_what_to_do():
    ok, refused = interleaved_shapes()
    for d, m, v in refused:
        for name in ("interleaved", "zb-h1"):
            with pytest.raises(ConfigError, match=rf"multiple of {d}; got m={m}\. Use m="):
                stage_actions(name, 0, d, m, 1, stages_per_rank=v)
    for name in ("2bw", "flush", "gpipe"):
        with pytest.raises(ConfigError, match=f"schedule '{name}' runs one stage per rank"):
            stage_actions(name, 0, 2, 4, 1, stages_per_rank=2)
    with pytest.raises(ConfigError, match="stages_per_rank must be >= 1"):
        stage_actions("interleaved", 0, 2, 4, 1, stages_per_rank=0)
    # zb-h1 and flush-like schedules accept m < d, as flush does
    simulate("zb-h1", all_ranks("zb-h1", 4, 2, 2), 2)
    simulate("interleaved", all_ranks("interleaved", 4, 2, 2), 2)


def test_runtime_check_refuses_what_it_cannot_run_yet():
    for name in schedules.REGISTRY:
        if name in config.SCHEDULES:
            check_shape(name, 2, 4)
        else:
            with pytest.raises(ConfigError, match="runtime cannot run it yet"):
                check_shape(name, 2, 4)


# ---------------------------------------------------------------- Done when 2: the simulator


def test_interleaved_is_deadlock_free_within_its_in_flight_bound():
    ok, _ = interleaved_shapes()
    for d, m, v in ok:
        for n, first in ((1, 0), (2, 3)) if d <= 4 else ((1, 0),):
            res = simulate("interleaved", all_ranks("interleaved", d, m, n, first, v), m,
                           first_step=first)
            for r in range(d):
                # Megatron's bound: the warm-up forwards plus the one of the first 1F1B pair
                warm = d - r - 1 if v == 1 else 2 * (d - r - 1) + (v - 1) * d
                assert res.max_in_flight[r] <= min(warm + 1, m * v), (d, m, v, r, res)
                assert res.max_held[r] == res.max_in_flight[r]      # no split backward
                assert res.max_live_versions[r] == 1                # flush semantics
            assert res.max_in_flight[0] == min(d - 1 if v == 1 else 2 * d - 2 + (v - 1) * d,
                                               m * v - 1) + 1


def test_zb_h1_is_deadlock_free_with_one_f_one_b_memory():
    for d in range(1, 9):
        for m in range(d, 3 * d + 1):
            for n, first in ((1, 0), (2, 3)) if d <= 4 else ((1, 0),):
                res = simulate("zb-h1", all_ranks("zb-h1", d, m, n, first), m, first_step=first)
                ref = simulate("flush", all_ranks("flush", d, m, n, first), m, first_step=first)
                for s in range(d):
                    # activations awaiting their input gradient: 1F1B's, d - s on stage s
                    assert res.max_in_flight[s] <= d - s, (d, m, s, res.max_in_flight)
                    assert res.max_in_flight[s] == ref.max_in_flight[s]
                    # activations kept until the deferred W: at most 1F1B's peak (stage 0's d)
                    assert res.max_held[s] <= d, (d, m, s, res.max_held)
                    assert res.max_live_versions[s] == 1
                assert max(res.max_held) == max(ref.max_in_flight) == min(d, m)


def test_zb_h1_over_virtual_stages_is_deadlock_free_with_interleaved_memory():
    ok, _ = interleaved_shapes()
    for d, m, v in ok:
        if v == 1:
            continue
        res = simulate("zb-h1", all_ranks("zb-h1", d, m, 1, v=v), m)
        ref = simulate("interleaved", all_ranks("interleaved", d, m, 1, v=v), m)
        assert res.max_in_flight == ref.max_in_flight, (d, m, v)
        for r in range(d):   # rank r defers r weight gradients
            assert res.max_held[r] <= ref.max_in_flight[r] + r, (d, m, v, r)
        assert max(res.max_held) == max(ref.max_in_flight), (d, m, v)   # the same peak


def test_simulator_checks_split_backwards_and_virtual_stages():
    good = all_ranks("zb-h1", 2, 2, 1)
    # a W before its I
    bad = [list(good[0]), list(good[1])]
    i = next(j for j, a in enumerate(bad[1]) if a.kind is Kind.BACKWARD_INPUT)
    w = next(j for j, a in enumerate(bad[1]) if a.kind is Kind.BACKWARD_WEIGHT
             and a.microbatch == bad[1][i].microbatch)
    bad[1][i], bad[1][w] = bad[1][w], bad[1][i]
    with pytest.raises(ScheduleError, match="weight gradient before the input gradient"):
        simulate("zb-h1", bad, 2)
    # a reduction before a deferred W
    bad = [list(good[0]), [a for a in good[1] if a.kind is not Kind.REDUCE]]
    bad[1].insert(next(j for j, a in enumerate(bad[1]) if a.kind is Kind.BACKWARD_WEIGHT),
                  Action(Kind.REDUCE, 0))
    with pytest.raises(ScheduleError, match="reduces step 0 before all its weight gradients"):
        simulate("zb-h1", bad, 2)
    # two I of one microbatch
    bad = [list(good[0]), list(good[1])]
    bad[1].insert(i + 1, bad[1][i])
    with pytest.raises(ScheduleError, match="second backward"):
        simulate("zb-h1", bad, 2)
    # a stage on the wrong rank
    lists = all_ranks("interleaved", 2, 2, 1, v=2)
    lists[0] = [dataclasses.replace(a, stage=1) if a.stage == 2 else a for a in lists[0]]
    with pytest.raises(ScheduleError, match="stage 1 lives on rank 1 of 2"):
        simulate("interleaved", lists, 2)
    # rank 1 receives stage 2's activations in the other order: FIFO per pair of ranks
    lists = all_ranks("interleaved", 2, 2, 1, v=2)
    ra = [j for j, a in enumerate(lists[1]) if a.kind is Kind.RECV_ACT and a.stage == 3]
    lists[1][ra[0]], lists[1][ra[1]] = lists[1][ra[1]], lists[1][ra[0]]
    with pytest.raises(ScheduleError, match="but stage 2 sent step 0 microbatch 0 first"):
        simulate("interleaved", lists, 2)


# ---------------------------------------------------------------- bubbles against their formulas

_COST = {Kind.FORWARD: 1, Kind.BACKWARD: 2, Kind.BACKWARD_INPUT: 1, Kind.BACKWARD_WEIGHT: 1}


def timed_makespan(lists) -> int:
    """Run the lists with F = 1, B = I + W = 2 time units per stage, free messages, a receive
    waiting for its send: the time the last rank finishes (an independent event simulation)."""
    d = len(lists)
    pc, clock, sent = [0] * d, [0] * d, {}
    while any(pc[r] < len(lists[r]) for r in range(d)):
        progressed = False
        for r in range(d):
            while pc[r] < len(lists[r]):
                a = lists[r][pc[r]]
                s = r if a.stage is None else a.stage
                if a.kind in _COST:
                    clock[r] += _COST[a.kind]
                elif a.kind in (Kind.SEND_ACT, Kind.SEND_GRAD):
                    sent[(a.kind is Kind.SEND_ACT, a.peer, a.step, a.microbatch)] = clock[r]
                elif a.kind in (Kind.RECV_ACT, Kind.RECV_GRAD):
                    key = (a.kind is Kind.RECV_ACT, s, a.step, a.microbatch)
                    if key not in sent:
                        break
                    clock[r] = max(clock[r], sent[key])
                pc[r] += 1
                progressed = True
        assert progressed
    return max(clock)


def test_bubbles_match_their_formulas():
    # F = 1, B = 2 (I = W = 1) per stage: 1F1B and GPipe take (m + d - 1)(F + B); Megatron's
    # interleaving over v chunks m v (F + B) + (d - 1)(F + B) with chunks 1/v of a rank's work,
    # i.e. a bubble (d-1)/(v m); ZB-H1 m (F + B) + (d - 1)(F + I - W) (the paper's Table), and
    # over v chunks m v (F + B) + (d - 1)(F + I - W)
    for d in (1, 2, 3, 4, 8):
        for m in (d, 2 * d):
            assert timed_makespan(all_ranks("flush", d, m, 1)) == 3 * (m + d - 1)
            assert timed_makespan(all_ranks("gpipe", d, m, 1)) == 3 * (m + d - 1)
            assert timed_makespan(all_ranks("zb-h1", d, m, 1)) == 3 * m + (d - 1)
            for v in (1, 2, 4):
                assert timed_makespan(all_ranks("interleaved", d, m, 1, v=v)) == \
                    3 * m * v + 3 * (d - 1), (d, m, v)
                assert timed_makespan(all_ranks("zb-h1", d, m, 1, v=v)) == \
                    3 * m * v + (d - 1), (d, m, v)


def test_timeline_labels_of_the_new_kinds_parse_back():
    from pd2bw_ray.timeline import parse_action

    for name, v in (("zb-h1", 1), ("zb-h1", 2), ("interleaved", 2), ("interleaved", 3)):
        for r in range(3):
            for a in stage_actions(name, r, 3, 6, 2, first_step=4, stages_per_rank=v):
                assert parse_action(str(a)) == a
    assert parse_action("s5:W3.1@v3") == Action(Kind.BACKWARD_WEIGHT, 3, 1, version=3, stage=5)
    assert parse_action("s5:SG3.1:4") == Action(Kind.SEND_GRAD, 3, 1, peer=4, stage=5)


def test_timeline_draws_split_backwards(tmp_path):
    from PIL import Image

    from pd2bw_ray.timeline import draw_timeline

    log = {}
    for s, acts in enumerate(all_ranks("zb-h1", 3, 3, 1)):
        log[(s, 0)] = [("compute" if a.kind in COMPUTE else "comm", a, 0.01 * j,
                        0.01 * j + 0.008) for j, a in enumerate(acts)]
    path = draw_timeline(log, tmp_path / "zb.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and len(img.convert("RGB").getcolors(1 << 20)) > 20
