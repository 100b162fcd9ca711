"""The planner as users reach it: ``--module ...depth=auto`` through the pre-training job, and
``python -m pd2bw_ray.plan`` from outside the repo after a plain (non-editable) install."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from job_helpers import ROOT, TINY, env, run


def test_depth_auto_plans_for_the_cluster_it_runs_on_and_trains(shards, tmp_path):
    flags = list(TINY)
    flags[flags.index("--module") + 1] = "models.bert4.depth=auto"
    out, profile = tmp_path / "throughput.json", tmp_path / "profile.json"
    p = run(["jobs/pretrain_bert24.py", *flags, "--train_path", shards, "--num_minibatches", 3,
             "--train_batch_size", 4, "--microbatch_sizes", "2,4", "--output_json", out,
             "--profile_path", profile])
    # the workers of the job's own (local) Ray: its CPUs at --num_cpus_per_stage 0.5 each
    planning = re.search(r"\[pretrain\] planning models.bert4.depth=auto for (\d+) workers "
                         r"\((\d+) per node, CPUs\), .* each, global batch (\d+)", p.stdout)
    assert planning, p.stdout[-3000:]
    workers, batch = int(planning[1]), int(planning[3])
    assert workers == int(os.cpu_count() / 0.5)
    assert batch == 4 * 1 * workers     # --train_batch_size x gas x workers
    chosen = re.search(r"\[pretrain\] planner chose (\d+) stages x (\d+) replicas, layers per "
                       r"stage \[([0-9, ]+)\] \((\S+)\), microbatch (\d+), m=(\d+)", p.stdout)
    assert chosen, p.stdout[-3000:]
    d, w, b, m = (int(chosen[i]) for i in (1, 2, 5, 6))
    assert d * w == workers and b * m * w == batch and m >= d
    assert "samples/s" in p.stdout.split("planner chose")[0]        # the table it chose from
    # the run is the plan: its start line and its measurements
    line = next(x for x in p.stdout.splitlines() if x.startswith("[pretrain] BERT "))
    assert f"on {d} stages x {w} replicas" in line and "(chosen by the planner)" in line
    assert f"m={m} microbatches" in line and f"microbatch {b}," in line
    result = json.loads(out.read_text())
    assert (result["num_stages"], result["num_replicas"]) == (d, w)
    assert result["num_microbatches"] == m and result["samples_per_iteration"] == batch
    assert result["iterations"] == 3
    assert all(math.isfinite(x) and x > 0 for x in result["losses"])
    # it profiled the optimizer the stages train with (fused AdamW), whose update costs about a
    # fifth of torch's per-tensor Adam on CPU
    assert json.loads(profile.read_text())["description"]["optimizer"] == "BertAdamW"


def test_the_planner_command_runs_outside_the_repo_from_a_plain_install(tmp_path):
    """A fresh venv, ``pip install --no-deps .`` (a wheel is built and installed: not
    editable), then ``python -m pd2bw_ray.plan`` from a directory outside the repo, with the
    heavy dependencies (torch, ray) borrowed from the test's own environment."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site_dir = Path(subprocess.run([str(py), "-c", "import sysconfig; "
                                    "print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
    # borrowed packages come after the venv's own (a .pth file appends them to sys.path); the
    # .pth files of the borrowed directory (our editable install) are not processed
    borrowed = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site_dir / "borrowed.pth").write_text("\n".join(borrowed) + "\n")
    build = tmp_path / "src"
    # the repo, or under bin/test-installed (tests run from a copy without pd2bw_ray/) its source
    source = Path(os.environ.get("PD2BW_INSTALLED_SOURCE") or ROOT)
    files = subprocess.run(["git", "-C", str(source), "ls-files", "-co", "--exclude-standard"],
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:                     # a clean copy of the tree, as a user's checkout
        if (source / f).is_file():
            (build / f).parent.mkdir(parents=True, exist_ok=True)
            (build / f).write_bytes((source / f).read_bytes())
    e = env()
    e.pop("PYTHONPATH", None)
    pip = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                          "--no-index", str(build)], capture_output=True, text=True, env=e,
                         cwd=tmp_path, timeout=300)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [str(py), "-c", "import importlib.util, pd2bw_ray; print(pd2bw_ray.__file__); "
         "print(importlib.util.find_spec('stages'), importlib.util.find_spec('data'))"],
        capture_output=True, text=True, env=e, cwd=elsewhere, check=True).stdout.split("\n")
    assert where[0].startswith(str(site_dir)), where     # the installed copy, not the repo
    assert where[1] == "None None", where                 # the repo-only packages are absent
    assert not (site_dir / "__editable__.pd2bw_ray-0.1.0.pth").exists()
    profile = ROOT / "bench" / "results" / "planner_profile_small_bert.json"
    p = subprocess.run([str(py), "-m", "pd2bw_ray.plan", "--profile_path", str(profile),
                        "--num_workers", "4", "--memory_per_worker", "1GiB",
                        "--global_batch_size", "32", "--output_dir", "plan"],
                       capture_output=True, text=True, env=e, cwd=elsewhere, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "chosen: depth" in p.stdout and "samples/s" in p.stdout
    conf = json.loads((elsewhere / "plan" / "conf.json").read_text())
    assert sum(len(r) for r in conf["stage_to_rank_map"].values()) == 4


def test_depth_auto_with_given_workers_of_no_cpu_shares_the_clusters_memory(ray_cluster,
                                                                             tmp_path):
    """--num_workers for stages of --num_cpus_per_stage 0 (which Ray cannot count): the memory
    per worker is the cluster's over the workers, and the saved profile is reused."""
    from jobs.pretrain_bert24 import build_parser, plan_for_cluster
    from pd2bw_ray.planner import format_bytes
    from stages import BertModelConfig
    from stages.bert_planner import profile_bert

    cfg = BertModelConfig.from_json(ROOT / "configs" / "bert_config_tiny.json")
    path = tmp_path / "tiny.profile.json"
    profile_bert(cfg, seq_length=16, microbatch_sizes=(1, 2), repeats=1).save(path)
    args = build_parser().parse_args([
        "--module", "models.bert4.depth=auto", "--num_cpus_per_stage", "0", "--num_workers", "2",
        "--max_seq_length", "16", "--train_batch_size", "2", "--microbatch_sizes", "1,2",
        "--profile_path", str(path)])
    lines: list[str] = []
    plan = plan_for_cluster(args, cfg, lines.append)
    nodes = [n for n in ray_cluster.nodes() if n.get("Alive")]
    memory = int(sum(n["Resources"].get("memory", 0) for n in nodes)) // 2
    assert f"for 2 workers (2 per node, CPUs), {format_bytes(memory)} each, global batch 4" \
        in lines[0]
    assert plan.pipeline_config.world_size == 2
    assert any(x.startswith("[pretrain] planner chose") for x in lines)
