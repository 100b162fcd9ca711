"""GPU check: one script for a lent GPU machine, under 8 minutes, its numbers in one file.

``python -m bench.gpu_check`` (``--out DIR``, default ``bench/results``) writes ``gpu.json`` and
prints what stays unverified. Where torch sees no CUDA device it refuses (exit code 2).

1. **Stage.** The float64 MLP pipeline of the exactness tests (3 stages, 2bw, Adam, clipping, a
   tied weight) on the GPU, in-process, against the CPU single-process reference (1e-10).
2. **Transport.** ``DistTransport`` between Ray actors: a stage on the GPU and its peer on the CPU
   (GLOO, CUDA tensors through host memory): activations whose layouts change, gradients, an
   all-reduce, and the wait on a peer that never sends (bounded by the timeout). With two GPUs or
   more, the same between two GPUs over NCCL (``cpu:gloo,cuda:nccl`` groups).
3. **BERT.** Pre-training steps (bf16 autocast, fp32 master weights, AdamW) of BERT-large:
   transformers' plain loop against our stage holding the whole model (``local=True``, d = 1),
   samples/s and peak CUDA memory; bf16 autocast activation memory per in-flight microbatch (the
   stage's accounting, GPipe so that all m microbatches are in flight); and a 2-stage BERT on two
   Ray actors sharing the GPU (``num_gpus=0.5``, GLOO between them: NCCL refuses two ranks on one
   GPU), its losses against the in-process pipeline's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
import uuid
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = ("bench.gpu_check needs a CUDA GPU and torch sees none (torch {torch}, CUDA build: "
           "{cuda}); run it on a machine with a GPU and a CUDA build of torch")


# ------------------------------------------------------------------------------------------------
# 1. the stage


def check_stage(device: str) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from torch import nn

    from pd2bw_ray import ActorResources, PipelineTrainer
    from reference import reference_train
    from test_exactness import M, OPTIMIZERS, TIE, conf, make_steps, mlp

    steps = make_steps(1)
    ref_losses, ref_state = reference_train(mlp(), nn.MSELoss(), steps, schedule="2bw",
                                            optimizer_factory=OPTIMIZERS["adam"],
                                            max_grad_norm=0.05, tied_parameters=TIE)
    gpus = 1 if device == "cuda" else 0
    trainer = PipelineTrainer(mlp(), nn.MSELoss(), conf(1), OPTIMIZERS["adam"], schedule="2bw",
                              num_microbatches=M, tied_parameters=TIE, max_grad_norm=0.05,
                              local=True, resources=ActorResources(num_cpus=0, num_gpus=gpus))
    try:
        devices = sorted({p["device"] for p in trainer.placement().values()})
        losses = trainer.train(steps)
        state = trainer.state_dict()
    finally:
        trainer.shutdown()
    loss_err = max(abs(a - b) for a, b in zip(losses, ref_losses))
    weight_err = max((state[k].cpu() - ref_state[k]).abs().max().item() for k in ref_state)
    return {"devices": devices, "max_loss_error": loss_err, "max_weight_error": weight_err,
            "ok": loss_err < 1e-10 and weight_err < 1e-10}


# ------------------------------------------------------------------------------------------------
# 2. the transport


class Endpoint:
    """One ``DistTransport`` endpoint in a Ray actor."""

    def setup(self, topology, stage: int, timeout_s: float, world: str, device: str) -> dict:
        from pd2bw_ray.collectives import DistTransport

        dev = f"cuda:{torch.cuda.current_device()}" if device == "cuda" else "cpu"
        self.t = DistTransport(topology, stage, 0, timeout_s, world, dev)
        return {"device": str(self.t.device), "backends": dict(self.t.backends)}

    def exchange(self, stage: int, messages, grads) -> dict:
        """Stage 0 sends ``messages`` and receives ``grads``; stage 1 the reverse. Both check
        what they got and all-reduce a vector."""
        t, dev = self.t, self.t.device
        t0 = time.perf_counter()
        if stage == 0:
            for i, m in enumerate(messages):
                t.send(1, "act", 2 * i, [x.to(dev) for x in m])
                t.expect(1, "grad", 2 * i, [(g.dtype, tuple(g.shape)) for g in grads[i]])
            got = [t.take(1, "grad", 2 * i, f"gradient {i}") for i in range(len(grads))]
            want = grads
        else:
            for i in range(len(messages)):
                t.expect(0, "act", 2 * i, None)
            got = [t.take(0, "act", 2 * i, f"activation {i}") for i in range(len(messages))]
            for i, g in enumerate(grads):
                t.send(0, "grad", 2 * i, [x.to(dev) for x in g])
            want = messages
        t.wait_sends()
        same = all(len(a) == len(b) and all(x.device == dev or x.device.type == "cpu"
                                            for x in a) and
                   all(x.dtype == y.dtype and torch.equal(x.cpu(), y) for x, y in zip(a, b))
                   for a, b in zip(got, want))
        v = torch.full((5,), float(stage + 1), device=dev)
        t.allreduce("pipeline:0", v)
        return {"same": same, "allreduce_ok": torch.equal(v.cpu(), torch.full((5,), 3.0)),
                "seconds": time.perf_counter() - t0, "devices": sorted({str(x.device)
                                                                         for a in got for x in a})}

    def wait_for_nothing(self, stage: int) -> dict:
        t0 = time.monotonic()
        # what this stage receives from its peer: activations flow 0 -> 1, gradients 1 -> 0
        kind = "act" if stage == 1 else "grad"      # a gradient's layout is known ahead
        self.t.expect(1 - stage, kind, 1000,
                      None if kind == "act" else [(torch.float32, (1,))])
        try:
            what = {"act": "activation", "grad": "gradient"}[kind]
            self.t.take(1 - stage, kind, 1000, f"{what} 1000")
            return {"raised": False}
        except Exception as e:  # noqa: BLE001 - reported
            return {"raised": True, "message": str(e), "seconds": time.monotonic() - t0}


def _messages():
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(16, 128, 1024, generator=g), torch.randint(0, 2, (16, 128), generator=g)]
    b = [torch.randn(16, 128, 1024, generator=g).to(torch.bfloat16),
         torch.rand(16, 1, 1, 128, generator=g) > 0.5, torch.randn(3, generator=g).double()]
    msgs = [a, [x.clone() for x in a], b, a]
    grads = [[torch.randn(16, 128, 1024, generator=g)] for _ in (a, a)] + \
            [[torch.randn(16, 128, 1024, generator=g).to(torch.bfloat16),
              torch.randn(3, generator=g).double()], [torch.randn(16, 128, 1024, generator=g)]]
    return msgs, grads


def check_transport(devices: tuple[str, str], timeout_s: float = 5.0) -> dict:
    """Two Ray actors on ``devices`` (e.g. ("cuda", "cpu")) exchange messages."""
    import ray

    from pd2bw_ray.collectives import Topology

    topo = Topology.build([[0], [1]], devices=devices)
    cls = ray.remote(Endpoint)
    actors = [cls.options(num_cpus=0, num_gpus=1 if d == "cuda" else 0).remote()
              for d in devices]
    world = f"gpu-check-{uuid.uuid4().hex[:6]}"
    try:
        setup = ray.get([a.setup.remote(topo, s, timeout_s, world, d)
                         for s, (a, d) in enumerate(zip(actors, devices))], timeout=180)
        msgs, grads = _messages()
        out = ray.get([a.exchange.remote(s, msgs, grads) for s, a in enumerate(actors)],
                      timeout=180)
        hung = ray.get(actors[0].wait_for_nothing.remote(0), timeout=timeout_s + 60)
    finally:
        for a in actors:
            ray.kill(a)
    ok = (all(o["same"] and o["allreduce_ok"] for o in out) and hung["raised"]
          and hung["seconds"] <= timeout_s + 3)
    return {"devices": list(devices), "setup": setup, "exchange": out,
            "hung_peer": hung, "timeout_s": timeout_s, "ok": ok}


# ------------------------------------------------------------------------------------------------
# 3. BERT


def timed_steps(train_one, steps, warmup: int, sync) -> tuple[float, list[float]]:
    """Seconds per step over the steps after ``warmup``, and all losses."""
    losses = list(train_one(steps[:warmup]))
    sync()
    t0 = time.perf_counter()
    losses += train_one(steps[warmup:])
    sync()
    return (time.perf_counter() - t0) / max(1, len(steps) - warmup), losses


def check_bert(device: str, config_path: str, microbatch: int, m: int, seq: int,
               num_steps: int, warmup: int) -> dict:
    from transformers import BertForPreTraining

    from pd2bw_ray import ActorResources, CommConfig, PipelineTrainer, StageOptions
    from stages.bert import build_bert_pipeline
    from stages.bert_batches import random_pretraining_steps
    from stages.bert_config import BertModelConfig
    from stages.bert_optim import BertAdamW
    from stages.hf_interop import hf_to_pipeline_state_dict
    from stages.partition import parse_module_spec, pipeline_conf

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def peak_mib() -> float | None:
        return torch.cuda.max_memory_allocated() / 2**20 if cuda else None

    def reset_peak() -> None:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    cfg = BertModelConfig.from_json(config_path)
    L = cfg.num_hidden_layers
    steps = random_pretraining_steps(num_steps=num_steps, num_microbatches=m,
                                     microbatch_size=microbatch, seq_length=seq,
                                     vocab_size=cfg.vocab_size, seed=0)
    samples = microbatch * m
    out: dict = {"config": Path(config_path).name, "microbatch": microbatch, "m": m, "seq": seq,
                 "timed_steps": num_steps - warmup, "rows": []}

    torch.manual_seed(0)
    hf = BertForPreTraining(cfg.to_transformers()).to(device)
    hf_state = {k: v.detach().cpu() for k, v in hf.state_dict().items()}
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, weight_decay=0.01)
    reset_peak()

    def hf_train(batch):
        losses = []
        for microbatches in batch:
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), device=device)
            for (ids, types, mask, _), (labels, nsp) in microbatches:
                with torch.autocast(device, dtype=torch.bfloat16):
                    loss = hf(input_ids=ids.to(device), token_type_ids=types.to(device),
                              attention_mask=mask.to(device), labels=labels.to(device),
                              next_sentence_label=nsp.to(device)).loss
                (loss / len(microbatches)).backward()
                total += loss.detach()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            opt.step()
            losses.append(total.item() / len(microbatches))
        return losses

    sec, losses = timed_steps(hf_train, steps, warmup, sync)
    out["rows"].append({"variant": "transformers loop", "samples_per_s": samples / sec,
                        "step_ms": sec * 1e3, "peak_cuda_mib": peak_mib(),
                        "first_loss": losses[0], "last_loss": losses[-1]})
    del hf, opt
    reset_peak()

    def pipeline(depth):
        model = build_bert_pipeline(cfg, parse_module_spec(f"models.bert{L}.depth={depth}", L),
                                    seed=1)
        return model, hf_to_pipeline_state_dict(model, hf_state)

    gpu = ActorResources(num_cpus=0, num_gpus=1 if cuda else 0)
    bf16 = StageOptions(autocast_bf16=True)
    losses_by = {}
    for schedule, depth in (("2bw", 1), ("gpipe", 1), ("2bw", 2)):
        model, init = pipeline(depth)
        reset_peak()
        trainer = PipelineTrainer(list(model.modules), model.loss_fn, pipeline_conf(depth, 1),
                                  BertAdamW(lr=1e-5), schedule=schedule, num_microbatches=m,
                                  tied_parameters=[list(g) for g in model.tied_parameters],
                                  initial_state_dict=init, max_grad_norm=1.0, local=True,
                                  resources=gpu, stage_options=bf16)
        try:
            sec, losses = timed_steps(trainer.train, steps, warmup, sync)
            mem = {f"{s}.{r}": st["memory"] for (s, r), st in trainer.stats().items()}
        finally:
            trainer.shutdown()
        losses_by[(schedule, depth)] = losses
        row = {"variant": f"pd2bw {schedule} d={depth} (in-process)",
               "samples_per_s": samples / sec, "step_ms": sec * 1e3,
               "peak_cuda_mib": peak_mib(), "first_loss": losses[0], "last_loss": losses[-1]}
        if schedule == "gpipe":     # all m microbatches in flight at once
            st = mem["0.0"]
            row["bf16_activation_mib_per_microbatch"] = (
                st["peak_stash"] / max(1, st["peak_in_flight"]) / 2**20)
            row["peak_in_flight"] = st["peak_in_flight"]
        out["rows"].append(row)
        del trainer, model
    base = out["rows"][0]["samples_per_s"]
    for row in out["rows"]:
        row["x_transformers"] = row["samples_per_s"] / base

    # 2 stages on two Ray actors sharing the GPU, GLOO between them
    model, init = pipeline(2)
    share = ActorResources(num_cpus=0, num_gpus=0.5 if cuda else 0)
    reset_peak()
    trainer = PipelineTrainer(list(model.modules), model.loss_fn, pipeline_conf(2, 1),
                              BertAdamW(lr=1e-5), schedule="2bw", num_microbatches=m,
                              tied_parameters=[list(g) for g in model.tied_parameters],
                              initial_state_dict=init, max_grad_norm=1.0, resources=share,
                              stage_options=bf16, comm=CommConfig(timeout_s=60, backend="gloo"))
    try:
        devices = sorted({p["device"] for p in trainer.placement().values()})
        t0 = time.perf_counter()
        losses = trainer.train(steps)
        sec = (time.perf_counter() - t0) / len(steps)
    finally:
        trainer.shutdown()
    ref = losses_by[("2bw", 2)]
    err = max(abs(a - b) / max(abs(b), 1e-9) for a, b in zip(losses, ref))
    out["ray_two_stages"] = {"devices": devices, "step_ms_including_warmup": sec * 1e3,
                             "losses": losses, "in_process_losses": ref,
                             "max_relative_loss_difference": err, "ok": err < 2e-2}
    return out


# ------------------------------------------------------------------------------------------------


def unverified(n_gpus: int) -> list[str]:
    out = ["a pipeline over several nodes (placement groups with SPREAD, GLOO/NCCL across hosts)"]
    if n_gpus < 2:
        out += ["NCCL between two GPUs (cpu:gloo,cuda:nccl groups, posted-ahead receives, "
                "the timeout on a hung NCCL peer): needs two GPUs, this machine has one",
                "a pipeline of GPU actors over NCCL (PipelineTrainer with num_gpus=1 per stage)"]
    return out


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
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)   # "cpu": a dry run
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA.format(torch=torch.__version__, cuda=torch.version.cuda), file=sys.stderr)
        return 2
    import ray

    t_start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    info: dict = {"device": torch.cuda.get_device_name(0) if n_gpus else "cpu (dry run)",
                  "gpus": n_gpus, "torch": torch.__version__, "cuda": torch.version.cuda,
                  "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
                  "settings": vars(args), "checks": {}}
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                     [str(ROOT), str(ROOT / "tests")])}})
    other = "cuda" if args.device == "cuda" else "cpu"
    checks = [("stage", lambda: check_stage(args.device)),
              ("transport gpu-cpu", lambda: check_transport((other, "cpu")))]
    if n_gpus >= 2:
        checks.append(("transport gpu-gpu nccl", lambda: check_transport(("cuda", "cuda"))))
    checks.append(("bert", lambda: check_bert(args.device, args.bert_config_path,
                                              args.microbatch, args.num_microbatches, args.seq,
                                              args.steps, args.warmup)))
    failed = []
    for name, fn in checks:
        print(f"[gpu_check] {name} ...", flush=True)
        t0 = time.monotonic()
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - recorded, the other checks still run
            result = {"ok": False, "error": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc()}
        result["seconds"] = time.monotonic() - t0
        info["checks"][name] = result
        if result.get("ok") is False or (name == "bert" and not result["ray_two_stages"]["ok"]):
            failed.append(name)
        print(json.dumps(result, default=str)[:2000], flush=True)
        (out / "gpu.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
    info["unverified"] = unverified(n_gpus)
    info["failed"] = failed
    info["total_seconds"] = time.monotonic() - t_start
    (out / "gpu.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
    bert = info["checks"].get("bert", {})
    for row in bert.get("rows", []):
        print(f"  {row['variant']:<34} {row['samples_per_s']:8.1f} samples/s "
              f"({row['x_transformers']:.3f}x transformers), peak {row['peak_cuda_mib']} MiB"
              + (f", bf16 activations {row['bf16_activation_mib_per_microbatch']:.1f} MiB per "
                 "in-flight microbatch" if "bf16_activation_mib_per_microbatch" in row else ""))
    print(f"[gpu_check] wrote {out / 'gpu.json'} in {info['total_seconds']:.0f} s; failed: "
          f"{failed or 'none'}")
    print("[gpu_check] not verified on this machine:\n  - " + "\n  - ".join(info["unverified"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
