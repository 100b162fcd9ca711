"""Fine-tune a pre-trained (partitioned) BERT checkpoint on a GLUE task and score its dev set(s).

    ray job submit --working-dir . -- python jobs/finetune_glue.py \\
        --data_dir glue_data --task_name MNLI --do_train --do_eval \\
        -m models.bert24.depth=8 --bert_config_path configs/bert_config_bert-large-uncased.json \\
        --checkpoint_path ckpt/ --epoch 0 --num_stages 8 --output_dir glue_out/

The flags are those of the original ``compute_glue_scores.py`` plus learning rate, batch size,
epochs and seed. The checkpoint of pre-training epoch ``--epoch`` (written by
``jobs/pretrain_bert24.py``, any number of stages) is merged into one BERT;
``-m/--module``, ``--num_stages`` and ``--bert_config_path``, if given, must describe it. The model
is fine-tuned data-parallel on Ray with this runtime at depth 1 (``--num_replicas`` replicas,
vanilla minibatch semantics), then each dev set of the task is scored with the task's official
metric(s) and the scores are written as JSON (``<output_dir>/scores_<task>.json``).

``--checkpoint_path`` may also be a transformers ``save_pretrained`` directory (``BertModel`` or
``BertForPreTraining``, e.g. ``bert-base-uncased`` or the output of ``jobs/export_hf.py``); the
vocab and lower-casing then come from its ``vocab.txt`` and ``tokenizer_config.json``. The
fine-tuned classifier is saved as a ``BertForSequenceClassification`` directory with its tokenizer
(``<output_dir>/model/``), and a task's ``test.tsv`` (MNLI: ``test_matched.tsv``,
``test_mismatched.tsv``) is predicted into GLUE's submission format (``<output_dir>/SST-2.tsv``,
``MNLI-m.tsv`` ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jobs.ray_cluster import init_ray  # noqa: E402  (after the path is set)


class JobError(ValueError):
    """A flag or input is wrong; the message names it and says what to do."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/finetune_glue.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="GLUE data (jiant download_glue_data.py layout)")
    p.add_argument("--task_name", required=True, help="CoLA, SST-2, MRPC, STS-B, QQP, MNLI, ...")
    p.add_argument("--do_train", action="store_true")
    p.add_argument("--do_eval", action="store_true")
    p.add_argument("-m", "--module", default=None,
                   help="the modules pre-training cut BERT into (checked against the "
                        "checkpoint), e.g. models.bert24.depth=8")
    p.add_argument("--bert_config_path", default=None, help="checked against the checkpoint's")
    p.add_argument("--checkpoint_path", required=True,
                   help="--checkpoint_dir of the pre-training run, one step-* directory, or a "
                        "transformers directory (BertModel or BertForPreTraining; its vocab.txt "
                        "and lower-casing are used)")
    p.add_argument("--epoch", type=int, default=None,
                   help="pre-training epoch whose checkpoint to use (default: the newest)")
    p.add_argument("--num_stages", type=int, default=None,
                   help="the stages pre-training put those modules on (checked against the "
                        "checkpoint): 1 for -m models.bert24.depth=8 pre-trained on one stage")
    p.add_argument("--vocab_path", default=None, help="default: the pre-training run's vocab")
    p.add_argument("--do_lower_case", action=argparse.BooleanOptionalAction, default=None,
                   help="default: as in pre-training")
    p.add_argument("--max_seq_length", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=2e-5)
    p.add_argument("--train_batch_size", type=int, default=32, help="sequences per microbatch")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="as in pre-training, m = stages x this; fine-tuning runs on 1 stage, "
                        "so each replica runs this many microbatches per update")
    p.add_argument("--num_train_epochs", type=float, default=3.0)
    p.add_argument("--warmup_proportion", type=float, default=0.1)
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--num_replicas", type=int, default=1, help="data-parallel replicas")
    p.add_argument("--num_cpus_per_replica", type=float, default=1.0)
    p.add_argument("--num_gpus_per_replica", type=float, default=0.0)
    p.add_argument("--torch_threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--timeline", default=None, metavar="PATH",
                   help="write the replicas' actions of the last 4 steps as PATH.json (Chrome "
                        "trace, for ui.perfetto.dev) and PATH.png (timeline picture)")
    p.add_argument("--output_dir", default=None, help="where scores_<task>.json goes "
                                                       "(default: <checkpoint_path>/glue)")
    p.add_argument("--log_every", type=int, default=20)
    return p


def check_against_checkpoint(args, pretrained) -> None:
    """The seed's flags describe the checkpoint; a mismatch is an error, not a guess."""
    from stages import BertModelConfig, parse_module_spec
    from stages.partition import spec_depth

    ck = pretrained.checkpoint
    part = pretrained.partition
    # PipeDream's meaning: -m names the modules BERT was cut into, --num_stages the stages the
    # pre-training conf grouped them onto (-m models.bert24.depth=8 --num_stages 1: 8 modules
    # pre-trained on one stage); both are checked against the checkpoint's record
    d = pretrained.num_stages
    if args.num_stages is not None and args.num_stages != d:
        raise JobError(f"--num_stages {args.num_stages}, but {ck.path} has {d} stage"
                       f"{'s' if d > 1 else ''}: {pretrained.describe()}; pass --num_stages {d}")
    if args.module:
        try:
            want = parse_module_spec(args.module, pretrained.model_config.num_hidden_layers,
                                     flag="-m")
        except ValueError as e:
            raise JobError(f"-m {args.module}: {e}") from None
        depth = spec_depth(args.module)
        if depth is not None:
            # depth=D names D modules; pre-training chose their layers by cost, and the
            # checkpoint's record of that split is the one that counts
            if depth != part.num_stages:
                raise JobError(f"-m {args.module} names {depth} modules, but {ck.path} holds "
                               f"{pretrained.describe()}; pass -m models.bert"
                               f"{part.num_layers}.depth={part.num_stages}")
        elif want.layers_per_stage != part.layers_per_stage:
            raise JobError(f"-m {args.module} cuts BERT into {want.num_stages} modules of "
                           f"{list(want.layers_per_stage)} layers, but {ck.path} holds "
                           f"{pretrained.describe()}; pass -m {part.to_spec()}")
    if args.bert_config_path:
        if not os.path.exists(args.bert_config_path):
            raise JobError(f"--bert_config_path {args.bert_config_path}: no such file")
        cfg = BertModelConfig.from_json(args.bert_config_path)
        if cfg.to_dict() != pretrained.model_config.to_dict():
            diff = {k: (v, pretrained.model_config.to_dict().get(k))
                    for k, v in cfg.to_dict().items() if pretrained.model_config.to_dict().get(k)
                    != v}
            raise JobError(f"--bert_config_path {args.bert_config_path} differs from the "
                           f"checkpoint's bert config: {diff} (flag, checkpoint)")


@dataclass(frozen=True)
class ModelSource:
    """The BERT fine-tuning starts from, and the tokenizer it was pre-trained with."""

    model_config: Any                  # stages.BertModelConfig
    hf_state_dict: dict[str, Any]      # BertForPreTraining names (bert.* are used)
    vocab_path: str
    do_lower_case: bool
    description: str                   # for the log
    record: dict[str, Any]             # for scores_<task>.json


def checkpoint_source(args, log) -> ModelSource:
    """A pre-training checkpoint of jobs/pretrain_bert24.py (the seed's flags describe it)."""
    from stages.bert_checkpoint import read_pretrained_bert

    pretrained = read_pretrained_bert(args.checkpoint_path, args.epoch, report=log)
    check_against_checkpoint(args, pretrained)
    extra = pretrained.checkpoint.extra
    vocab = args.vocab_path or extra.get("vocab_path")
    if not vocab or not os.path.exists(vocab):
        raise JobError(f"vocab {vocab!r} not found; pass --vocab_path (the pre-training vocab)")
    lower = args.do_lower_case if args.do_lower_case is not None else extra.get("do_lower_case",
                                                                               True)
    return ModelSource(pretrained.model_config, pretrained.hf_state_dict, vocab, bool(lower),
                       f"{pretrained.checkpoint.path} (pre-training epoch {extra.get('epoch')}, "
                       f"{pretrained.describe()}, merged)",
                       {"checkpoint": str(pretrained.checkpoint.path),
                        "pretraining_epoch": extra.get("epoch")})


def transformers_source(args, log) -> ModelSource:
    """A transformers ``save_pretrained`` directory (BertModel or BertForPreTraining); its
    ``vocab.txt`` and ``tokenizer_config.json`` give the tokenizer unless the flags do."""
    from stages import BertModelConfig
    from stages.hf_interop import hf_tokenizer_settings, read_hf_encoder

    directory = args.checkpoint_path
    given = [flag for flag, value in (("--epoch", args.epoch), ("-m", args.module),
                                      ("--num_stages", args.num_stages)) if value is not None]
    if given:
        raise JobError(f"{' '.join(given)} describe a pre-training checkpoint of "
                       f"jobs/pretrain_bert24.py, but --checkpoint_path {directory} is a "
                       "transformers directory (one unsplit BERT); drop them")
    cfg, hf_state = read_hf_encoder(directory, seed=args.seed)
    if args.bert_config_path:
        want = BertModelConfig.from_json(args.bert_config_path)
        if want.to_dict() != cfg.to_dict():
            diff = {k: (v, cfg.to_dict().get(k)) for k, v in want.to_dict().items()
                    if cfg.to_dict().get(k) != v}
            raise JobError(f"--bert_config_path {args.bert_config_path} differs from "
                           f"{directory}/config.json: {diff} (flag, directory)")
    dir_vocab, dir_lower = hf_tokenizer_settings(directory)
    vocab = args.vocab_path or dir_vocab
    if not vocab:
        raise JobError(f"{directory} holds no vocab.txt; pass --vocab_path with the vocab the "
                       "model was trained with")
    if not os.path.isfile(vocab):
        raise JobError(f"--vocab_path {vocab}: no such file")
    lower = args.do_lower_case if args.do_lower_case is not None else (
        dir_lower if dir_lower is not None else True)
    return ModelSource(cfg, hf_state, vocab, bool(lower),
                       f"transformers directory {directory} ({cfg.num_hidden_layers} layers x "
                       f"{cfg.hidden_size}; vocab {vocab}, do_lower_case={bool(lower)})",
                       {"checkpoint": str(directory), "pretraining_epoch": None})


def steps_of(features, indices, b: int, m: int, w: int) -> list[list[tuple]]:
    """Cut ``indices`` into steps of m*w microbatches of b examples (the last partial step is
    dropped); replica r takes microbatches r::w."""
    per_step = b * m * w
    out = []
    for start in range(0, len(indices) - per_step + 1, per_step):
        step = []
        for j in range(m * w):
            idx = indices[start + j * b: start + (j + 1) * b]
            inputs = tuple(t[idx] for t in features.inputs)
            step.append((inputs, features.labels[idx]))
        out.append(step)
    return out


def evaluate(model, features, batch_size: int):
    import torch

    model.eval()
    outs = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            sl = slice(start, start + batch_size)
            outs.append(model(*(t[sl] for t in features.inputs)))
    return torch.cat(outs)


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    import ray
    import torch

    from transformers.utils import logging as transformers_logging

    from data.glue import (encode_examples, get_task, load_examples, load_test_examples,
                           present_test_splits, task_file, write_submission)
    from data.glue_metrics import glue_metrics
    from data.vocab import load_tokenizer
    from pd2bw_ray import ActorResources, PipelineConfig, PipelineTrainer
    from stages.bert_glue import BertClassifier, GlueLoss
    from stages.hf_interop import is_hf_directory
    from stages.bert_optim import BertAdamW, WarmupLinearDecay

    if not (args.do_train or args.do_eval):
        raise JobError("nothing to do: pass --do_train and/or --do_eval")
    task = get_task(args.task_name)
    for split in (("train",) if args.do_train else ()) + (task.dev_splits if args.do_eval else ()):
        task_file(args.data_dir, task, split)      # missing files fail before any work
    # transformers' own loading/saving bars are not progress of this job
    transformers_logging.disable_progress_bar()
    if is_hf_directory(args.checkpoint_path):
        source = transformers_source(args, log)
    else:
        source = checkpoint_source(args, log)
    if args.max_seq_length > source.model_config.max_position_embeddings:
        raise JobError(f"--max_seq_length {args.max_seq_length} exceeds the model's "
                       f"max_position_embeddings={source.model_config.max_position_embeddings}")
    tokenizer = load_tokenizer(source.vocab_path, do_lower_case=source.do_lower_case)
    log(f"[glue] {task.dir_name}: BERT from {source.description}")
    model = BertClassifier(source.model_config, task.num_labels, source.hf_state_dict,
                           seed=args.seed)
    loss_fn = GlueLoss(task.num_labels)
    result: dict[str, Any] = {"task": task.dir_name, **source.record}
    if args.do_train:
        train = encode_examples(load_examples(args.data_dir, task.name, "train"), tokenizer,
                                args.max_seq_length)
        b, m, w = args.train_batch_size, args.gradient_accumulation_steps, args.num_replicas
        per_epoch = len(train) // (b * m * w)
        if per_epoch == 0:
            raise JobError(f"{len(train)} training examples are fewer than one update of "
                           f"{b * m * w} (--train_batch_size x --gradient_accumulation_steps x "
                           "--num_replicas); lower them")
        total = max(1, int(round(args.num_train_epochs * per_epoch)))
        g = torch.Generator().manual_seed(args.seed)
        steps = []
        while len(steps) < total:
            steps += steps_of(train, torch.randperm(len(train), generator=g), b, m, w)
        steps = steps[:total]
        if not ray.is_initialized():
            init_ray()
        trainer = PipelineTrainer(
            [model], loss_fn, PipelineConfig([0], {"0": list(range(w))}),
            BertAdamW(lr=args.learning_rate), schedule="flush", num_microbatches=m,
            lr_schedule=WarmupLinearDecay(total, args.warmup_proportion), max_grad_norm=1.0,
            resources=ActorResources(num_cpus=args.num_cpus_per_replica,
                                     num_gpus=args.num_gpus_per_replica,
                                     torch_threads=args.torch_threads), seed=args.seed)
        t0 = time.time()

        def progress(step: int, loss: float) -> None:
            if (step + 1) % args.log_every == 0 or step + 1 == total:
                log(f"[glue] step {step + 1}/{total} loss {loss:.4f} "
                    f"({(step + 1) * b * m * w / (time.time() - t0):.1f} examples/s)")

        try:
            losses = trainer.train(steps, on_step=progress)
            state = trainer.state_dict()
            if args.timeline:
                tl = trainer.timeline(args.timeline, last_steps=4)
                log(f"[glue] timeline: {tl['png']} (picture), {tl['trace']} (Chrome trace)")
        finally:
            trainer.shutdown()
        model.load_state_dict({k[len("0."):]: v for k, v in state.items()})
        result.update({"train_examples": len(train), "steps": total, "final_loss": losses[-1],
                       "first_loss": losses[0]})
    if args.do_eval:
        scores = {}
        for split in task.dev_splits:
            dev = encode_examples(load_examples(args.data_dir, task.name, split), tokenizer,
                                  args.max_seq_length)
            preds = evaluate(model, dev, args.eval_batch_size)
            scores[split] = dict(glue_metrics(task, preds, dev.labels))
            log(f"[glue] {task.dir_name} {split}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in scores[split].items()))
        result["scores"] = scores
    out = Path(args.output_dir or Path(args.checkpoint_path) / "glue")
    out.mkdir(parents=True, exist_ok=True)
    if args.do_train:
        model.save_pretrained(out / "model", labels=task.labels, vocab_path=source.vocab_path,
                              do_lower_case=source.do_lower_case)
        result["model"] = str(out / "model")
        log(f"[glue] fine-tuned model written to {out / 'model'} (BertForSequenceClassification "
            "with its tokenizer; from_pretrained loads it)")
    for split, stem in present_test_splits(args.data_dir, task):
        indices, examples = load_test_examples(args.data_dir, task.name, split)
        preds = evaluate(model, encode_examples(examples, tokenizer, args.max_seq_length),
                         args.eval_batch_size)
        write_submission(out / f"{stem}.tsv", task, indices, preds)
        result.setdefault("test_predictions", {})[split] = str(out / f"{stem}.tsv")
        log(f"[glue] {task.dir_name} {split}: {len(indices)} predictions written to "
            f"{out / (stem + '.tsv')} (GLUE submission format)")
    path = out / f"scores_{task.name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    log(f"[glue] results written to {path}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Run the job; exit status 2 for bad input, 1 if training failed. A local Ray started
    here ends with the process."""
    from pd2bw_ray import PipelineFailure
    from pd2bw_ray.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, CheckpointError) as e:   # bad input: flags, data, checkpoint
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PipelineFailure as e:
        print(f"error: training stopped: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
