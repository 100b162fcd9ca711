"""PipeDream's module grouping: the conf puts several of ``--module``'s modules on one stage.

BERT cut into 4 modules trained on 2 stages, and into 2 modules trained on 1 stage (with and
without replicas), through the real pipeline (Ray actors, GLOO), equals the single-process
reference of the schedule's formula (tests/reference.py: one model, tied weights as one
Parameter, one loss over all of a step's microbatches); training resumed from a checkpoint of
the grouped pipeline equals training straight through.
"""

from __future__ import annotations

import pytest
import torch

from pd2bw_ray import ActorResources, PipelineConfig, PipelineTrainer
from reference import reference_train
from stages.bert import build_bert_pipeline
from stages.bert_batches import random_pretraining_steps
from stages.partition import parse_module_spec
from test_bert_training import TINY, optimizer_factory

RES = ActorResources(num_cpus=0.5)
STEPS, GAS, B, SEQ = 4, 2, 2, 16     # m = stages x GAS, as the job derives it


def grouped(depth: int, stage_of_module: list[int], replicas: int):
    """BERT-4 cut into ``depth`` modules, and a conf putting module k on stage_of_module[k]
    (plus the loss on the last module's stage)."""
    model = build_bert_pipeline(TINY, parse_module_spec(f"models.bert4.depth={depth}", 4), seed=3)
    stages = stage_of_module[-1] + 1
    conf = PipelineConfig(stage_of_module + [stage_of_module[-1]],
                          {str(s): list(range(s * replicas, (s + 1) * replicas))
                           for s in range(stages)})
    model.check_pipeline_config(conf)
    return model, conf


def steps_for(m: int, replicas: int, seed: int):
    return random_pretraining_steps(num_steps=STEPS, num_microbatches=m * replicas,
                                    microbatch_size=B, seq_length=SEQ,
                                    vocab_size=TINY.vocab_size, seed=seed)


def assert_close_states(ours, theirs):
    assert ours.keys() <= theirs.keys() and len(ours) > 10
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("schedule, depth, stage_of_module, replicas", [
    ("2bw", 4, [0, 0, 1, 1], 1),      # depth-4 modules on 2 stages
    ("2bw", 4, [0, 0, 1, 1], 2),      # ... with replicas
    ("flush", 4, [0, 1, 1, 1], 1),    # uneven groups
    ("2bw", 2, [0, 0], 2),            # depth-2 modules on 1 stage, replicated
])
def test_grouped_modules_train_as_the_reference_formula(ray_cluster, schedule, depth,
                                                         stage_of_module, replicas):
    model, conf = grouped(depth, stage_of_module, replicas)
    m = conf.num_stages * GAS
    steps = steps_for(m, replicas, seed=depth + replicas)
    tied = [list(g) for g in model.tied_parameters]
    ref_losses, ref_state = reference_train(list(model.modules), model.loss_fn, steps,
                                            schedule=schedule,
                                            optimizer_factory=optimizer_factory,
                                            tied_parameters=tied, max_grad_norm=1.0)
    trainer = PipelineTrainer(list(model.modules), model.loss_fn, conf, optimizer_factory,
                              schedule=schedule, num_microbatches=m,
                              tied_parameters=tied, max_grad_norm=1.0, resources=RES)
    try:
        assert trainer.num_stages == stage_of_module[-1] + 1
        losses = trainer.train(steps)
        state = trainer.state_dict()
    finally:
        trainer.shutdown()
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert_close_states(state, ref_state)
    start = model.state_dict()
    assert any(not torch.equal(state[k], start[k]) for k in state)      # it trained


def test_a_grouped_checkpoint_resumes_as_if_uninterrupted(ray_cluster, tmp_path):
    """4 modules on 2 stages: 2 steps, a checkpoint, a new trainer from it, 2 more steps ==
    the reference's 4 steps of 2bw."""
    model, conf = grouped(4, [0, 0, 1, 1], 1)
    steps = steps_for(2 * GAS, 1, seed=11)
    tied = [list(g) for g in model.tied_parameters]
    _, ref_state = reference_train(list(model.modules), model.loss_fn, steps, schedule="2bw",
                                   optimizer_factory=optimizer_factory, tied_parameters=tied)
    kwargs = dict(schedule="2bw", num_microbatches=2 * GAS, tied_parameters=tied, resources=RES)
    trainer = PipelineTrainer(list(model.modules), model.loss_fn, conf, optimizer_factory,
                              **kwargs)
    try:
        trainer.train(steps[:2])
        path = trainer.checkpoint(str(tmp_path))
    finally:
        trainer.shutdown()
    fresh, _ = grouped(4, [0, 0, 1, 1], 1)
    resumed = PipelineTrainer.from_checkpoint(path, list(fresh.modules), fresh.loss_fn,
                                              optimizer_factory, config=conf, **kwargs)
    try:
        assert resumed.step == 2
        resumed.train(steps[2:])
        state = resumed.state_dict()
    finally:
        resumed.shutdown()
    assert_close_states(state, ref_state)
