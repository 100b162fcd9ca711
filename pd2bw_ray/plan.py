"""Choose a pipeline configuration for BERT pre-training and write its conf.json.

    python -m pd2bw_ray.plan --bert_config_path configs/bert_config_bert-large-uncased.json \\
        --num_workers 64 --workers_per_node 8 --memory_per_worker 16GiB \\
        --max_seq_length 128 --global_batch_size 1024 --profile_path bert24.profile.json

Profiles the model on this device (or reuses ``--profile_path``), prints every configuration the
planner considered (predicted throughput, memory per worker, whether it fits), and writes into
``--output_dir`` the chosen ``conf.json``, ``plan.json`` (all candidates with their per-stage
predictions) and ``job_flags.txt``: the flags to pass to ``jobs/pretrain_bert24.py``. The models
are described in `pd2bw_ray.planner`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .planner import (DEFAULT_MICROBATCH_SIZES, Cluster, Network, PlanError, format_bytes,
                      format_table, job_plan, load_or_profile, parse_bytes, parse_rate,
                      parse_seconds, search)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pd2bw_ray.plan",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and batch")
    g.add_argument("--bert_config_path", required=True)
    g.add_argument("--max_seq_length", type=int, default=128)
    g.add_argument("--global_batch_size", type=int, required=True,
                   help="sequences per weight update (microbatch x microbatches x replicas)")
    g.add_argument("--microbatch_sizes", default=",".join(map(str, DEFAULT_MICROBATCH_SIZES)),
                   help="microbatch sizes to profile and consider, comma-separated")
    g = p.add_argument_group("cluster")
    g.add_argument("--num_workers", type=int, required=True, help="stage replicas in all")
    g.add_argument("--workers_per_node", type=int, default=None,
                   help="default: all workers on one node")
    g.add_argument("--memory_per_worker", required=True,
                   help="bytes for weights, gradients, optimizer state and activations, "
                        "e.g. 16GiB")
    g.add_argument("--intra_node_bandwidth", default="100GB/s")
    g.add_argument("--inter_node_bandwidth", default="12.5GB/s")
    g.add_argument("--latency", default="20us", help="per message")
    g.add_argument("--allreduce_efficiency", type=float, default=1.0,
                   help="fraction of the link bandwidth a ring all-reduce achieves "
                        "(about 0.4 for gloo on CPU)")
    g.add_argument("--comm_overlaps_compute", choices=("auto", "yes", "no"), default="auto",
                   help="auto: yes when profiling on a GPU, no on CPU")
    g = p.add_argument_group("profiling")
    g.add_argument("--profile_path", default=None,
                   help="reuse this profile when it matches (model, length, device, threads); "
                        "otherwise profile and write it here")
    g.add_argument("--device", default="cpu", help="cpu or cuda: where to profile")
    g.add_argument("--torch_threads", type=int, default=1,
                   help="threads per worker, as the job's --torch_threads")
    g.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement")
    g.add_argument("--profile_concurrency", type=int, default=1,
                   help="profile in this many processes at once; on CPU nodes, the workers per "
                        "node (they slow each other down)")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="plan", help="where conf.json, plan.json and "
                                                        "job_flags.txt go")
    return p


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PlanError(f"--microbatch_sizes {text!r}: expected comma-separated integers, "
                        "e.g. 1,2,4,8") from None
    if not sizes or min(sizes) < 1:
        raise PlanError(f"--microbatch_sizes {text!r}: sizes must be positive")
    return sizes


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    import torch

    from stages import BertModelConfig, format_conf_json

    model_config = BertModelConfig.from_json(args.bert_config_path)
    overlap = {"yes": True, "no": False,
               "auto": torch.device(args.device).type == "cuda"}[args.comm_overlaps_compute]
    network = Network(intra_node_bandwidth=parse_rate(args.intra_node_bandwidth,
                                                      "--intra_node_bandwidth"),
                      inter_node_bandwidth=parse_rate(args.inter_node_bandwidth,
                                                      "--inter_node_bandwidth"),
                      latency_s=parse_seconds(args.latency, "--latency"),
                      allreduce_efficiency=args.allreduce_efficiency,
                      comm_overlaps_compute=overlap)
    cluster = Cluster(num_workers=args.num_workers,
                      memory_per_worker=parse_bytes(args.memory_per_worker,
                                                    "--memory_per_worker"),
                      workers_per_node=args.workers_per_node, network=network)
    sizes = _sizes(args.microbatch_sizes)
    profile = load_or_profile(model_config, seq_length=args.max_seq_length,
                              microbatch_sizes=sizes, profile_path=args.profile_path,
                              device=args.device, torch_threads=args.torch_threads,
                              repeats=args.repeats, concurrency=args.profile_concurrency,
                              log=lambda line: print(line, file=sys.stderr, flush=True))
    candidates = search(profile, cluster, args.global_batch_size, sizes)
    print(f"{model_config.num_hidden_layers}-layer BERT ({args.bert_config_path}), "
          f"{args.max_seq_length} tokens, global batch {args.global_batch_size}; "
          f"{cluster.num_workers} workers, {cluster.workers_per_node} per node, "
          f"{format_bytes(cluster.memory_per_worker)} each; links "
          f"{network.intra_node_bandwidth / 1e9:g} GB/s within and "
          f"{network.inter_node_bandwidth / 1e9:g} GB/s across nodes, "
          f"{network.latency_s * 1e6:g} us, all-reduce efficiency "
          f"{network.allreduce_efficiency:g}, communication "
          f"{'overlaps' if overlap else 'does not overlap'} computation; profiled on "
          f"{profile.description.get('device', '?')} with "
          f"{profile.description.get('torch_threads', '?')} thread(s).")
    print()
    plan = None
    try:
        plan = job_plan(candidates)
    finally:
        print(format_table(candidates, plan.candidate if plan else None))
        print()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    conf_path = out / "conf.json"
    conf_path.write_text(format_conf_json(plan.pipeline_config))
    flags = plan.job_flags(str(conf_path))
    (out / "job_flags.txt").write_text(flags + "\n")
    (out / "plan.json").write_text(json.dumps({
        "chosen": _candidate_dict(plan.candidate), "module_spec": plan.module_spec,
        "job_flags": flags,
        "candidates": [_candidate_dict(c) for c in candidates]}, indent=1) + "\n")
    c = plan.candidate
    print(f"chosen: depth {c.depth} x width {c.width}, microbatch {c.microbatch_size}, "
          f"{c.num_microbatches} microbatches per replica, recompute "
          f"{'on' if c.recompute else 'off'}: {c.throughput:.1f} samples/s predicted, "
          f"{format_bytes(c.memory)} on the most loaded worker (stage {_most_loaded(c)})")
    print(f"wrote {conf_path}, {out / 'plan.json'}, {out / 'job_flags.txt'}")
    print(f"job flags: {flags}")
    return 0


def _most_loaded(c) -> int:
    return max(range(c.depth), key=lambda s: c.stages[s].memory)


def _candidate_dict(c) -> dict:
    return {"depth": c.depth, "width": c.width, "microbatch_size": c.microbatch_size,
            "num_microbatches": c.num_microbatches, "recompute": c.recompute,
            "layers_per_stage": list(c.layers_per_stage), "throughput": c.throughput,
            "step_s": c.step_s, "memory": c.memory, "fits": c.fits,
            "stages": [dict(s.__dict__, memory=s.memory) for s in c.stages]}


if __name__ == "__main__":
    sys.exit(main())
