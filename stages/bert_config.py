"""BERT shape from a Google-format ``bert_config.json`` (``--bert_config_path``).

The file is the one Google's BERT release and NVIDIA's/PipeDream's BERT scripts use::

    {"vocab_size": 30522, "hidden_size": 1024, "num_hidden_layers": 24, ...}

`BertModelConfig` holds its eleven keys, validated, and turns them into the
`transformers.BertConfig` our stages are built from.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from transformers import BertConfig
from transformers.activations import ACT2FN

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATIONS = ("eager", "sdpa")


class BertConfigError(ValueError):
    """A bert_config.json is missing, malformed or describes an impossible model."""


@dataclass(frozen=True)
class BertModelConfig:
    """The keys of a Google-format ``bert_config.json``.

    ``source`` names where the values came from (a file path) and prefixes every error message.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    hidden_dropout_prob: float
    attention_probs_dropout_prob: float
    max_position_embeddings: int
    type_vocab_size: int
    initializer_range: float
    source: str = field(default="<BertModelConfig>", compare=False)

    def __post_init__(self) -> None:
        where = self.source
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BertConfigError(f"{where}: {name} must be a positive integer, got {value!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not 0.0 <= value < 1.0):
                raise BertConfigError(f"{where}: {name} must be a probability in [0, 1), "
                                      f"got {value!r}")
        value = self.initializer_range
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or value <= 0):
            raise BertConfigError(f"{where}: initializer_range must be a positive number (Google's "
                                  f"BERT uses 0.02), got {value!r}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN:
            raise BertConfigError(f"{where}: hidden_act {self.hidden_act!r} is not an activation "
                                  f"transformers knows; use one of {sorted(ACT2FN)}")
        if self.hidden_size % self.num_attention_heads:
            raise BertConfigError(f"{where}: hidden_size {self.hidden_size} is not divisible by "
                                  f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> "BertModelConfig":
        if not isinstance(d, Mapping):
            raise BertConfigError(f"{source}: expected a JSON object of BERT hyper-parameters, "
                                  f"got {type(d).__name__}")
        keys = [f.name for f in fields(cls) if f.name != "source"]
        missing = [k for k in keys if k not in d]
        if missing:
            raise BertConfigError(f"{source}: missing key(s) {missing}; a bert_config.json needs "
                                  f"all of {keys} (see "
                                  "configs/bert_config_bert-large-uncased.json)")
        ignored = sorted(set(d) - set(keys))
        if ignored:
            # Google's multilingual configs carry pooler_* and directionality keys BERT ignores.
            logger.warning("%s: ignoring key(s) %s, which BertForPreTraining does not use",
                           source, ignored)
        return cls(**{k: d[k] for k in keys}, source=source)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "BertModelConfig":
        path = os.fspath(path)
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            raise BertConfigError(f"{path}: no such BERT config file (pass --bert_config_path "
                                  "with a bert_config.json, e.g. "
                                  "configs/bert_config_bert-large-uncased.json)") from None
        except OSError as e:
            raise BertConfigError(f"{path}: cannot read BERT config file: {e.strerror}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise BertConfigError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
        return cls.from_dict(d, source=path)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["source"]
        return d

    def to_transformers(self, attn_implementation: str = "sdpa") -> BertConfig:
        """The `transformers.BertConfig` for these hyper-parameters.

        ``attn_implementation`` is "sdpa" (``BertModel``'s default) or "eager"; both build the
        attention mask with transformers' own ``create_bidirectional_mask``.
        """
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise BertConfigError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, "
                                  f"got {attn_implementation!r}")
        return BertConfig(**self.to_dict(), attn_implementation=attn_implementation)
