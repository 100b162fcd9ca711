"""Helpers for tests that run the jobs as users do (a process and a Ray cluster of their own)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TINY = ["--module", "models.bert4.depth=2", "--bert_config_path",
        str(ROOT / "configs" / "bert_config_demo.json"), "--vocab_path",
        str(ROOT / "data" / "sample" / "vocab.txt"), "--do_train", "--do_lower_case",
        "--max_seq_length", "32", "--num_cpus_per_stage", "0.5", "--log_every", "5"]


# Lines in a job's output that read as a crash or as something the user must fix.
BAD = re.compile(r"Traceback|Fatal Python error|SIGABRT|Aborted|[Dd]eprecat|FutureWarning")


def bad_lines(*outputs: str) -> list[str]:
    return [line for out in outputs for line in out.splitlines() if BAD.search(line)]


def env(**extra):
    # RAY_ADDRESS=local: every job starts its own Ray, whatever else runs on this machine
    e = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0", OMP_NUM_THREADS="1",
             RAY_ADDRESS="local")
    e.update(extra)
    return e


def run(args, timeout=600, ok=True):
    p = subprocess.run([PY] + [str(a) for a in args], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=timeout)
    if ok and p.returncode != 0:
        raise AssertionError(f"{args[:2]} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-3000:]}")
    return p


def final_weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted(ckpt_dir.glob("step-*"))[-1]
    out = {}
    for f in sorted(last.glob("stage*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    return out


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids
