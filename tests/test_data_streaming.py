"""The trainer's data stream: replicas, epochs, coverage, determinism and exact resumption.

The shards are written here with plain pyarrow (variable-length int64 lists, as pre-masked shards
made elsewhere would be), and every row carries its example id, so coverage is checked against
the ids written, not against the stream's own bookkeeping.
"""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data.shards import ShardError
from data.streaming import DataPosition, PretrainingStream, StreamConfig, StreamError, split_step
from data.wait_meter import WaitMeter

L = 8


def write_shards(directory, rows_per_shard: list[int]) -> list[list[int]]:
    """Shards whose row with example id ``i`` has input_ids all ``i``; returns ids per shard."""
    directory.mkdir(parents=True, exist_ok=True)
    ids_per_shard, next_id = [], 0
    for s, n in enumerate(rows_per_shard):
        ids = list(range(next_id, next_id + n))
        next_id += n
        labels = [[-100] * L for _ in ids]
        for row, i in zip(labels, ids):
            row[1] = 1000 + i
        table = pa.table({
            "input_ids": pa.array([[i] * L for i in ids], pa.list_(pa.int64())),
            "token_type_ids": pa.array([[0] * 4 + [1] * 4 for _ in ids], pa.list_(pa.int64())),
            "attention_mask": pa.array([[1] * L for _ in ids], pa.list_(pa.int64())),
            "masked_lm_labels": pa.array(labels, pa.list_(pa.int64())),
            "next_sentence_label": pa.array([i % 2 for i in ids], pa.int64()),
        })
        pq.write_table(table, directory / f"part-{s:05d}.parquet")
        ids_per_shard.append(ids)
    return ids_per_shard


def microbatch_ids(mb) -> list[int]:
    (input_ids, token_type_ids, attention_mask, input_labels), (labels, nsp) = mb
    assert torch.equal(input_labels, labels)   # also an input: the masked-only MLM head
    b = input_ids.shape[0]
    assert input_ids.dtype == torch.int64 and input_ids.shape == (b, L)
    assert token_type_ids.shape == attention_mask.shape == labels.shape == (b, L)
    assert nsp.shape == (b,) and nsp.dtype == torch.int64
    ids = input_ids[:, 0]
    # Targets stay with their inputs through the shuffles.
    assert torch.equal(labels[:, 1], 1000 + ids) and torch.equal(nsp, ids % 2)
    return ids.tolist()


def replica_ids(step, w: int) -> list[list[int]]:
    return [[i for mb in part for i in microbatch_ids(mb)] for part in split_step(step, w)]


def assert_same_steps(a, b):
    assert len(a) == len(b)
    for sa, sb in zip(a, b):
        assert len(sa) == len(sb)
        for (ia, ta), (ib, tb) in zip(sa, sb):
            assert all(torch.equal(x, y) for x, y in zip(ia + ta, ib + tb))


def test_partitioned_replicas_read_disjoint_files_covering_every_example_once(ray_cluster,
                                                                               tmp_path):
    shard_ids = write_shards(tmp_path / "shards", [24, 24, 24, 24])
    cfg = StreamConfig(shards=(str(tmp_path / "shards"),), train_batch_size=4, microbatches=3,
                       num_replicas=2, seed=1, partitioned_data=True, num_epochs=2)
    stream = PretrainingStream(cfg)
    assert stream.steps_per_epoch == 4  # 48 rows per replica / (3 x 4)
    steps = list(stream)
    assert len(steps) == 8 and all(len(s) == 6 for s in steps)
    assert stream.position == DataPosition(2, 0, 1, 24)
    files_of = [set(shard_ids[0] + shard_ids[2]), set(shard_ids[1] + shard_ids[3])]
    orders = []
    for epoch in range(2):
        per_replica = [[], []]
        for step in steps[4 * epoch: 4 * epoch + 4]:
            for r, ids in enumerate(replica_ids(step, 2)):
                per_replica[r] += ids
        assert set(per_replica[0]) <= files_of[0] and set(per_replica[1]) <= files_of[1]
        everything = per_replica[0] + per_replica[1]
        assert sorted(everything) == list(range(96))  # each example exactly once
        orders.append(everything)
    assert orders[0] != orders[1]  # a new order each epoch


def test_streaming_split_is_deterministic_and_on_memory_gives_the_same_steps(ray_cluster,
                                                                             tmp_path):
    write_shards(tmp_path / "shards", [20, 20, 20, 20, 20])
    base = dict(shards=(str(tmp_path / "shards"),), train_batch_size=5, microbatches=2,
                num_replicas=2, seed=4, num_epochs=1)
    stream = PretrainingStream(StreamConfig(**base))
    assert stream.steps_per_epoch == 5  # 50 rows per replica / (2 x 5)
    first = list(stream)
    ids = [i for step in first for part in replica_ids(step, 2) for i in part]
    assert sorted(ids) == list(range(100))
    assert_same_steps(first, list(PretrainingStream(StreamConfig(**base))))
    assert_same_steps(first, list(PretrainingStream(StreamConfig(**base, on_memory=True))))
    other_seed = list(PretrainingStream(StreamConfig(**{**base, "seed": 5})))
    assert [replica_ids(s, 2) for s in other_seed] != [replica_ids(s, 2) for s in first]
    unshuffled = list(PretrainingStream(StreamConfig(**base, shuffle=False)))
    assert sorted(i for s in unshuffled for p in replica_ids(s, 2) for i in p) == list(range(100))


def test_a_stream_started_early_reads_ahead_and_gives_the_same_steps(ray_cluster, tmp_path):
    """``start()``, which the job calls before its stage actors come up: the readers fill their
    queues before anything is asked for, the steps are those of a stream started by iterating,
    and a started stream closed unread stops its readers and cannot be iterated."""
    write_shards(tmp_path / "shards", [20, 20, 20, 20, 20])
    cfg = StreamConfig(shards=(str(tmp_path / "shards"),), train_batch_size=5, microbatches=2,
                       num_replicas=2, seed=4, num_epochs=2, prefetch_steps=2)
    early = PretrainingStream(cfg)
    assert early.read_ahead == 0
    assert early.start() is early and early.start() is early      # a second start is a no-op
    deadline = time.time() + 120
    while early.read_ahead < cfg.prefetch_steps * cfg.microbatches:
        assert time.time() < deadline, "the started stream read nothing ahead"
        time.sleep(0.05)
    assert_same_steps(list(early), list(PretrainingStream(cfg)))
    unread = PretrainingStream(cfg).start()
    unread.close()
    deadline = time.time() + 60      # a reader still waiting for its first batch ends with it
    while any(t.is_alive() for t in unread._threads):
        assert time.time() < deadline, "a closed stream's readers are still running"
        time.sleep(0.05)
    with pytest.raises(StreamError, match="was closed"):
        next(iter(unread))


@pytest.mark.parametrize("partitioned", [True, False])
def test_resumed_stream_continues_exactly_where_it_stopped(ray_cluster, tmp_path, partitioned):
    write_shards(tmp_path / "shards", [18, 14, 20, 12])  # uneven: leftovers are dropped
    cfg = StreamConfig(shards=(str(tmp_path / "shards"),), train_batch_size=3, microbatches=2,
                       num_replicas=2, seed=9, partitioned_data=partitioned, num_epochs=2)
    stream = PretrainingStream(cfg)
    spe = stream.steps_per_epoch
    # partitioned: min(38, 26) rows // 3 // 2; split: 64 // 2 rows // 3 // 2
    assert spe == (4 if partitioned else 5)
    full, positions = [], []
    for step in stream:
        full.append(step)
        positions.append(stream.position)
    assert len(full) == 2 * spe
    for taken in (2, spe + 1):  # inside the first epoch, inside the second
        saved = DataPosition.from_dict(positions[taken - 1].to_dict())  # as a checkpoint has it
        assert saved == stream.position_after(taken)
        assert (saved.epoch, saved.step) == divmod(taken, spe)
        assert_same_steps(list(PretrainingStream(cfg, position=saved)), full[taken:])


def test_stream_errors_name_the_problem(ray_cluster, tmp_path):
    write_shards(tmp_path / "shards", [10, 10])
    cfg = StreamConfig(shards=(str(tmp_path / "shards"),), train_batch_size=2, microbatches=2,
                       num_replicas=2, seed=0)
    with pytest.raises(StreamError, match="recorded with seed 3.*--seed 3"):
        PretrainingStream(cfg, position=DataPosition(0, 1, 3, 8))
    with pytest.raises(StreamError, match="recorded with 16 examples per step"):
        PretrainingStream(cfg, position=DataPosition(0, 1, 0, 16))
    with pytest.raises(StreamError, match="fewer than one step"):
        PretrainingStream(StreamConfig(shards=cfg.shards, train_batch_size=20, num_replicas=2))
    with pytest.raises(StreamError, match="needs at least 3 shard files, found 2"):
        PretrainingStream(StreamConfig(shards=cfg.shards, train_batch_size=1, num_replicas=3,
                                       partitioned_data=True))
    table = pq.read_table(tmp_path / "shards" / "part-00001.parquet")
    pq.write_table(table.drop_columns(["masked_lm_labels", "next_sentence_label"]),
                   tmp_path / "shards" / "part-00001.parquet")
    with pytest.raises(ShardError, match=r"part-00001.parquet: shard lacks column\(s\) "
                                         r"masked_lm_labels, next_sentence_label"):
        PretrainingStream(cfg)
    with pytest.raises(ShardError, match="no such shard file or directory"):
        PretrainingStream(StreamConfig(shards=(str(tmp_path / "nowhere"),), train_batch_size=1))


def test_data_position_arithmetic_and_round_trip():
    p = DataPosition(epoch=1, step=3, seed=5, examples_per_step=24)
    assert p.examples_consumed == 72
    assert p.advanced(0, 4) == p
    assert p.advanced(1, 4) == DataPosition(2, 0, 5, 24)
    assert p.advanced(6, 4) == DataPosition(3, 1, 5, 24)
    assert DataPosition.from_dict(p.to_dict()) == p
    with pytest.raises(StreamError, match="lacks examples_per_step"):
        DataPosition.from_dict({"epoch": 0, "step": 0, "seed": 0})
    with pytest.raises(StreamError, match="step must be a non-negative integer"):
        DataPosition(0, -1, 0, 1)


def test_wait_meter_reports_the_share_of_step_time_spent_waiting():
    # A fake clock: each step the source takes 0.1 s, then the consumer computes 0.9 s.
    now = [0.0]
    waits = [2.0, 0.1, 0.1, 0.3]  # the first includes start-up

    def source():
        for w in waits:
            now[0] += w
            yield w

    meter = WaitMeter(source(), clock=lambda: now[0])
    for _ in meter:
        now[0] += 0.9
    stats = meter.stats()
    assert stats.steps == 3 and stats.first_wait_s == pytest.approx(2.0)
    assert stats.wait_s == pytest.approx(0.5)  # 0.1 + 0.1 + 0.3
    assert stats.elapsed_s == pytest.approx(3 * 0.9 + 0.5)
    assert stats.wait_fraction == pytest.approx(0.5 / 3.2)
    assert stats.max_wait_s == pytest.approx(0.3)
    assert "data wait 15.6%" in str(stats)


def test_stream_reads_while_stage_actors_hold_every_cpu(ray_cluster, tmp_path):
    import ray

    write_shards(tmp_path / "shards", [12, 12, 12])
    cfg = StreamConfig(shards=(str(tmp_path / "shards"),), train_batch_size=3, microbatches=2,
                       num_replicas=2, seed=0, num_epochs=2)

    @ray.remote(num_cpus=1)
    class Stage:
        def ping(self) -> int:
            return 1

    stages = [Stage.remote() for _ in range(int(ray.cluster_resources()["CPU"]))]
    ray.get([s.ping.remote() for s in stages])
    assert ray.available_resources().get("CPU", 0) < 1
    result: list = []
    try:
        reader = threading.Thread(target=lambda: result.extend(PretrainingStream(cfg)),
                                  daemon=True)
        reader.start()
        reader.join(timeout=120)  # a read task that waited for a CPU would wait forever
        assert not reader.is_alive(), "the stream got no data while actors held every CPU"
    finally:
        for s in stages:
            ray.kill(s)
    assert len(result) == 2 * 3  # 18 rows per replica // 3 // 2 = 3 steps per epoch
