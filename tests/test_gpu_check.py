"""The GPU check (``python -m bench.gpu_check``) on a machine without a GPU: it refuses with a
clear message, and its checks, run on the CPU (a dry run), pass: the stage against the
single-process reference, the transport between two actors, and the BERT steps with the 2-stage
Ray pipeline against the in-process one. On a GPU machine the same functions run on CUDA."""

import json
import os
import subprocess
import sys

from job_helpers import ROOT

from bench.gpu_check import check_bert, check_stage, check_transport, main


def test_without_cuda_the_check_refuses_with_a_clear_message(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "bench.gpu_check needs a CUDA GPU and torch sees none" in p.stderr
    assert not (tmp_path / "gpu.json").exists()


def test_the_checks_pass_on_the_cpu(ray_cluster, tmp_path):
    stage = check_stage("cpu")
    assert stage["ok"], stage
    transport = check_transport(("cpu", "cpu"), timeout_s=3.0)
    assert transport["ok"], transport
    assert ("stage 0 replica 0: no gradient 1000 from stage 1 replica 0 (rank 1) within 3 s "
            "(is that stage hung?)") in transport["hung_peer"]["message"]
    bert = check_bert("cpu", str(ROOT / "configs" / "bert_config_tiny.json"), microbatch=2, m=2,
                      seq=32, num_steps=3, warmup=1)
    assert [r["variant"] for r in bert["rows"]] == [
        "transformers loop", "pd2bw 2bw d=1 (in-process)", "pd2bw gpipe d=1 (in-process)",
        "pd2bw 2bw d=2 (in-process)"]
    assert bert["rows"][2]["peak_in_flight"] == 2
    assert bert["rows"][2]["bf16_activation_mib_per_microbatch"] > 0
    assert bert["ray_two_stages"]["ok"], bert["ray_two_stages"]
