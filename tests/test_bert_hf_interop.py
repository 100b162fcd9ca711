"""State-dict conversion to and from transformers, checkpoint import/export, and their errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertForPreTraining, BertModel

from stages.bert import build_bert_pipeline
from stages.bert_batches import random_pretraining_microbatch
from stages.bert_config import BertModelConfig
from stages.hf_interop import (CheckpointError, export_hf_checkpoint, hf_to_pipeline_state_dict,
                               load_hf_checkpoint, pipeline_to_hf_state_dict)
from stages.partition import parse_module_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = BertModelConfig.from_json(CONFIGS / "bert_config_tiny.json")
SPECS = ["models.bert4.depth=1", "models.bert4.depth=3", "models.bert4.layers=0,3,1",
         "models.bert4.layers=1.5,1,1.5"]


def tiny_model(spec: str = "models.bert4.depth=2", seed: int = 0):
    return build_bert_pipeline(TINY, parse_module_spec(spec, 4), seed=seed)


def tiny_hf(seed: int = 0) -> BertForPreTraining:
    torch.manual_seed(seed)
    return BertForPreTraining(TINY.to_transformers())


def perturbed_state(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's state moved away from initialisation (zero biases become non-zero), with the
    tied copies kept equal, as after training."""
    generator = torch.Generator().manual_seed(seed)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=generator)
             for k, v in model.state_dict().items()}
    (first, last), = model.tied_parameters
    state[last] = state[first].clone()
    return state


def run_chain(model, inputs):
    x = inputs
    for module in model.modules:
        x = module(*x)
    return x


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("spec", SPECS)
def test_round_trip_from_transformers(spec):
    hf_model = tiny_hf()
    hf_model.cls.predictions.bias.data.normal_()  # make the MLM bias distinguishable from zeros
    model = tiny_model(spec)
    ours = hf_to_pipeline_state_dict(model, hf_model.state_dict())
    assert ours.keys() == model.state_dict().keys()
    back = pipeline_to_hf_state_dict(model, ours, with_tied_aliases=True)
    assert_same_state(back, hf_model.state_dict())
    # The on-disk form has no alias keys; it converts back the same.
    on_disk = pipeline_to_hf_state_dict(model, ours)
    assert set(back) - set(on_disk) == {"cls.predictions.decoder.weight",
                                        "cls.predictions.decoder.bias"}
    assert_same_state(hf_to_pipeline_state_dict(model, on_disk), ours)


@pytest.mark.parametrize("spec", SPECS)
def test_round_trip_from_pipeline(spec):
    model = tiny_model(spec)
    state = perturbed_state(model)
    hf_state = pipeline_to_hf_state_dict(model, state, with_tied_aliases=True)
    hf_model = tiny_hf(seed=1)
    hf_model.load_state_dict(hf_state, strict=True)
    assert_same_state(hf_to_pipeline_state_dict(model, hf_model.state_dict()), state)


def test_conversion_is_independent_of_the_split():
    hf_state = tiny_hf().state_dict()
    a, b = tiny_model("models.bert4.depth=2"), tiny_model("models.bert4.layers=1,2,1")
    via_a = pipeline_to_hf_state_dict(a, hf_to_pipeline_state_dict(a, hf_state))
    via_b = pipeline_to_hf_state_dict(b, hf_to_pipeline_state_dict(b, hf_state))
    assert_same_state(via_a, via_b)
    assert "1.layer.2.output.dense.weight" in hf_to_pipeline_state_dict(b, hf_state)


def test_runtime_state_with_position_buffers_is_accepted():
    model = tiny_model()
    state = model.state_dict()
    state.update({f"0.{n}": b for n, b in model.modules[0].named_buffers()})
    assert "0.embeddings.position_ids" in state
    assert "bert.embeddings.position_ids" not in pipeline_to_hf_state_dict(model, state)


def test_conversion_errors_name_keys():
    model = tiny_model()
    state = model.state_dict()
    del state["1.layer.3.output.dense.bias"]
    state["1.layer.9.output.dense.bias"] = torch.zeros(64)
    with pytest.raises(CheckpointError, match=r"missing \['1.layer.3.output.dense.bias'\], "
                                              r"unexpected \['1.layer.9.output.dense.bias'\]"):
        pipeline_to_hf_state_dict(model, state)
    hf_state = tiny_hf().state_dict()
    hf_state.pop("cls.seq_relationship.bias")
    hf_state["bert.encoder.layer.4.output.dense.bias"] = torch.zeros(64)
    with pytest.raises(CheckpointError, match=r"missing \['cls.seq_relationship.bias'\], "
                                              r"unexpected \['bert.encoder.layer.4"):
        hf_to_pipeline_state_dict(model, hf_state)


def test_diverged_tied_copies_are_an_error():
    model = tiny_model()
    state = model.state_dict()
    state["1.cls.predictions.decoder.weight"] = state["1.cls.predictions.decoder.weight"] + 1e-3
    with pytest.raises(CheckpointError, match="tied parameters 0.embeddings.word_embeddings.weight "
                                              "and 1.cls.predictions.decoder.weight differ"):
        pipeline_to_hf_state_dict(model, state)


@pytest.mark.parametrize("spec", ["models.bert4.layers=1,2,1", "models.bert4.layers=2.5,1.5"])
def test_export_loads_in_transformers_and_gives_our_logits(tmp_path, spec):
    model = tiny_model(spec)
    state = perturbed_state(model)
    model.load_state_dict(state)
    export_hf_checkpoint(model, state, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["num_hidden_layers"] == 4
    hf_model, info = BertForPreTraining.from_pretrained(tmp_path / "export",
                                                        output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf_model.eval()
    generator = torch.Generator().manual_seed(0)
    inputs, _ = random_pretraining_microbatch(generator, microbatch_size=4, seq_length=20,
                                              vocab_size=TINY.vocab_size)
    inputs = inputs[:3]          # without the labels: every position is scored
    with torch.no_grad():
        ours = run_chain(model, inputs)
        input_ids, token_type_ids, attention_mask = inputs
        theirs = hf_model(input_ids=input_ids, token_type_ids=token_type_ids,
                          attention_mask=attention_mask)
    torch.testing.assert_close(ours[0], theirs.prediction_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs.seq_relationship_logits, rtol=1e-5, atol=1e-6)
    # And it loads back into a pipeline with another split unchanged.
    other = tiny_model("models.bert4.depth=4", seed=9)
    again = load_hf_checkpoint(tmp_path / "export", other)
    assert_same_state(pipeline_to_hf_state_dict(other, again),
                      pipeline_to_hf_state_dict(model, state))


def test_load_full_checkpoint(tmp_path):
    hf_model = tiny_hf()
    hf_model.cls.predictions.bias.data.normal_()
    hf_model.save_pretrained(tmp_path / "ckpt")
    model = tiny_model("models.bert4.depth=2", seed=4)
    state = load_hf_checkpoint(tmp_path / "ckpt", model)
    assert_same_state(state, hf_to_pipeline_state_dict(model, hf_model.state_dict()))


@pytest.mark.parametrize("with_pooler", [True, False])
def test_bare_bert_model_loads_with_heads_initialised(tmp_path, caplog, with_pooler):
    torch.manual_seed(0)
    bare = BertModel(TINY.to_transformers(), add_pooling_layer=with_pooler)
    bare.save_pretrained(tmp_path / "bare")
    saved = load_file(tmp_path / "bare" / "model.safetensors")
    assert not any(k.startswith("bert.") for k in saved)
    model = tiny_model("models.bert4.depth=2", seed=4)
    with caplog.at_level(logging.WARNING, logger="stages.hf_interop"):
        state = load_hf_checkpoint(tmp_path / "bare", model, seed=0)
    for name, tensor in bare.state_dict().items():
        key = f"0.{name}" if name.startswith("embeddings.") else (
            f"1.{name}" if name.startswith("pooler.") else f"{int(name.split('.')[2]) // 2}."
            + name.removeprefix("encoder."))
        assert torch.equal(state[key], tensor), name
    # Heads as transformers initialises them: zero bias, unit LayerNorm, N(0, 0.02) dense, and
    # the decoder tied to the loaded word embedding.
    assert torch.equal(state["1.cls.predictions.decoder.bias"], torch.zeros(TINY.vocab_size))
    assert torch.equal(state["1.cls.predictions.transform.LayerNorm.weight"], torch.ones(64))
    std = state["1.cls.predictions.transform.dense.weight"].std().item()
    assert abs(std - TINY.initializer_range) < 0.2 * TINY.initializer_range
    assert torch.equal(state["1.cls.predictions.decoder.weight"],
                       bare.state_dict()["embeddings.word_embeddings.weight"])
    warnings = [r.getMessage() for r in caplog.records if r.name == "stages.hf_interop"]
    assert len(warnings) == 1 and "bare BertModel" in warnings[0]
    assert "cls.seq_relationship.weight" in warnings[0] and "cls.predictions.bias" in warnings[0]
    assert ("bert.pooler.dense.weight" in warnings[0]) == (not with_pooler)
    model.load_state_dict(state)


def test_checkpoint_errors(tmp_path):
    model = tiny_model()
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_hf_checkpoint(tmp_path / "missing", model)

    other = BertModelConfig.from_dict({**TINY.to_dict(), "hidden_size": 32})
    torch.manual_seed(0)
    BertForPreTraining(other.to_transformers()).save_pretrained(tmp_path / "narrow")
    with pytest.raises(CheckpointError, match=r"config.json describes a different BERT .*"
                                              r"hidden_size=32 \(ours 64\).*--bert_config_path"):
        load_hf_checkpoint(tmp_path / "narrow", model)

    tiny_hf().save_pretrained(tmp_path / "extra")
    weights = tmp_path / "extra" / "model.safetensors"
    tensors = load_file(weights)
    tensors["bert.encoder.layer.7.output.dense.bias"] = torch.zeros(64)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"keys BertForPreTraining does not: "
                                              r"\['bert.encoder.layer.7.output.dense.bias'\]"):
        load_hf_checkpoint(tmp_path / "extra", model)

    tiny_hf().save_pretrained(tmp_path / "holey")
    weights = tmp_path / "holey" / "model.safetensors"
    tensors = load_file(weights)
    del tensors["bert.encoder.layer.2.attention.self.key.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lacks \['bert.encoder.layer.2.attention.self.key."
                                              r"weight'\]"):
        load_hf_checkpoint(tmp_path / "holey", model)

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="could not load"):
        load_hf_checkpoint(tmp_path / "empty", model)
