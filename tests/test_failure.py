"""The library's failure handling and checkpoint retention (pd2bw_ray.failure, CheckpointConfig),
without processes: attempts that fail as a dead or hung stage would, real checkpoints on disk.
The jobs' restart after a killed stage actor is tested through the job in test_reliability.py."""

from __future__ import annotations

import pytest

from pd2bw_ray import (CheckpointConfig, ConfigError, FailureConfig, NonFiniteError,
                       PipelineFailure, prune_checkpoints, run_with_restarts)
from pd2bw_ray.checkpoint import list_checkpoints, write_checkpoint


def checkpoint(root, step, **extra):
    return write_checkpoint(root, step, {"x.bin": bytes([step])}, {"extra": extra})


def test_a_failed_attempt_restarts_from_the_newest_checkpoint(tmp_path):
    seen, lines = [], []

    def attempt(ck):
        seen.append(None if ck is None else ck.step)
        if len(seen) == 1:
            checkpoint(tmp_path, 4)
            raise PipelineFailure("stage 1 replica 0 died")
        if len(seen) == 2:
            checkpoint(tmp_path, 8)
            raise PipelineFailure("stage 0 replica 0 hung")
        return "done"

    assert run_with_restarts(attempt, tmp_path, FailureConfig(max_failures=2),
                             log=lines.append) == "done"
    assert seen == [None, 4, 8]
    assert any("failure 1 of at most 2: stage 1 replica 0 died" in line for line in lines)
    assert any("restarting the pipeline from" in line and "step-00000008" in line
               for line in lines)


def test_a_corrupted_newest_checkpoint_is_skipped(tmp_path):
    checkpoint(tmp_path, 2)
    newest = checkpoint(tmp_path, 3)
    (newest / "x.bin").write_bytes(b"garbage")
    seen, lines = [], []

    def attempt(ck):
        seen.append(ck.step if ck is not None else None)
        if len(seen) == 1:
            raise PipelineFailure("boom")
        return len(seen)

    run_with_restarts(attempt, tmp_path, FailureConfig(1), log=lines.append)
    assert seen == [None, 2]
    assert any("skipping checkpoint" in line for line in lines)


def test_too_many_failures_raise_the_last_one(tmp_path):
    calls = []

    def attempt(ck):
        calls.append(ck)
        raise PipelineFailure(f"failure {len(calls)}")

    with pytest.raises(PipelineFailure, match="failure 3"):
        run_with_restarts(attempt, tmp_path, FailureConfig(max_failures=2), log=lambda _: None)
    assert len(calls) == 3


def test_a_non_finite_loss_is_never_retried(tmp_path):
    calls = []

    def attempt(ck):
        calls.append(ck)
        raise NonFiniteError("loss is nan at step 3")

    with pytest.raises(NonFiniteError):
        run_with_restarts(attempt, tmp_path, FailureConfig(max_failures=5), log=lambda _: None)
    assert len(calls) == 1


def test_resume_from_is_the_first_attempts_checkpoint(tmp_path):
    from pd2bw_ray.checkpoint import latest_checkpoint

    checkpoint(tmp_path, 7)
    ck = latest_checkpoint(tmp_path)
    assert run_with_restarts(lambda c: c.step, tmp_path, FailureConfig(), resume_from=ck) == 7


def test_failure_config_is_checked():
    with pytest.raises(ConfigError, match="max_failures"):
        FailureConfig(max_failures=-1)


def test_retention_keeps_every_epoch_end_and_the_newest_others(tmp_path):
    for step, end in [(1, False), (2, True), (3, False), (4, False), (5, True), (6, False),
                      (7, False)]:
        checkpoint(tmp_path, step, end_of_epoch=end)
    removed = prune_checkpoints(tmp_path, CheckpointConfig(num_to_keep=2))
    assert [p.name for p in removed] == ["step-00000001", "step-00000003", "step-00000004"]
    assert [int(p.name[5:]) for p in list_checkpoints(tmp_path)] == [2, 5, 6, 7]
    prune_checkpoints(tmp_path, CheckpointConfig(num_to_keep=0))
    assert [int(p.name[5:]) for p in list_checkpoints(tmp_path)] == [2, 5]
    with pytest.raises(ValueError, match="num_to_keep"):
        CheckpointConfig(num_to_keep=-2)
