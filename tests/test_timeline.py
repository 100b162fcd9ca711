"""Action logs as Chrome traces and pictures: a real 2bw run (threads and Ray actors) exported,
read back, and compared with the schedule's own action lists."""

import json

import pytest
import torch
from PIL import Image
from torch import nn

from pd2bw_ray import ActorResources, PipelineConfig, PipelineTrainer
from pd2bw_ray.executor import Event
from pd2bw_ray.schedule import Action, Kind, stage_actions
from pd2bw_ray.timeline import (chrome_trace, draw_loss_curve, draw_timeline, parse_action,
                                read_train_log, restrict_steps, write_chrome_trace)

D, M, STEPS = 3, 4, 3


def run_2bw(replicas: int, timeline=None, **kwargs):
    torch.manual_seed(0)
    mods = [nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)]
    steps = [[(torch.randn(8, 16), torch.randn(8, 16)) for _ in range(M * replicas)]
             for _ in range(STEPS)]
    conf = PipelineConfig([0, 0, 1, 1, 2], {str(s): [s * replicas + r for r in range(replicas)]
                                            for s in range(D)})
    trainer = PipelineTrainer(mods, nn.MSELoss(), conf, lambda p: torch.optim.Adam(p),
                              schedule="2bw", num_microbatches=M, **kwargs)
    try:
        losses = trainer.train(steps)
        files = trainer.timeline(timeline) if timeline is not None else None
        return losses, trainer.action_log(), files
    finally:
        trainer.shutdown()


def check_trace(path, replicas: int) -> None:
    """The trace file has one named track per stage replica whose forwards and backwards, in
    time order, are the schedule's."""
    trace = json.loads(path.read_text())
    events = trace["traceEvents"]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e["ph"] == "M" and e["name"] == "thread_name"}
    tracks: dict[tuple[int, int], list[dict]] = {}
    for e in events:
        if e["ph"] == "X":
            tracks.setdefault((e["pid"], e["tid"]), []).append(e)
    assert len(tracks) == D * replicas
    assert sorted(names.values()) == sorted(f"stage {s} replica {r}"
                                            for s in range(D) for r in range(replicas))
    assert set(names) == set(tracks)
    for key, evs in tracks.items():
        s, r = evs[0]["args"]["stage"], evs[0]["args"]["replica"]
        assert names[key] == f"stage {s} replica {r}"
        assert all(e["args"]["stage"] == s and e["args"]["replica"] == r for e in evs)
        evs.sort(key=lambda e: e["ts"])
        # one replica runs one action at a time: each event starts after the previous ended
        for a, b in zip(evs, evs[1:]):
            assert a["ts"] + a["dur"] <= b["ts"] + 0.01, (a, b)   # ns rounding
        compute = [e for e in evs if e["name"][0] in "FB"]
        want = [a for a in stage_actions("2bw", s, D, M, STEPS)
                if a.kind in (Kind.FORWARD, Kind.BACKWARD)]
        assert [parse_action(e["name"]) for e in compute] == want
        assert [(e["args"]["step"], e["args"]["microbatch"], e["args"]["version"])
                for e in compute] == [(a.step, a.microbatch, a.version) for a in want]
        assert all(e["dur"] > 0 and e["cat"] == "compute" for e in compute)


def check_png(path, min_width: int, min_height: int) -> None:
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width >= min_width and img.height >= min_height, img.size
        assert img.width <= 6000 and img.height <= 3000, img.size
        colors = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is not None and len(colors) > 20   # not a blank canvas


def test_parse_action_inverts_str():
    for schedule in ("2bw", "flush", "gpipe"):
        for s in range(D):
            for a in stage_actions(schedule, s, D, M, 4, first_step=2):
                assert parse_action(str(a)) == a
    assert parse_action("F3.1@v2") == Action(Kind.FORWARD, 3, 1, version=2)
    assert parse_action("RA3.1:0") == Action(Kind.RECV_ACT, 3, 1, peer=0)
    assert parse_action("U3->v4") == Action(Kind.UPDATE, 3, version=4)
    assert parse_action("R12") == Action(Kind.REDUCE, 12)
    for bad in ("F3@v2", "X1.2@v0", "RA3.1", "U3", ""):
        with pytest.raises(ValueError, match="not an action label"):
            parse_action(bad)


def test_local_run_trace_and_timeline(tmp_path):
    losses, log, _ = run_2bw(replicas=2, local=True)
    assert sorted(log) == [(s, r) for s in range(D) for r in range(2)]
    # the log holds the executed Actions themselves, not labels to parse back
    assert all(isinstance(e, Event) and isinstance(e.action, Action) and e.start <= e.end
               for events in log.values() for e in events)
    check_trace(write_chrome_trace(log, tmp_path / "trace.json"), replicas=2)
    assert chrome_trace(log) == json.loads((tmp_path / "trace.json").read_text())
    check_png(draw_timeline(log, tmp_path / "timeline.png"), 800, 300)
    check_png(draw_loss_curve(losses, tmp_path / "loss.png", lrs=[1e-3] * STEPS), 600, 300)


def test_ray_run_trace_and_timeline(ray_cluster, tmp_path):
    _, log, files = run_2bw(replicas=1, timeline=str(tmp_path / "run.png"),
                            resources=ActorResources(num_cpus=0.5))
    # trainer.timeline(path): the trace and the picture side by side
    assert files == {"trace": str(tmp_path / "run.json"), "png": str(tmp_path / "run.png")}
    check_trace(tmp_path / "run.json", replicas=1)
    check_png(tmp_path / "run.png", 800, 200)


def test_restrict_steps_keeps_the_last_steps():
    _, log, _ = run_2bw(replicas=1, local=True)
    last = restrict_steps(log, 1)
    for key, events in last.items():
        steps = {e.action.step for e in events}
        assert steps == {STEPS - 1}, (key, steps)
        assert [e for e in log[key] if e.action.step == STEPS - 1] == events
    assert restrict_steps(log, STEPS) == {k: list(v) for k, v in log.items()}
    with pytest.raises(ValueError, match="last_steps must be at least 1"):
        restrict_steps(log, 0)


def test_loss_curve_from_train_log(tmp_path):
    log = tmp_path / "train_log.jsonl"
    records = [{"step": t, "loss": 8.0 - 0.1 * t, "lr": 1e-4 * min(1, (t + 1) / 5), "time": 0}
               for t in range(30)]
    # a resume from step 25 logs steps 25.. again: the newer records win
    records += [{"step": t, "loss": 1.0, "lr": None, "time": 1} for t in range(25, 32)]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    got = read_train_log(log)
    assert [r["step"] for r in got] == list(range(32))
    assert [r["loss"] for r in got] == [8.0 - 0.1 * t for t in range(25)] + [1.0] * 7
    check_png(draw_loss_curve(log, tmp_path / "loss_curve.png"), 600, 300)
    log.write_text('{"step": 0, "loss": 1.0}\nnot json\n')
    with pytest.raises(ValueError, match="train_log.jsonl:2"):
        read_train_log(log)
