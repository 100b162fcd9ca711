"""The seed's three PipeDream-2BW commands, as its README prints them, run as a new user would:
only the launcher prefix replaced (``python -m launch ... main_with_runtime.py`` becomes
``python jobs/pretrain_bert24.py``, ``python -m torch.distributed.launch ... compute_glue_scores.py``
becomes ``python jobs/finetune_glue.py``), the placeholders filled with the bundled sample, and the
world scaled down to this machine (BERT-4 at depth 2 for BERT-24 at depth 8, 1 or 2 replicas,
32 tokens, a few iterations). Each job runs in its own process and Ray."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

from job_helpers import ROOT, TINY, run
from pd2bw_ray import PipelineConfig
from stages import BertModelConfig, build_bert_pipeline, parse_module_spec

# The seed's commands, verbatim (README of PipeDream-2BW's BERT scripts).
THROUGHPUT = r"""
python -m launch --nnodes 8 \
        --node_rank 0 \
        --nproc_per_node=8 \
        main_with_runtime.py \
        --master_addr MASTER_ADDR \
        --module models.bert24.depth=8 \
        --max_seq_length 128 \
        --train_batch_size 16 \
        --train_path TRAINING_DATA_PATH \
        --bert_config_path configs/bert_config_bert-large-uncased.json \
        --vocab_path TRAINING_DATA_PATH/vocab.txt \
        --do_train \
        --on_memory \
        --do_lower_case \
        --num_minibatches 200 \
        --gradient_accumulation_steps 1 \
        --config_path conf.json
"""
SEED_CONF = ("{'module_to_stage_map': [0, 1, 2, 3, 4, 5, 6, 7, 7], 'stage_to_rank_map': "
             "{'0': [0, 1, 2, 3, 4, 5, 6, 7], '1': [8, 9, 10, 11, 12, 13, 14, 15], "
             "'2': [16, 17, 18, 19, 20, 21, 22, 23], '3': [24, 25, 26, 27, 28, 29, 30, 31], "
             "'4': [32, 33, 34, 35, 36, 37, 38, 39], '5': [40, 41, 42, 43, 44, 45, 46, 47], "
             "'6': [48, 49, 50, 51, 52, 53, 54, 55], '7': [56, 57, 58, 59, 60, 61, 62, 63]}}")
PRETRAIN = r"""
python -u -m launch --nnodes 2 --node_rank 0 --nproc_per_node=8 main_with_runtime.py \
        --master_addr 10.185.12.207 \
        --module models.bert24.depth=8 \
        --config_path models/bert24/depth=8/dp_conf.json \
        --max_seq_length 128 \
        --train_batch_size 8 \
        --gradient_accumulation_steps 1 \
        --train_path <TRAIN_PATH> \
        --partitioned_data \
        --bert_config_path configs/bert_config_bert-large-uncased.json \
        --vocab_path <VOCAB_PATH> \
        --do_train \
        --on_memory \
        --do_lower_case \
        --num_train_epochs 30.0 \
        --learning_rate 2e-5 \
        --checkpoint_dir <CHECKPOINT_DIR>
"""
GLUE = r"""
python -u -m torch.distributed.launch --nproc_per_node=8 compute_glue_scores.py \
    --data_dir <DATA_DIR>  --task_name MNLI --do_train --do_eval \
    -m models.bert24.depth=8 \
    --bert_config_path configs/bert_config_bert-large-uncased.json \
    --checkpoint_path <CHECKPOINT_PATH> \
    --epoch 5 --num_stages 1
"""

# BERT-24 at depth 8 -> the demo's BERT-4 at depth 2; what this machine holds
SCALE_DOWN = [("models.bert24.depth=8", "models.bert4.depth=2"),
              ("models/bert24/depth=8/", "models/bert4/depth=2/"),
              ("configs/bert_config_bert-large-uncased.json", "configs/bert_config_demo.json"),
              ("--max_seq_length 128", "--max_seq_length 32"),
              ("--num_minibatches 200", "--num_minibatches 3"),
              ("--num_train_epochs 30.0", "--num_train_epochs 0.25"),
              ("--epoch 5", "--epoch 0"),
              ("--task_name MNLI", "--task_name SST-2")]     # the bundled GLUE task


def as_ours(seed_command: str, fill: dict[str, str]) -> list[str]:
    """The seed's command with only the launcher prefix replaced, placeholders filled, scaled
    down."""
    text = seed_command.replace("\\\n", " ")
    text = re.sub(r"python (-u )?-m launch .*? main_with_runtime\.py",
                  "python jobs/pretrain_bert24.py", text)
    text = re.sub(r"python (-u )?-m torch\.distributed\.launch .*? compute_glue_scores\.py",
                  "python jobs/finetune_glue.py", text)
    for old, new in fill.items():
        assert old in text, old         # every placeholder is filled
        text = text.replace(old, new)
    for old, new in SCALE_DOWN:
        text = text.replace(old, new)
    argv = shlex.split(text)
    assert argv[0] == "python"
    return argv[1:]


def start_line(stdout: str) -> str:
    return next(x for x in stdout.splitlines() if x.startswith("[pretrain] BERT "))


def test_the_seeds_three_commands_run_as_written(shards, tmp_path):
    data = tmp_path / "wiki"            # TRAINING_DATA_PATH: the shards and their vocab.txt
    shutil.copytree(shards, data)
    shutil.copy(ROOT / "data/sample/vocab.txt", data / "vocab.txt")
    assert len(list(data.glob("*.parquet"))) >= 2      # --partitioned_data: a file per replica

    # 1. throughput, with the seed's conf.json pasted as printed, scaled to 2 stages x 1 replica
    conf = tmp_path / "conf.json"
    conf.write_text("{'module_to_stage_map': [0, 1, 1], 'stage_to_rank_map': "
                    "{'0': [0], '1': [1]}}\n")
    assert SEED_CONF.startswith("{'module_to_stage_map': [0, 1, 2")   # the same form
    argv = as_ours(THROUGHPUT, {"MASTER_ADDR": "127.0.0.1", "TRAINING_DATA_PATH": str(data),
                                "--config_path conf.json": f"--config_path {conf}"})
    assert {"--gradient_accumulation_steps", "--on_memory"} <= set(argv)
    p = run(argv)
    line = start_line(p.stdout)
    # PipeDream's meaning: m = stages x --gradient_accumulation_steps = 2 x 1
    assert "on 2 stages x 1 replicas" in line, line
    assert "m=2 microbatches per update per replica (2 stages x --gradient_accumulation_steps 1)" \
        in line, line
    assert "--master_addr" in p.stdout and "ignored" in p.stdout
    assert "[pretrain] 3 iterations, steady state" in p.stdout
    written = re.search(r"\[pretrain\] metrics written to (\S+)", p.stdout)[1]
    out = json.loads(Path(written).read_text())
    assert out["iterations"] == 3 and out["num_microbatches"] == 2
    assert out["samples_per_iteration"] == 16 * 2 * 1

    # 2. pre-training to accuracy with the seed's dp_conf.json (the modules on one stage,
    #    replicated): here models/bert4/depth=2/dp_conf.json, 2 modules on 1 stage x 2 replicas
    ckpt = tmp_path / "ckpt"
    argv = as_ours(PRETRAIN, {"<TRAIN_PATH>": str(data), "<VOCAB_PATH>": str(data / "vocab.txt"),
                              "<CHECKPOINT_DIR>": str(ckpt)})
    assert {"--partitioned_data", "--on_memory"} <= set(argv)
    p = run(argv)
    line = start_line(p.stdout)
    assert "(2 modules: [2, 2] layers), on 1 stages x 2 replicas (module_to_stage_map " \
           "[0, 0, 0])" in line, line
    assert "m=1 microbatches per update per replica (1 stage x --gradient_accumulation_steps 1)" \
        in line, line
    assert "end of epoch 0" in p.stdout
    (last,) = sorted(ckpt.glob("step-*"))
    extra = json.loads((last / "manifest.json").read_text())["extra"]
    assert extra["num_modules"] == 2 and extra["num_stages"] == 1
    assert extra["module_to_stage_map"] == [0, 0, 0]

    # 3. GLUE from that 1-stage checkpoint of the 2-module model: -m ...depth=2 --num_stages 1
    glue_out = ckpt / "glue"           # the default: next to the checkpoints
    argv = as_ours(GLUE, {"<DATA_DIR>": str(ROOT / "data/sample/glue"),
                          "<CHECKPOINT_PATH>": str(ckpt)})
    assert argv[argv.index("--num_stages") + 1] == "1"
    p = run(argv)
    assert "2 modules (models.bert4.layers=2,2) on 1 stage" in p.stdout
    scores = json.loads((glue_out / "scores_sst-2.json").read_text())
    assert scores["pretraining_epoch"] == 0
    assert 0.0 <= scores["scores"]["dev"]["accuracy"] <= 1.0


def test_the_shipped_seed_conf_paths_fit_their_modules():
    """models/bert24/depth=8/dp_conf.json (the seed's path): the 8 modules of
    --module models.bert24.depth=8 on one stage, 16 replicas (2 nodes x 8 GPUs)."""
    cfg = BertModelConfig.from_json(ROOT / "configs/bert_config_bert-large-uncased.json")
    for layers, depth, replicas in ((24, 8, 16), (4, 2, 2)):
        path = ROOT / f"models/bert{layers}/depth={depth}/dp_conf.json"
        conf = PipelineConfig.from_json(path)
        assert (conf.num_stages, conf.num_replicas) == (1, replicas)
        model_cfg = cfg if layers == 24 else BertModelConfig.from_json(
            ROOT / "configs/bert_config_demo.json")
        model = build_bert_pipeline(model_cfg, parse_module_spec(
            f"models.bert{layers}.depth={depth}", layers), device="meta")
        model.check_pipeline_config(conf)
        assert model.num_modules == depth


def test_grouped_modules_resume_and_fine_tune_and_wrong_records_are_refused(shards, tmp_path):
    """--module models.bert4.depth=4 on 2 stages (the conf groups the 4 modules in pairs): the
    checkpoint records both, resumes, and fine-tunes with -m ...depth=4 --num_stages 2; flags
    that disagree with the record, and confs that cannot hold the modules, fail with messages
    that say what to pass."""
    conf = tmp_path / "conf_4_modules_2_stages.json"
    conf.write_text(json.dumps({"module_to_stage_map": [0, 0, 1, 1, 1],
                                "stage_to_rank_map": {"0": [0], "1": [1]}}))
    flags = list(TINY)
    flags[flags.index("--module") + 1] = "models.bert4.depth=4"
    ckpt = tmp_path / "ckpt"
    pretrain = ["jobs/pretrain_bert24.py", *flags, "--train_path", shards, "--config_path", conf,
                "--num_train_epochs", 1, "--train_batch_size", 4, "--checkpoint_dir", ckpt,
                "--gradient_accumulation_steps", 2]
    p = run(pretrain + ["--max_steps", 2])
    line = start_line(p.stdout)
    assert "(4 modules: [1, 1, 1, 1] layers), on 2 stages x 1 replicas (module_to_stage_map " \
           "[0, 0, 1, 1, 1])" in line, line
    assert "m=4 microbatches per update per replica (2 stages x --gradient_accumulation_steps 2)" \
        in line, line
    extra = json.loads((sorted(ckpt.glob("step-*"))[-1] / "manifest.json").read_text())["extra"]
    assert (extra["num_modules"], extra["num_stages"]) == (4, 2)

    resumed = run(pretrain + ["--max_steps", 3, "--resume"])
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    assert sorted(ckpt.glob("step-*"))[-1].name == "step-00000003"

    glue = ["jobs/finetune_glue.py", "--data_dir", ROOT / "data/sample/glue", "--task_name",
            "SST-2", "--do_train", "--do_eval", "--checkpoint_path", ckpt, "--max_seq_length",
            32, "--num_train_epochs", 1, "--output_dir", tmp_path / "glue"]
    p = run(glue + ["-m", "models.bert4.depth=4", "--num_stages", 2])
    assert "4 modules (models.bert4.layers=1,1,1,1) on 2 stages" in p.stdout
    assert "[glue] SST-2 dev: accuracy" in p.stdout

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"module_to_stage_map": [0, 1, 0, 1, 1],
                               "stage_to_rank_map": {"0": [0], "1": [1]}}))
    one_stage = tmp_path / "one_stage.json"
    one_stage.write_text(json.dumps({"module_to_stage_map": [0, 0, 0, 0, 0],
                                     "stage_to_rank_map": {"0": [0]}}))
    cases = [
        (glue + ["-m", "models.bert4.depth=4", "--num_stages", 4],
         rf"--num_stages 4, but {ckpt}/step-00000003 has 2 stages: 4 modules "
         r"\(models.bert4.layers=1,1,1,1\) on 2 stages \(module_to_stage_map \[0, 0, 1, 1, 1\]\); "
         r"pass --num_stages 2"),
        (glue + ["-m", "models.bert4.depth=2", "--num_stages", 2],
         r"-m models.bert4.depth=2 names 2 modules, but .* holds 4 modules .*; pass "
         r"-m models.bert4.depth=4"),
        (glue + ["-m", "models.bert4.layers=1,2,1", "--num_stages", 2],
         r"-m models.bert4.layers=1,2,1 cuts BERT into 3 modules of \[1, 2, 1\] layers, but .* "
         r"holds 4 modules .*; pass -m models.bert4.layers=1,1,1,1"),
        (_with(pretrain, "--config_path", bad) + ["--max_steps", 1],
         rf"{bad}: stages in module_to_stage_map must be contiguous .* module 2 goes to stage 0 "
         r"after module 1 on stage 1"),
        (_with(pretrain, "--config_path", one_stage) + ["--max_steps", 4, "--resume"],
         r"step-00000003 was trained with its modules on stages as module_to_stage_map "
         r"\[0, 0, 1, 1, 1\]; this run's conf .* has \[0, 0, 0, 0, 0\]. Resume with the same "
         r"grouping"),
        (pretrain + ["--microbatches_per_update", 1],
         r"pass one of --gradient_accumulation_steps .* and --microbatches_per_update"),
        (_with(pretrain, "--gradient_accumulation_steps", None) + ["--microbatches_per_update", 1],
         r"--microbatches_per_update 1 < 2 stages: 2bw needs at least as many microbatches per "
         r"update as stages; pass --microbatches_per_update 2 or more"),
    ]
    for argv, expect in cases:
        p = run(argv, ok=False)
        assert p.returncode == 2, (argv, p.stdout[-1500:], p.stderr[-1500:])
        assert re.search(expect, p.stderr), (expect, p.stderr[-1500:])
        assert "stage actors up" not in p.stdout


def _with(argv: list, flag: str, value) -> list:
    """``argv`` with ``flag``'s value replaced (None: the flag removed)."""
    out = list(argv)
    i = out.index(flag)
    if value is None:
        del out[i:i + 2]
    else:
        out[i + 1] = value
    return out


def test_depth_auto_refuses_flags_it_would_override():
    """The planner chooses the conf and m; a --config_path or --microbatches_per_update beside
    depth=auto is an error before anything starts (no Ray)."""
    import pytest

    from jobs.pretrain_bert24 import JobError, build_parser, load_model_and_layout

    base = [*TINY, "--train_path", str(ROOT / "data/sample/corpus.txt"), "--num_minibatches",
            "1"]
    base[base.index("--module") + 1] = "models.bert4.depth=auto"
    for extra, flag in ((["--config_path", str(ROOT / "models/bert4/depth=2/dp_conf.json")],
                         "--config_path"), (["--microbatches_per_update", "2"],
                                            "--microbatches_per_update")):
        with pytest.raises(JobError, match=rf"--module models.bert4.depth=auto chooses the conf "
                                           rf"and m itself; drop {flag}"):
            load_model_and_layout(build_parser().parse_args(base + extra), log=lambda *_: None)


def test_glue_takes_depth_d_for_whatever_split_pre_training_chose(tmp_path):
    """``-m models.bert<L>.depth=D`` names D modules; pre-training chose their layers by cost,
    so a checkpoint of 2 modules split 1 + 3 is ``-m models.bert4.depth=2`` (the seed's GLUE
    command names the depth, never the split). An explicit split must match the record."""
    import pytest
    import torch

    from jobs.finetune_glue import JobError, build_parser, check_against_checkpoint
    from pd2bw_ray import PipelineTrainer
    from stages import BertPartition
    from stages.bert_checkpoint import read_pretrained_bert

    cfg = BertModelConfig.from_json(ROOT / "configs/bert_config_demo.json")
    part = BertPartition((1, 3))
    model = build_bert_pipeline(cfg, part, seed=0)
    trainer = PipelineTrainer(list(model.modules), model.loss_fn,
                              PipelineConfig([0, 0, 0], {"0": [0]}),
                              lambda params: torch.optim.SGD([p for _, p in params], lr=0.1),
                              schedule="2bw", num_microbatches=1, local=True,
                              tied_parameters=[list(g) for g in model.tied_parameters])
    try:
        path = trainer.checkpoint(str(tmp_path), extra={
            "module": part.to_spec(), "bert_config": cfg.to_dict(), "epoch": 0,
            "end_of_epoch": True})
    finally:
        trainer.shutdown()
    pretrained = read_pretrained_bert(path, report=lambda *_: None)
    assert pretrained.describe() == ("2 modules (models.bert4.layers=1,3) on 1 stage "
                                     "(module_to_stage_map [0, 0, 0])")

    def glue(*flags):
        return build_parser().parse_args(["--data_dir", str(tmp_path), "--task_name", "SST-2",
                                          "--checkpoint_path", str(path), *flags])

    check_against_checkpoint(glue("-m", "models.bert4.depth=2", "--num_stages", "1"), pretrained)
    check_against_checkpoint(glue("-m", "models.bert4.layers=1,3"), pretrained)
    with pytest.raises(JobError, match=r"-m models.bert4.depth=4 names 4 modules, but .* holds "
                                       r"2 modules .*; pass -m models.bert4.depth=2"):
        check_against_checkpoint(glue("-m", "models.bert4.depth=4"), pretrained)
    with pytest.raises(JobError, match=r"-m models.bert4.layers=2,2 cuts BERT into 2 modules of "
                                       r"\[2, 2\] layers, .*; pass -m models.bert4.layers=1,3"):
        check_against_checkpoint(glue("-m", "models.bert4.layers=2,2"), pretrained)
    with pytest.raises(JobError, match=r"--num_stages 2, but .* has 1 stage: .*; pass "
                                       r"--num_stages 1"):
        check_against_checkpoint(glue("--num_stages", "2"), pretrained)
