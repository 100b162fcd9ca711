"""Training the stage chain equals training transformers' BertForPreTraining.

Reference: single-process ``BertForPreTraining`` with gradient accumulation over ``m``
microbatches (each microbatch loss divided by ``m``) and Adam, both sides in float64. Not float32:
some gradients are zero in exact arithmetic (a key bias adds the same score to every key of a
query, which softmax ignores), so they are rounding noise, about 5e-12 in float32 here, and Adam
moves such a weight by ``lr * g / (|g| + eps)``, about 5e-7 per step: two correct implementations
that round differently (another matmul blocking, another CPU's kernels, the masked-only MLM
head's smaller decoder) end up about 1e-6 apart (1.4e-6 on an AMD EPYC, where this test in float32
failed its atol of 1e-6; it passed on Intel Xeons). In float64 the noise is about 1e-20 and the
step 1e-15, and what is left to differ is rounding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertForPreTraining

from stages.bert import build_bert_pipeline
from stages.bert_batches import random_pretraining_steps
from stages.bert_config import BertModelConfig
from stages.hf_interop import hf_to_pipeline_state_dict, pipeline_to_hf_state_dict
from stages.partition import parse_module_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = BertModelConfig.from_json(CONFIGS / "bert_config_tiny.json")
LR = 1e-3


def optimizer_factory(params):
    """What the runtime is given: ``params`` are (name, parameter) pairs."""
    return torch.optim.Adam([p for _, p in params], lr=LR)


def hf_reference_train(hf_model: BertForPreTraining, steps) -> list[float]:
    """Single-process training with gradient accumulation; returns each step's mean loss."""
    optimizer = optimizer_factory(list(hf_model.named_parameters()))
    losses = []
    for microbatches in steps:
        optimizer.zero_grad()
        total = 0.0
        for (input_ids, token_type_ids, attention_mask, _), (labels, nsp) in microbatches:
            loss = hf_model(input_ids=input_ids, token_type_ids=token_type_ids,
                            attention_mask=attention_mask, labels=labels,
                            next_sentence_label=nsp).loss
            (loss / len(microbatches)).backward()
            total += loss.item()
        optimizer.step()
        losses.append(total / len(microbatches))
    return losses


def chain_train(model, steps) -> list[float]:
    """Our stages, in-process and in order, with the tied copies' gradients summed."""
    params = {f"{k}.{n}": p for k, m in enumerate(model.modules) for n, p in m.named_parameters()}
    optimizer = optimizer_factory(list(params.items()))
    losses = []
    for microbatches in steps:
        optimizer.zero_grad()
        total = 0.0
        for inputs, targets in microbatches:
            x = inputs
            for module in model.modules:
                x = module(*x)
            loss = model.loss_fn(x, targets)
            (loss / len(microbatches)).backward()
            total += loss.item()
        for group in model.tied_parameters:
            summed = sum(params[name].grad for name in group)
            for name in group:
                params[name].grad = summed.clone()
        optimizer.step()
        losses.append(total / len(microbatches))
    return losses


@pytest.mark.parametrize("spec", ["models.bert4.depth=2", "models.bert4.layers=1,2,1",
                                  "models.bert4.layers=1.5,2.5", "models.bert4.layers=0.5,3,0.5"])
def test_three_steps_with_accumulation_match_transformers(spec):
    steps = random_pretraining_steps(num_steps=3, num_microbatches=4, microbatch_size=3,
                                     seq_length=16, vocab_size=TINY.vocab_size, seed=0)
    torch.manual_seed(0)
    hf_model = BertForPreTraining(TINY.to_transformers()).double()
    model = build_bert_pipeline(TINY, parse_module_spec(spec, 4), seed=1)
    for module in model.modules:
        module.double()
    model.load_state_dict(hf_to_pipeline_state_dict(model, hf_model.state_dict()))
    before = {k: v.clone() for k, v in hf_model.state_dict().items()}

    expected_losses = hf_reference_train(hf_model, steps)
    losses = chain_train(model, steps)

    assert losses == pytest.approx(expected_losses, rel=1e-9)
    ours = pipeline_to_hf_state_dict(model, model.state_dict(), with_tied_aliases=True)
    theirs = hf_model.state_dict()
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"{name}: {m}")
    # Training moved the weights well beyond the tolerance, so the comparison means something.
    moved = (theirs["bert.embeddings.word_embeddings.weight"]
             - before["bert.embeddings.word_embeddings.weight"]).abs().max()
    assert moved > 1e-3
