"""Validate the planner's cost and memory models against the runtime on this machine.

    flock /tmp/pd2bw-ray.lock .venv/bin/python bench/validate_planner.py [--quick]

1. Profiles a small BERT (4 layers, hidden 256, vocab 8192, 128 tokens) with
   `stages.bert_planner.profile_bert_concurrently`: one single-threaded profiler per core at once,
   as the two stage actors run.
2. Measures this host's gloo links (two processes on loopback): message latency and bandwidth,
   which become the planner's `Network` (on CPU, communication does not overlap computation).
3. Runs the planner for the 2 workers of this machine (1 CPU and 1 torch thread each) and a
   global batch of 32 sequences, then trains every configuration it considered with
   `PipelineTrainer` on Ray: a warm-up call, then a timed call. Measured steady-state throughput
   is taken from stage 0's action log (the start of the second step's first forward to the start
   of the last step's first forward); measured memory is ``trainer.stats()``'s weights, optimizer
   state and peak stashed activations of each stage (replica 0).
4. Writes bench/results/planner_validation.md (the table) and planner_validation.json (raw),
   with the profile and the model config next to them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from pd2bw_ray.planner import (Cluster, Network, choose, format_bytes,  # noqa: E402
                               format_table, search)
from stages.bert_planner import (default_optimizer, module_spec,  # noqa: E402
                                 profile_bert_concurrently)

RESULTS = ROOT / "bench" / "results"
SMALL_BERT = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=1024, hidden_act="gelu", hidden_dropout_prob=0.1,
                  attention_probs_dropout_prob=0.1, max_position_embeddings=128,
                  type_vocab_size=2, initializer_range=0.02)
SEQ_LENGTH = 128
GLOBAL_BATCH = 32
NUM_WORKERS = 2
MEMORY_PER_WORKER = 8 * 2**30
MICROBATCH_SIZES = (2, 4, 8)
THROUGHPUT_TOLERANCE = 0.25
MEMORY_TOLERANCE = 0.20


# ------------------------------------------------------------------------------------------------
# this host's gloo links


def _link_worker(rank: int, port: int, sizes: list[int], repeats: int, out) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    result = {}
    for n in sizes:
        buf = torch.zeros(n // 4)
        times = []
        for rep in range(repeats + 2):
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:   # ping-pong: a message each way
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            if rep >= 2:
                times.append((time.perf_counter() - t0) / 2)
        reduce_times = []
        for rep in range(repeats + 2):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            if rep >= 2:
                reduce_times.append(time.perf_counter() - t0)
        result[n] = (sorted(times)[len(times) // 2], sorted(reduce_times)[len(reduce_times) // 2])
    dist.destroy_process_group()
    if rank == 0:
        out.put(result)


def measure_gloo_links(repeats: int = 7) -> dict:
    """One-way message time and 2-rank all-reduce time per size; the least-squares line
    ``t = latency + bytes / bandwidth`` through the message times; and the all-reduce efficiency:
    the ring model's time at that bandwidth over the measured time, for sizes of 4 MiB and up
    (gradients are that large)."""
    import torch.multiprocessing as mp

    sizes = [2**k for k in (12, 14, 16, 18, 20, 22, 24, 25)]     # 4 KiB .. 32 MiB
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_link_worker, args=(r, port, sizes, repeats, q))
             for r in range(2)]
    for p in procs:
        p.start()
    result = q.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    xs = sizes
    ys = [result[n][0] for n in sizes]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
             / sum((x - mean_x) ** 2 for x in xs))
    latency = max(mean_y - slope * mean_x, 0.0)
    bandwidth = 1.0 / slope
    ring = {n: n / bandwidth + 2 * latency for n in sizes}     # 2 ranks: 2(k-1)/k = 1
    big = [n for n in sizes if n >= 4 * 2**20]
    efficiency = sorted(ring[n] / result[n][1] for n in big)[len(big) // 2]
    return {"sizes": sizes, "message_s": ys, "allreduce_s": [result[n][1] for n in sizes],
            "bandwidth": bandwidth, "latency_s": latency,
            "allreduce_efficiency": min(efficiency, 1.0)}


# ------------------------------------------------------------------------------------------------
# running a configuration


def steady_state_throughput(log, samples_per_step: int) -> tuple[float, int]:
    """Samples/s between the starts of the first forward of the call's second step and of its
    last step, on one stage replica; and the number of steps that spans."""
    from pd2bw_ray.schedule import Kind

    starts = {e.action.step: e.start for e in log
              if e.action.kind is Kind.FORWARD and e.action.microbatch == 0}
    steps = sorted(starts)
    first, last = steps[1], steps[-1]
    return samples_per_step * (last - first) / (starts[last] - starts[first]), last - first


def run_configuration(candidate, model_config, warmup_steps: int, steps: int) -> dict:
    from pd2bw_ray import ActorResources, PipelineTrainer, StageOptions
    from stages import BertPartition, build_bert_pipeline, pipeline_conf
    from stages.bert_batches import random_pretraining_steps

    c = candidate
    model = build_bert_pipeline(model_config, BertPartition(c.layers_per_stage), seed=0)
    data = random_pretraining_steps(num_steps=warmup_steps + steps,
                                    num_microbatches=c.num_microbatches * c.width,
                                    microbatch_size=c.microbatch_size, seq_length=SEQ_LENGTH,
                                    vocab_size=model_config.vocab_size, seed=1)
    trainer = PipelineTrainer(
        list(model.modules), model.loss_fn, pipeline_conf(c.depth, c.width), default_optimizer,
        schedule="2bw", num_microbatches=c.num_microbatches,
        tied_parameters=[list(g) for g in model.tied_parameters],
        resources=ActorResources(num_cpus=1, torch_threads=1),
        stage_options=StageOptions(recompute=tuple(range(c.depth)) if c.recompute else ()))
    try:
        trainer.train(data[:warmup_steps])
        trainer.stats(reset_peaks=True)
        t0 = time.perf_counter()
        losses = trainer.train(data[warmup_steps:])
        wall = time.perf_counter() - t0
        stats = trainer.stats()
        log = trainer.action_log()[(0, 0)]
    finally:
        trainer.shutdown()
    throughput, spanned = steady_state_throughput(log, c.samples_per_step)
    return {"throughput": throughput, "steps_spanned": spanned,
            "call_throughput": c.samples_per_step * steps / wall, "losses": losses,
            "stages": [{k: stats[(s, 0)]["memory"][k] for k in
                        ("weights", "gradients", "optimizer", "peak_stash", "peak_in_flight",
                         "process_peak_rss")} | {"time": stats[(s, 0)]["time"]}
                       for s in range(c.depth)]}


# ------------------------------------------------------------------------------------------------
# the report


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _pct(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def write_report(rows, profile, network_measured, cluster, chosen, candidates, meta) -> str:
    lines = [
        "# Planner validation: predicted vs measured on a 2-core CPU machine",
        "",
        f"Generated by `bench/validate_planner.py` on {meta['date']} ({meta['host']}: "
        f"{meta['cpus']} CPUs, torch {torch.__version__}). Model: a small BERT "
        f"(`planner_small_bert_config.json`: {SMALL_BERT['num_hidden_layers']} layers, hidden "
        f"{SMALL_BERT['hidden_size']}, vocab {SMALL_BERT['vocab_size']}), "
        f"{SEQ_LENGTH} tokens, fused AdamW (`BertAdamW`, as the jobs train), schedule 2bw, "
        f"global batch {GLOBAL_BATCH} sequences, "
        f"{NUM_WORKERS} workers (Ray actors with 1 CPU and 1 torch thread each).",
        "",
        "Predictions come from the planner's profile of this machine "
        "(`planner_profile_small_bert.json`: `profile_bert_concurrently`, one single-threaded "
        "profiler per core at once, as the workers run) and its measured gloo "
        f"link (loopback: {network_measured['bandwidth'] / 1e9:.2f} GB/s, "
        f"{network_measured['latency_s'] * 1e6:.0f} us per message, all-reduce efficiency "
        f"{network_measured['allreduce_efficiency']:.2f}; communication counted as "
        "not overlapping computation, as on CPU). Measured throughput is steady state: samples "
        "per second between the first forwards of the second and the last step of a "
        f"{meta['steps']}-step `train()` call after a {meta['warmup_steps']}-step warm-up call. "
        "Memory is per stage (replica 0), in MiB: the runtime's `trainer.stats()` weights (both "
        "versions) + optimizer state + peak stashed activations, against the model's "
        "`2 P_s + O_s + min(d - s, m) A_s` for the same terms.",
        "",
        "| config (d x w, mbs, m, recompute, layers) | predicted samples/s | measured samples/s "
        "| error | stage | predicted MiB | measured MiB | error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        c, meas = row["candidate"], row["measured"]
        name = (f"{c.depth} x {c.width}, mbs {c.microbatch_size}, m {c.num_microbatches}, "
                f"recompute {'on' if c.recompute else 'off'}, layers "
                f"{','.join(map(str, c.layers_per_stage))}" + (" (chosen)" if c is chosen else ""))
        for s, (pred, got) in enumerate(zip(row["predicted_memory"], row["measured_memory"])):
            head = (f"| {name} | {c.throughput:.2f} | {meas['throughput']:.2f} | "
                    f"{_pct(c.throughput, meas['throughput']):+.1%} "
                    if s == 0 else "| | | | ")
            lines.append(f"{head}| {s} | {_mib(pred)} | {_mib(got)} | {_pct(pred, got):+.1%} |")
    worst_t = max(abs(r["throughput_error"]) for r in rows)
    worst_m = max(abs(e) for r in rows for e in r["memory_errors"])
    mean_t = _mean([r["throughput_error"] for r in rows])
    best = max(rows, key=lambda r: r["measured"]["throughput"])
    mine = next(r for r in rows if r["candidate"] is chosen)
    piped = [r["throughput_error"] for r in rows if r["candidate"].depth > 1] or [0.0]
    recomputing = [r["throughput_error"] for r in rows if r["candidate"].recompute]
    storing = [r["throughput_error"] for r in rows if not r["candidate"].recompute]
    lines += [
        "",
        f"Largest throughput error {worst_t:.1%} (tolerance {THROUGHPUT_TOLERANCE:.0%}), mean "
        f"{mean_t:+.1%}; largest memory error {worst_m:.1%} (tolerance "
        f"{MEMORY_TOLERANCE:.0%}). The chosen configuration measured "
        f"{mine['measured']['throughput']:.2f} samples/s, the best measured "
        f"{best['measured']['throughput']:.2f} "
        f"({best['measured']['throughput'] / mine['measured']['throughput'] - 1:+.1%}).",
        "",
        "Memory agrees exactly because the profile counts bytes the way the runtime does (the "
        "runtime's own `Stage`); what this checks is the composition: layers per stage from "
        "stages of one and two layers, microbatches in flight per stage under 1F1B, two weight "
        "versions, optimizer state. Timing is where the model can be wrong: stages before the "
        "last are profiled in 1F1B order (a backward after the next forward) and with both "
        "cores busy; without either, predictions were 10-25% optimistic on this machine. "
        f"Here the 2-stage configurations' errors range from {min(piped):+.1%} to "
        f"{max(piped):+.1%}; the model leaves out the runtime's per-action work beyond `Stage` "
        "(packing and posting messages, the reducer thread) on the same core, and waiting on "
        "message latency where 1F1B leaves no slack. With recomputation the mean error is "
        f"{_mean(recomputing):+.1%}, without it {_mean(storing):+.1%}.",
        "",
        "Not in the comparison: the model's gradient term (`2 P_s`: step t's gradients wait for "
        "their all-reduce and update while step t+1's accumulate) and its recomputation working "
        "set (one microbatch's full activations), which `trainer.stats()` does not report at "
        "their peak (its `gradients` is what the stage holds when asked: 0 after a call). Each "
        "actor's peak resident size (`process_peak_rss`, with Python, torch and Ray) is in "
        "`planner_validation.json`.",
        "",
        "The planner's table for this machine (`memory_per_worker "
        f"{format_bytes(cluster.memory_per_worker)}`; `*` = chosen, "
        f"`{module_spec(chosen.layers_per_stage)}`):",
        "",
        "```",
        format_table(candidates, chosen),
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats and steps (a smoke run; results not written)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup_steps", type=int, default=2)
    args = p.parse_args(argv)
    import ray

    from stages import BertModelConfig

    steps = 3 if args.quick else args.steps
    model_config = BertModelConfig.from_dict(SMALL_BERT, source="small BERT")
    print(f"[validate] profiling {model_config.num_hidden_layers}-layer BERT ...", flush=True)
    # one profiler per core at once, as the two stage actors run
    profile = profile_bert_concurrently(model_config, concurrency=NUM_WORKERS,
                                        seq_length=SEQ_LENGTH, microbatch_sizes=MICROBATCH_SIZES,
                                        repeats=2 if args.quick else 5, warmup=2)
    print("[validate] measuring gloo links ...", flush=True)
    links = measure_gloo_links(repeats=3 if args.quick else 7)
    network = Network(intra_node_bandwidth=links["bandwidth"],
                      inter_node_bandwidth=links["bandwidth"], latency_s=links["latency_s"],
                      allreduce_efficiency=links["allreduce_efficiency"],
                      comm_overlaps_compute=False)
    cluster = Cluster(num_workers=NUM_WORKERS, memory_per_worker=MEMORY_PER_WORKER,
                      workers_per_node=NUM_WORKERS, network=network)
    candidates = search(profile, cluster, GLOBAL_BATCH)
    chosen = choose(candidates)
    print(format_table(candidates, chosen), flush=True)

    # a private local instance, even if another Ray cluster runs on this machine
    ray.init(address="local", num_cpus=NUM_WORKERS, include_dashboard=False,
             log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}})
    rows = []
    try:
        for c in sorted(candidates, key=lambda c: (c.depth, c.microbatch_size, c.recompute)):
            print(f"[validate] d={c.depth} w={c.width} mbs={c.microbatch_size} "
                  f"m={c.num_microbatches} recompute={c.recompute} "
                  f"layers={c.layers_per_stage} ...", flush=True)
            measured = run_configuration(c, model_config, args.warmup_steps, steps)
            pred_mem = [e.weights + e.optimizer + e.stash for e in c.stages]
            got_mem = [st["weights"] + st["optimizer"] + st["peak_stash"]
                       for st in measured["stages"]]
            row = {"candidate": c, "measured": measured, "predicted_memory": pred_mem,
                   "measured_memory": got_mem,
                   "throughput_error": _pct(c.throughput, measured["throughput"]),
                   "memory_errors": [_pct(a, b) for a, b in zip(pred_mem, got_mem)]}
            rows.append(row)
            print(f"    predicted {c.throughput:.2f} samples/s, measured "
                  f"{measured['throughput']:.2f} ({row['throughput_error']:+.1%}); memory "
                  + ", ".join(f"stage {s}: {_mib(a)} vs {_mib(b)} MiB"
                              for s, (a, b) in enumerate(zip(pred_mem, got_mem))), flush=True)
    finally:
        ray.shutdown()

    meta = {"date": datetime.date.today().isoformat(), "host": platform.node(),
            "cpus": os.cpu_count(), "steps": steps, "warmup_steps": args.warmup_steps}
    report = write_report(rows, profile, links, cluster, chosen, candidates, meta)
    print(report)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "planner_validation.md").write_text(report)
        (RESULTS / "planner_small_bert_config.json").write_text(
            json.dumps(SMALL_BERT, indent=2) + "\n")
        profile.save(RESULTS / "planner_profile_small_bert.json")
        raw = {"meta": meta, "links": links,
               "network": network.__dict__, "cluster": {
                   "num_workers": cluster.num_workers,
                   "memory_per_worker": cluster.memory_per_worker},
               "rows": [{"depth": r["candidate"].depth, "width": r["candidate"].width,
                         "microbatch_size": r["candidate"].microbatch_size,
                         "num_microbatches": r["candidate"].num_microbatches,
                         "recompute": r["candidate"].recompute,
                         "layers_per_stage": r["candidate"].layers_per_stage,
                         "predicted_throughput": r["candidate"].throughput,
                         "predicted_stages": [e.__dict__ for e in r["candidate"].stages],
                         "measured": r["measured"], "predicted_memory": r["predicted_memory"],
                         "measured_memory": r["measured_memory"],
                         "throughput_error": r["throughput_error"],
                         "memory_errors": r["memory_errors"]} for r in rows]}
        (RESULTS / "planner_validation.json").write_text(json.dumps(raw, indent=1) + "\n")
    ok = (all(abs(r["throughput_error"]) <= THROUGHPUT_TOLERANCE for r in rows)
          and all(abs(e) <= MEMORY_TOLERANCE for r in rows for e in r["memory_errors"]))
    print(f"[validate] {'within' if ok else 'OUTSIDE'} tolerance")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
