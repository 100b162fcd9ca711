"""Pre-training data for the trainer: shards streamed with Ray Data into weight-update steps.

:class:`PretrainingStream` is the iterable ``trainer.train(steps)`` takes. Each item is one
weight update's data: a list of ``m * w`` microbatches ``(inputs, targets)`` (see
:data:`data.shards.Microbatch`) of ``train_batch_size`` examples each, ordered so that
``step[r::w]`` are the ``m`` microbatches of replica ``r``.

How the examples reach the replicas, per epoch:

* Order. Epoch ``e`` reads the shards in an order drawn from ``(seed, e)`` and each shard's rows
  in an order drawn from ``(seed, e, shard)`` (a two-level shuffle: shards are small, so rows of
  many shards mix over an epoch). ``shuffle=False`` keeps file and row order. The order is a
  function of the seed and epoch only, so a restarted run sees the same data.
* Replicas. By default one Ray Data stream of all shards is divided by ``streaming_split(w,
  equal=True)``; with ``preserve_order`` set, Ray's splitter hands whole blocks to the replica
  that has had the fewest rows so far, which is deterministic. With ``partitioned_data`` replica
  ``r`` reads only shard files ``r, r + w, r + 2w, ...`` (PipeDream's ``--partitioned_data``), as
  its own stream; the partitions are disjoint and together cover every shard.
* Memory. Shards are read by Ray Data tasks as the consumer needs them (bounded by Ray Data's
  backpressure and ``prefetch_steps``). With ``on_memory`` they are read once into the object store
  when the stream starts and every epoch streams from there.
* Epoch length. Every replica gets the same number of steps per epoch,
  :attr:`PretrainingStream.steps_per_epoch`, known from the shards' footers before reading: with
  ``streaming_split``, ``floor(floor(N / w) / b) // m``; with ``partitioned_data``, the least over
  replicas of ``floor(N_r / b) // m``. The rows left over (fewer than one step per replica, or a
  bigger partition's surplus) are not used that epoch.

Waiting. Each replica has a reader thread that keeps up to ``prefetch_steps`` steps ready. With
``streaming_split`` every epoch runs on a new split coordinator actor (Ray's design, since the
order changes per epoch); the next epoch's is made while the current one is read. Measured on 2
CPU cores with the sample shards: the data wait was 0.1% of a 200 ms step over three epochs with
either split; with 50 ms steps, 0.1% partitioned and about 6% with ``streaming_split`` (its
epoch changes cost a few hundred ms there). The first step of a run also waits for Ray Data's
workers to start (seconds). :class:`data.wait_meter.WaitMeter` measures it for a real run.

A :class:`DataPosition` (seed, epoch, step within the epoch) says where the stream is; a
checkpoint records it and a stream made with ``position=`` continues exactly there: it rebuilds
that epoch's order and skips the steps already taken.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from data.shards import COLUMNS, Microbatch, check_shard, list_shards, table_to_microbatch

Step = list  # list[Microbatch], m * w of them, replica r's at [r::w]
_END = object()  # what a reader thread puts after its last microbatch


class StreamError(ValueError):
    """The stream cannot be built or resumed as asked; the message says why and what to change."""


@dataclass(frozen=True)
class StreamConfig:
    """What the trainer's data stream reads and how it cuts it into steps.

    ``train_batch_size`` is the microbatch size b, ``microbatches`` the microbatches per replica
    per weight update m, ``num_replicas`` the data-parallel width w.

    ``read_num_cpus`` is what each Ray Data read task asks for. The default 0 lets reading run
    beside stage actors that hold every CPU of the cluster (a read task asking for a CPU would
    wait for one forever); ``read_parallelism`` caps the read tasks of a stream that run at once.
    ``prefetch_steps`` is how many steps each replica's reader may be ahead of the consumer.
    """

    shards: tuple[str, ...]
    train_batch_size: int
    microbatches: int = 1
    num_replicas: int = 1
    seed: int = 0
    shuffle: bool = True
    partitioned_data: bool = False
    on_memory: bool = False
    num_epochs: int | None = None  # None: epoch after epoch until the consumer stops
    prefetch_steps: int = 4
    read_num_cpus: float = 0.0
    read_parallelism: int = 2

    def __post_init__(self) -> None:
        shards = (self.shards,) if isinstance(self.shards, str) else self.shards
        object.__setattr__(self, "shards", tuple(str(s) for s in shards))
        if not self.shards:
            raise StreamError("no shards given; pass the --output_dir of "
                              "python -m data.prepare_pretraining")
        for name in ("train_batch_size", "microbatches", "num_replicas", "prefetch_steps",
                     "read_parallelism"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StreamError(f"{name} must be a positive integer, got {value!r}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise StreamError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")
        if self.read_num_cpus < 0:
            raise StreamError(f"read_num_cpus must be >= 0, got {self.read_num_cpus}")

    @property
    def examples_per_step(self) -> int:
        return self.train_batch_size * self.microbatches * self.num_replicas


@dataclass(frozen=True)
class DataPosition:
    """Where a stream is: the next step to hand out is step ``step`` of epoch ``epoch``.

    ``seed`` and ``examples_per_step`` (b * m * w) are recorded so that resuming with a different
    seed or step geometry, which could not continue at the same examples, is refused.
    """

    epoch: int = 0
    step: int = 0
    seed: int = 0
    examples_per_step: int = 0

    def __post_init__(self) -> None:
        for name in ("epoch", "step", "seed", "examples_per_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise StreamError(f"DataPosition.{name} must be a non-negative integer, got "
                                  f"{value!r}")

    @property
    def examples_consumed(self) -> int:
        """Examples of this epoch already handed out (over all replicas)."""
        return self.step * self.examples_per_step

    def advanced(self, steps: int, steps_per_epoch: int) -> "DataPosition":
        """The position ``steps`` steps later, with epochs of ``steps_per_epoch`` steps."""
        total = self.step + steps
        return DataPosition(self.epoch + total // steps_per_epoch, total % steps_per_epoch,
                            self.seed, self.examples_per_step)

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed,
                "examples_per_step": self.examples_per_step}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataPosition":
        if not isinstance(d, Mapping):
            raise StreamError(f"a data position is a mapping with epoch, step, seed and "
                              f"examples_per_step, got {type(d).__name__}")
        missing = [k for k in ("epoch", "step", "seed", "examples_per_step") if k not in d]
        if missing:
            raise StreamError(f"data position {dict(d)!r} lacks {', '.join(missing)}")
        return cls(int(d["epoch"]), int(d["step"]), int(d["seed"]), int(d["examples_per_step"]))


def epoch_order(num: int, seed: int, epoch: int, salt: int, shuffle: bool) -> list[int]:
    """The order of ``num`` items (shards of a stream, rows of a shard) in epoch ``epoch``."""
    if not shuffle:
        return list(range(num))
    rng = np.random.default_rng([seed, epoch, salt])
    return [int(i) for i in rng.permutation(num)]


def _read_shard(path: str) -> pa.Table:
    return pq.read_table(path, columns=list(COLUMNS))


def _load_shards(batch: pa.Table, sources: Sequence[Any], seed: int, epoch: int,
                 shuffle: bool) -> pa.Table:
    """Ray Data map: shard indices in, their rows (in this epoch's row order) out."""
    tables = []
    for index in batch.column("shard").to_pylist():
        source = sources[index]
        table = _read_shard(source) if isinstance(source, str) else ray.get(source)
        # Salt 1_000_000 + index keeps row orders apart from the shard-order stream (salts < w).
        order = epoch_order(table.num_rows, seed, epoch, 1_000_000 + index, shuffle)
        tables.append(table.take(pa.array(order, type=pa.int64())) if shuffle else table)
    return pa.concat_tables(tables)


class PretrainingStream:
    """The trainer's steps, read from pre-training shards with Ray Data (see the module docstring).

    Iterate it once; it yields steps until ``num_epochs`` epochs are done (forever if None).
    :attr:`position` is where the stream stands after the steps handed out so far. Needs a
    running Ray cluster.
    """

    def __init__(self, config: StreamConfig, position: DataPosition | None = None) -> None:
        self.config = config
        self.files = list_shards(config.shards)
        self.num_rows = [check_shard(path).num_rows for path in self.files]
        w, b, m = config.num_replicas, config.train_batch_size, config.microbatches
        if config.partitioned_data:
            if len(self.files) < w:
                raise StreamError(f"--partitioned_data with {w} replicas needs at least {w} "
                                  f"shard files, found {len(self.files)} in "
                                  f"{', '.join(config.shards)}; prepare more shards (a smaller "
                                  "--documents_per_shard) or drop --partitioned_data")
            self.partitions = [list(range(r, len(self.files), w)) for r in range(w)]
            per_replica = [sum(self.num_rows[i] for i in part) for part in self.partitions]
        else:
            self.partitions = [list(range(len(self.files)))]
            per_replica = [sum(self.num_rows) // w] * w
        self.steps_per_epoch = min(rows // b for rows in per_replica) // m
        if self.steps_per_epoch == 0:
            raise StreamError(f"the shards hold {sum(self.num_rows)} examples, fewer than one "
                              f"step of {m} microbatch(es) of {b} for each of {w} replica(s) "
                              f"(rows per replica: {per_replica}); lower --train_batch_size or "
                              "prepare more data")
        start = position or DataPosition(0, 0, config.seed, config.examples_per_step)
        if start.seed != config.seed:
            raise StreamError(f"the data position was recorded with seed {start.seed}, but this "
                              f"stream has seed {config.seed}; resume with --seed {start.seed}")
        if start.examples_per_step != config.examples_per_step:
            raise StreamError(f"the data position was recorded with {start.examples_per_step} "
                              f"examples per step, but this stream takes "
                              f"{config.examples_per_step} (= train_batch_size {b} x "
                              f"microbatches {m} x replicas {w}); resume with the same step "
                              "geometry")
        if start.step >= self.steps_per_epoch:
            raise StreamError(f"the data position is step {start.step} of epoch {start.epoch}, "
                              f"but an epoch of these shards has {self.steps_per_epoch} steps; "
                              "were the shards changed since the checkpoint?")
        self._start = start
        self._position = start
        self._sources: list[Any] | None = None
        self._lock = threading.Lock()
        self._splits: dict[int, list] = {}  # epoch -> streaming_split iterators not yet taken
        self._taken: dict[int, int] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._queues: list[queue.Queue] = []
        self._started = False

    @property
    def position(self) -> DataPosition:
        """Where the stream stands after the steps handed out so far."""
        return self._position

    def position_after(self, steps: int) -> DataPosition:
        """The position after ``steps`` steps from where this stream started."""
        return self._start.advanced(steps, self.steps_per_epoch)

    # -- building one epoch's Ray Data stream -------------------------------------------------

    def _sources_for_reading(self) -> list[Any]:
        if self._sources is None:
            if self.config.on_memory:
                read = ray.remote(num_cpus=self.config.read_num_cpus)(_read_shard)
                refs = [read.remote(path) for path in self.files]
                ray.wait(refs, num_returns=len(refs))  # materialized once, up front
                self._sources = refs
            else:
                self._sources = list(self.files)
        return self._sources

    def _dataset(self, epoch: int, replica: int | None) -> ray.data.Dataset:
        part = self.partitions[replica if replica is not None else 0]
        salt = replica if replica is not None else 0
        shards = [part[i] for i in epoch_order(len(part), self.config.seed, epoch, salt,
                                               self.config.shuffle)]
        ds = ray.data.from_items([{"shard": i} for i in shards], override_num_blocks=len(shards))
        ds = ds.map_batches(_load_shards, batch_size=1, batch_format="pyarrow",
                            fn_kwargs={"sources": self._sources_for_reading(),
                                       "seed": self.config.seed, "epoch": epoch,
                                       "shuffle": self.config.shuffle},
                            num_cpus=self.config.read_num_cpus,
                            # no more read tasks than shards: Ray Data warns of idle slots
                            compute=ray.data.TaskPoolStrategy(
                                size=max(1, min(self.config.read_parallelism, len(shards)))))
        ctx = ds.context
        ctx.execution_options.preserve_order = True  # deterministic order and split
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        return ds

    def _iterator(self, epoch: int, replica: int):
        if self.config.partitioned_data:
            return self._dataset(epoch, replica).iterator()
        with self._lock:
            # Each epoch's split starts a coordinator actor (a second or two); the next epoch's
            # is made now, so that its start-up overlaps this epoch.
            last = self.config.num_epochs
            for e in (epoch, epoch + 1):
                if e not in self._splits and (last is None or e < last):
                    self._splits[e] = self._dataset(e, None).streaming_split(
                        self.config.num_replicas, equal=True)
                    self._taken[e] = 0
            it = self._splits[epoch][replica]
            self._taken[epoch] += 1
            if self._taken[epoch] == self.config.num_replicas:
                del self._splits[epoch], self._taken[epoch]
            return it

    # -- the reader threads, one per replica --------------------------------------------------

    def _put(self, q: queue.Queue, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read_replica(self, replica: int, q: queue.Queue) -> None:
        cfg = self.config
        epoch, skip = self._start.epoch, self._start.step * cfg.microbatches
        wanted = self.steps_per_epoch * cfg.microbatches
        try:
            while cfg.num_epochs is None or epoch < cfg.num_epochs:
                seen = 0
                for batch in self._iterator(epoch, replica).iter_batches(
                        batch_size=cfg.train_batch_size, batch_format="pyarrow", drop_last=True,
                        prefetch_batches=1):
                    if self._stop.is_set():
                        return
                    if skip <= seen < wanted:
                        if not self._put(q, table_to_microbatch(batch)):
                            return
                    seen += 1
                    # A partition's surplus is not needed; a streaming_split's remainder is
                    # drained so that the other replicas' splits are not held up.
                    if seen >= wanted and cfg.partitioned_data:
                        break
                if seen < wanted:
                    raise StreamError(f"replica {replica} got {seen} microbatches in epoch "
                                      f"{epoch}, expected {wanted}; were shards changed while "
                                      "training?")
                epoch, skip = epoch + 1, 0
            self._put(q, _END)
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(q, e)

    def _get(self, replica: int, q: queue.Queue) -> Microbatch:
        while True:
            try:
                item = q.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._threads[replica].is_alive() and q.empty():
                    raise StreamError(f"the reader of replica {replica} stopped without "
                                      "handing over its data") from None
        if isinstance(item, BaseException):
            raise item
        if item is _END:
            raise StreamError(f"the reader of replica {replica} ran out of data before the "
                              f"stream's last step (position {self._position})")
        return item

    def start(self) -> "PretrainingStream":
        """Start reading now, before the first step is asked for: the reader threads fill their
        queues (``prefetch_steps`` steps each) while, say, the stage actors come up, so the
        first step does not wait for Ray Data's start-up after theirs. Iterating takes what was
        read. Called by ``__iter__`` when not called before; ``close()`` stops the readers
        either way. Returns the stream."""
        if self._threads or self._stop.is_set():
            return self
        cfg = self.config
        self._queues = [queue.Queue(maxsize=cfg.prefetch_steps * cfg.microbatches)
                        for _ in range(cfg.num_replicas)]
        self._threads = [threading.Thread(target=self._read_replica, args=(r, q),
                                          name=f"pretraining-stream-replica-{r}", daemon=True)
                         for r, q in enumerate(self._queues)]
        for t in self._threads:
            t.start()
        return self

    @property
    def read_ahead(self) -> int:
        """Microbatches read and not yet handed out, the fewest over the replicas (0 before
        ``start``)."""
        return min((q.qsize() for q in self._queues), default=0)

    def __iter__(self) -> Iterator[Step]:
        if self._started:
            raise StreamError("a PretrainingStream is iterated once; make a new one with "
                              "position=stream.position to go on")
        if self._stop.is_set():
            raise StreamError("this PretrainingStream was closed; make a new one with "
                              "position=stream.position to go on")
        self._started = True
        cfg = self.config
        w, m = cfg.num_replicas, cfg.microbatches
        queues = self.start()._queues
        try:
            while cfg.num_epochs is None or self._position.epoch < cfg.num_epochs:
                step: list = [None] * (m * w)
                for k in range(m):
                    for r in range(w):
                        step[k * w + r] = self._get(r, queues[r])
                self._position = self._position.advanced(1, self.steps_per_epoch)
                yield step
        finally:
            self.close()

    def close(self) -> None:
        """Stop the reader threads and end the splits made ahead that no reader started (the
        stream cannot be iterated again).

        A split coordinator is a threaded actor (``max_concurrency`` n + 1). Ray 2.60 aborts such
        an actor (SIGABRT in the CoreWorker destructor, "Fatal Python error: Aborted") when its
        last handle is dropped before it ever ran a task, which is the state of the next epoch's
        split when the consumer stops first. One call (``stats()``) on each split still held
        makes its coordinator an actor that has run a task, which exits quietly when dropped.
        """
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5.0)
        with self._lock:
            held = [its[0] for its in self._splits.values()]  # not yet taken by every reader
            self._splits.clear()
            self._taken.clear()
        for it in held:
            try:
                it.stats()
            except ray.exceptions.RayError:
                pass  # the coordinator is already gone (a cluster going down): nothing to end


def split_step(step: Sequence[Microbatch], num_replicas: int) -> list[list[Microbatch]]:
    """Replica ``r``'s microbatches of a step, ``step[r::w]``, for each ``r`` (trainer contract)."""
    if len(step) % num_replicas:
        raise ValueError(f"a step of {len(step)} microbatches does not split over "
                         f"{num_replicas} replicas")
    return [list(step[r::num_replicas]) for r in range(num_replicas)]

