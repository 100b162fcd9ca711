"""Choose a pipeline configuration for BERT pre-training and write its conf.json.

    python -m stages.plan --bert_config_path configs/bert_config_bert-large-uncased.json \\
        --num_workers 64 --workers_per_node 8 --memory_per_worker 16GiB \\
        --max_seq_length 128 --global_batch_size 1024 --profile_path bert24.profile.json

Profiles the model on this device (or reuses ``--profile_path``), prints every configuration the
planner considered (predicted throughput, memory per worker, whether it fits), and writes into
``--output_dir`` the chosen ``conf.json``, ``plan.json`` (all candidates with their per-stage
predictions) and ``job_flags.txt``: the flags to pass to ``jobs/pretrain_bert24.py``. The models
are described in `pd2bw_ray.planner`; the profile written to ``--profile_path`` can be planned
again for other clusters, without the BERT code, by ``python -m pd2bw_ray.plan``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pd2bw_ray.plan import (add_cluster_arguments, candidate_dict, cluster_from_args,
                            describe_choice, describe_cluster, parse_sizes)
from pd2bw_ray.planner import DEFAULT_MICROBATCH_SIZES, PlanError, format_table, search


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stages.plan",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and batch")
    g.add_argument("--bert_config_path", required=True)
    g.add_argument("--max_seq_length", type=int, default=128)
    g.add_argument("--global_batch_size", type=int, required=True,
                   help="sequences per weight update (microbatch x microbatches x replicas)")
    g.add_argument("--microbatch_sizes", default=",".join(map(str, DEFAULT_MICROBATCH_SIZES)),
                   help="microbatch sizes to profile and consider, comma-separated")
    add_cluster_arguments(p)
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
    from stages.bert_planner import job_plan, load_or_profile

    model_config = BertModelConfig.from_json(args.bert_config_path)
    cluster = cluster_from_args(args, on_gpu=torch.device(args.device).type == "cuda")
    sizes = parse_sizes(args.microbatch_sizes)
    profile = load_or_profile(model_config, seq_length=args.max_seq_length,
                              microbatch_sizes=sizes, profile_path=args.profile_path,
                              device=args.device, torch_threads=args.torch_threads,
                              repeats=args.repeats, concurrency=args.profile_concurrency,
                              log=lambda line: print(line, file=sys.stderr, flush=True))
    candidates = search(profile, cluster, args.global_batch_size, sizes)
    print(f"{model_config.num_hidden_layers}-layer BERT ({args.bert_config_path}), "
          f"{args.max_seq_length} tokens, global batch {args.global_batch_size}; "
          + describe_cluster(cluster, profile))
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
        "chosen": candidate_dict(plan.candidate), "module_spec": plan.module_spec,
        "job_flags": flags,
        "candidates": [candidate_dict(c) for c in candidates]}, indent=1) + "\n")
    print(describe_choice(plan.candidate))
    print(f"wrote {conf_path}, {out / 'plan.json'}, {out / 'job_flags.txt'}")
    print(f"job flags: {flags}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
