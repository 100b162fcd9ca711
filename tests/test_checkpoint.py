"""Checkpoints: exact resume, atomic writes, corruption detection, nothing unpickled."""

import json
import os
import pickle

import pytest
import torch
from torch import nn

from pd2bw_ray import PipelineTrainer
from pd2bw_ray.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints,
                                  open_checkpoint, write_checkpoint)
from reference import reference_train
from test_exactness import M, OPTIMIZERS, TIE, assert_matches, conf, make_steps, mlp

SGD_MOMENTUM = lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9)  # noqa: E731


@pytest.mark.parametrize("schedule,opt", [("2bw", "adam"), ("flush", "adam"), ("2bw", "mom")])
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, schedule, opt):
    factory = SGD_MOMENTUM if opt == "mom" else OPTIMIZERS[opt]
    steps = make_steps(1)
    _, ref = reference_train(mlp(), nn.MSELoss(), steps, schedule=schedule,
                             optimizer_factory=factory, max_grad_norm=0.05, tied_parameters=TIE)
    kw = dict(num_microbatches=M, tied_parameters=TIE, max_grad_norm=0.05, local=True)
    first = PipelineTrainer(mlp(), nn.MSELoss(), conf(1), factory, schedule=schedule, **kw)
    try:
        first.train(steps[:4])
        path = first.checkpoint(str(tmp_path), extra={"epoch": 1, "data_position": 4})
    finally:
        first.shutdown()
    ck = open_checkpoint(path)
    assert ck.step == 4 and ck.extra == {"epoch": 1, "data_position": 4}
    if schedule == "2bw":
        assert any(n.endswith("previous.safetensors") for n in ck.manifest["files"])
    # fresh modules (different init) prove that everything comes from the checkpoint
    torch.manual_seed(123)
    fresh = [nn.Linear(5, 5).double(), nn.Tanh(), nn.Linear(5, 5).double(), nn.Tanh(),
             nn.Linear(5, 5).double()]
    resumed = PipelineTrainer.from_checkpoint(str(tmp_path), fresh, nn.MSELoss(), factory,
                                              **{k: v for k, v in kw.items()
                                                 if k != "num_microbatches"})
    try:
        assert resumed.step == 4 and resumed.schedule == schedule
        resumed.train(steps[4:])
        assert_matches(resumed.state_dict(), ref)
    finally:
        resumed.shutdown()


def test_resume_with_more_replicas(tmp_path):
    steps1, steps2 = make_steps(1), make_steps(2)
    a = PipelineTrainer(mlp(), nn.MSELoss(), conf(1), OPTIMIZERS["adam"], num_microbatches=M,
                        local=True)
    try:
        a.train(steps1[:2])
        a.checkpoint(str(tmp_path))
        before = a.state_dict()
    finally:
        a.shutdown()
    b = PipelineTrainer.from_checkpoint(str(tmp_path), mlp(), nn.MSELoss(), OPTIMIZERS["adam"],
                                        config=conf(2), local=True)
    try:
        assert_matches(b.state_dict(), before, tol=0)
        b.train(steps2[2:3])
        per = b.replica_state_dicts()
        assert all(torch.equal(per[(s, 0)][k], per[(s, 1)][k]) for s in range(3)
                   for k in per[(s, 0)])
    finally:
        b.shutdown()


def trained_checkpoints(root, n=2):
    t = PipelineTrainer(mlp(), nn.MSELoss(), conf(1), OPTIMIZERS["adam"], num_microbatches=M,
                        local=True)
    try:
        paths = []
        for i in range(n):
            t.train(make_steps(1)[i:i + 1])
            paths.append(t.checkpoint(str(root)))
        return paths
    finally:
        t.shutdown()


def test_a_write_interrupted_midway_is_never_chosen(tmp_path, monkeypatch):
    good, = trained_checkpoints(tmp_path, 1)
    import pd2bw_ray.checkpoint as ckmod

    real_write = ckmod._write
    calls = {"n": 0}

    def crash_on_third_file(path, data):
        calls["n"] += 1
        if calls["n"] == 3:
            real_write(path, data[: len(data) // 2])     # half a file, then the crash
            raise KeyboardInterrupt("power cut")
        real_write(path, data)

    monkeypatch.setattr(ckmod, "_write", crash_on_third_file)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, 99, {"a.safetensors": b"x" * 10, "b.safetensors": b"y" * 10,
                                        "c.safetensors": b"z" * 10}, {"stages": []})
    monkeypatch.setattr(ckmod, "_write", real_write)
    # a crash can also leave a temporary directory behind (process killed): simulate one
    leftover = tmp_path / ".tmp-step-00000100-dead"
    leftover.mkdir()
    (leftover / "stage000.weights.safetensors").write_bytes(b"partial")
    assert [p.name for p in list_checkpoints(tmp_path)] == [os.path.basename(good)]
    assert str(latest_checkpoint(tmp_path).path) == good


def test_a_corrupted_checkpoint_is_reported_and_skipped(tmp_path):
    older, newer = trained_checkpoints(tmp_path, 2)
    f = os.path.join(newer, "stage001.weights.safetensors")
    data = bytearray(open(f, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(f, "wb").write(bytes(data))
    reports = []
    ck = latest_checkpoint(tmp_path, report=reports.append)
    assert str(ck.path) == older
    assert len(reports) == 1 and "stage001.weights.safetensors" in reports[0]
    assert "corrupted" in reports[0]
    with pytest.raises(CheckpointError, match="corrupted"):
        open_checkpoint(newer)
    # truncated file and missing manifest
    with open(f, "wb") as fh:
        fh.write(bytes(data[:100]))
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(newer)
    os.remove(os.path.join(newer, "manifest.json"))
    with pytest.raises(CheckpointError, match="incomplete"):
        open_checkpoint(newer)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    trained_checkpoints(tmp_path, 1)
    manifest = json.loads(open(list_checkpoints(tmp_path)[0] / "manifest.json").read())
    assert all(n.endswith((".safetensors", ".json")) for n in manifest["files"])

    def forbidden(*a, **k):
        raise AssertionError("a checkpoint load unpickled something")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    t = PipelineTrainer.from_checkpoint(str(tmp_path), mlp(), nn.MSELoss(), OPTIMIZERS["adam"],
                                        local=True)
    t.shutdown()


def test_checkpoint_of_a_different_layout_is_refused(tmp_path):
    trained_checkpoints(tmp_path, 1)
    from pd2bw_ray import PipelineConfig

    with pytest.raises(CheckpointError, match="module_to_stage_map"):
        PipelineTrainer.from_checkpoint(
            str(tmp_path), mlp(), nn.MSELoss(), OPTIMIZERS["adam"], local=True,
            config=PipelineConfig([0, 0, 0, 1, 1], {"0": [0], "1": [1]}))
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        PipelineTrainer.from_checkpoint(str(tmp_path / "nothing"), mlp(), nn.MSELoss(),
                                        OPTIMIZERS["adam"], local=True)
