"""BERT for GLUE fine-tuning: transformers' BertForSequenceClassification as one pipeline module.

`BertClassifier` takes ``(input_ids, token_type_ids, attention_mask)`` and returns the logits, so
the runtime can train it (depth 1, data-parallel replicas); `GlueLoss` is cross-entropy, or mean
squared error for the regression task (STS-B), as transformers computes them.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Sequence

import torch
from torch import nn
from transformers import BertForSequenceClassification

from stages.bert_config import BertModelConfig

logger = logging.getLogger(__name__)


class BertClassifier(nn.Module):
    def __init__(self, model_config: BertModelConfig, num_labels: int,
                 pretrained: Mapping[str, torch.Tensor] | None = None, seed: int = 0):
        super().__init__()
        config = model_config.to_transformers()
        config.num_labels = num_labels
        config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.model = BertForSequenceClassification(config)
        if pretrained is not None:
            bert = {k[len("bert."):]: v for k, v in pretrained.items() if k.startswith("bert.")}
            result = self.model.bert.load_state_dict(bert, strict=False)
            missing = [k for k in result.missing_keys if "position_ids" not in k]
            if missing or result.unexpected_keys:
                raise ValueError(f"pre-trained weights do not fit BertModel: missing {missing[:5]}, "
                                 f"unexpected {result.unexpected_keys[:5]}")
            logger.info("classifier head initialised; encoder from the pre-trained checkpoint")

    def forward(self, input_ids, token_type_ids, attention_mask):
        return self.model(input_ids=input_ids, token_type_ids=token_type_ids,
                          attention_mask=attention_mask).logits

    def save_pretrained(self, directory: str | os.PathLike, *, labels: Sequence[str] | None,
                        vocab_path: str | os.PathLike, do_lower_case: bool) -> None:
        """Write the classifier as a directory that ``BertForSequenceClassification`` and
        ``AutoTokenizer`` load with ``from_pretrained``: config (with the task's label names),
        safetensors weights and the tokenizer it was fine-tuned with."""
        from stages.hf_interop import save_hf_tokenizer

        config = self.model.config
        if labels is not None:
            config.id2label = dict(enumerate(labels))
            config.label2id = {name: i for i, name in enumerate(labels)}
        config.architectures = ["BertForSequenceClassification"]
        self.model.save_pretrained(directory)
        save_hf_tokenizer(vocab_path, do_lower_case, directory, config.max_position_embeddings)


class GlueLoss(nn.Module):
    def __init__(self, num_labels: int):
        super().__init__()
        self.num_labels = num_labels

    def forward(self, logits, labels):
        if self.num_labels == 1:
            return nn.functional.mse_loss(logits.reshape(-1), labels.float().reshape(-1))
        return nn.functional.cross_entropy(logits.reshape(-1, self.num_labels),
                                           labels.reshape(-1))
