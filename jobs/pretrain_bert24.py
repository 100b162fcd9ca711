"""Pre-train BERT with pipeline parallelism (PipeDream-2BW by default) on a Ray cluster.

    ray job submit --working-dir . -- python jobs/pretrain_bert24.py \\
        --module models.bert24.depth=8 --config_path configs/conf_bert24_depth8_replicas8.json \\
        --bert_config_path configs/bert_config_bert-large-uncased.json --vocab_path vocab.txt \\
        --train_path wiki_shards/ --do_train --do_lower_case --max_seq_length 128 \\
        --train_batch_size 8 --gradient_accumulation_steps 1 --num_train_epochs 1 \\
        --learning_rate 1e-4 --checkpoint_dir ckpt/

or plain ``python jobs/pretrain_bert24.py ...`` (a local Ray is started). The flags are those of
the original PipeDream BERT scripts:

- Batches, as in PipeDream-2BW: a microbatch is ``--train_batch_size`` sequences; every replica
  runs ``m = d x --gradient_accumulation_steps`` microbatches per weight update, ``d`` being the
  conf's stages (PipeDream's ``update_interval = num_stages * gradient_accumulation_steps``, so
  2bw's ``m >= d`` always holds). flush and gpipe use the same m (a flush every m microbatches).
  ``--microbatches_per_update M`` sets m directly instead. One update averages
  ``train_batch_size x m x replicas`` sequences.
- Modules and stages: ``--module models.bert<L>.depth=<D>`` cuts BERT into D modules; the conf's
  ``module_to_stage_map`` puts them on stages, contiguously (as in PipeDream: a depth-8 model may
  run on 8, 4, 2 or 1 stages). Without ``--config_path``, one module per stage.
- Modes: ``--num_minibatches N`` measures throughput over N iterations (weight updates) and writes
  per-iteration times, samples/s and per-stage compute / communication / idle fractions as JSON;
  ``--num_train_epochs E`` trains to accuracy with BERT's optimizer and schedule, logging the loss
  of every step and writing an atomic checkpoint per epoch (and every ``--checkpoint_every``
  steps) into ``--checkpoint_dir``; ``--resume`` continues from the newest complete checkpoint.
- ``--train_path``: a directory of prepared Parquet shards (``python -m data.prepare_pretraining``,
  or pre-masked shards with the same columns), or raw text (one sentence per line, WikiExtractor
  JSON, a Wikipedia XML dump), which is prepared first into ``<checkpoint_dir>/shards``.
- ``--master_addr --nnodes --node_rank --nproc_per_node`` (the original launcher's) are accepted
  and ignored: Ray places one actor per rank of the conf with a placement group, on whatever
  nodes the cluster has; run the job once, from any node.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:           # `python jobs/pretrain_bert24.py` from anywhere
    sys.path.insert(0, str(ROOT))

from jobs.ray_cluster import init_ray  # noqa: E402  (after the path is set)

LAUNCHER_FLAGS = ("master_addr", "nnodes", "node_rank", "nproc_per_node")


SCHEDULE_CHOICES = ("2bw", "flush", "gpipe", "zb-h1", "interleaved")


class JobError(ValueError):
    """A flag or input is wrong; the message names it and says what to do."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jobs/pretrain_bert24.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and layout")
    g.add_argument("--module", default="models.bert24.depth=8",
                   help="BERT cut into modules: models.bert<L>.depth=<D> (D modules, balanced "
                        "by predicted cost), models.bert<L>.layers=<n0>,<n1>,... (explicit; "
                        "n.5 cuts a layer between its attention and its feed-forward), or "
                        "models.bert<L>.depth=auto (the planner chooses modules, stages, "
                        "replicas, microbatch size and m for this cluster)")
    g.add_argument("--config_path", default=None,
                   help="conf.json: module_to_stage_map puts the modules on stages "
                        "(contiguously; several per stage allowed), stage_to_rank_map gives each "
                        "stage its replicas; default: one module per stage, --num_replicas "
                        "replicas")
    g.add_argument("--num_replicas", type=int, default=1,
                   help="data-parallel width when no --config_path is given")
    g.add_argument("--bert_config_path", default=str(ROOT / "configs" /
                                                     "bert_config_bert-large-uncased.json"))
    g.add_argument("--init_checkpoint", default=None,
                   help="start from a transformers BertForPreTraining/BertModel directory")
    g.add_argument("--schedule", choices=SCHEDULE_CHOICES, default="2bw",
                   help="2bw: PipeDream-2BW (the default). Vanilla (synchronous) semantics: "
                        "flush (1F1B), gpipe, zb-h1 (Zero Bubble H1: the backward split into "
                        "input and weight gradients) and interleaved (Megatron's interleaved "
                        "1F1B over --virtual_stages stages per rank)")
    g.add_argument("--virtual_stages", type=int, default=None, metavar="V",
                   help="stages per rank without --config_path: the D modules go one per stage "
                        "and stage s onto rank s mod D/V, so each of the D/V ranks holds V "
                        "stages (default 2 with --schedule interleaved, else 1). With "
                        "--config_path, its stage_to_rank_map says it")
    g.add_argument("--recompute", action="store_true",
                   help="recompute activations in backward on every stage")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU), fp32 weights")
    g = p.add_argument_group("data")
    g.add_argument("--train_path", default=None, help="prepared shards directory or raw text")
    g.add_argument("--vocab_path", default=None)
    g.add_argument("--do_lower_case", action="store_true")
    g.add_argument("--max_seq_length", type=int, default=128)
    g.add_argument("--on_memory", action="store_true",
                   help="materialize the shards in Ray's object store once")
    g.add_argument("--partitioned_data", action="store_true",
                   help="each replica reads its own disjoint subset of shard files")
    g.add_argument("--dupe_factor", type=int, default=1,
                   help="when preparing raw text: uses of each document, with different masks")
    g = p.add_argument_group("training")
    g.add_argument("--do_train", action="store_true")
    g.add_argument("--train_batch_size", type=int, default=8, help="sequences per microbatch")
    g.add_argument("--gradient_accumulation_steps", type=int, default=None,
                   help="PipeDream-2BW's meaning: every replica runs m = d x this many "
                        "microbatches per weight update, d = the conf's stages (default 1: "
                        "m = d); the same m under flush and gpipe")
    g.add_argument("--microbatches_per_update", type=int, default=None, metavar="M",
                   help="set m directly instead (any M >= 1; 2bw needs M >= d)")
    g.add_argument("--num_minibatches", type=int, default=None,
                   help="throughput mode: run this many iterations (weight updates)")
    g.add_argument("--num_train_epochs", type=float, default=None,
                   help="to-accuracy mode: epochs over the data")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--warmup_proportion", type=float, default=0.01)
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--max_steps", type=int, default=None,
                   help="cap on weight updates in to-accuracy mode")
    g = p.add_argument_group("planner (--module models.bert<L>.depth=auto)")
    g.add_argument("--num_workers", type=int, default=None,
                   help="stage replicas to plan for (default: what Ray's cluster holds: its "
                        "GPUs / --num_gpus_per_stage, or CPUs / --num_cpus_per_stage)")
    g.add_argument("--memory_per_worker", default=None,
                   help="e.g. 16GiB (default: from Ray: a GPU's memory, or the cluster's memory "
                        "/ workers)")
    g.add_argument("--workers_per_node", type=int, default=None,
                   help="default: from Ray, the most workers one node holds")
    g.add_argument("--global_batch_size", type=int, default=None,
                   help="sequences per update (default: --train_batch_size x "
                        "--gradient_accumulation_steps x workers, PipeDream's batch for any "
                        "depth)")
    g.add_argument("--microbatch_sizes", default="1,2,4,8,16,32,64",
                   help="microbatch sizes the planner profiles and considers")
    g.add_argument("--profile_path", default=None,
                   help="reuse this profile when it matches, else profile and write it here")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint_dir", default=None)
    g.add_argument("--checkpoint_every", type=int, default=0,
                   help="also checkpoint every N updates (0: only at the end of each epoch)")
    g.add_argument("--keep_checkpoints", type=int, default=2,
                   help="step checkpoints kept besides the end-of-epoch ones")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in --checkpoint_dir")
    g.add_argument("--max_failures", type=int, default=3,
                   help="times a failed pipeline (a stage actor died or hung) is rebuilt from "
                        "the newest checkpoint before the job gives up")
    g.add_argument("--stop_after_epoch", type=int, default=None,
                   help="exit after this epoch's checkpoint (a preemption at an epoch "
                        "boundary; continue with --resume)")
    g.add_argument("--export_hf", default=None, metavar="DIR",
                   help="at the end, also write the last checkpoint as a transformers "
                        "directory (as jobs/export_hf.py does)")
    g = p.add_argument_group("resources and output")
    g.add_argument("--num_cpus_per_stage", type=float, default=1.0)
    g.add_argument("--num_gpus_per_stage", type=float, default=0.0)
    g.add_argument("--torch_threads", type=int, default=1)
    g.add_argument("--comm_timeout", type=float, default=300.0,
                   help="seconds a stage waits for a peer before reporting it hung")
    g.add_argument("--output_json", default=None,
                   help="throughput mode: where the metrics go (default: "
                        "<checkpoint_dir or runs>/throughput.json)")
    g.add_argument("--log_every", type=int, default=10, help="print progress every N steps")
    g.add_argument("--timeline", default=None, metavar="PATH",
                   help="write what each stage replica did in the last steps as PATH.json "
                        "(Chrome trace, for ui.perfetto.dev) and PATH.png (pipeline picture)")
    g.add_argument("--timeline_steps", type=int, default=4,
                   help="steps shown by --timeline (the last ones trained)")
    g = p.add_argument_group("accepted for compatibility with the original launcher (ignored: "
                             "Ray places the actors)")
    for flag in LAUNCHER_FLAGS:
        g.add_argument(f"--{flag}", default=None)
    g.add_argument("--local_rank", default=None)
    return p


# ------------------------------------------------------------------------------------------------
# checking the inputs (before anything starts)


def _need_file(path: str | None, flag: str, what: str) -> str:
    if not path:
        raise JobError(f"{flag} is required ({what})")
    if not os.path.exists(path):
        raise JobError(f"{flag} {path}: no such file or directory ({what})")
    if os.path.isfile(path) and not os.access(path, os.R_OK):
        raise JobError(f"{flag} {path}: not readable")
    return path


def check_args(args: argparse.Namespace) -> None:
    if not args.do_train:
        raise JobError("nothing to do: pass --do_train")
    modes = [f for f in ("num_minibatches", "num_train_epochs") if getattr(args, f) is not None]
    if len(modes) != 1:
        raise JobError("pass exactly one of --num_minibatches N (throughput) and "
                       "--num_train_epochs E (to accuracy)")
    if args.timeline_steps < 1:
        raise JobError(f"--timeline_steps must be >= 1, got {args.timeline_steps}")
    if args.num_minibatches is not None and args.num_minibatches < 1:
        raise JobError(f"--num_minibatches must be >= 1, got {args.num_minibatches}")
    if args.num_train_epochs is not None and not args.num_train_epochs > 0:
        raise JobError(f"--num_train_epochs must be > 0, got {args.num_train_epochs}")
    if args.num_train_epochs is not None and not args.checkpoint_dir:
        raise JobError("--num_train_epochs needs --checkpoint_dir (checkpoints go there)")
    if args.resume and not args.checkpoint_dir:
        raise JobError("--resume needs --checkpoint_dir")
    if args.export_hf and args.num_train_epochs is None:
        raise JobError("--export_hf needs --num_train_epochs (it exports the last checkpoint)")
    if args.export_hf and os.path.exists(args.export_hf) and not os.path.isdir(args.export_hf):
        raise JobError(f"--export_hf {args.export_hf}: exists and is not a directory")
    for flag in ("train_batch_size", "max_seq_length", "num_replicas"):
        if getattr(args, flag) < 1:
            raise JobError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.virtual_stages is not None:
        if args.virtual_stages < 1:
            raise JobError(f"--virtual_stages must be >= 1, got {args.virtual_stages}")
        if args.config_path:
            raise JobError("--virtual_stages places stages on ranks without a conf; with "
                           f"--config_path {args.config_path}, give stage s and s + p the same "
                           "ranks in its stage_to_rank_map instead (p ranks per pipeline)")
        if args.virtual_stages > 1 and args.schedule != "interleaved":
            raise JobError(f"--virtual_stages {args.virtual_stages}: only --schedule interleaved "
                           f"runs several stages per rank; --schedule {args.schedule} runs one")
    if args.gradient_accumulation_steps is not None and args.gradient_accumulation_steps < 1:
        raise JobError("--gradient_accumulation_steps must be >= 1")
    if args.microbatches_per_update is not None:
        if args.microbatches_per_update < 1:
            raise JobError("--microbatches_per_update must be >= 1")
        if args.gradient_accumulation_steps is not None:
            raise JobError("pass one of --gradient_accumulation_steps (m = stages x it) and "
                           "--microbatches_per_update (m itself), not both")
    _need_file(args.bert_config_path, "--bert_config_path", "Google-format bert_config.json")
    _need_file(args.vocab_path, "--vocab_path", "BERT vocab.txt")
    _need_file(args.train_path, "--train_path", "prepared shards or raw text")
    if args.config_path:
        _need_file(args.config_path, "--config_path", "conf.json")
    if args.init_checkpoint:
        _need_file(args.init_checkpoint, "--init_checkpoint", "transformers checkpoint dir")


@dataclass(frozen=True)
class Layout:
    """What the flags (or the planner) chose: BERT cut into modules, the conf putting the modules
    on stages, and one update's batch (m microbatches of ``microbatch_size`` per replica)."""

    model_cfg: Any
    partition: Any              # the modules: stages.BertPartition
    model: Any                  # stages.BertPipelineModel
    conf: Any                   # pd2bw_ray.PipelineConfig
    microbatch_size: int
    m: int
    m_source: str               # how m was derived, for the log
    recompute: bool


def load_model_and_layout(args: argparse.Namespace, log=print, *,
                          resume_module: str | None = None) -> Layout:
    """Everything built from the flags, checked before any actor starts. ``resume_module``: the
    partition a checkpoint being resumed records; a ``depth=D`` of as many modules takes it, as
    the cost model (the data, a profile, a newer model) may now choose another split."""
    from data.vocab import read_vocab
    from pd2bw_ray import PipelineConfig
    from stages import BertModelConfig, build_bert_pipeline, parse_module_spec, pipeline_conf
    from stages.partition import PartitionError, spec_depth

    model_cfg = BertModelConfig.from_json(args.bert_config_path)
    if args.max_seq_length > model_cfg.max_position_embeddings:
        raise JobError(f"--max_seq_length {args.max_seq_length} exceeds max_position_embeddings="
                       f"{model_cfg.max_position_embeddings} of {args.bert_config_path}")
    vocab = read_vocab(args.vocab_path)
    if len(vocab) > model_cfg.vocab_size:
        raise JobError(f"{args.vocab_path} has {len(vocab)} tokens but {args.bert_config_path} "
                       f"has vocab_size={model_cfg.vocab_size}")
    plan = None
    spec = args.module
    if spec.strip().endswith("depth=auto"):
        for flag in ("config_path", "microbatches_per_update"):
            if getattr(args, flag) is not None:
                raise JobError(f"--module {spec} chooses the conf and m itself; drop --{flag}, "
                               "or plan with python -m stages.plan and pass what it chose")
        plan = plan_for_cluster(args, model_cfg, log)
        spec = plan.module_spec
    costs = partition_cost_model(args, model_cfg, spec, log)
    partition = parse_module_spec(spec, model_cfg.num_hidden_layers,
                                  config_source=args.bert_config_path, cost_model=costs)
    if resume_module and plan is None and spec_depth(spec) is not None:
        try:
            recorded = parse_module_spec(resume_module, model_cfg.num_hidden_layers)
        except PartitionError:
            recorded = None       # another model: check_resume_matches says so
        if (recorded is not None and recorded.num_stages == partition.num_stages
                and recorded != partition):
            log(f"[pretrain] --module {spec}: resuming the checkpoint's split "
                f"{recorded.to_spec()} (the cost model would now choose {partition.to_spec()})")
            partition = recorded
    log(f"[pretrain] {partition.to_spec()}: {costs.stage_costs(partition).describe()}")
    if plan is not None:
        conf = plan.pipeline_config
    elif args.config_path:
        conf = PipelineConfig.from_json(args.config_path)
    else:
        v = args.virtual_stages or (2 if args.schedule == "interleaved" else 1)
        if partition.num_stages % v:
            raise JobError(f"--module {spec}: {partition.num_stages} modules do not split over "
                           f"{v} stages per rank (--virtual_stages {v}); use a depth that is a "
                           f"multiple of {v}")
        conf = pipeline_conf(partition.num_stages, args.num_replicas, stages_per_rank=v)
    model = build_bert_pipeline(model_cfg, partition, seed=args.seed)
    model.check_pipeline_config(conf)
    d = conf.num_stages
    if plan is not None:
        b, m, recompute = plan.microbatch_size, plan.num_microbatches, plan.recompute
        source = "chosen by the planner"
    elif args.microbatches_per_update is not None:
        b, m, recompute = args.train_batch_size, args.microbatches_per_update, args.recompute
        source = "--microbatches_per_update"
    else:
        gas = args.gradient_accumulation_steps or 1
        b, m, recompute = args.train_batch_size, d * gas, args.recompute
        source = f"{d} stage{'s' if d > 1 else ''} x --gradient_accumulation_steps {gas}"
    if args.schedule == "2bw" and m < d:
        raise JobError(f"--microbatches_per_update {m} < {d} stages: 2bw needs at least as many "
                       f"microbatches per update as stages; pass --microbatches_per_update {d} "
                       "or more, or drop it (m = stages x --gradient_accumulation_steps)")
    return Layout(model_cfg, partition, model, conf, b, m, source, recompute)


def partition_cost_model(args: argparse.Namespace, model_cfg, spec: str, log):
    """What ``models.bert<L>.depth=D`` balances: the planner's profile at ``--profile_path`` when
    one was measured there for this model, sequence length and microbatch size, else the
    analytic model of ``stages.bert_cost`` for the device the stages run on."""
    import re

    from pd2bw_ray.planner import ModelProfile, PlanError
    from stages.bert_cost import CostModel, rates_for

    from pd2bw_ray import PipelineConfig

    b = args.train_batch_size
    depth = re.search(r"depth=([0-9]+)$", spec.strip())
    stages = (PipelineConfig.from_json(args.config_path).num_stages if args.config_path
              else int(depth[1]) if depth else len(spec.split(",")))
    # m only weighs the optimizer step (once per m microbatches) in the balance
    m = args.microbatches_per_update or stages * (args.gradient_accumulation_steps or 1)
    device = "cuda" if args.num_gpus_per_stage > 0 else "cpu"
    if args.profile_path and os.path.exists(args.profile_path):
        try:
            profile = ModelProfile.load(args.profile_path)
            profile.at(b)
        except PlanError as e:
            log(f"[pretrain] --profile_path: {e}; balancing the partition with the analytic "
                "cost model instead")
        else:
            desc = profile.description
            if (profile.num_layers == model_cfg.num_hidden_layers
                    and profile.seq_length == args.max_seq_length
                    and desc.get("model", model_cfg.to_dict()) == model_cfg.to_dict()):
                return CostModel.of_profile(profile, model_cfg, microbatch_size=b,
                                            num_microbatches=m,
                                            rates=rates_for(desc.get("device", device),
                                                            args.torch_threads))
            log(f"[pretrain] --profile_path {args.profile_path} was measured for another model "
                "or sequence length; balancing the partition with the analytic cost model")
    return CostModel.analytic(model_cfg, seq_length=args.max_seq_length, microbatch_size=b,
                              num_microbatches=m, device=device,
                              torch_threads=args.torch_threads,
                              mlm_fraction=data_labelled_fraction(args))


def data_labelled_fraction(args: argparse.Namespace) -> float:
    """The share of positions labelled in the training data, which the masked-only head's cost
    follows: measured on the first shard when --train_path holds prepared shards, else 15%
    (what preparation masks in full-length sequences)."""
    from data.shards import labelled_fraction, list_shards
    from stages.bert_cost import MLM_FRACTION

    if not holds_shards(args.train_path):
        return MLM_FRACTION
    fraction = labelled_fraction(list_shards([args.train_path])[0])
    return MLM_FRACTION if fraction is None else fraction


def holds_shards(train_path: str | None) -> bool:
    """Whether --train_path is a directory of prepared Parquet shards (else raw text)."""
    path = Path(train_path) if train_path else None
    return path is not None and path.is_dir() and any(path.rglob("*.parquet"))


def plan_for_cluster(args: argparse.Namespace, model_cfg, log):
    """``--module models.bert<L>.depth=auto``: plan for the workers this job can use on Ray's
    cluster (its GPUs, or its CPUs, at --num_gpus_per_stage / --num_cpus_per_stage each, and
    their memory), unless the planner flags say otherwise. Profiling runs as a Ray task on such
    a worker, so it measures the device the stages will run on."""
    import ray

    from pd2bw_ray.planner import PlanError, format_bytes, format_table, parse_bytes
    from stages.bert_planner import plan_for_job

    if not ray.is_initialized():
        init_ray()
    on_gpu = args.num_gpus_per_stage > 0
    per, kind = ((args.num_gpus_per_stage, "GPU") if on_gpu else
                 (args.num_cpus_per_stage, "CPU"))
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = [int(n["Resources"].get(kind, 0) / per + 1e-9) if per > 0 else 0 for n in nodes]
    workers = args.num_workers or sum(fits)
    if workers < 1:
        raise JobError(f"--module {args.module}: Ray's cluster has no room for a stage of "
                       f"{per} {kind}(s) (--num_{kind.lower()}s_per_stage); pass --num_workers")
    per_node = args.workers_per_node or max(fits) or workers
    if args.memory_per_worker is not None:
        memory = parse_bytes(args.memory_per_worker, "--memory_per_worker")
    elif on_gpu:
        memory = ray.get(ray.remote(num_gpus=per)(_gpu_memory).remote())
    elif any(fits):
        memory = min(int(n["Resources"].get("memory", 0)) // f for n, f in zip(nodes, fits)
                     if f > 0)
    else:       # --num_workers given for stages of no CPU: share the cluster's memory
        memory = int(sum(n["Resources"].get("memory", 0) for n in nodes)) // workers
    gas = args.gradient_accumulation_steps or 1
    batch = args.global_batch_size or args.train_batch_size * gas * workers
    sizes = tuple(int(x) for x in args.microbatch_sizes.split(",") if x.strip())
    how = ("--global_batch_size" if args.global_batch_size else
           "--train_batch_size x --gradient_accumulation_steps x workers")
    log(f"[pretrain] planning {args.module} for {workers} workers ({per_node} per node, "
        f"{'GPUs' if on_gpu else 'CPUs'}), {format_bytes(memory)} each, global batch {batch} "
        f"({how}); profiling on a worker ...")
    task = ray.remote(num_cpus=args.num_cpus_per_stage, num_gpus=args.num_gpus_per_stage)
    try:
        plan = ray.get(task(plan_for_job).remote(
            model_cfg, module_spec=args.module, num_workers=workers, memory_per_worker=memory,
            global_batch_size=batch, max_seq_length=args.max_seq_length,
            workers_per_node=per_node, microbatch_sizes=sizes, profile_path=args.profile_path,
            device="cuda" if on_gpu else "cpu", torch_threads=args.torch_threads,
            optimizer_factory=job_optimizer(args)))
    except ray.exceptions.RayTaskError as e:
        cause = e.as_instanceof_cause()
        if isinstance(cause, PlanError):
            raise JobError(f"--module {args.module}: {cause}") from None
        raise
    log(format_table(plan.candidates, plan.candidate))
    c = plan.candidate
    log(f"[pretrain] planner chose {c.depth} stages x {c.width} replicas, layers per stage "
        f"{list(c.layers_per_stage)} ({plan.module_spec}), microbatch {c.microbatch_size}, "
        f"m={c.num_microbatches}, recompute {'on' if c.recompute else 'off'}: "
        f"{c.throughput:.1f} samples/s predicted, {format_bytes(c.memory)} on the most loaded "
        f"worker; the same run as flags: {plan.job_flags('plan/conf.json')}")
    return plan


def job_optimizer(args: argparse.Namespace):
    """The optimizer the stages train with, which ``depth=auto`` also profiles: an update's
    cost is part of each stage's."""
    from stages.bert_optim import BertAdamW

    return BertAdamW(lr=args.learning_rate, weight_decay=args.weight_decay)


def _gpu_memory() -> int:
    import torch

    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory


# ------------------------------------------------------------------------------------------------
# data


def prepared_shards(args: argparse.Namespace) -> list[str] | None:
    """If --train_path holds Parquet shards: all of them, each checked for the columns training
    needs and for --max_seq_length. None if it is raw text (to be prepared)."""
    from data.shards import check_shard, list_shards

    if not holds_shards(args.train_path):
        return None
    shards = list_shards([args.train_path])
    for shard in shards:
        check_shard(shard)
    check_shard_length(shards, args.max_seq_length)
    return shards


def shards_for(args: argparse.Namespace, log) -> list[str]:
    """The Parquet shards to train on: --train_path itself, or raw text prepared once into
    <checkpoint_dir or runs>/shards (reused while the preparation settings are unchanged)."""
    from data.prepare_pretraining import PrepareConfig, prepare_pretraining
    from data.pretraining import ExampleConfig
    from data.shards import list_shards

    path = Path(args.train_path)
    if holds_shards(args.train_path):
        return list_shards([str(path)])
    out = Path(args.checkpoint_dir or ROOT / "runs") / "shards"
    settings = {"inputs": [str(path.resolve())], "vocab": str(Path(args.vocab_path).resolve()),
                "do_lower_case": bool(args.do_lower_case),
                "max_seq_length": args.max_seq_length, "dupe_factor": args.dupe_factor,
                "seed": args.seed, "mtime": path.stat().st_mtime}
    marker = out / "prepared.json"
    if marker.exists() and json.loads(marker.read_text()) == settings:
        log(f"[pretrain] reusing prepared shards in {out}")
        return list_shards([str(out)])
    log(f"[pretrain] preparing {path} into {out} ...")
    summary = prepare_pretraining(PrepareConfig(
        inputs=(str(path),), output_dir=str(out), vocab_path=args.vocab_path,
        do_lower_case=args.do_lower_case,
        examples=ExampleConfig(max_seq_length=args.max_seq_length, dupe_factor=args.dupe_factor,
                               seed=args.seed),
        overwrite=True), show_progress=False)
    log(f"[pretrain] {summary}")
    marker.write_text(json.dumps(settings))
    return list_shards([str(out)])


def check_shard_length(shards: Sequence[str], max_seq_length: int) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(shards[0], columns=["input_ids"]).slice(0, 1)
    if table.num_rows:
        got = len(table.column("input_ids")[0].as_py())
        if got != max_seq_length:
            raise JobError(f"{shards[0]} holds sequences of {got} tokens but --max_seq_length is "
                           f"{max_seq_length}; pass --max_seq_length {got} or re-prepare the data")


# ------------------------------------------------------------------------------------------------
# running


def iteration_times(log: dict, num_stages: int) -> list[float]:
    """Seconds between the completions of consecutive steps, a step being complete when its
    last backward (with zb-h1: weight-gradient pass) finished on every stage (from the executed
    action log)."""
    from pd2bw_ray.schedules.ir import COMPUTE, Kind

    backwards = COMPUTE - {Kind.FORWARD}
    done: dict[int, float] = {}
    for events in log.values():
        for e in events:
            if e.action.kind in backwards:
                done[e.action.step] = max(done.get(e.action.step, 0.0), e.end)
    ends = [done[k] for k in sorted(done)]
    return [b - a for a, b in zip(ends, ends[1:])]


class Progress:
    """Per step: a record in ``train_log.jsonl`` and the progress display (steps, epoch, loss,
    lr, samples/s, ETA): a live bar in a terminal, plain lines every ``every`` steps in
    ``ray job logs`` or a file (see ``pd2bw_ray.progress``)."""

    def __init__(self, total: int, first: int, samples_per_step: int, every: int, log,
                 steps_per_epoch: int | None = None, lr_fn=None, jsonl: Path | None = None):
        from pd2bw_ray.progress import ProgressBar

        self.spe, self.lr_fn, self.jsonl = steps_per_epoch, lr_fn, jsonl
        self.last_loss = float("nan")
        # a bar only where it can be redrawn: our own terminal; a log (or a caller's log
        # function) gets lines
        mode = "bar" if log is print and sys.stdout.isatty() else "lines"
        self.bar = ProgressBar(max(0, total - first), first=first,
                               samples_per_step=samples_per_step, every=every, desc="pretrain",
                               file=sys.stdout, mode=mode, line=log)

    def __call__(self, step: int, loss: float) -> None:
        self.last_loss = loss
        lr = self.lr_fn(step) if self.lr_fn else None
        if self.jsonl is not None:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"step": step, "loss": loss, "lr": lr,
                                    "time": time.time()}) + "\n")
        extra = " ".join(x for x in (f"epoch {step // self.spe}" if self.spe else "",
                                     f"lr {lr:.2e}" if lr is not None else "") if x)
        self.bar.update(step, loss, extra)

    def close(self) -> None:
        self.bar.close()


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    import ray

    from data.streaming import DataPosition, PretrainingStream, StreamConfig
    from pd2bw_ray import ActorResources, CommConfig, PipelineTrainer, StageOptions
    from pd2bw_ray.checkpoint import latest_checkpoint
    from stages import load_hf_checkpoint
    from stages.bert_optim import WarmupLinearDecay

    check_args(args)
    ignored = [f"--{f}" for f in LAUNCHER_FLAGS if getattr(args, f) is not None]
    if ignored:
        log(f"[pretrain] note: {' '.join(ignored)} ignored: Ray places the stage actors "
            "(one per rank of the conf) on the cluster's nodes")
    ckpt_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    resume = latest_checkpoint(ckpt_dir, report=log) if (args.resume and ckpt_dir) else None
    if args.resume and resume is None:
        log(f"[pretrain] --resume: no complete checkpoint in {ckpt_dir}; starting from scratch")
    layout = load_model_and_layout(
        args, log, resume_module=resume.extra.get("module") if resume is not None else None)
    model_cfg, partition, model, conf = (layout.model_cfg, layout.partition, layout.model,
                                         layout.conf)
    d, w, b, m = conf.num_stages, conf.num_replicas, layout.microbatch_size, layout.m
    if resume is not None:
        check_resume_matches(resume, args, partition, model_cfg, conf)

    prepared = prepared_shards(args)        # shards given: check them before anything starts
    if not ray.is_initialized():
        init_ray()
    shards = prepared if prepared is not None else shards_for(args, log)
    check_shard_length(shards, args.max_seq_length)
    stream_cfg = StreamConfig(shards=tuple(shards), train_batch_size=b, microbatches=m,
                              num_replicas=w, seed=args.seed, partitioned_data=args.partitioned_data,
                              on_memory=args.on_memory)
    spe = PretrainingStream(stream_cfg).steps_per_epoch
    samples_per_step = b * m * w
    if args.num_minibatches is not None:
        total = args.num_minibatches
    else:
        total = int(round(args.num_train_epochs * spe))
        if args.max_steps is not None:
            total = min(total, args.max_steps)
    total = max(total, 1)
    # The stream ends with the epoch of the last step: its readers neither read nor start Ray
    # Data streams (split coordinators) for epochs this run does not train.
    from dataclasses import replace
    stream_cfg = replace(stream_cfg, num_epochs=-(-total // spe))
    lr_schedule = (WarmupLinearDecay(total, args.warmup_proportion)
                   if args.num_train_epochs is not None else None)
    optimizer = job_optimizer(args)
    kwargs = dict(
        schedule=args.schedule, num_microbatches=m,
        tied_parameters=[list(g) for g in model.tied_parameters],
        max_grad_norm=args.max_grad_norm or None, lr_schedule=lr_schedule,
        resources=ActorResources(num_cpus=args.num_cpus_per_stage,
                                 num_gpus=args.num_gpus_per_stage,
                                 torch_threads=args.torch_threads),
        stage_options=StageOptions(recompute=tuple(range(d)) if layout.recompute else (),
                                   autocast_bf16=args.bf16),
        comm=CommConfig(timeout_s=args.comm_timeout), seed=args.seed)
    log(f"[pretrain] BERT {model_cfg.num_hidden_layers} layers x {model_cfg.hidden_size} as "
        f"{partition.to_spec()} ({partition.num_stages} modules: "
        f"{list(partition.layers_per_stage)} layers), on {d} stages x {w} replicas"
        + (f" ({conf.ranks_per_pipeline} ranks per pipeline, {conf.stages_per_rank} virtual "
           "stages each)" if conf.stages_per_rank > 1 else "") + " "
        f"(module_to_stage_map {list(conf.module_to_stage_map)}), schedule {args.schedule}, "
        f"m={m} microbatches per update per replica ({layout.m_source}), microbatch {b}, "
        f"{samples_per_step} sequences per update, {spe} updates per epoch")
    init = load_hf_checkpoint(args.init_checkpoint, model) if args.init_checkpoint else None

    def start(ck):
        """The data stream and the trainer, from checkpoint ``ck`` (None: from the start)."""
        t0 = time.time()
        position = None if ck is None else DataPosition.from_dict(ck.extra["data_position"])
        # reading starts now, so Ray Data's start-up overlaps the stage actors'
        stream = PretrainingStream(stream_cfg, position).start()
        try:
            if ck is None:
                trainer = PipelineTrainer(list(model.modules), model.loss_fn, conf, optimizer,
                                          initial_state_dict=init, **kwargs)
            else:
                trainer = PipelineTrainer.from_checkpoint(str(ck.path), list(model.modules),
                                                          model.loss_fn, optimizer, config=conf,
                                                          **kwargs)
        except BaseException:
            stream.close()
            raise
        if position is not None:
            log(f"[pretrain] resumed from {ck.path} at step {trainer.step} "
                f"(epoch {position.epoch}, step {position.step} of it)")
        log(f"[pretrain] {conf.world_size} stage actors up in {time.time() - t0:.1f} s")
        return trainer, stream

    if args.num_minibatches is not None:
        trainer, stream = start(resume)
        try:
            return throughput_mode(args, trainer, stream, total, samples_per_step, log)
        finally:
            stream.close()
            trainer.shutdown()
    result = accuracy_mode(args, start, resume, total, spe, samples_per_step, lr_schedule,
                           ckpt_dir, model_cfg, partition, log)
    if args.export_hf and result["checkpoint"]:
        from jobs.export_hf import export

        result["export_hf"] = export(result["checkpoint"], args.export_hf, log=log)
    return result


def check_resume_matches(resume, args, partition, model_cfg, conf) -> None:
    extra = resume.extra
    if extra.get("module") and extra["module"] != partition.to_spec():
        raise JobError(f"{resume.path} was trained with --module {extra['module']}; this run "
                       f"asks for {partition.to_spec()}. Resume with the same partition.")
    recorded = extra.get("module_to_stage_map")
    if recorded is not None and list(recorded) != list(conf.module_to_stage_map):
        raise JobError(f"{resume.path} was trained with its modules on stages as "
                       f"module_to_stage_map {list(recorded)}; this run's conf ({conf.source}) "
                       f"has {list(conf.module_to_stage_map)}. Resume with the same grouping "
                       "(the number of replicas may change).")
    if extra.get("bert_config") and extra["bert_config"] != model_cfg.to_dict():
        raise JobError(f"{resume.path} was trained with a different bert config than "
                       f"{args.bert_config_path}")
    if "data_position" not in extra:
        raise JobError(f"{resume.path} has no data position; it was not written by this job")


def throughput_mode(args, trainer, stream, total, samples_per_step, log) -> dict[str, Any]:
    progress = Progress(total, trainer.step, samples_per_step, args.log_every, log)
    t0 = time.time()
    from data.wait_meter import WaitMeter

    meter = WaitMeter(itertools.islice(iter(stream), total))
    try:
        losses = trainer.train(meter, on_step=progress)
    finally:
        progress.close()
    waits = meter.stats()
    wall = time.time() - t0
    write_timeline(args, trainer, log)
    times = iteration_times(trainer.action_log(), trainer.num_stages)
    steady = times[len(times) // 4:] or times or [wall / max(1, len(losses))]
    mean_it = sum(steady) / len(steady)
    stats = trainer.stats()
    placement = {f"{s}.{r}": where for (s, r), where in sorted(trainer.placement().items())}
    stages = {}
    for (s, r), st in sorted(stats.items()):
        t = st["time"]
        stages[f"{s}.{r}"] = {"compute": t["compute"], "communication": t["comm"],
                              "idle": t["wait"] + t["idle"], "wait_for_peer": t["wait"],
                              "memory_bytes": st["memory"]}
    out = {
        "mode": "throughput", "schedule": args.schedule, "iterations": len(losses),
        "num_stages": trainer.num_stages, "num_replicas": trainer.num_replicas,
        "microbatch_size": samples_per_step // (trainer.num_microbatches *
                                                trainer.num_replicas),
        "num_microbatches": trainer.num_microbatches,
        "samples_per_iteration": samples_per_step,
        "iteration_times_s": times, "mean_iteration_time_s": mean_it,
        "samples_per_second": samples_per_step / mean_it, "wall_time_s": wall,
        "losses": losses, "stages": stages, "placement": placement,
        "data_wait": {"fraction": waits.wait_fraction, "wait_s": waits.wait_s,
                      "max_wait_s": waits.max_wait_s, "first_wait_s": waits.first_wait_s},
    }
    path = Path(args.output_json or Path(args.checkpoint_dir or ROOT / "runs") /
                "throughput.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    log(f"[pretrain] {len(losses)} iterations, steady state {mean_it * 1000:.1f} ms/iteration, "
        f"{out['samples_per_second']:.1f} samples/s; per stage (compute/comm/idle): "
        + ", ".join(f"{k}: {v['compute']:.2f}/{v['communication']:.2f}/{v['idle']:.2f}"
                    for k, v in stages.items()))
    log(f"[pretrain] {waits}")
    log(f"[pretrain] metrics written to {path}")
    return out


def accuracy_mode(args, start, resume, total, spe, samples_per_step, lr_schedule, ckpt_dir,
                  model_cfg, partition, log) -> dict[str, Any]:
    """Train to ``total`` steps, checkpointing at epoch ends and every --checkpoint_every steps.
    A failed stage replica (dead, hung, out of memory) stops the pipeline; the library rebuilds
    it from the newest complete checkpoint, up to --max_failures times
    (`pd2bw_ray.failure.run_with_restarts`), and training continues exactly where that
    checkpoint left it."""
    from pd2bw_ray import FailureConfig, NonFiniteError
    from pd2bw_ray.checkpoint import latest_checkpoint
    from pd2bw_ray.failure import run_with_restarts

    assert ckpt_dir is not None
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    jsonl = ckpt_dir / "train_log.jsonl"
    losses: list[float] = []
    attempts = 0

    def attempt(ck) -> str | None:
        nonlocal attempts
        attempts += 1
        trim_log(jsonl, ck.step if ck is not None else 0)
        trainer, stream = start(ck)
        try:
            progress = Progress(total, trainer.step, samples_per_step, args.log_every, log, spe,
                                lambda t: args.learning_rate * lr_schedule(t), jsonl)
            try:
                path = train_until_done(args, trainer, stream, total, spe, ckpt_dir, model_cfg,
                                        partition, progress, losses, log)
            finally:
                progress.close()
            write_timeline(args, trainer, log)
            return path
        finally:
            stream.close()
            trainer.shutdown()

    try:
        last_path = run_with_restarts(attempt, ckpt_dir, FailureConfig(args.max_failures),
                                      resume_from=resume, log=log, tag="[pretrain]")
    except NonFiniteError as e:
        good = latest_checkpoint(ckpt_dir, report=log)
        log(f"[pretrain] stopped: {e}")
        log(f"[pretrain] the last good checkpoint is "
            f"{good.path if good is not None else '(none yet)'}; lower --learning_rate or "
            "check the data, then continue with --resume")
        raise
    if last_path is None:
        newest = latest_checkpoint(ckpt_dir, report=log)
        last_path = str(newest.path) if newest is not None else None
    return {"mode": "accuracy", "losses": losses, "checkpoint": last_path,
            "final_loss": losses[-1] if losses else None, "failures": attempts - 1}


def train_until_done(args, trainer, stream, total, spe, ckpt_dir, model_cfg, partition,
                     progress, losses, log) -> str | None:
    from pd2bw_ray.checkpoint import CheckpointConfig, prune_checkpoints
    from data.wait_meter import WaitMeter

    meter = WaitMeter(stream)     # how long the driver waits for the next step's data
    it = iter(meter)
    every = args.checkpoint_every or spe
    first = start_step(stream, spe)
    last_path = None
    while trainer.step < total:
        step = trainer.step
        epoch_end = (step // spe + 1) * spe
        stop = min(total, epoch_end, (step // every + 1) * every)
        losses += trainer.train(itertools.islice(it, stop - step), on_step=progress)
        at_epoch_end = trainer.step == epoch_end or trainer.step == total
        position = stream.position_after(trainer.step - first)
        extra = {"epoch": (trainer.step - 1) // spe, "end_of_epoch": at_epoch_end,
                 "global_step": trainer.step, "data_position": position.to_dict(),
                 "module": partition.to_spec(), "layers_per_stage": list(
                     partition.layers_per_stage), "num_modules": partition.num_stages,
                 "module_to_stage_map": list(trainer.config.module_to_stage_map),
                 "num_stages": trainer.num_stages, "bert_config": model_cfg.to_dict(),
                 "vocab_path": str(Path(args.vocab_path).resolve()),
                 "do_lower_case": bool(args.do_lower_case),
                 "max_seq_length": args.max_seq_length, "loss": losses[-1] if losses else None}
        last_path = trainer.checkpoint(str(ckpt_dir), extra=extra)
        log(f"[pretrain] checkpoint {last_path} (step {trainer.step}, "
            f"{'end of epoch ' + str(extra['epoch']) if at_epoch_end else 'mid-epoch'})")
        prune_checkpoints(ckpt_dir, CheckpointConfig(num_to_keep=args.keep_checkpoints))
        draw_loss_curve(ckpt_dir, log)
        if (at_epoch_end and args.stop_after_epoch is not None
                and extra["epoch"] >= args.stop_after_epoch and trainer.step < total):
            log(f"[pretrain] stopping after epoch {extra['epoch']} as asked "
                f"(--stop_after_epoch); continue with --resume")
            break
    log(f"[pretrain] {meter.stats()}")
    return last_path


def draw_loss_curve(ckpt_dir: Path, log) -> None:
    """``loss_curve.png`` next to the checkpoints, from ``train_log.jsonl`` (redrawn at every
    checkpoint, so it is there while the run goes on)."""
    from pd2bw_ray.timeline import draw_loss_curve as draw

    jsonl = ckpt_dir / "train_log.jsonl"
    if jsonl.exists() and jsonl.stat().st_size:
        draw(jsonl, ckpt_dir / "loss_curve.png", title=f"pre-training loss ({ckpt_dir.name})")


def write_timeline(args, trainer, log) -> None:
    """--timeline PATH: the Chrome trace and the pipeline picture of the last train() call's
    last --timeline_steps steps."""
    if not args.timeline:
        return
    out = trainer.timeline(args.timeline, last_steps=args.timeline_steps)
    log(f"[pretrain] timeline: {out['png']} (picture), {out['trace']} (Chrome trace: open it "
        "in ui.perfetto.dev or chrome://tracing)")


def trim_log(jsonl: Path, step: int) -> None:
    """Drop logged steps at or after ``step`` (they are about to be trained again after a
    restart from the checkpoint of that step)."""
    if not jsonl.exists():
        return
    keep = [line for line in jsonl.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] < step]
    jsonl.write_text("".join(line + "\n" for line in keep))


def start_step(stream, spe: int) -> int:
    """Global step index at which this stream started (from its starting data position)."""
    pos = stream.position_after(0)
    return pos.epoch * spe + pos.step


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job; exit status 2 for bad input, 1 if training failed. A local Ray started
    here ends with the process."""
    args = build_parser().parse_args(argv)
    try:
        check_args(args)        # the flags alone: answered before torch and transformers load
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pd2bw_ray import PipelineFailure
    from pd2bw_ray.checkpoint import CheckpointError

    try:
        run(args)
    except ValueError as e:   # JobError, ConfigError, StreamError, BertConfigError: bad input
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PipelineFailure as e:
        print(f"error: training stopped: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
