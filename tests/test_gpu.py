"""The GPU path of a stage (device placement, bf16 autocast with fp32 master weights, CUDA memory
accounting), run in-process (local=True: stages on threads of this process, one GPU), and the
transport between a stage on the GPU and one on the CPU (two Ray actors, GLOO).

Refused (skipped, with the reason) where torch sees no CUDA device, as on this project's CI. On a
GPU machine: ``python -m pytest tests/test_gpu.py``; ``python -m bench.gpu_check`` runs these
checks and the BERT figures in one go. NCCL between stages needs a GPU per rank and is exercised
by ``bench.gpu_check`` only where there are two GPUs."""

import pytest
import torch
from torch import nn
from transformers import BertForPreTraining

from pd2bw_ray import ActorResources, PipelineTrainer, StageOptions
from reference import reference_train
from stages.bert_batches import random_pretraining_steps
from stages.partition import pipeline_conf
from test_bert_pipeline import hf_and_pipeline
from test_bert_training import TINY, optimizer_factory
from test_exactness import M, OPTIMIZERS, TIE, assert_matches, conf, make_steps, mlp

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"needs a CUDA GPU and torch {torch.__version__} sees none (CUDA build: "
           f"{torch.version.cuda}); run on a GPU machine")
GPU = ActorResources(num_cpus=0, num_gpus=1)


@pytest.mark.parametrize("schedule", ["2bw", "flush", "gpipe"])
def test_float64_mlp_on_the_gpu_matches_the_cpu_reference(schedule):
    steps = make_steps(2)
    ref_losses, ref_state = reference_train(mlp(), nn.MSELoss(), steps, schedule=schedule,
                                            optimizer_factory=OPTIMIZERS["adam"],
                                            max_grad_norm=0.05, tied_parameters=TIE)
    trainer = PipelineTrainer(mlp(), nn.MSELoss(), conf(2), OPTIMIZERS["adam"],
                              schedule=schedule, num_microbatches=M, tied_parameters=TIE,
                              max_grad_norm=0.05, local=True, resources=GPU)
    try:
        assert {p["device"] for p in trainer.placement().values()} == {"cuda:0"}
        losses = trainer.train(steps)
        state = trainer.state_dict()
        memory = trainer.stats()[(0, 0)]["memory"]
    finally:
        trainer.shutdown()
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-10,
                               atol=1e-12)
    assert_matches(state, ref_state)
    assert memory["cuda_peak_allocated"] > 0


def test_bert_bf16_autocast_keeps_fp32_weights_and_the_loss():
    steps = random_pretraining_steps(num_steps=3, num_microbatches=2, microbatch_size=4,
                                     seq_length=32, vocab_size=TINY.vocab_size, seed=3)
    hf, model, init = hf_and_pipeline(2)
    with torch.no_grad():
        fp32 = [hf(input_ids=i, token_type_ids=t, attention_mask=a, labels=lab,
                   next_sentence_label=n).loss.item()
                for (i, t, a, _), (lab, n) in steps[0]]
    trainer = PipelineTrainer(list(model.modules), model.loss_fn, pipeline_conf(2, 1),
                              optimizer_factory, schedule="2bw", num_microbatches=2,
                              tied_parameters=[list(g) for g in model.tied_parameters],
                              initial_state_dict=init, local=True, resources=GPU,
                              stage_options=StageOptions(autocast_bf16=True))
    try:
        losses = trainer.train(steps)
        state = trainer.state_dict()
    finally:
        trainer.shutdown()
    # step 0 runs on the initial weights: bf16 compute gives fp32's loss to bf16 precision
    assert losses[0] == pytest.approx(sum(fp32) / len(fp32), rel=2e-2)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert {v.dtype for k, v in state.items() if v.is_floating_point()} == {torch.float32}
    moved = max((state[k] - init[k]).abs().max().item() for k in init
                if init[k].is_floating_point())
    assert moved > 1e-4     # the updates reached the fp32 master weights


def test_transport_between_a_gpu_stage_and_a_cpu_stage(ray_cluster):
    from bench.gpu_check import check_transport

    result = check_transport(("cuda", "cpu"), timeout_s=5.0)
    assert result["setup"][0]["device"].startswith("cuda")
    backends = result["setup"][0]["backends"]
    assert [backends[g] for g in ("act:0:0", "grad:0:0", "pipeline:0")] == ["gloo"] * 3
    assert result["ok"], result
