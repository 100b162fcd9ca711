"""BERT through the real pipeline (Ray actors, GLOO) against transformers' BertForPreTraining."""

import pytest
import torch
from transformers import BertForPreTraining

from pd2bw_ray import ActorResources, PipelineTrainer
from stages.bert import build_bert_pipeline
from stages.bert_batches import random_pretraining_steps
from stages.hf_interop import hf_to_pipeline_state_dict, pipeline_to_hf_state_dict
from stages.partition import parse_module_spec, pipeline_conf
from test_bert_training import TINY, hf_reference_train, optimizer_factory

RES = ActorResources(num_cpus=0.5)


def hf_and_pipeline(depth, seed=0, dtype=torch.float32, spec=None):
    torch.manual_seed(seed)
    hf = BertForPreTraining(TINY.to_transformers()).to(dtype)
    model = build_bert_pipeline(TINY, parse_module_spec(spec or f"models.bert4.depth={depth}", 4),
                                seed=1)
    for module in model.modules:
        module.to(dtype)
    return hf, model, hf_to_pipeline_state_dict(model, hf.state_dict())


@pytest.mark.parametrize("depth, spec", [(1, None), (2, None), (4, None),
                                         (3, "models.bert4.layers=1.5,1,1.5")])
def test_pipelined_bert_loss_and_flush_training_equal_transformers(ray_cluster, depth, spec):
    """In float64, like test_bert_training (its docstring says why: Adam in float32 turns the
    rounding noise of gradients that are zero in exact arithmetic into weight differences).
    The last case cuts layers 1 and 2 between attention and feed-forward."""
    steps = random_pretraining_steps(num_steps=3, num_microbatches=4, microbatch_size=3,
                                     seq_length=16, vocab_size=TINY.vocab_size, seed=depth)
    hf, model, init = hf_and_pipeline(depth, dtype=torch.float64, spec=spec)
    trainer = PipelineTrainer(list(model.modules), model.loss_fn, pipeline_conf(depth, 1),
                              optimizer_factory, schedule="flush", num_microbatches=4,
                              tied_parameters=[list(g) for g in model.tied_parameters],
                              initial_state_dict=init, resources=RES)
    try:
        losses = trainer.train(steps)
        state = trainer.state_dict()
    finally:
        trainer.shutdown()
    before = hf.state_dict()["bert.embeddings.word_embeddings.weight"].clone()
    expected = hf_reference_train(hf, steps)   # gradient accumulation over the 4 microbatches
    # step 0's loss is the loss of the initial weights on that batch
    assert losses == pytest.approx(expected, rel=1e-9)
    ours = pipeline_to_hf_state_dict(model, state, with_tied_aliases=True)
    theirs = hf.state_dict()
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"{name}: {m}")
    assert (theirs["bert.embeddings.word_embeddings.weight"] - before).abs().max() > 1e-3


def test_tied_embedding_and_decoder_stay_bit_identical_under_2bw_with_replicas(ray_cluster):
    steps = random_pretraining_steps(num_steps=4, num_microbatches=4, microbatch_size=2,
                                     seq_length=16, vocab_size=TINY.vocab_size, seed=7)
    _, model, init = hf_and_pipeline(2)
    (emb, dec), = model.tied_parameters
    trainer = PipelineTrainer(list(model.modules), model.loss_fn, pipeline_conf(2, 2),
                              optimizer_factory, schedule="2bw", num_microbatches=2,
                              tied_parameters=[[emb, dec]], initial_state_dict=init,
                              max_grad_norm=1.0, resources=RES)
    try:
        trainer.train(steps)
        per = trainer.replica_state_dicts()
    finally:
        trainer.shutdown()
    ref = per[(0, 0)][emb]
    assert not torch.equal(ref, init[emb])          # it trained
    for s, r in per:
        held = per[(s, r)].get(emb if s == 0 else dec)
        assert held is not None and torch.equal(held, ref), (s, r)
