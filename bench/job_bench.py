"""The whole pre-training job against plain single-process loops, side by side in one run.

Three variants train the same model shape on the same prepared shards, each in its own process
with one torch thread per process, alternating within every repeat:

- ``job``: ``jobs/pretrain_bert24.py`` in throughput mode, as a user runs it: Ray Data streaming
  the shards, the driver, and ``d`` stage actors (2bw). Its steady-state samples/s is the one the
  job reports (the last three quarters of its iterations).
- ``transformers``: a plain loop of ``transformers.BertForPreTraining`` (BERT's AdamW, global-norm
  clipping at 1.0, gradient accumulation over the same microbatches per update), reading the
  shards with pyarrow: what a user would write without a pipeline.
- ``single``: the same work as the job in one process: our stages (masked-only MLM head) called in
  sequence with the tied weight shared, the same optimizer and clipping.

Targets (issue #14): job / transformers >= 2.0, job / single >= 1.8 (the limit is 2.0 at d = 2).

    python -m bench.job_bench --repeats 3        # writes bench/results/job.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
VOCAB_SIZE = 30522      # bert-base-uncased's


def minilm_config(num_layers: int) -> dict:
    """MiniLM-L6's shape (384 hidden, 12 heads, 1536 MLP) with BERT's uncased vocabulary size."""
    return {"vocab_size": VOCAB_SIZE, "hidden_size": 384, "num_hidden_layers": num_layers,
            "num_attention_heads": 12, "intermediate_size": 1536, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": 512, "type_vocab_size": 2, "initializer_range": 0.02}


def write_vocab(path: Path) -> None:
    """The bundled vocab padded with [unused] entries to 30522 tokens, so that the MLM decoder
    has BERT's real width."""
    tokens = (ROOT / "data/sample/vocab.txt").read_text().split("\n")
    tokens = [t for t in tokens if t]
    tokens += [f"[unused{i}]" for i in range(VOCAB_SIZE - len(tokens))]
    path.write_text("\n".join(tokens) + "\n")


def long_documents(path: Path, per_document: int = 10) -> None:
    """The bundled corpus with every ``per_document`` of its short documents joined into one, so
    that sequences fill ``max_seq_length`` as Wikipedia articles do (a bundled document has about
    60 words)."""
    docs = [d for d in (ROOT / "data/sample/corpus.txt").read_text().split("\n\n") if d.strip()]
    merged = ["\n".join(d.strip() for d in docs[i:i + per_document])
              for i in range(0, len(docs), per_document)]
    path.write_text("\n\n".join(merged) + "\n")


def prepare(work: Path, seq: int, dupe_factor: int) -> tuple[Path, Path, Path]:
    vocab, config, shards = work / "vocab.txt", work / "bert_config.json", work / "shards"
    corpus = work / "corpus.txt"
    write_vocab(vocab)
    long_documents(corpus)
    subprocess.run([sys.executable, "-m", "data.prepare_pretraining", "--input",
                    str(corpus), "--output_dir", str(shards),
                    "--vocab_path", str(vocab), "--do_lower_case", "--max_seq_length", str(seq),
                    "--dupe_factor", str(dupe_factor), "--seed", "1", "--quiet"],
                   cwd=ROOT, check=True)
    return vocab, config, shards


# ------------------------------------------------------------------------------------------------
# the single-process loops (run in a child process: `python -m bench.job_bench --loop ...`)


def _loop(kind: str, config_path: str, shards: str, b: int, m: int, steps: int,
          warmup: int) -> dict:
    import torch
    torch.set_num_threads(1)
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.shards import list_shards, table_to_microbatch
    from stages.bert_config import BertModelConfig
    from stages.bert_optim import BertAdamW

    cfg = BertModelConfig.from_json(config_path)
    table = pa.concat_tables([pq.read_table(p) for p in list_shards([shards])])
    need = (steps + warmup) * m * b
    if table.num_rows < need:
        raise SystemExit(f"{shards}: {table.num_rows} sequences, need {need}; raise --dupe_factor")
    microbatches = [table_to_microbatch(table.slice(i * b, b)) for i in range(need // b)]
    torch.manual_seed(0)
    if kind == "transformers":
        from transformers import BertForPreTraining
        model = BertForPreTraining(cfg.to_transformers("sdpa"))
        params = list(model.named_parameters())

        def loss_of(inputs, targets):
            ids, types, mask, _ = inputs
            return model(input_ids=ids, token_type_ids=types, attention_mask=mask,
                         labels=targets[0], next_sentence_label=targets[1]).loss
    else:
        from stages.bert import build_bert_pipeline
        from stages.partition import BertPartition
        pipe = build_bert_pipeline(cfg, BertPartition((cfg.num_hidden_layers,)), seed=0)
        (stage,) = pipe.modules
        stage.cls.predictions.decoder.weight = stage.embeddings.word_embeddings.weight  # tie
        params = list(stage.named_parameters())

        def loss_of(inputs, targets):
            return pipe.loss_fn(stage(*inputs), targets)
    optimizer = BertAdamW(lr=1e-4)(params)
    tensors = [p for _, p in params]
    ends, losses = [], []
    for step in range(steps + warmup):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for x, y in microbatches[step * m:(step + 1) * m]:
            loss = loss_of(x, y) / m
            loss.backward()
            total += float(loss)
        torch.nn.utils.clip_grad_norm_(tensors, 1.0)
        optimizer.step()
        losses.append(total)
        ends.append(time.perf_counter())
    times = [b_ - a for a, b_ in zip(ends[warmup - 1:], ends[warmup:])]
    return {"samples_per_second": m * b / statistics.mean(times), "iteration_times_s": times,
            "losses": losses}


def run_loop(kind, config, shards, b, m, steps, warmup) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "bench.job_bench", "--loop", kind,
                          "--config", str(config), "--shards", str(shards), "--b", str(b),
                          "--m", str(m), "--steps", str(steps), "--warmup", str(warmup)],
                         cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_job(config, vocab, shards, seq, b, gas, steps, module: str, work: Path) -> dict:
    out_json = work / "throughput.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "local"}
    cmd = [sys.executable, "jobs/pretrain_bert24.py", "--module", module,
           "--bert_config_path", str(config), "--vocab_path", str(vocab),
           "--train_path", str(shards), "--do_train", "--do_lower_case", "--max_seq_length",
           str(seq), "--train_batch_size", str(b), "--gradient_accumulation_steps", str(gas),
           "--num_minibatches", str(steps), "--output_json", str(out_json),
           "--torch_threads", "1", "--log_every", "1000"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"the job failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    result = json.loads(out_json.read_text())
    result["log"] = [line for line in proc.stdout.splitlines() if line.startswith("[pretrain]")]
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--b", type=int, default=8, help="sequences per microbatch")
    p.add_argument("--m", type=int, default=4, help="microbatches per update")
    p.add_argument("--steps", type=int, default=12, help="timed updates per variant")
    p.add_argument("--dupe_factor", type=int, default=4)
    p.add_argument("--output", default=str(RESULTS / "job"))
    p.add_argument("--compare_module", action="append", default=[], metavar="SPEC",
                   help="also run the job with --module SPEC in every repeat (e.g. "
                        "models.bert6.layers=3,3, whole layers), reported beside depth=D's")
    # the child-process loop
    p.add_argument("--loop", choices=("transformers", "single"), default=None)
    p.add_argument("--config"), p.add_argument("--shards"), p.add_argument("--warmup", type=int)
    args = p.parse_args(argv)
    if args.loop:
        print(json.dumps(_loop(args.loop, args.config, args.shards, args.b, args.m, args.steps,
                               args.warmup)))
        return
    work = Path(tempfile.mkdtemp(prefix="pd2bw-job-bench-"))
    vocab, config, shards = prepare(work, args.seq, args.dupe_factor)
    config.write_text(json.dumps(minilm_config(args.layers), indent=1))
    gas = gas_for(args.m, args.depth)
    warmup = 2
    jobs = {"job": f"models.bert{args.layers}.depth={args.depth}"}
    jobs.update({f"job {spec}": spec for spec in args.compare_module})
    rows: dict[str, list[float]] = {name: [] for name in jobs}
    rows.update({"transformers": [], "single": []})
    logs: dict[str, list[str]] = {}
    for r in range(args.repeats):
        for name, module in jobs.items():
            job = run_job(config, vocab, shards, args.seq, args.b, gas,
                          args.steps + warmup + 2, module, work)
            rows[name].append(job["samples_per_second"])
            logs[name] = job["log"]
        for kind in ("transformers", "single"):
            rows[kind].append(run_loop(kind, config, shards, args.b, args.m, args.steps,
                                       warmup)["samples_per_second"])
        print(f"[job_bench] repeat {r + 1}/{args.repeats}: "
              + ", ".join(f"{k} {v[-1]:.2f} samples/s" for k, v in rows.items()), flush=True)
    def per_repeat(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(rows[a], rows[b])]

    ratios = {"job / transformers": per_repeat("job", "transformers"),
              "job / single": per_repeat("job", "single"),
              "single / transformers": per_repeat("single", "transformers")}
    for name in list(jobs)[1:]:
        ratios[f"{name} / single"] = per_repeat(name, "single")
        ratios[f"job / {name}"] = per_repeat("job", name)
    result = {"settings": {**vars(args), "gradient_accumulation_steps": gas},
              "samples_per_second": rows, "ratios": ratios, "job_log": logs["job"],
              "job_logs": logs,
              "date": time.strftime("%Y-%m-%d")}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Whole job vs single-process loops ({result['date']})", "",
             f"BERT {args.layers} x 384, vocab {VOCAB_SIZE}, sequence {args.seq}, microbatch "
             f"{args.b}, {args.m} microbatches per update, depth {args.depth}, one thread per "
             f"process, {args.repeats} repeats (median, min..max).", "",
             "| variant | samples/s |", "|---|---:|"]
    for k, v in rows.items():
        lines.append(f"| {k} | {statistics.median(v):.2f} ({min(v):.2f}..{max(v):.2f}) |")
    lines += ["", "Ratios within each repeat (the variants run one after another in every "
              "repeat):", "", "| ratio | median | min..max | per repeat |", "|---|---:|---:|---|"]
    for k, v in ratios.items():
        lines.append(f"| {k} | {statistics.median(v):.2f} | {min(v):.2f}..{max(v):.2f} | "
                     + ", ".join(f"{x:.2f}" for x in v) + " |")
    for name, log in logs.items():
        lines += ["", f"`{name}` ({jobs[name]}): the job's own start lines and report (last "
                  "repeat):", "", "```"]
        lines += log + ["```"]
    lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


def gas_for(m: int, depth: int) -> int:
    """``--gradient_accumulation_steps`` for ``m`` microbatches per update: under 2bw the job
    runs ``depth x gas`` (PipeDream-2BW's meaning)."""
    if m % depth:
        raise SystemExit(f"--m {m} is not a multiple of --depth {depth}")
    return m // depth


if __name__ == "__main__":
    main()
