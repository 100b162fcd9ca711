"""What a job's start costs: the Ray cluster it joins or starts, and what its worker processes
import. Each check runs in a process of its own (a Ray of its own, a clean ``sys.modules``)."""

from __future__ import annotations

import json
import subprocess
import sys

from job_helpers import ROOT, env


def python(code: str, **extra_env) -> str:
    e = env(**extra_env)
    e.pop("PYTHONPATH", None)
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip().splitlines()[-1]


def test_the_data_streams_read_path_imports_no_torch():
    """Ray Data's read workers and split coordinators import ``data.streaming`` for its map
    function and need only pyarrow; torch would cost each of them about 2 s of CPU at every
    job's start. The tensors are made where the trainer takes them."""
    out = python("import sys, data.streaming, data.shards; print('torch' in sys.modules)")
    assert out == "False"
    out = python("import sys, pyarrow as pa, torch; from data.shards import table_to_microbatch; "
                 "t = pa.table({c: pa.array([[1, 2]], pa.list_(pa.int64())) for c in "
                 "('input_ids', 'token_type_ids', 'attention_mask', 'masked_lm_labels')} | "
                 "{'next_sentence_label': pa.array([1], pa.int64())}); "
                 "(i, tt, am, ml), (lab, nsp) = table_to_microbatch(t); "
                 "print(type(i).__name__, i.dtype, nsp.tolist())")
    assert out == "Tensor torch.int64 [1]"


def test_a_local_cluster_gives_workers_the_repo_without_a_runtime_environment():
    """A Ray the job starts inherits the repo root on PYTHONPATH: its workers import stages/ and
    data/ with no runtime environment (which would start each through Ray's setup process)."""
    code = ("import json, os, ray; from jobs.ray_cluster import init_ray; init_ray(); "
            "f = ray.remote(lambda: (__import__('stages.partition').__name__, "
            "ray.get_runtime_context().runtime_env, os.environ['PYTHONPATH'])); "
            "print(json.dumps(ray.get(f.remote())))")
    mod, runtime_env, path = json.loads(python(code, RAY_ADDRESS="local"))
    assert mod == "stages" and runtime_env == {}
    assert path.split(":")[0] == str(ROOT)


def test_only_a_new_local_cluster_takes_the_path_from_the_environment():
    """An address to join names a cluster that did not inherit this environment: the job's
    runtime environment carries the path there."""
    from jobs.ray_cluster import _starts_a_local_cluster

    assert _starts_a_local_cluster("local")
    assert not _starts_a_local_cluster("127.0.0.1:6379")


def test_a_wrong_flag_is_answered_before_torch_loads():
    """Flags that contradict each other are refused at once (torch and transformers take over
    ten seconds to import on a small machine), with exit status 2 and the message."""
    code = ("import sys; from jobs.pretrain_bert24 import main; "
            "rc = main(['--module', 'models.bert4.depth=2', '--do_train', '--num_train_epochs', "
            "'1', '--train_path', 'data/sample/corpus.txt', '--bert_config_path', "
            "'configs/bert_config_demo.json', '--vocab_path', 'data/sample/vocab.txt']); "
            "print(rc, 'torch' in sys.modules)")
    e = env()
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True,
                       text=True, timeout=120)
    assert p.stdout.split() == ["2", "False"], p.stderr[-2000:]
    assert "--num_train_epochs needs --checkpoint_dir" in p.stderr
