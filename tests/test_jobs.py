"""The jobs as users run them: plain python with a local Ray, `ray job submit` against a real
`ray start --head`, and a two-node cluster. Each job runs in its own process and Ray cluster."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch

from job_helpers import (PY, ROOT, TINY, bad_lines, env, final_weights, processes_mentioning,
                         run)


def test_throughput_mode_writes_iteration_times_and_stage_fractions(shards, tmp_path):
    out = tmp_path / "throughput.json"
    p = run(["jobs/pretrain_bert24.py", *TINY, "--train_path", shards, "--num_minibatches", 8,
             "--train_batch_size", 4, "--gradient_accumulation_steps", 1,
             "--output_json", out, "--timeline", tmp_path / "tl", "--timeline_steps", 2])
    assert "samples/s" in p.stdout
    # --timeline: the last 2 steps as a Chrome trace and a picture
    trace = json.loads((tmp_path / "tl.json").read_text())
    computes = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["name"][0] in "FB"]
    assert {e["args"]["step"] for e in computes} == {6, 7}
    assert len(computes) == 2 * 2 * 2 * 2      # steps x stages x microbatches x (F, B)
    assert (tmp_path / "tl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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
    assert 0 <= m["data_wait"]["fraction"] < 1 and "data wait" in p.stdout


def test_resume_at_an_epoch_boundary_equals_an_uninterrupted_run(shards, tmp_path):
    """Two epochs on 2 stages x 2 replicas, uninterrupted against stopped after the first and
    resumed: the same weights and losses, and no line of any run reads as a crash."""
    common = ["jobs/pretrain_bert24.py", *TINY, "--train_path", shards, "--num_train_epochs", 2,
              "--train_batch_size", 8, "--num_replicas", 2, "--gradient_accumulation_steps", 1,
              "--learning_rate", "5e-4", "--seed", 5]
    whole = run(common + ["--checkpoint_dir", tmp_path / "a"])
    assert "end of epoch 1" in whole.stdout
    # the split coordinators' datasets: one per epoch trained, none read past the last step
    assert whole.stderr.count("execution finished") <= 2, whole.stderr[-4000:]
    stopped = run(common + ["--checkpoint_dir", tmp_path / "b", "--stop_after_epoch", 0])
    assert "stopping after epoch 0" in stopped.stdout
    assert len(list((tmp_path / "b").glob("step-*"))) == 1
    resumed = run(common + ["--checkpoint_dir", tmp_path / "b", "--resume"])
    assert "resumed from" in resumed.stdout
    for p in (whole, stopped, resumed):
        assert bad_lines(p.stdout, p.stderr) == [], p.stderr[-4000:]
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [json.loads(x)["loss"] for x in open(tmp_path / "a" / "train_log.jsonl")]
    lb = [json.loads(x)["loss"] for x in open(tmp_path / "b" / "train_log.jsonl")]
    assert la == lb


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(tmp: Path, port: int, dash: int, metrics: int) -> subprocess.Popen:
    """`ray start --head` on loopback, in its own temp dir (so that it can be cleaned up without
    `ray stop`, which would stop every Ray on the machine)."""
    e = env(PATH=f"{Path(PY).parent}:{os.environ['PATH']}", RAY_AUTH_MODE="token")
    e.pop("RAY_ADDRESS")
    return subprocess.Popen(
        [str(Path(PY).parent / "ray"), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=2",
         f"--metrics-export-port={metrics}",
         # its own agent port: the default (52365) is taken while another Ray runs here, as
         # the test session's own cluster does, and the job server then finds no agent
         f"--dashboard-agent-listen-port={free_port()}",
         '--system-config={"metrics_report_interval_ms": 1000}',
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


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The pd2bw metrics on a Ray metrics endpoint (Prometheus text): name -> [(labels, value)]."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, list] = {}
    for line in text.splitlines():
        m = re.match(r"(ray_pd2bw_\w+)\{(.*)\} (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m[2]))
            out.setdefault(m[1], []).append((labels, float(m[3])))
    return out


WANTED = {"ray_pd2bw_loss", "ray_pd2bw_samples_per_second", "ray_pd2bw_weight_updates",
          "ray_pd2bw_learning_rate", "ray_pd2bw_stage_time_fraction",
          "ray_pd2bw_stage_memory_bytes"}


def check_metrics(found: dict) -> None:
    """Sane values of a 2-stage x 1-replica BERT pre-training run's metrics."""
    (_, loss), = found["ray_pd2bw_loss"]
    assert 0 < loss < 20, loss
    (_, rate), = found["ray_pd2bw_samples_per_second"]
    assert 0 < rate < 1e5, rate
    (_, updates), = found["ray_pd2bw_weight_updates"]
    assert updates >= 1 and updates == int(updates)
    lrs = found["ray_pd2bw_learning_rate"]
    assert {x["stage"] for x, _ in lrs} == {"0", "1"} and all(0 < v < 1e-2 for _, v in lrs)
    fractions: dict[str, dict[str, float]] = {}
    for labels, v in found["ray_pd2bw_stage_time_fraction"]:
        assert 0.0 <= v <= 1.0, (labels, v)
        fractions.setdefault(labels["stage"], {})[labels["kind"]] = v
    assert set(fractions) == {"0", "1"}
    for stage, kinds in fractions.items():
        assert set(kinds) == {"compute", "comm", "wait", "idle"}, kinds
        assert abs(sum(kinds.values()) - 1) < 0.2, (stage, kinds)   # recorded together
        assert kinds["compute"] > 0.05, (stage, kinds)
    memory: dict[str, dict[str, float]] = {}
    for labels, v in found["ray_pd2bw_stage_memory_bytes"]:
        memory.setdefault(labels["stage"], {})[labels["kind"]] = v
    for stage, kinds in memory.items():
        # 2bw: two versions of the stage's weights; AdamW: two moments of each parameter
        assert kinds["weights"] > 100_000 and kinds["optimizer"] > 0.9 * kinds["weights"], kinds
    runs = {labels["run"] for name in WANTED for labels, _ in found[name]}
    assert len(runs) == 1, runs     # one trainer, its name on every metric


def test_ray_job_submit_pretrain_then_finetune(shards, tmp_path):
    """Against a real `ray start --head`: the pre-training job submitted with `ray job submit`
    succeeds, shows progress in its logs and its metrics on the head's Prometheus endpoint
    while it runs; then the fine-tuning job runs on its checkpoint and writes the scores."""
    import threading

    tmp = Path(f"/tmp/pd2bw-head-{os.getpid()}")
    metrics_port = 8294
    head = start_head(tmp, 6493, 8293, metrics_port)
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
        result: dict = {}

        def pretrain():
            try:
                result["logs"] = submit(address, [
                    "jobs/pretrain_bert24.py", *TINY, "--train_path", shards,
                    "--num_train_epochs", 1, "--train_batch_size", 16,
                    "--gradient_accumulation_steps", 1, "--checkpoint_dir", ckpt])
            except BaseException as e:  # noqa: BLE001 - re-raised below
                result["error"] = e

        job = threading.Thread(target=pretrain)
        job.start()
        found: dict = {}
        while job.is_alive():   # scrape while the job runs
            try:
                now = scrape(metrics_port)
            except OSError:
                now = {}
            if WANTED <= set(now):
                found = now
                optimizer = [v for labels, v in now["ray_pd2bw_stage_memory_bytes"]
                             if labels["kind"] == "optimizer"]
                # past a few updates, and the stages have recorded since they made their
                # optimizer state (a stage records at most once a second)
                if now["ray_pd2bw_weight_updates"][0][1] >= 3 and all(optimizer):
                    break
            time.sleep(0.5)
        job.join()
        if "error" in result:
            raise result["error"]
        assert WANTED <= set(found), sorted(found)
        check_metrics(found)
        logs = result["logs"]
        assert "[pretrain] step" in logs and "end of epoch 0" in logs
        assert (ckpt / "loss_curve.png").stat().st_size > 1000
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
             "--gradient_accumulation_steps", 1, "--output_json", tmp_path / "t.json"])
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))
    placement = json.loads(line[len("RESULT "):])
    node = {k: v["node_id"] for k, v in placement.items()}
    assert set(node) == {"0.0", "0.1", "1.0", "1.1"}
    assert node["0.0"] != node["0.1"] and node["1.0"] != node["1.1"]      # replicas spread
    assert node["0.0"] == node["1.0"] and node["0.1"] == node["1.1"]      # pipelines local


def test_zero_bubble_and_interleaved_jobs_give_the_same_losses(shards, tmp_path):
    """--schedule zb-h1 (4 ranks, split backward) and --schedule interleaved (4 modules as 2
    virtual stages on each of 2 ranks, whole backward) both have vanilla semantics: without
    dropout, their per-step losses (every one after the first computed on updated weights) are
    equal. Each schedule's exactness against a single-process reference is
    test_exactness_zero_bubble.py's and test_exactness_interleaved.py's."""
    cfg = json.loads((ROOT / "configs" / "bert_config_demo.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (tmp_path / "bert.json").write_text(json.dumps(cfg))
    common = ["jobs/pretrain_bert24.py", *TINY, "--module", "models.bert4.depth=4",
              "--bert_config_path", tmp_path / "bert.json", "--train_path", shards,
              "--num_minibatches", 4, "--train_batch_size", 4, "--num_cpus_per_stage", 0.25,
              "--seed", 3]
    losses, logs = {}, {}
    for schedule in ("zb-h1", "interleaved"):
        out = tmp_path / f"{schedule}.json"
        logs[schedule] = run(common + ["--schedule", schedule, "--output_json", out]).stdout
        record = json.loads(out.read_text())
        assert record["schedule"] == schedule and record["num_microbatches"] == 4
        losses[schedule] = record["losses"]
        # every rank of the pipeline reports (interleaved: 2 ranks holding 2 stages each)
        assert len(record["stages"]) == (2 if schedule == "interleaved" else 4)
        assert len(record["iteration_times_s"]) == 3
    assert "2 ranks per pipeline, 2 virtual stages each" in logs["interleaved"]
    assert losses["interleaved"] == pytest.approx(losses["zb-h1"], rel=1e-5)
    assert losses["zb-h1"][0] != pytest.approx(losses["zb-h1"][-1], rel=1e-3)   # it trained


def test_schedule_flags_refuse_what_cannot_run(shards, tmp_path):
    common = ["jobs/pretrain_bert24.py", *TINY, "--train_path", shards, "--num_minibatches", 1]
    bad = run(common + ["--virtual_stages", "2"], ok=False)
    assert bad.returncode != 0 and "only --schedule interleaved" in bad.stderr + bad.stdout
    odd = run(common + ["--module", "models.bert4.depth=3", "--schedule", "interleaved"],
              ok=False)
    assert odd.returncode != 0 and "3 modules do not split over 2 stages per rank" in (
        odd.stderr + odd.stdout)
    assert "Traceback" not in odd.stderr + bad.stderr
