"""bert_config.json loading: the shipped configs, and errors that name the file, line and key."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers import BertForPreTraining

from stages.bert_config import BertConfigError, BertModelConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Google's released bert_config.json of BERT-Large, Uncased (24-layer, 1024-hidden, 16-heads).
GOOGLE_BERT_LARGE = {
    "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 4096,
    "max_position_embeddings": 512, "num_attention_heads": 16, "num_hidden_layers": 24,
    "type_vocab_size": 2, "vocab_size": 30522,
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bert_config.json"
    path.write_text(text)
    return path


def test_shipped_bert_large_config_is_googles():
    config = BertModelConfig.from_json(CONFIGS / "bert_config_bert-large-uncased.json")
    assert config.to_dict() == GOOGLE_BERT_LARGE
    hf_config = config.to_transformers()
    for key, value in GOOGLE_BERT_LARGE.items():
        assert getattr(hf_config, key) == value, key
    with torch.device("meta"):
        hf_model = BertForPreTraining(hf_config)
    # BERT-large's 335,141,888 BertModel parameters plus the pre-training heads (transform dense
    # 1024*1024+1024, its LayerNorm 2*1024, MLM bias 30522, NSP 1024*2+2).
    heads = 1024 * 1024 + 1024 + 2 * 1024 + 30522 + 1024 * 2 + 2
    assert sum(p.numel() for p in hf_model.parameters()) == 335_141_888 + heads


def test_tiny_config_has_no_dropout():
    config = BertModelConfig.from_json(CONFIGS / "bert_config_tiny.json")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (4, 64, 4)
    assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0.0


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attn_implementation_reaches_transformers(impl):
    config = BertModelConfig.from_dict(GOOGLE_BERT_LARGE)
    assert config.to_transformers(impl)._attn_implementation == impl
    with pytest.raises(BertConfigError, match="attn_implementation"):
        config.to_transformers("flash")


def test_missing_file_names_the_path_and_the_flag(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(BertConfigError,
                       match=rf"{path}: no such BERT config file.*--bert_config_path"):
        BertModelConfig.from_json(path)


def test_malformed_json_names_file_and_line(tmp_path):
    text = json.dumps(GOOGLE_BERT_LARGE, indent=2)
    text = text.replace('"hidden_size": 1024,', '"hidden_size": ,')
    line = 1 + text.split("\n").index('  "hidden_size": ,')
    path = write(tmp_path, text)
    with pytest.raises(BertConfigError, match=rf"{path}:{line}:\d+: malformed JSON"):
        BertModelConfig.from_json(path)


def test_missing_key_is_named(tmp_path):
    d = dict(GOOGLE_BERT_LARGE)
    del d["num_attention_heads"]
    path = write(tmp_path, json.dumps(d))
    with pytest.raises(BertConfigError,
                       match=rf"{path}: missing key\(s\) \['num_attention_heads'\]"):
        BertModelConfig.from_json(path)


@pytest.mark.parametrize("key, value, message", [
    ("hidden_size", 0, "hidden_size must be a positive integer"),
    ("num_hidden_layers", 2.5, "num_hidden_layers must be a positive integer"),
    ("vocab_size", True, "vocab_size must be a positive integer"),
    ("hidden_dropout_prob", 1.0, r"hidden_dropout_prob must be a probability in \[0, 1\)"),
    ("initializer_range", -0.02, "initializer_range must be a positive number"),
    ("hidden_act", "gleu", "hidden_act 'gleu' is not an activation"),
    ("num_attention_heads", 24, "hidden_size 1024 is not divisible by num_attention_heads 24"),
])
def test_invalid_values_are_named(tmp_path, key, value, message):
    path = write(tmp_path, json.dumps({**GOOGLE_BERT_LARGE, key: value}))
    with pytest.raises(BertConfigError, match=rf"{path}: {message}"):
        BertModelConfig.from_json(path)


def test_extra_keys_are_ignored_with_a_warning(tmp_path, caplog):
    path = write(tmp_path, json.dumps({**GOOGLE_BERT_LARGE, "directionality": "bidi"}))
    with caplog.at_level(logging.WARNING, logger="stages.bert_config"):
        config = BertModelConfig.from_json(path)
    assert config.to_dict() == GOOGLE_BERT_LARGE
    assert "directionality" in caplog.text and str(path) in caplog.text


def test_not_an_object(tmp_path):
    path = write(tmp_path, "[1, 2]")
    with pytest.raises(BertConfigError, match=rf"{path}: expected a JSON object"):
        BertModelConfig.from_json(path)
