"""Choose a pipeline configuration from a saved profile and write its conf.json.

    python -m pd2bw_ray.plan --profile_path bert24.profile.json \\
        --num_workers 64 --workers_per_node 8 --memory_per_worker 16GiB --global_batch_size 1024

Needs only the installed package: the profile (a `pd2bw_ray.planner.ModelProfile` as JSON) was
measured earlier, for BERT by ``python -m stages.plan --profile_path ...`` in the repo. Prints
every configuration the planner considered (predicted throughput, memory per worker, whether it
fits) and writes into ``--output_dir`` the chosen ``conf.json`` (one module per stage) and
``plan.json`` (all candidates with their per-stage predictions). The models are described in
`pd2bw_ray.planner`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .planner import (Candidate, Cluster, ModelProfile, Network, PlanError, candidate_config,
                      choose, format_bytes, format_table, parse_bytes, parse_rate, parse_seconds,
                      search)


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """The cluster's flags, shared with BERT's ``python -m stages.plan``."""
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
                   help="auto: yes when the profile was measured on a GPU, no on CPU")


def cluster_from_args(args: argparse.Namespace, on_gpu: bool) -> Cluster:
    overlap = {"yes": True, "no": False, "auto": on_gpu}[args.comm_overlaps_compute]
    network = Network(intra_node_bandwidth=parse_rate(args.intra_node_bandwidth,
                                                      "--intra_node_bandwidth"),
                      inter_node_bandwidth=parse_rate(args.inter_node_bandwidth,
                                                      "--inter_node_bandwidth"),
                      latency_s=parse_seconds(args.latency, "--latency"),
                      allreduce_efficiency=args.allreduce_efficiency,
                      comm_overlaps_compute=overlap)
    return Cluster(num_workers=args.num_workers,
                   memory_per_worker=parse_bytes(args.memory_per_worker, "--memory_per_worker"),
                   workers_per_node=args.workers_per_node, network=network)


def describe_cluster(cluster: Cluster, profile: ModelProfile) -> str:
    network = cluster.network
    return (f"{cluster.num_workers} workers, {cluster.workers_per_node} per node, "
            f"{format_bytes(cluster.memory_per_worker)} each; links "
            f"{network.intra_node_bandwidth / 1e9:g} GB/s within and "
            f"{network.inter_node_bandwidth / 1e9:g} GB/s across nodes, "
            f"{network.latency_s * 1e6:g} us, all-reduce efficiency "
            f"{network.allreduce_efficiency:g}, communication "
            f"{'overlaps' if network.comm_overlaps_compute else 'does not overlap'} "
            f"computation; profiled on {profile.description.get('device', '?')} with "
            f"{profile.description.get('torch_threads', '?')} thread(s).")


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PlanError(f"--microbatch_sizes {text!r}: expected comma-separated integers, "
                        "e.g. 1,2,4,8") from None
    if not sizes or min(sizes) < 1:
        raise PlanError(f"--microbatch_sizes {text!r}: sizes must be positive")
    return sizes


def candidate_dict(c: Candidate) -> dict:
    return {"depth": c.depth, "width": c.width, "microbatch_size": c.microbatch_size,
            "num_microbatches": c.num_microbatches, "recompute": c.recompute,
            "layers_per_stage": list(c.layers_per_stage), "throughput": c.throughput,
            "step_s": c.step_s, "memory": c.memory, "fits": c.fits,
            "stages": [dict(s.__dict__, memory=s.memory) for s in c.stages]}


def describe_choice(c: Candidate) -> str:
    most_loaded = max(range(c.depth), key=lambda s: c.stages[s].memory)
    gas = (f" = {c.depth} stages x {c.num_microbatches // c.depth}"
           if c.num_microbatches % c.depth == 0 else "")
    return (f"chosen: depth {c.depth} x width {c.width}, layers per stage "
            f"{list(c.layers_per_stage)}, microbatch {c.microbatch_size}, "
            f"m = {c.num_microbatches}{gas} microbatches per replica per update, recompute "
            f"{'on' if c.recompute else 'off'}: {c.throughput:.1f} samples/s predicted, "
            f"{format_bytes(c.memory)} on the most loaded worker (stage {most_loaded})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pd2bw_ray.plan",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and batch")
    g.add_argument("--profile_path", required=True,
                   help="a saved profile (JSON), e.g. from python -m stages.plan --profile_path")
    g.add_argument("--global_batch_size", type=int, required=True,
                   help="sequences per weight update (microbatch x microbatches x replicas)")
    g.add_argument("--microbatch_sizes", default=None,
                   help="microbatch sizes to consider, comma-separated (default: all the "
                        "profile has)")
    add_cluster_arguments(p)
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="plan", help="where conf.json and plan.json go")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    profile = ModelProfile.load(args.profile_path)
    sizes = (parse_sizes(args.microbatch_sizes) if args.microbatch_sizes
             else list(profile.microbatch_sizes))
    missing = [b for b in sizes if b not in profile.microbatch_sizes]
    if missing:
        raise PlanError(f"--microbatch_sizes: {args.profile_path} has no measurements for "
                        f"{missing} (it has {list(profile.microbatch_sizes)}); profile them "
                        "(python -m stages.plan --profile_path ... for BERT) or leave them out")
    cluster = cluster_from_args(args, on_gpu=profile.description.get("device") == "cuda")
    candidates = search(profile, cluster, args.global_batch_size, sizes)
    print(f"{profile.num_layers} blocks, {profile.seq_length} tokens, global batch "
          f"{args.global_batch_size} (profile {args.profile_path}); "
          + describe_cluster(cluster, profile))
    print()
    chosen = None
    try:
        chosen = choose(candidates)
    finally:
        print(format_table(candidates, chosen))
        print()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    candidate_config(chosen).to_json(out / "conf.json")
    (out / "plan.json").write_text(json.dumps({
        "chosen": candidate_dict(chosen),
        "candidates": [candidate_dict(c) for c in candidates]}, indent=1) + "\n")
    print(describe_choice(chosen))
    print(f"wrote {out / 'conf.json'}, {out / 'plan.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
