"""The masked-only MLM head: the last stage scores only the labelled positions, and the loss and
gradients are still exactly ``transformers.BertForPreTraining``'s.

Reference: a randomly initialised ``BertForPreTraining`` (tiny config, dropout 0, fp32) given the
same padded microbatches; it scores every position and ignores the -100 labels in its loss.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertForPreTraining

from stages.bert import build_bert_pipeline
from stages.bert_batches import random_pretraining_microbatch
from stages.bert_config import BertModelConfig
from stages.hf_interop import hf_name, hf_to_pipeline_state_dict
from stages.partition import parse_module_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = BertModelConfig.from_json(CONFIGS / "bert_config_tiny.json")


def pair(spec: str, seed: int = 0):
    torch.manual_seed(seed)
    hf_model = BertForPreTraining(TINY.to_transformers("sdpa"))
    model = build_bert_pipeline(TINY, parse_module_spec(spec, TINY.num_hidden_layers), seed=1)
    model.load_state_dict(hf_to_pipeline_state_dict(model, hf_model.state_dict()))
    return hf_model, model


def microbatches():
    """Padded microbatches with different numbers of labelled positions; in the third, one
    sequence has no label at all."""
    generator = torch.Generator().manual_seed(7)
    out = []
    for size, p in ((4, 0.15), (3, 0.4), (5, 0.1)):
        out.append(random_pretraining_microbatch(generator, microbatch_size=size, seq_length=20,
                                                 vocab_size=TINY.vocab_size, mlm_probability=p))
    (ids, types, mask, labels), (labels_t, nsp) = out[2]
    assert labels is labels_t
    labels[1] = -100           # a sequence with no label (its inputs keep their [MASK]s)
    return out


def run_chain(model, inputs):
    x = inputs
    for module in model.modules:
        x = module(*x)
    return x


def test_the_microbatches_cover_the_cases():
    counts = [int((y[0] != -100).sum()) for _, y in microbatches()]
    assert len(set(counts)) == 3
    (_, _, mask, _), (labels, _) = microbatches()[2]
    assert (labels[1] == -100).all() and (labels != -100).any()
    assert all((x[2] == 0).any() for x, _ in microbatches())     # all padded


@pytest.mark.parametrize("spec", ["models.bert4.depth=1", "models.bert4.depth=2",
                                  "models.bert4.depth=4"])
def test_masked_head_loss_and_gradients_equal_bert_for_pretraining(spec):
    hf_model, model = pair(spec)
    for inputs, targets in microbatches():
        ids, types, mask, _ = inputs
        expected = hf_model(input_ids=ids, token_type_ids=types, attention_mask=mask,
                            labels=targets[0], next_sentence_label=targets[1])
        expected.loss.backward()
        scores, nsp = run_chain(model, inputs)
        labelled = int((targets[0] != -100).sum())
        assert scores.shape == (labelled, TINY.vocab_size)   # only the labelled positions
        loss = model.loss_fn((scores, nsp), targets)
        torch.testing.assert_close(loss, expected.loss, rtol=1e-5, atol=0)
        loss.backward()
    ours: dict[str, torch.Tensor] = {}
    for module in model.modules:
        for name, p in module.named_parameters():
            key = hf_name(name)       # the two copies of the tied word embedding add up
            ours[key] = ours[key] + p.grad if key in ours else p.grad.clone()
    theirs = {name: p.grad for name, p in hf_model.named_parameters()}
    assert ours.keys() == theirs.keys()
    for name, grad in theirs.items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"{name}: {m}")


def test_mismatched_labels_are_reported():
    _, model = pair("models.bert4.depth=2")
    (inputs, targets), = microbatches()[:1]
    scores, nsp = run_chain(model, inputs)
    other = targets[0].clone()
    other[other == -100] = 5
    with pytest.raises(ValueError, match="MLM scores for .* labelled positions"):
        model.loss_fn((scores, nsp), (other, targets[1]))


def test_a_microbatch_without_labels_has_nan_loss_like_transformers():
    hf_model, model = pair("models.bert4.depth=2")
    (ids, types, mask, labels), (_, nsp) = microbatches()[0]
    none = torch.full_like(labels, -100)
    expected = hf_model(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=none,
                        next_sentence_label=nsp).loss
    scores, nsp_scores = run_chain(model, (ids, types, mask, none))
    assert scores.shape == (0, TINY.vocab_size)
    loss = model.loss_fn((scores, nsp_scores), (none, nsp))
    assert torch.isnan(expected) and torch.isnan(loss)
