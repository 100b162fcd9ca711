"""The stage chain computes what transformers' BertForPreTraining computes: loss, logits, gradients.

Reference: a randomly initialised ``BertForPreTraining`` (tiny config, dropout 0, fp32) run on the
same padded batch with -100 labels; our stages get its weights and run one after the other.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint
from transformers import BertForPreTraining

from stages.bert import (BertPretrainingLoss, BertStage, build_bert_pipeline,
                         format_parameter_table, stage_parameter_counts, tied_copy_count)
from stages.bert_batches import random_pretraining_microbatch
from stages.bert_config import BertModelConfig
from stages.hf_interop import hf_name, hf_to_pipeline_state_dict
from stages.partition import BertPartition, PartitionError, parse_module_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = BertModelConfig.from_json(CONFIGS / "bert_config_tiny.json")
SPECS = ["models.bert4.depth=1", "models.bert4.depth=2", "models.bert4.depth=4",
         "models.bert4.layers=0,3,1", "models.bert4.layers=1,3,0",
         # layers cut between attention and feed-forward (half layers)
         "models.bert4.layers=1.5,2.5", "models.bert4.layers=0.5,1,1.5,1",
         "models.bert4.layers=2.5,0.5,1", "models.bert4.layers=0,0.5,3.5"]


def tiny_pair(spec: str, attn: str = "sdpa", seed: int = 0):
    """A random HF BertForPreTraining and our stages for ``spec`` holding the same weights."""
    torch.manual_seed(seed)
    hf_model = BertForPreTraining(TINY.to_transformers(attn))
    model = build_bert_pipeline(TINY, parse_module_spec(spec, TINY.num_hidden_layers),
                                attn_implementation=attn, seed=seed + 1)
    model.load_state_dict(hf_to_pipeline_state_dict(model, hf_model.state_dict()))
    return hf_model, model


def batch(seed: int = 0, size: int = 6, seq_length: int = 24):
    generator = torch.Generator().manual_seed(seed)
    return random_pretraining_microbatch(generator, microbatch_size=size, seq_length=seq_length,
                                         vocab_size=TINY.vocab_size)


def run_chain(model, inputs):
    x = inputs
    for module in model.modules:
        x = module(*x)
    return x


def hf_forward(hf_model, inputs, targets):
    input_ids, token_type_ids, attention_mask = inputs[:3]
    return hf_model(input_ids=input_ids, token_type_ids=token_type_ids,
                    attention_mask=attention_mask, labels=targets[0],
                    next_sentence_label=targets[1])


def test_batches_have_padding_and_ignored_labels():
    (input_ids, _, attention_mask, input_labels), (labels, nsp) = batch()
    assert input_labels is labels      # the labels go to the first stage too (masked head)
    assert (attention_mask == 0).any() and (attention_mask == 1).any()
    assert (labels == -100).any() and (labels != -100).sum(dim=1).min() >= 1
    assert (labels[attention_mask == 0] == -100).all()
    assert set(nsp.tolist()) <= {0, 1}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("spec", SPECS)
def test_loss_and_logits_match_transformers(spec, attn):
    hf_model, model = tiny_pair(spec, attn)
    inputs, targets = batch()
    expected = hf_forward(hf_model, inputs, targets)
    # without labels among the inputs: every position is scored, as BertForPreTraining does
    prediction_scores, seq_relationship_score = run_chain(model, inputs[:3])
    loss = model.loss_fn((prediction_scores, seq_relationship_score), targets)
    torch.testing.assert_close(loss, expected.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(prediction_scores, expected.prediction_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seq_relationship_score, expected.seq_relationship_logits,
                               rtol=1e-5, atol=1e-6)
    # with them (training): only the labelled positions, in row-major order
    labelled = targets[0] != -100
    masked_scores, masked_nsp = run_chain(model, inputs)
    assert masked_scores.shape == (int(labelled.sum()), TINY.vocab_size)
    torch.testing.assert_close(masked_scores, expected.prediction_logits[labelled], rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(masked_nsp, expected.seq_relationship_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.loss_fn((masked_scores, masked_nsp), targets), expected.loss,
                               rtol=1e-5, atol=0)


def test_padding_is_masked():
    """Padded positions must not influence real tokens: changing padded ids changes nothing."""
    _, model = tiny_pair("models.bert4.depth=2")
    inputs, _ = batch()
    input_ids, token_type_ids, attention_mask = inputs = inputs[:3]
    changed = torch.where(attention_mask == 0, 7, input_ids)
    assert not torch.equal(changed, input_ids)
    real = attention_mask.bool()
    a = run_chain(model, inputs)[0][real]
    b = run_chain(model, (changed, token_type_ids, attention_mask))[0][real]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def hf_grads_of(model) -> dict[str, torch.Tensor]:
    """Our gradients under HF names; the two copies of a tied weight add up."""
    grads: dict[str, torch.Tensor] = {}
    for k, module in enumerate(model.modules):
        for name, p in module.named_parameters():
            key = hf_name(name)
            grads[key] = grads[key] + p.grad if key in grads else p.grad.clone()
    return grads


@pytest.mark.parametrize("spec", ["models.bert4.depth=2", "models.bert4.depth=4",
                                  "models.bert4.layers=0,3,1", "models.bert4.layers=1.5,2.5",
                                  "models.bert4.layers=0.5,1,1.5,1",
                                  "models.bert4.layers=2.5,0.5,1"])
def test_gradients_match_transformers(spec):
    hf_model, model = tiny_pair(spec)
    inputs, targets = batch(seed=1)
    hf_forward(hf_model, inputs, targets).loss.backward()
    model.loss_fn(run_chain(model, inputs), targets).backward()
    ours = hf_grads_of(model)
    theirs = {name: p.grad for name, p in hf_model.named_parameters()}
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"{name}: {m}")
    # Both uses of the word embedding contribute: neither copy alone has HF's gradient.
    first, last = model.modules[0], model.modules[-1]
    word = first.embeddings.word_embeddings.weight.grad
    decoder = last.cls.predictions.decoder.weight.grad
    assert word.abs().sum() > 0 and decoder.abs().sum() > 0
    torch.testing.assert_close(word + decoder, theirs["bert.embeddings.word_embeddings.weight"],
                               rtol=1e-5, atol=1e-7)


def test_tied_copies_start_equal_and_are_separate_parameters():
    model = build_bert_pipeline(TINY, parse_module_spec("models.bert4.depth=2", 4), seed=3)
    (first, last), = model.tied_parameters
    assert (first, last) == ("0.embeddings.word_embeddings.weight",
                             "1.cls.predictions.decoder.weight")
    params = {f"{k}.{n}": p for k, m in enumerate(model.modules) for n, p in m.named_parameters()}
    assert torch.equal(params[first], params[last])
    assert params[first] is not params[last]
    assert params[first].data_ptr() != params[last].data_ptr()
    # Every parameter has exactly one name (no aliasing inside a stage either) and is used.
    for module in model.modules:
        named = dict(module.named_parameters(remove_duplicate=False))
        assert len(named) == len({id(p) for p in named.values()})


def test_build_is_seeded_and_initialised_like_transformers():
    a = build_bert_pipeline(TINY, parse_module_spec("models.bert4.depth=2", 4), seed=5)
    b = build_bert_pipeline(TINY, parse_module_spec("models.bert4.depth=2", 4), seed=5)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    last = a.modules[-1]
    assert torch.equal(last.cls.predictions.decoder.bias, torch.zeros(TINY.vocab_size))
    weight = a.modules[0].layer["0"].attention.self.query.weight
    assert abs(weight.std().item() - TINY.initializer_range) < 0.2 * TINY.initializer_range


def test_stage_rejects_wrong_inputs():
    _, model = tiny_pair("models.bert4.depth=2")
    inputs, _ = batch()
    with pytest.raises(TypeError, match="first BERT stage takes"):
        model.modules[0](*inputs[:2])
    with pytest.raises(TypeError, match="after the first takes"):
        model.modules[1](*inputs)


def test_partition_must_fit_config():
    with pytest.raises(PartitionError, match="has 6 layers but .*bert_config_tiny.json has "
                                             "num_hidden_layers=4"):
        build_bert_pipeline(TINY, BertPartition((3, 3)))


def runtime_call(module, args, params):
    """How the runtime calls a stage: functional_call with the stage's own names."""
    return torch.func.functional_call(module, params, args)


def test_stages_work_with_functional_call_and_non_reentrant_checkpoint():
    """With dropout on and in train mode: recomputing each stage under torch.utils.checkpoint
    (non-reentrant, RNG state preserved) gives the same loss and gradients as keeping
    activations, i.e. stages hold no state across calls."""
    config = BertModelConfig.from_dict({**TINY.to_dict(), "hidden_dropout_prob": 0.1,
                                        "attention_probs_dropout_prob": 0.1})
    model = build_bert_pipeline(config, parse_module_spec("models.bert4.depth=2", 4), seed=0)
    inputs, targets = batch(seed=2)
    results = []
    for recompute in (False, True):
        params = [{n: p.detach().clone().requires_grad_(True)
                   for n, p in m.named_parameters()} | dict(m.named_buffers())
                  for m in model.modules]
        torch.manual_seed(123)
        x = inputs
        for module, p in zip(model.modules, params):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(runtime_call, module, x, p,
                                                      use_reentrant=False)
            else:
                x = runtime_call(module, x, p)
        loss = model.loss_fn(x, targets)
        loss.backward()
        results.append((loss.detach(), [t.grad for p in params for t in p.values()
                                        if t.requires_grad]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    # Dropout really ran: without it the loss differs.
    model_eval = [m.eval() for m in model.modules]
    x = inputs
    for module in model_eval:
        x = module(*x)
    assert not torch.allclose(model.loss_fn(x, targets), loss_a)


def test_loss_is_mlm_plus_nsp_mean():
    """BertPretrainingLoss against a hand-written mean over the non-ignored labels."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 5, generator=generator)
    nsp_scores = torch.randn(2, 2, generator=generator)
    labels = torch.tensor([[1, -100, 4], [-100, -100, 0]])
    nsp = torch.tensor([1, 0])
    logp = scores.log_softmax(-1)
    mlm = -(logp[0, 0, 1] + logp[0, 2, 4] + logp[1, 2, 0]) / 3
    nsp_loss = -(nsp_scores.log_softmax(-1)[0, 1] + nsp_scores.log_softmax(-1)[1, 0]) / 2
    loss = BertPretrainingLoss()((scores, nsp_scores), (labels, nsp))
    torch.testing.assert_close(loss, mlm + nsp_loss)


def test_meta_build_of_bert_large_depth_8():
    config = BertModelConfig.from_json(CONFIGS / "bert_config_bert-large-uncased.json")
    model = build_bert_pipeline(config, parse_module_spec("models.bert24.depth=8", 24),
                                device="meta")
    assert model.layers_per_stage == (3,) * 8
    assert model.module_to_stage_map == (0, 1, 2, 3, 4, 5, 6, 7, 7)
    assert all(isinstance(m, BertStage) and len(m.layer) == 3 for m in model.modules)
    assert [list(map(int, m.layer)) for m in model.modules][2] == [6, 7, 8]
    assert all(p.is_meta for m in model.modules for p in m.parameters())
    with torch.device("meta"):
        hf_model = BertForPreTraining(config.to_transformers())
    hf_count = sum(p.numel() for p in hf_model.parameters())  # counts the tied weight once
    counts = stage_parameter_counts(model)
    assert len(counts) == 8
    assert tied_copy_count(model) == config.vocab_size * config.hidden_size
    assert sum(counts) - tied_copy_count(model) == hf_count
    # One BERT-large layer: q, k, v, out projections; two LayerNorms; the 1024-4096-1024 MLP.
    layer = 4 * (1024 * 1024 + 1024) + 2 * 2 * 1024 + (1024 * 4096 + 4096) + (4096 * 1024 + 1024)
    assert counts[1:7] == (3 * layer,) * 6
    table = format_parameter_table(model)
    assert f"{counts[0]:,}" in table and f"unique {hf_count:,}" in table
    assert len(table.splitlines()) == 10


def test_stages_survive_pickling():
    """Ray ships stages to their actors by pickling; a shipped stage computes the same."""
    import pickle

    _, model = tiny_pair("models.bert4.depth=2")
    inputs, targets = batch()
    shipped = pickle.loads(pickle.dumps((model.modules, model.loss_fn)))
    x, y = inputs, inputs
    for module, copy in zip(model.modules, shipped[0]):
        x, y = module(*x), copy(*y)
    assert torch.equal(model.loss_fn(x, targets), shipped[1](y, targets))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_stages_run_under_bf16_autocast(attn):
    hf_model, model = tiny_pair("models.bert4.depth=2", attn)
    inputs, targets = batch()
    expected = hf_forward(hf_model, inputs, targets).loss
    x = inputs
    for module in model.modules:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = module(*x)
    assert x[0].dtype == torch.bfloat16
    torch.testing.assert_close(model.loss_fn(x, targets).float(), expected, rtol=2e-2, atol=0)
