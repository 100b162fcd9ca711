"""Moving weights between a pipelined BERT and transformers' ``BertForPreTraining``.

Our state dicts have keys ``"<module index>.<name>"`` (see `stages.bert`); transformers' have
``bert.embeddings.*``, ``bert.encoder.layer.<i>.*``, ``bert.pooler.*`` and ``cls.*``. Because a
stage keys its layers by their global index, the name mapping does not depend on the split:

    <k>.embeddings.X                     <-> bert.embeddings.X                 (k = 0)
    <k>.layer.<i>.X                      <-> bert.encoder.layer.<i>.X
    <k>.pooler.X                         <-> bert.pooler.X                     (k = last)
    <k>.cls.predictions.decoder.bias     <-> cls.predictions.bias
    <k>.cls.predictions.decoder.weight   <-> bert.embeddings.word_embeddings.weight (tied copy)
    <k>.cls.X                            <-> cls.X

transformers' own state dict also names the two ties (``cls.predictions.decoder.weight`` and
``cls.predictions.decoder.bias``); its saved checkpoints leave them out. We accept both and write
the saved form, so ``BertForPreTraining.from_pretrained`` loads what we export.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from typing import Mapping

import torch
from safetensors.torch import save_file
from transformers import BertForPreTraining

from stages.bert import MLM_DECODER_WEIGHT, BertPipelineModel

logger = logging.getLogger(__name__)

HF_WORD_EMBEDDING = "bert.embeddings.word_embeddings.weight"
HF_MLM_BIAS = "cls.predictions.bias"
# transformers' second names for the tied tensors (present in model.state_dict(), not on disk).
HF_TIED_ALIASES = {"cls.predictions.decoder.weight": HF_WORD_EMBEDDING,
                   "cls.predictions.decoder.bias": HF_MLM_BIAS}
# Shape-defining keys a checkpoint's config.json must share with --bert_config_path.
_SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size", "max_position_embeddings", "type_vocab_size")


class CheckpointError(ValueError):
    """A checkpoint or state dict does not fit the pipelined BERT; the message says how."""


def hf_name(name: str) -> str:
    """The transformers name of a stage's state-dict entry ``name`` (without module index)."""
    if name.startswith(("embeddings.", "pooler.")):
        return "bert." + name
    if name.startswith("layer."):
        return "bert.encoder." + name
    if name == "cls.predictions.decoder.bias":
        return HF_MLM_BIAS
    if name == MLM_DECODER_WEIGHT:
        return HF_WORD_EMBEDDING
    if name.startswith("cls."):
        return name
    raise CheckpointError(f"{name!r} is not a BERT stage parameter name")


def _non_persistent_buffers(model: BertPipelineModel) -> set[str]:
    """``"<k>.<name>"`` of buffers that are not part of a state dict (position ids)."""
    names = set()
    for k, module in enumerate(model.modules):
        persistent = module.state_dict().keys()
        names |= {f"{k}.{n}" for n, _ in module.named_buffers() if n not in persistent}
    return names


def _short(keys) -> str:
    keys = sorted(keys)
    return str(keys[:12])[:-1] + (f", ... ({len(keys)} in all)]" if len(keys) > 12 else "]")


def pipeline_to_hf_state_dict(model: BertPipelineModel, state_dict: Mapping[str, torch.Tensor], *,
                              with_tied_aliases: bool = False) -> dict[str, torch.Tensor]:
    """Our ``"<k>.<name>"`` state dict as ``BertForPreTraining`` names.

    The tied MLM decoder copy must equal the word embedding (the runtime keeps them equal). The
    result is the on-disk form; ``with_tied_aliases=True`` adds transformers' two alias keys so
    ``BertForPreTraining.load_state_dict(..., strict=True)`` accepts it. Non-persistent buffers
    (position ids), which a runtime may include, are ignored.
    """
    expected = model.state_dict().keys()
    ignorable = _non_persistent_buffers(model)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected and k not in ignorable]
    if missing or unexpected:
        raise CheckpointError(f"state dict does not fit BERT {model.partition.to_spec()}: "
                              f"missing {_short(missing)}, unexpected {_short(unexpected)}")
    out: dict[str, torch.Tensor] = {}
    for key in expected:
        name = key.partition(".")[2]
        if name == MLM_DECODER_WEIGHT:
            continue  # checked against the word embedding below
        out[hf_name(name)] = state_dict[key]
    for group in model.tied_parameters:
        first = state_dict[group[0]]
        for other in group[1:]:
            other_tensor = state_dict[other].to(first.device)
            if first.device.type != "meta" and not torch.equal(first, other_tensor):
                diff = (first.float() - other_tensor.float()).abs().max().item()
                raise CheckpointError(f"tied parameters {group[0]} and {other} differ (max abs "
                                      f"difference {diff:.3g}); the runtime must keep tied copies "
                                      "equal, so this state is inconsistent")
    if with_tied_aliases:
        for alias, canonical in HF_TIED_ALIASES.items():
            out[alias] = out[canonical]
    return out


def hf_to_pipeline_state_dict(model: BertPipelineModel, hf_state_dict: Mapping[str, torch.Tensor]
                              ) -> dict[str, torch.Tensor]:
    """A ``BertForPreTraining`` state dict (on-disk form, or ``model.state_dict()`` with the tied
    aliases) as our ``"<k>.<name>"`` state dict for ``model``'s partition.

    The MLM decoder copy on the last stage is a clone of the word embedding.
    """
    for alias, canonical in HF_TIED_ALIASES.items():
        if alias in hf_state_dict and canonical in hf_state_dict and not torch.equal(
                hf_state_dict[alias], hf_state_dict[canonical]):
            raise CheckpointError(f"{alias} differs from {canonical}; BertForPreTraining ties "
                                  "them, so the checkpoint is inconsistent")
    ignorable = {hf_name(key.partition(".")[2]) for key in _non_persistent_buffers(model)}
    out: dict[str, torch.Tensor] = {}
    used = set(HF_TIED_ALIASES)
    missing = []
    for key in model.state_dict().keys():
        name = hf_name(key.partition(".")[2])
        if name not in hf_state_dict:
            missing.append(name)
            continue
        used.add(name)
        tensor = hf_state_dict[name]
        out[key] = tensor.clone() if key.partition(".")[2] == MLM_DECODER_WEIGHT else tensor
    unexpected = [k for k in hf_state_dict if k not in used and k not in ignorable]
    if missing or unexpected:
        raise CheckpointError(f"BertForPreTraining state dict does not fit BERT "
                              f"{model.partition.to_spec()}: missing {_short(set(missing))}, "
                              f"unexpected {_short(unexpected)}")
    return out


def _check_checkpoint_config(directory: str, model: BertPipelineModel) -> None:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        return  # weights alone are fine: shapes are then checked tensor by tensor
    try:
        with open(path) as f:
            saved = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
    ours = model.hf_config
    diffs = [f"{k}={saved.get(k)!r} (ours {getattr(ours, k)!r})" for k in _SHAPE_KEYS
             if saved.get(k) != getattr(ours, k)]
    if diffs:
        raise CheckpointError(f"{path} describes a different BERT than the one being trained: "
                              + ", ".join(diffs) + "; pass a --bert_config_path that matches "
                              "the checkpoint")


def load_hf_checkpoint(directory: str | os.PathLike, model: BertPipelineModel, *,
                       seed: int | None = None) -> dict[str, torch.Tensor]:
    """Read a ``BertForPreTraining.from_pretrained`` directory into our state dict for ``model``
    (usable as ``PipelineTrainer(initial_state_dict=...)`` or ``model.load_state_dict``).

    A bare ``BertModel`` checkpoint (keys without ``bert.``, no ``cls.*``, possibly no pooler) loads
    too: the missing pooler and heads are initialised as transformers initialises them (``seed``
    makes that reproducible) and a warning names them. Any other missing or unexpected key is an
    error.
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such checkpoint directory (expected a directory "
                              "written by save_pretrained, with config.json and model.safetensors)")
    _check_checkpoint_config(directory, model)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    try:
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            hf_model, info = BertForPreTraining.from_pretrained(
                directory, config=copy.deepcopy(model.hf_config), output_loading_info=True)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{directory}: transformers could not load a BertForPreTraining "
                              f"checkpoint from it: {e}") from e
    if info["unexpected_keys"]:
        raise CheckpointError(f"{directory}: checkpoint has keys BertForPreTraining does not: "
                              f"{_short(info['unexpected_keys'])}; is it a BERT checkpoint?")
    hf_keys = hf_model.state_dict().keys()
    missing = set(info["missing_keys"])
    heads = {k for k in hf_keys if k.startswith(("cls.", "bert.pooler."))}
    head_params = {k for k in heads if k.startswith("cls.") and k not in HF_TIED_ALIASES}
    if head_params <= missing:
        initialised = sorted((missing & heads) - set(HF_TIED_ALIASES))
        logger.warning("%s holds a bare BertModel (no pre-training heads); initialised %s as "
                       "transformers initialises them", directory, initialised)
        missing -= heads
    missing -= set(HF_TIED_ALIASES)  # a missing tied tensor is reported under its canonical name
    if missing:
        raise CheckpointError(f"{directory}: checkpoint lacks {_short(missing)}; it must hold a "
                              "whole BertForPreTraining, or a BertModel (then only the pooler and "
                              "heads are initialised)")
    return hf_to_pipeline_state_dict(model, hf_model.state_dict())


def export_hf_checkpoint(model: BertPipelineModel, state_dict: Mapping[str, torch.Tensor],
                         directory: str | os.PathLike) -> None:
    """Write our state dict as a directory ``BertForPreTraining.from_pretrained`` loads
    (``config.json`` + ``model.safetensors``)."""
    directory = os.fspath(directory)
    hf_state = pipeline_to_hf_state_dict(model, state_dict)
    os.makedirs(directory, exist_ok=True)
    config = copy.deepcopy(model.hf_config)
    config.architectures = ["BertForPreTraining"]
    config.save_pretrained(directory)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in hf_state.items()},
              os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
