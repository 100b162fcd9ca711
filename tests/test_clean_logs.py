"""What a user reads: the output of the jobs holds our lines and Ray's start-up lines, nothing that
looks like a crash (no aborted split coordinators, tracebacks or deprecation warnings).

Each run is a process with its own Ray, as a user runs it, whose workers' output reaches the
driver's stderr (Ray's default), so anything a Ray Data coordinator prints is captured here.
"""

from __future__ import annotations

import re
import subprocess
import textwrap

from job_helpers import PY, ROOT, TINY, env, run

# Lines that read as a crash or as something the user must fix.
BAD = re.compile(r"Traceback|Fatal Python error|SIGABRT|Aborted|[Dd]eprecat|FutureWarning")


def bad_lines(*outputs: str) -> list[str]:
    return [line for out in outputs for line in out.splitlines() if BAD.search(line)]


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


def test_two_epochs_of_pretraining_then_fine_tuning_print_no_crash_lines(shards, tmp_path):
    ck = tmp_path / "ck"
    pre = run(["jobs/pretrain_bert24.py", *TINY, "--train_path", shards, "--num_train_epochs", 2,
               "--train_batch_size", 8, "--gradient_accumulation_steps", 1, "--num_replicas", 2,
               "--checkpoint_dir", ck, "--log_every", 20])
    assert "end of epoch 1" in pre.stdout
    assert bad_lines(pre.stdout, pre.stderr) == [], pre.stderr[-4000:]
    # the split coordinators' datasets: one per epoch trained, none read past the last step
    assert pre.stderr.count("execution finished") <= 2, pre.stderr[-4000:]
    glue = run(["jobs/finetune_glue.py", "--data_dir", ROOT / "data/sample/glue", "--task_name",
                "SST-2", "--do_train", "--do_eval", "--checkpoint_path", ck,
                "--max_seq_length", 32, "--train_batch_size", 16, "--num_train_epochs", 1,
                "--num_cpus_per_replica", 0.5, "--output_dir", tmp_path / "glue"])
    assert "dev: accuracy" in glue.stdout
    assert bad_lines(glue.stdout, glue.stderr) == [], glue.stderr[-4000:]
