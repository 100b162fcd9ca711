"""What a user reads: the output of the jobs holds our lines and Ray's start-up lines, nothing that
looks like a crash (no aborted split coordinators, tracebacks or deprecation warnings).

The jobs' own runs are checked where they run anyway: two epochs of pre-training with 2
replicas, stopped and resumed, in `test_jobs.py` (resume at an epoch boundary), and fine-tuning
from a pre-training checkpoint in `test_hf_cli.py`.

Each run is a process with its own Ray, as a user runs it, whose workers' output reaches the
driver's stderr (Ray's default), so anything a Ray Data coordinator prints is captured here.
"""

from __future__ import annotations

import subprocess
import textwrap

from job_helpers import PY, ROOT, bad_lines, env


def test_a_stream_closed_before_its_next_epoch_leaves_no_aborted_coordinator(shards):
    # Two replicas read through streaming_split; the split of epoch 1 is made while epoch 0 is
    # read, and the consumer stops after one step, before any reader started epoch 1. Dropping
    # that split's coordinator unstarted used to abort it (SIGABRT, "Fatal Python error").
    script = textwrap.dedent(f"""
        import time, ray
        from data.streaming import PretrainingStream, StreamConfig
        ray.init(num_cpus=2, include_dashboard=False,
                 runtime_env={{"env_vars": {{"PYTHONPATH": {str(ROOT)!r}}}}})
        stream = PretrainingStream(StreamConfig(shards=({str(shards)!r},), train_batch_size=4,
                                                microbatches=2, num_replicas=2, seed=1))
        it = iter(stream)
        step = next(it)
        assert len(step) == 4
        stream.close()
        time.sleep(4)   # the coordinators' handles are gone; Ray ends them meanwhile
        print("closed after one step", flush=True)
    """)
    p = subprocess.run([PY, "-c", script], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "closed after one step" in p.stdout
    assert bad_lines(p.stdout, p.stderr) == [], p.stderr[-4000:]
    assert "concurrency" not in p.stderr   # Ray Data's current arguments (compute=)
