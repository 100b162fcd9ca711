"""BERT's side of the planner: profiling BERT's stages, and planning the pre-training job.

The cost and memory models and the search are model-agnostic (`pd2bw_ray.planner`); this module
measures a `ModelProfile` of BERT with the runtime's own `Stage` (`profile_bert`), keeps profiles
on disk (`load_or_profile`), and turns the chosen configuration into what
``jobs/pretrain_bert24.py`` runs (`plan_for_job`, `JobPlan`: ``--module``, conf.json, microbatch
size, m, recomputation). ``python -m stages.plan`` is its command line.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from pd2bw_ray.config import PipelineConfig
from pd2bw_ray.planner import (DEFAULT_MICROBATCH_SIZES, KINDS, Candidate, Cluster, ModelProfile,
                               Network, PlanError, WeightPart, _less, _Measured,
                               _microbatch_profile, average_profiles, choose, format_table,
                               parse_bytes, search)
from stages.bert import build_bert_pipeline
from stages.bert_batches import (expected_labels_per_sequence,
                                  random_pretraining_steps)
from stages.bert_optim import BertAdamW
from stages.partition import BertPartition, balanced_partition, pipeline_conf

# ------------------------------------------------------------------------------------------------
# Profiling BERT on the local device


# What the pre-training and GLUE jobs train with (fused AdamW, BERT's weight-decay groups), so the
# profiled update time is the jobs' (torch's per-tensor Adam took about 5x longer on CPU). Its
# hyperparameters do not change the cost, and a profile records only its type (see
# `profile_description`).
default_optimizer = BertAdamW()


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# kind -> (layers per stage of a model whose stage of that kind holds n layers, that stage)
_PROFILED_STAGES = {"first": (lambda n: (n, 0), 0), "middle": (lambda n: (0, n, 0), 1),
                    "last": (lambda n: (0, n), 1), "only": (lambda n: (n,), 0)}
# Stages before the last hold two or more microbatches in flight under 1F1B: a backward runs
# after the next microbatch's forward, which has evicted its activations from the caches.
_INTERLEAVED = {"first": True, "middle": True, "last": False, "only": False}


def profile_bert(model_config, *, seq_length: int, microbatch_sizes: Sequence[int],
                 device: str = "cpu", torch_threads: int = 1, repeats: int = 3, warmup: int = 1,
                 optimizer_factory: Callable = default_optimizer, seed: int = 0,
                 attn_implementation: str = "sdpa",
                 log: Callable[[str], None] | None = None) -> ModelProfile:
    """Profile BERT (a `stages.BertModelConfig`) with the runtime's `Stage` on ``device``.

    Stages of each kind with one and with two layers are built with ``torch_threads`` threads.
    At every microbatch size, with and without recomputation, each runs ``warmup + repeats``
    steps of two microbatches and an update, in the order 1F1B runs that kind of stage: F0 F1 B0
    B1 before the last stage (two or more microbatches in flight), F0 B0 F1 B1 on it. Times are
    medians over the last ``repeats`` steps; stashed bytes come from ``Stage.memory()`` with one
    microbatch in flight (what ``trainer.stats()`` counts), parameter and optimizer bytes from
    it after the updates. A kind's per-layer part is its two-layer stage less its one-layer one,
    its base the one-layer stage less a layer (times clamped at 0: differences of medians).
    The masked-only MLM head's cost and stash grow with the labelled positions of a microbatch:
    the profile labels `expected_labels_per_sequence` positions of every sequence (15% of an
    average sequence), so its last-stage numbers hold for microbatches labelled like that.
    """
    from pd2bw_ray.collectives import HEADER_LEN, layout_of, payload_size
    from pd2bw_ray.stage import Stage

    if seq_length > model_config.max_position_embeddings:
        raise PlanError(f"seq_length {seq_length} exceeds max_position_embeddings="
                        f"{model_config.max_position_embeddings} of {model_config.source}")
    if repeats < 1 or warmup < 1:
        raise PlanError(f"repeats and warmup must be >= 1 (the first update allocates the "
                        f"second weight version), got repeats={repeats}, warmup={warmup}")
    sizes = sorted(set(int(b) for b in microbatch_sizes))
    if not sizes or sizes[0] < 1:
        raise PlanError(f"microbatch sizes must be positive integers, got "
                        f"{list(microbatch_sizes)}")
    dev = torch.device(device)
    say = log or (lambda _: None)

    def build(kind: str, n: int, recompute: bool) -> Stage:
        layout, s = _PROFILED_STAGES[kind]
        counts = layout(n)
        cfg = dataclasses.replace(model_config, num_hidden_layers=n)
        model = build_bert_pipeline(cfg, BertPartition(counts), seed=seed,
                                    attn_implementation=attn_implementation)
        # the word embedding and the MLM decoder share one tensor when one stage holds both
        ties = [g for g in model.tied_parameters if all(x.startswith(f"{s}.") for x in g)]
        return Stage(stage=s, num_stages=len(counts), modules={s: model.modules[s]},
                     optimizer_factory=optimizer_factory,
                     loss_fn=model.loss_fn if s == len(counts) - 1 else None,
                     local_ties=ties, device=dev, recompute=recompute, two_versions=True)

    def measure(stage: Stage, kind: str, b: int, update_times: list[float]
                ) -> tuple[_Measured, tuple]:
        (inputs, targets), = random_pretraining_steps(
            num_steps=1, num_microbatches=1, microbatch_size=b, seq_length=seq_length,
            vocab_size=model_config.vocab_size, seed=seed,
            labels_per_sequence=expected_labels_per_sequence(seq_length))[0]
        if kind in ("middle", "last"):
            # a later stage gets (hidden states, mask, MLM labels), as in training: the labels
            # travel with the inputs so that the last stage scores only the masked positions
            gen = torch.Generator().manual_seed(seed)
            inputs = (torch.randn(b, seq_length, model_config.hidden_size, generator=gen),
                      *inputs[2:])
        y = tuple(t.to(dev) for t in targets)
        order = ([("F", 0), ("F", 1), ("B", 0), ("B", 1)] if _INTERLEAVED[kind]
                 else [("F", 0), ("B", 0), ("F", 1), ("B", 1)])
        fwd, bwd, stash, out = [], [], 0, ()
        for rep in range(warmup + repeats):
            step = stage.newest_version   # update `step` creates version step + 1
            stage.reset_peaks()
            outs: dict[int, tuple] = {}
            for what, i in order:
                if what == "F":
                    x = tuple(t.clone().to(dev) for t in inputs)
                    t0 = _clock(dev)
                    outs[i] = stage.forward(step, i, step, x, y if stage.is_last else None)
                    elapsed = _clock(dev) - t0
                    if i == 0:
                        stash = stage.memory()["stash"]
                else:
                    grads = (None if stage.is_last else
                             [torch.ones_like(o) for o in outs[i] if o.is_floating_point()])
                    t0 = _clock(dev)
                    stage.backward(step, i, grads)
                    elapsed = _clock(dev) - t0
                if rep >= warmup:
                    (fwd if what == "F" else bwd).append(elapsed)
            out = outs[0]
            t0 = _clock(dev)
            stage.apply_update(step, stage.take_grads(step))
            if rep >= warmup:
                update_times.append(_clock(dev) - t0)
        return _Measured(statistics.median(fwd), statistics.median(bwd), stash), out

    old_threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    got: dict[tuple[int, str, int, bool], _Measured] = {}
    weights: dict[tuple[str, int], WeightPart] = {}
    messages: dict[int, tuple[int, int]] = {}
    try:
        for kind, n, r in itertools.product(KINDS, (1, 2), (False, True)):
            stage = build(kind, n, r)     # one at a time: a large model's stages are big
            updates: list[float] = []
            for b in sizes:
                say(f"[profile] {kind} stage with {n} layer(s), recompute "
                    f"{'on' if r else 'off'}: microbatch size {b}")
                got[b, kind, n, r], out = measure(stage, kind, b, updates)
                if (kind, n, r) == ("first", 1, False):
                    layout = layout_of(out)
                    messages[b] = (payload_size(layout) + HEADER_LEN * 8,    # int64 header
                                   payload_size([lt for lt in layout if lt[0].is_floating_point]))
            if not r:
                mem = stage.memory()
                weights[kind, n] = WeightPart(
                    param_bytes=mem["weights"] // mem["weight_versions"],
                    optimizer_bytes=mem["optimizer"], update_s=statistics.median(updates))
            del stage
    finally:
        torch.set_num_threads(old_threads)
    microbatches = [_microbatch_profile(b, {k[1:]: v for k, v in got.items() if k[0] == b},
                                        *messages[b]) for b in sizes]

    layer_w = _less(weights["middle", 2], weights["middle", 1])    # the same for every kind
    return ModelProfile(
        num_layers=model_config.num_hidden_layers, seq_length=seq_length,
        layer_weights=layer_w,
        base_weights={kind: _less(weights[kind, 1], layer_w) for kind in KINDS},
        microbatches=tuple(microbatches),
        tied_bytes=model_config.vocab_size * model_config.hidden_size * 4,
        description=profile_description(model_config, seq_length=seq_length, device=dev.type,
                                        torch_threads=torch_threads,
                                        optimizer_factory=optimizer_factory,
                                        attn_implementation=attn_implementation))


def profile_description(model_config, *, seq_length: int, device: str, torch_threads: int,
                        optimizer_factory: Callable, attn_implementation: str,
                        concurrency: int = 1) -> dict[str, Any]:
    """What a profile depends on; a saved profile is reused only when this is equal."""
    # a function by its name, an optimizer object (e.g. `BertAdamW(lr=...)`) by its type: the
    # learning rate and decay do not change what an update costs
    optimizer = (getattr(optimizer_factory, "__qualname__", None)
                 or type(optimizer_factory).__qualname__)
    return {"model": model_config.to_dict(), "seq_length": seq_length, "device": device,
            "torch_threads": torch_threads, "optimizer": optimizer,
            "attn_implementation": attn_implementation, "concurrency": concurrency}


def profile_bert_concurrently(model_config, *, concurrency: int,
                              log: Callable[[str], None] | None = None,
                              **kwargs: Any) -> ModelProfile:
    """`profile_bert` in ``concurrency`` processes at once, times averaged: how fast a worker is
    while the other workers of its node compute too (on CPU nodes they share caches, memory
    bandwidth and clocks; pass the number of workers per node). 1: `profile_bert` here."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise PlanError(f"concurrency must be a positive integer, got {concurrency!r}")
    if concurrency == 1:
        return profile_bert(model_config, log=log, **kwargs)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if log is not None:
        log(f"[profile] {concurrency} processes profiling at once")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(concurrency, mp_context=ctx) as pool:
        start = manager.Barrier(concurrency)
        futures = [pool.submit(_profile_together, start, model_config, kwargs)
                   for _ in range(concurrency)]
        profiles = [f.result() for f in futures]
    return dataclasses.replace(average_profiles(profiles), description={
        **profiles[0].description, "concurrency": concurrency})


def _profile_together(start, model_config, kwargs: dict) -> ModelProfile:
    start.wait()    # measure only once every process has imported and is ready
    return profile_bert(model_config, **kwargs)


# ------------------------------------------------------------------------------------------------
# What the job runs


def module_spec(layers_per_stage: Sequence[int]) -> str:
    """``models.bert<L>.depth=<D>`` when the partition is the balanced one, else ``layers=``."""
    partition = BertPartition(tuple(layers_per_stage))
    d, L = partition.num_stages, partition.num_layers
    if d <= L and balanced_partition(L, d) == partition:
        return f"models.bert{L}.depth={d}"
    return partition.to_spec()


@dataclass(frozen=True)
class JobPlan:
    """What the pre-training job needs from the planner."""

    pipeline_config: PipelineConfig
    module_spec: str
    microbatch_size: int          # --train_batch_size
    num_microbatches: int         # m per replica: d x --gradient_accumulation_steps
    recompute: bool               # --recompute (every stage)
    candidate: Candidate
    candidates: tuple[Candidate, ...]

    @property
    def recompute_stages(self) -> tuple[int, ...]:
        """For ``StageOptions(recompute=...)``."""
        return tuple(range(self.candidate.depth)) if self.recompute else ()

    def job_flags(self, config_path: str = "conf.json") -> str:
        d, m = self.pipeline_config.num_stages, self.num_microbatches
        # PipeDream's meaning: m = d x gas; an m that is no multiple of d is set directly
        batches = (f"--gradient_accumulation_steps {m // d}" if m % d == 0
                   else f"--microbatches_per_update {m}")
        flags = [f"--module {self.module_spec}", f"--config_path {config_path}",
                 f"--train_batch_size {self.microbatch_size}", batches]
        return " ".join(flags + (["--recompute"] if self.recompute else []))


def job_plan(candidates: Sequence[Candidate]) -> JobPlan:
    best = choose(candidates)
    return JobPlan(pipeline_config=pipeline_conf(best.depth, best.width),
                   module_spec=module_spec(best.layers_per_stage),
                   microbatch_size=best.microbatch_size, num_microbatches=best.num_microbatches,
                   recompute=best.recompute, candidate=best, candidates=tuple(candidates))


_AUTO_SPEC = re.compile(r"models\.bert(?P<layers>[0-9]+)\.depth=auto")


def plan_for_job(model_config, *, module_spec: str, num_workers: int,
                 memory_per_worker: int | str, global_batch_size: int, max_seq_length: int,
                 workers_per_node: int | None = None,
                 microbatch_sizes: Sequence[int] = DEFAULT_MICROBATCH_SIZES,
                 network: Network | None = None, profile_path: str | None = None,
                 device: str = "cpu", torch_threads: int = 1,
                 optimizer_factory: Callable = default_optimizer, repeats: int = 3,
                 profile_concurrency: int = 1,
                 log: Callable[[str], None] | None = None) -> JobPlan:
    """Plan a pre-training job given ``--module models.bert<L>.depth=auto``.

    Profiles ``model_config`` (a `stages.BertModelConfig`) on this device, or reuses the profile
    at ``profile_path`` when it was made for the same model, sequence length, device, threads,
    optimizer and ``profile_concurrency`` (a new one is written there; on CPU nodes pass the
    number of workers per node, see `profile_bert_concurrently`), then searches. ``network``
    defaults to `Network()` with ``comm_overlaps_compute`` true on GPUs only. Raises
    `PlanError` when nothing fits.
    """
    match = _AUTO_SPEC.fullmatch(module_spec.strip())
    if match is None:
        raise PlanError(f"--module {module_spec!r}: the planner takes "
                        f"models.bert{model_config.num_hidden_layers}.depth=auto")
    if int(match["layers"]) != model_config.num_hidden_layers:
        raise PlanError(f"--module {module_spec!r} names a {match['layers']}-layer BERT but "
                        f"{model_config.source} has num_hidden_layers="
                        f"{model_config.num_hidden_layers}; use "
                        f"models.bert{model_config.num_hidden_layers}.depth=auto")
    if network is None:
        network = Network(comm_overlaps_compute=torch.device(device).type == "cuda")
    cluster = Cluster(num_workers=num_workers,
                      memory_per_worker=parse_bytes(memory_per_worker, "memory per worker"),
                      workers_per_node=workers_per_node, network=network)
    profile = load_or_profile(model_config, seq_length=max_seq_length,
                              microbatch_sizes=microbatch_sizes, profile_path=profile_path,
                              device=device, torch_threads=torch_threads,
                              optimizer_factory=optimizer_factory, repeats=repeats,
                              concurrency=profile_concurrency, log=log)
    plan = job_plan(search(profile, cluster, global_batch_size, microbatch_sizes))
    if log is not None:
        log(format_table(plan.candidates, plan.candidate))
    return plan


def load_or_profile(model_config, *, seq_length: int, microbatch_sizes: Sequence[int],
                    profile_path: str | None = None, device: str = "cpu", torch_threads: int = 1,
                    optimizer_factory: Callable = default_optimizer, repeats: int = 3,
                    attn_implementation: str = "sdpa", concurrency: int = 1,
                    log: Callable[[str], None] | None = None) -> ModelProfile:
    """The profile at ``profile_path`` if it describes the same setup, with any microbatch sizes
    it lacks profiled and added (and saved back); a new profile otherwise (see
    `profile_bert_concurrently` for ``concurrency``)."""
    description = profile_description(model_config, seq_length=seq_length,
                                      device=torch.device(device).type,
                                      torch_threads=torch_threads,
                                      optimizer_factory=optimizer_factory,
                                      attn_implementation=attn_implementation,
                                      concurrency=concurrency)
    kw = dict(seq_length=seq_length, device=device, torch_threads=torch_threads,
              optimizer_factory=optimizer_factory, repeats=repeats,
              attn_implementation=attn_implementation, concurrency=concurrency, log=log)
    sizes = sorted(set(microbatch_sizes))
    if profile_path is None or not os.path.exists(profile_path):
        profile = profile_bert_concurrently(model_config, microbatch_sizes=sizes, **kw)
    else:
        profile = ModelProfile.load(profile_path)
        if dict(profile.description) != description:
            raise PlanError(f"{profile_path} was profiled for {dict(profile.description)}, not "
                            f"{description}; pass another --profile_path or delete it")
        missing = [b for b in sizes if b not in profile.microbatch_sizes]
        if not missing:
            return profile
        extra = profile_bert_concurrently(model_config, microbatch_sizes=missing, **kw)
        profile = dataclasses.replace(profile,
                                      microbatches=profile.microbatches + extra.microbatches)
    if profile_path is not None:
        profile.save(profile_path)
    return profile
