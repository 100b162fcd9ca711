"""The jobs as users run them: plain python with a local Ray, `ray job submit` against a real
`ray start --head`, and a two-node cluster. Each job runs in its own process and Ray cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch

from job_helpers import PY, ROOT, TINY, env, final_weights, processes_mentioning, run


def test_throughput_mode_writes_iteration_times_and_stage_fractions(shards, tmp_path):
    out = tmp_path / "throughput.json"
    p = run(["jobs/pretrain_bert24.py", *TINY, "--train_path", shards, "--num_minibatches", 8,
             "--train_batch_size", 4, "--gradient_accumulation_steps", 2,
             "--output_json", out])
    assert "samples/s" in p.stdout
    m = json.loads(out.read_text())
    assert m["mode"] == "throughput" and m["iterations"] == 8
    assert len(m["iteration_times_s"]) == 7 and all(t > 0 for t in m["iteration_times_s"])
    assert m["samples_per_iteration"] == 8
    assert m["samples_per_second"] == pytest.approx(8 / m["mean_iteration_time_s"])
    assert set(m["stages"]) == {"0.0", "1.0"}
    for st in m["stages"].values():
        assert st["compute"] > 0
        assert st["compute"] + st["communication"] + st["idle"] == pytest.approx(1.0, abs=0.02)
        assert st["memory_bytes"]["weights"] > 0
    assert len({v["pid"] for v in m["placement"].values()}) == 2


def test_resume_at_an_epoch_boundary_equals_an_uninterrupted_run(shards, tmp_path):
    common = ["jobs/pretrain_bert24.py", *TINY, "--train_path", shards, "--num_train_epochs", 2,
              "--train_batch_size", 16, "--gradient_accumulation_steps", 2,
              "--learning_rate", "5e-4", "--seed", 5]
    run(common + ["--checkpoint_dir", tmp_path / "a"])
    stopped = run(common + ["--checkpoint_dir", tmp_path / "b", "--stop_after_epoch", 0])
    assert "stopping after epoch 0" in stopped.stdout
    assert len(list((tmp_path / "b").glob("step-*"))) == 1
    resumed = run(common + ["--checkpoint_dir", tmp_path / "b", "--resume"])
    assert "resumed from" in resumed.stdout
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [json.loads(x)["loss"] for x in open(tmp_path / "a" / "train_log.jsonl")]
    lb = [json.loads(x)["loss"] for x in open(tmp_path / "b" / "train_log.jsonl")]
    assert la == lb


def start_head(tmp: Path, port: int, dash: int) -> subprocess.Popen:
    """`ray start --head` on loopback, in its own temp dir (so that it can be cleaned up without
    `ray stop`, which would stop every Ray on the machine)."""
    e = env(PATH=f"{Path(PY).parent}:{os.environ['PATH']}", RAY_AUTH_MODE="token")
    e.pop("RAY_ADDRESS")
    return subprocess.Popen(
        [str(Path(PY).parent / "ray"), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=2",
         f"--temp-dir={tmp}", "--disable-usage-stats"],
        env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop_head(proc: subprocess.Popen, tmp: Path) -> None:
    """Stop the head and every process it started (they all mention its temp dir)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.time() + 20
    while time.time() < deadline:
        left = [p for p in processes_mentioning(str(tmp)) if p != os.getpid()]
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)


def submit(address: str, args: list, timeout: float = 600) -> str:
    """`ray job submit --working-dir . -- python ...`, as a user types it; returns its output
    (the job's logs and the final status line)."""
    e = env(PATH=f"{Path(PY).parent}:{os.environ['PATH']}", RAY_AUTH_MODE="token")
    e.pop("RAY_ADDRESS")
    deadline = time.time() + 120
    while True:
        p = subprocess.run([str(Path(PY).parent / "ray"), "job", "submit", "--address", address,
                            "--working-dir", ".", "--", "python", *[str(a) for a in args]],
                           cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
        out = p.stdout + p.stderr
        # A fresh head answers HTTP before its job agent is up; Ray says to try again later.
        if p.returncode == 0 or "No available agent" not in out or time.time() > deadline:
            break
        time.sleep(3)
    assert p.returncode == 0 and "succeeded" in out, out[-4000:]
    return out


def test_ray_job_submit_pretrain_then_finetune(shards, tmp_path):
    tmp = Path(f"/tmp/pd2bw-head-{os.getpid()}")
    head = start_head(tmp, 6493, 8293)
    address = "http://127.0.0.1:8293"
    try:
        import urllib.error
        import urllib.request

        deadline = time.time() + 90
        while True:     # the dashboard (job server) answers once the head is up
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break       # it answered (401: token auth is on, as by default)
            except Exception:
                if time.time() > deadline or head.poll() is not None:
                    raise AssertionError("ray start --head did not come up")
                time.sleep(1)
        ckpt = tmp_path / "ckpt"
        logs = submit(address, ["jobs/pretrain_bert24.py", *TINY, "--train_path", shards,
                                "--num_train_epochs", 1, "--train_batch_size", 16,
                                "--gradient_accumulation_steps", 2, "--checkpoint_dir", ckpt])
        assert "[pretrain] step" in logs and "end of epoch 0" in logs
        out = tmp_path / "glue"
        logs = submit(address, ["jobs/finetune_glue.py", "--data_dir", ROOT / "data/sample/glue",
                                "--task_name", "SST-2", "--do_train", "--do_eval", "-m",
                                "models.bert4.depth=2", "--num_stages", 2, "--checkpoint_path",
                                ckpt, "--epoch", 0, "--max_seq_length", 32,
                                "--num_train_epochs", 1, "--num_cpus_per_replica", 0.5,
                                "--output_dir", out])
        assert "[glue] SST-2 dev: accuracy" in logs
        scores = json.loads((out / "scores_sst-2.json").read_text())
        assert scores["pretraining_epoch"] == 0
        assert 0.0 <= scores["scores"]["dev"]["accuracy"] <= 1.0
    finally:
        stop_head(head, tmp)


TWO_NODES = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address,
             runtime_env={"env_vars": {"PYTHONPATH": sys.argv[1], "OMP_NUM_THREADS": "1"}})
    sys.path.insert(0, sys.argv[1])
    from jobs.pretrain_bert24 import build_parser, run
    try:
        out = run(build_parser().parse_args(sys.argv[2:]))
        print("RESULT " + json.dumps(out["placement"]))
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_two_node_cluster_spreads_replicas_over_nodes(shards, tmp_path):
    p = run(["-c", TWO_NODES, ROOT, *TINY, "--num_cpus_per_stage", "1", "--train_path", shards,
             "--num_replicas", 2, "--num_minibatches", 3, "--train_batch_size", 4,
             "--gradient_accumulation_steps", 2, "--output_json", tmp_path / "t.json"])
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
    placement = json.loads(line[len("RESULT "):])
    node = {k: v["node_id"] for k, v in placement.items()}
    assert set(node) == {"0.0", "0.1", "1.0", "1.1"}
    assert node["0.0"] != node["0.1"] and node["1.0"] != node["1.1"]      # replicas spread
    assert node["0.0"] == node["1.0"] and node["0.1"] == node["1.1"]      # pipelines local
