"""Failures: a stage actor killed mid-run, the driver killed mid-run, NaN losses and gradients,
and bad input rejected before any work with a message saying what is wrong."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from job_helpers import PY, ROOT, TINY, env, final_weights
from pd2bw_ray import (ActorResources, NonFiniteError, PipelineConfig, PipelineTrainer)
from pipeline_helpers import NanAfter, NanGradAfter
from test_exactness import OPTIMIZERS

RECOVERY = [*TINY, "--num_replicas", "2", "--num_train_epochs", "1", "--train_batch_size", "8",
            "--gradient_accumulation_steps", "1", "--checkpoint_every", "4",
            "--learning_rate", "5e-4", "--seed", "11", "--comm_timeout", "30"]


def stage_actors(ray):
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if "pd2bw" in a["name"] and ":stage" in a["name"]]


def test_a_killed_stage_actor_is_replaced_and_the_run_ends_as_if_nothing_happened(
        ray_cluster, shards, tmp_path):
    from jobs.pretrain_bert24 import build_parser, run

    ray = ray_cluster
    args = RECOVERY + ["--train_path", str(shards)]
    clean = run(build_parser().parse_args(args + ["--checkpoint_dir", str(tmp_path / "a")]),
                log=lambda *_: None)
    assert clean["failures"] == 0
    killed = []

    def kill_after_first_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline and not (tmp_path / "b" / "step-00000004").exists():
            time.sleep(0.05)
        time.sleep(0.3)     # mid-way through the next steps
        for name in stage_actors(ray):
            if name.endswith("stage1:replica1"):
                ray.kill(ray.get_actor(name, namespace=ray.get_runtime_context().namespace))
                killed.append(name)

    killer = threading.Thread(target=kill_after_first_checkpoint)
    killer.start()
    lines: list[str] = []
    out = run(build_parser().parse_args(args + ["--checkpoint_dir", str(tmp_path / "b")]),
              log=lines.append)
    killer.join()
    assert killed, "the actor to kill was never found"
    assert out["failures"] == 1
    assert any("stage 1 replica 1 died" in x for x in lines), lines
    assert any("restarting the pipeline from" in x for x in lines)
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [json.loads(x) for x in open(tmp_path / "a" / "train_log.jsonl")]
    lb = [json.loads(x) for x in open(tmp_path / "b" / "train_log.jsonl")]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert not stage_actors(ray)


def test_a_killed_driver_resumes_from_its_newest_checkpoint(shards, tmp_path):
    base = [PY, "jobs/pretrain_bert24.py", *RECOVERY, "--num_replicas", "1", "--train_path",
            str(shards)]
    subprocess.run(base + ["--checkpoint_dir", str(tmp_path / "a")], cwd=ROOT, env=env(),
                   check=True, capture_output=True, timeout=600)
    job = subprocess.Popen(base + ["--checkpoint_dir", str(tmp_path / "b")], cwd=ROOT,
                           env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "b" / "step-00000008").exists():
        assert time.time() < deadline and job.poll() is None, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(job.pid, signal.SIGKILL)            # the driver dies (its local Ray goes with it)
    job.wait()
    done = {int(p.name.split("-")[1]) for p in (tmp_path / "b").glob("step-*")}
    total = {int(p.name.split("-")[1]) for p in (tmp_path / "a").glob("step-*")}
    assert max(done) < max(total), "the driver was killed too late to test anything"
    p = subprocess.run(base + ["--checkpoint_dir", str(tmp_path / "b"), "--resume"], cwd=ROOT,
                       env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("bad,expect", [
    (NanAfter(5), r"stage 2 replica 0: the loss is nan at step \d+ microbatch \d"),
    (NanGradAfter(5), r"stage \d replica 0: non-finite gradient at step \d+"),
])
def test_nan_loss_or_gradient_stops_with_a_clear_message(ray_cluster, bad, expect):
    torch.manual_seed(0)
    mods = [nn.Linear(5, 5).double(), bad, nn.Linear(5, 5).double()]
    g = torch.Generator().manual_seed(0)
    steps = [[(torch.randn(2, 5, generator=g, dtype=torch.float64),
               torch.randn(2, 5, generator=g, dtype=torch.float64)) for _ in range(3)]
             for _ in range(6)]
    trainer = PipelineTrainer(mods, nn.MSELoss(),
                              PipelineConfig([0, 1, 2], {"0": [0], "1": [1], "2": [2]}),
                              OPTIMIZERS["sgd"], num_microbatches=3,
                              resources=ActorResources(num_cpus=0.5))
    with pytest.raises(NonFiniteError, match=expect):
        trainer.train(steps)
    trainer.shutdown()
    time.sleep(1)
    assert not stage_actors(ray_cluster)


def test_nan_in_a_job_keeps_the_last_good_checkpoint(ray_cluster, shards, tmp_path):
    from jobs.pretrain_bert24 import build_parser, run

    ck = tmp_path / "ck"
    args = build_parser().parse_args(RECOVERY + ["--train_path", str(shards), "--num_replicas",
                                                 "1", "--checkpoint_dir", str(ck),
                                                 "--learning_rate", "1e9",
                                                 "--max_grad_norm", "0",
                                                 "--warmup_proportion", "0"])
    lines: list[str] = []
    with pytest.raises(NonFiniteError):
        run(args, log=lines.append)
    assert any("the last good checkpoint is" in x for x in lines), lines
    from pd2bw_ray.checkpoint import latest_checkpoint
    good = latest_checkpoint(ck)
    if good is not None:               # every checkpoint written before the NaN verifies
        assert all(torch.isfinite(v).all() for f in good.path.glob("stage*weights*")
                   for v in __import__("safetensors.torch").torch.load_file(f).values())
    assert not stage_actors(ray_cluster)


# ------------------------------------------------------------------------------------------------
# bad input: a message naming the problem, before any stage actor starts


def _bad_inputs(tmp: Path, shards: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (pre-training flags replacing the good ones, expected message)."""
    cfg = json.loads((ROOT / "configs" / "bert_config_demo.json").read_text())
    vocab_lines = (ROOT / "data" / "sample" / "vocab.txt").read_text().splitlines()
    (tmp / "bad_conf.json").write_text('{"module_to_stage_map": [0, 1, 1],\n'
                                       ' "stage_to_rank_map": {"0": [0] "1": [1]}}\n')
    (tmp / "bad_bert.json").write_text(json.dumps(cfg, indent=1)[:-3] + "\n")
    (tmp / "no_mask_vocab.txt").write_text("\n".join(x for x in vocab_lines
                                                     if x != "[MASK]") + "\n")
    (tmp / "empty.txt").write_text("\n\n")
    cols = tmp / "cols"
    cols.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1, 1]]}),
                   cols / "shard-00000.parquet")
    return {
        "missing train data": (["--train_path", str(tmp / "nowhere")],
                               r"--train_path .*nowhere: no such file or directory"),
        "vocab is a directory": (["--vocab_path", str(tmp)],
                                 r"is a directory; pass --vocab_path with the vocab.txt file"),
        "missing vocab": (["--vocab_path", str(tmp / "no_vocab.txt")],
                          r"--vocab_path .*no_vocab.txt: no such file"),
        "missing bert config": (["--bert_config_path", str(tmp / "no_bert.json")],
                                r"--bert_config_path .*no_bert.json: no such file"),
        "missing conf": (["--config_path", str(tmp / "no_conf.json")],
                         r"--config_path .*no_conf.json: no such file"),
        "malformed conf": (["--config_path", str(tmp / "bad_conf.json")],
                           r"bad_conf.json:2:\d+: malformed JSON"),
        "malformed bert config": (["--bert_config_path", str(tmp / "bad_bert.json")],
                                  r"bad_bert.json:\d+:\d+: .*JSON"),
        "vocab without [MASK]": (["--vocab_path", str(tmp / "no_mask_vocab.txt")],
                                 r"no_mask_vocab.txt: vocab lacks the special token\(s\) \[MASK\]"),
        "sequence too long": (["--max_seq_length", "4096"],
                              r"--max_seq_length 4096 exceeds max_position_embeddings=\d+"),
        "empty corpus": (["--train_path", str(tmp / "empty.txt")], r"empty.txt, read as lines\) has no documents with text"),
        "shard without columns": (["--train_path", str(cols)],
                                  r"shard-00000.parquet: shard lacks column\(s\) token_type_ids, "
                                  r".*masked_lm_labels"),
    }


def _flags(base: list[str], override: list[str]) -> list[str]:
    out = list(base)
    for flag, value in zip(override[::2], override[1::2]):
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


def test_bad_input_fails_before_any_stage_actor_starts(ray_cluster, shards, tmp_path):
    from jobs.finetune_glue import build_parser as glue_parser
    from jobs.finetune_glue import run as glue_run
    from jobs.pretrain_bert24 import build_parser, run

    ray = ray_cluster
    base = RECOVERY + ["--train_path", str(shards), "--num_replicas", "1", "--checkpoint_dir",
                       str(tmp_path / "ck")]
    for case, (override, expect) in _bad_inputs(tmp_path, shards).items():
        with pytest.raises(ValueError, match=expect) as err:
            run(build_parser().parse_args(_flags(base, override)), log=lambda *_: None)
        assert not stage_actors(ray), case
        print(f"{case}: {err.value}")

    # a checkpoint to resume and to fine-tune: 2 stages, 2 updates
    good = run(build_parser().parse_args(base + ["--max_steps", "2"]), log=lambda *_: None)
    assert good["checkpoint"]
    from pd2bw_ray.checkpoint import CheckpointError

    resume = _flags(base, ["--module", "models.bert4.depth=1"]) + ["--resume"]
    with pytest.raises(ValueError, match=r"step-00000002 was trained with --module "
                                         r"models.bert4.layers=2,2; this run asks for "
                                         r"models.bert4.layers=4"):
        run(build_parser().parse_args(resume), log=lambda *_: None)
    assert not stage_actors(ray)

    glue = ["--data_dir", str(ROOT / "data" / "sample" / "glue"), "--task_name", "SST-2",
            "--do_train", "--do_eval", "--checkpoint_path", str(tmp_path / "ck"),
            "--max_seq_length", "32", "--output_dir", str(tmp_path / "glue")]
    for override, expect in [
        (["--data_dir", str(tmp_path / "no_glue")], r"no_glue"),
        (["--task_name", "SST-3"], r"SST-3.*(CoLA|SST-2)"),
        (["--num_stages", "4"], r"--num_stages 4, but .* has 2"),
    ]:
        with pytest.raises((ValueError, CheckpointError), match=expect) as err:
            glue_run(glue_parser().parse_args(_flags(glue, override)), log=lambda *_: None)
        assert not stage_actors(ray), override
        print(f"{override}: {err.value}")
