"""GPU check and benchmark, for a lent single-GPU machine (no Ray needed there).

1. Whether NCCL can join two ranks on this one GPU (the NCCL transport needs that, or a GPU per
   rank): two processes, one ``torch.distributed`` NCCL group, one send/recv.
2. BERT pre-training steps (bf16 autocast, fp32 master weights, AdamW) on the GPU, same
   model, data and microbatches:
   - ``hf``: transformers' ``BertForPreTraining`` in a plain loop with gradient accumulation;
   - ``pd2bw-d1``: our runtime, one stage holding the whole model (in-process, ``local=True``):
     what the stage machinery (two weight slots, stash, executor) costs on a GPU;
   - ``pd2bw-2bw-d2``: our runtime, 2 stages under 2bw on threads sharing the one GPU (no
     speed-up is possible on one GPU; it shows the in-process pipeline runs there).
   Steady-state samples/s (the mean over the timed steps after warm-up) and peak CUDA memory.

``python -m bench.gpu_check --out DIR`` writes ``gpu.json`` and ``gpu.md`` to DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

NCCL_PAIR = textwrap.dedent("""
    import os, sys, datetime
    import torch, torch.distributed as dist
    rank = int(sys.argv[1])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60), device_id=torch.device("cuda:0"))
    t = torch.full((4,), float(rank), device="cuda:0")
    if rank == 0:
        dist.send(t, 1)
    else:
        dist.recv(t, 0)
        torch.cuda.synchronize()
        print("RECEIVED", t.tolist())
    dist.destroy_process_group()
""")


def nccl_two_ranks_one_gpu() -> dict:
    env = dict(os.environ, NCCL_DEBUG="WARN")
    procs = [subprocess.Popen([sys.executable, "-c", NCCL_PAIR, str(r)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(2)]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            out = "timed out after 120 s"
        outs.append((p.returncode, out))
    ok = all(rc == 0 for rc, _ in outs) and "RECEIVED [0.0, 0.0, 0.0, 0.0]" in outs[1][1]
    tail = [line for _, out in outs for line in out.splitlines()
            if "NCCL WARN" in line or "Error" in line or "RECEIVED" in line][:6]
    return {"ok": ok, "returncodes": [rc for rc, _ in outs], "messages": tail}


def timed_steps(train_one, steps, warmup: int) -> tuple[float, list[float]]:
    """Seconds per step over the steps after ``warmup``, and all losses."""
    losses = []
    for s in steps[:warmup]:
        losses += train_one([s])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    losses += train_one(steps[warmup:])
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / max(1, len(steps) - warmup), losses


def bench_bert(config_path: str, microbatch: int, m: int, seq: int, num_steps: int,
               warmup: int) -> list[dict]:
    from transformers import BertForPreTraining

    from pd2bw_ray import ActorResources, PipelineTrainer, StageOptions
    from stages.bert import build_bert_pipeline
    from stages.bert_batches import random_pretraining_steps
    from stages.bert_config import BertModelConfig
    from stages.bert_optim import BertAdamW
    from stages.hf_interop import hf_to_pipeline_state_dict
    from stages.partition import parse_module_spec, pipeline_conf

    cfg = BertModelConfig.from_json(config_path)
    L = cfg.num_hidden_layers
    steps = random_pretraining_steps(num_steps=num_steps, num_microbatches=m,
                                     microbatch_size=microbatch, seq_length=seq,
                                     vocab_size=cfg.vocab_size, seed=0)
    samples = microbatch * m
    rows = []

    torch.manual_seed(0)
    hf = BertForPreTraining(cfg.to_transformers()).cuda()
    hf_state = {k: v.detach().cpu() for k, v in hf.state_dict().items()}
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, weight_decay=0.01)
    torch.cuda.reset_peak_memory_stats()

    def hf_train(batch):
        out = []
        for microbatches in batch:
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), device="cuda")
            for (ids, types, mask, _), (labels, nsp) in microbatches:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = hf(input_ids=ids.cuda(non_blocking=True),
                              token_type_ids=types.cuda(non_blocking=True),
                              attention_mask=mask.cuda(non_blocking=True),
                              labels=labels.cuda(non_blocking=True),
                              next_sentence_label=nsp.cuda(non_blocking=True)).loss
                (loss / len(microbatches)).backward()
                total += loss.detach()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            opt.step()
            out.append(total.item() / len(microbatches))
        return out

    sec, losses = timed_steps(hf_train, steps, warmup)
    rows.append({"variant": "hf", "stages": 1, "samples_per_s": samples / sec,
                 "step_ms": sec * 1e3, "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20,
                 "first_loss": losses[0], "last_loss": losses[-1]})
    del hf, opt
    torch.cuda.empty_cache()

    for depth, schedule in ((1, "flush"), (1, "2bw"), (2, "2bw")):
        model = build_bert_pipeline(cfg, parse_module_spec(f"models.bert{L}.depth={depth}", L),
                                    seed=1)
        init = hf_to_pipeline_state_dict(model, hf_state)
        torch.cuda.reset_peak_memory_stats()
        trainer = PipelineTrainer(list(model.modules), model.loss_fn, pipeline_conf(depth, 1),
                                  BertAdamW(lr=1e-5), schedule=schedule, num_microbatches=m,
                                  tied_parameters=[list(g) for g in model.tied_parameters],
                                  initial_state_dict=init, max_grad_norm=1.0, local=True,
                                  resources=ActorResources(num_cpus=0, num_gpus=1),
                                  stage_options=StageOptions(autocast_bf16=True))
        try:
            sec, losses = timed_steps(trainer.train, steps, warmup)
            fractions = {f"{s}.{r}": {k: round(v, 3) for k, v in st["time"].items()}
                         for (s, r), st in trainer.stats().items()}
        finally:
            trainer.shutdown()
        rows.append({"variant": f"pd2bw-{schedule}-d{depth}", "stages": depth,
                     "samples_per_s": samples / sec, "step_ms": sec * 1e3,
                     "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20,
                     "first_loss": losses[0], "last_loss": losses[-1],
                     "time_fractions": fractions})
        del trainer, model
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--bert_config_path",
                   default=str(ROOT / "configs" / "bert_config_bert-large-uncased.json"))
    p.add_argument("--microbatch", type=int, default=16)
    p.add_argument("--num_microbatches", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "settings": vars(args)}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    print("[gpu] NCCL, two ranks on one GPU ...", flush=True)
    info["nccl_two_ranks_one_gpu"] = nccl_two_ranks_one_gpu()
    print(json.dumps(info["nccl_two_ranks_one_gpu"]), flush=True)
    print("[gpu] BERT steps ...", flush=True)
    rows = bench_bert(args.bert_config_path, args.microbatch, args.num_microbatches, args.seq,
                      args.steps, args.warmup)
    info["bert"] = rows
    (out / "gpu.json").write_text(json.dumps(info, indent=1) + "\n")
    base = rows[0]["samples_per_s"]
    lines = [f"# GPU check: {info['gpu']}", "",
             f"torch {info['torch']} (CUDA {info['cuda']}), transformers "
             f"{info.get('transformers')}, {info['date']}. BERT from "
             f"`{Path(args.bert_config_path).name}`, sequence {args.seq}, microbatch "
             f"{args.microbatch}, m = {args.num_microbatches} per update, bf16 autocast with fp32 "
             f"master weights, AdamW; {args.steps - args.warmup} timed steps after "
             f"{args.warmup} warm-up steps.", "",
             "| variant | stages | samples/s | x hf | step ms | peak CUDA MiB | first loss | "
             "last loss |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['stages']} | {r['samples_per_s']:.1f} | "
                     f"{r['samples_per_s'] / base:.3f} | {r['step_ms']:.1f} | "
                     f"{r['peak_cuda_mib']:.0f} | {r['first_loss']:.4f} | {r['last_loss']:.4f} |")
    n = info["nccl_two_ranks_one_gpu"]
    lines += ["", f"NCCL with two ranks on this one GPU: {'works' if n['ok'] else 'fails'} "
                  f"(return codes {n['returncodes']}); " + "; ".join(n["messages"][:3])]
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
