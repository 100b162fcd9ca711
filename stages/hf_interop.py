"""Moving weights between a pipelined BERT and transformers' ``BertForPreTraining``.

Our state dicts have keys ``"<module index>.<name>"`` (see `stages.bert`); transformers' have
``bert.embeddings.*``, ``bert.encoder.layer.<i>.*``, ``bert.pooler.*`` and ``cls.*``. Because a
stage keys its layers by their global index, the name mapping does not depend on the split (a
layer cut in two keeps ``layer.<i>.attention.*`` on one stage and ``layer.<i>.intermediate.*``
and ``layer.<i>.output.*`` on the next):

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
import dataclasses
import json
import logging
import os
import shutil
from typing import Mapping

import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForPreTraining, BertModel

from stages.bert import MLM_DECODER_WEIGHT, BertPipelineModel, build_bert_pipeline
from stages.bert_config import BertModelConfig
from stages.partition import parse_module_spec

logger = logging.getLogger(__name__)

HF_WORD_EMBEDDING = "bert.embeddings.word_embeddings.weight"
HF_VOCAB = "vocab.txt"
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


def save_hf_pretraining(hf_state_dict: Mapping[str, torch.Tensor], hf_config: BertConfig,
                        directory: str | os.PathLike) -> None:
    """Write a ``BertForPreTraining`` state dict (on-disk names) and its config as a directory
    ``BertForPreTraining.from_pretrained`` loads (``config.json`` + ``model.safetensors``)."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    config = copy.deepcopy(hf_config)
    config.architectures = ["BertForPreTraining"]
    config.save_pretrained(directory)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in hf_state_dict.items()},
              os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


def save_hf_tokenizer(vocab_path: str | os.PathLike, do_lower_case: bool,
                      directory: str | os.PathLike, model_max_length: int) -> None:
    """Write the run's WordPiece tokenizer so ``AutoTokenizer.from_pretrained(directory)`` loads
    it: ``vocab.txt`` (the run's file, unchanged), ``tokenizer.json`` and
    ``tokenizer_config.json`` (with the run's ``do_lower_case``)."""
    from data.vocab import load_tokenizer

    directory = os.fspath(directory)
    tokenizer = load_tokenizer(vocab_path, do_lower_case=do_lower_case)
    tokenizer.model_max_length = model_max_length
    os.makedirs(directory, exist_ok=True)
    tokenizer.save_pretrained(directory)
    # transformers 5 writes only tokenizer.json; BERT tools (and our --vocab_path) read vocab.txt
    shutil.copyfile(vocab_path, os.path.join(directory, HF_VOCAB))


def hf_tokenizer_settings(directory: str | os.PathLike) -> tuple[str | None, bool | None]:
    """(``vocab.txt`` path, ``do_lower_case``) of a transformers directory, each None where the
    directory does not say (no ``vocab.txt``; no ``tokenizer_config.json`` or no such key)."""
    directory = os.fspath(directory)
    vocab = os.path.join(directory, HF_VOCAB)
    lower = None
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(path):
        try:
            with open(path) as f:
                lower = json.load(f).get("do_lower_case")
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") \
                from None
    return (vocab if os.path.isfile(vocab) else None), lower


def is_hf_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a transformers ``save_pretrained`` directory (a ``config.json``, not a
    checkpoint of ours, which has a ``manifest.json``)."""
    return (os.path.isfile(os.path.join(path, "config.json"))
            and not os.path.exists(os.path.join(path, "manifest.json")))


def read_hf_encoder(directory: str | os.PathLike, *, seed: int | None = None
                    ) -> tuple[BertModelConfig, dict[str, torch.Tensor]]:
    """A transformers ``BertModel`` or ``BertForPreTraining`` directory as (its BERT config, the
    encoder's state dict with ``bert.`` names, as ``BertForSequenceClassification`` holds it).

    A ``BertForPreTraining`` directory is read and checked as `load_hf_checkpoint` reads it (the
    heads are then dropped); a ``BertModel`` one (``architectures`` says so) by ``BertModel``,
    which may only lack the pooler (then initialised, ``seed`` making it reproducible).
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no config.json; expected a directory written by "
                              "save_pretrained") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
    if saved.get("model_type", "bert") != "bert":
        raise CheckpointError(f"{path}: model_type {saved['model_type']!r}; only BERT "
                              "checkpoints (model_type \"bert\") can be used")
    hf_config = BertConfig.from_pretrained(directory)
    defaults = BertConfig()
    for key in ("layer_norm_eps", "position_embedding_type"):
        if getattr(hf_config, key, None) != getattr(defaults, key, None):
            raise CheckpointError(f"{path}: {key}={getattr(hf_config, key, None)!r}; the pipeline "
                                  f"builds BERT with transformers' default "
                                  f"{getattr(defaults, key, None)!r}")
    keys = [f.name for f in dataclasses.fields(BertModelConfig) if f.name != "source"]
    cfg = BertModelConfig.from_dict({k: getattr(hf_config, k) for k in keys}, source=path)
    if saved.get("architectures") == ["BertModel"]:
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        try:
            with rng:
                if seed is not None:
                    torch.manual_seed(seed)
                encoder, info = BertModel.from_pretrained(directory, config=cfg.to_transformers(),
                                                          output_loading_info=True)
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{directory}: transformers could not load a BertModel from "
                                  f"it: {e}") from e
        missing = [k for k in info["missing_keys"] if not k.startswith("pooler.")]
        if missing or info["unexpected_keys"]:
            raise CheckpointError(f"{directory}: not a BertModel of its config.json: missing "
                                  f"{_short(missing)}, unexpected "
                                  f"{_short(info['unexpected_keys'])}")
        return cfg, {"bert." + k: v for k, v in encoder.state_dict().items()}
    layers = cfg.num_hidden_layers
    model = build_bert_pipeline(cfg, parse_module_spec(f"models.bert{layers}.depth=1", layers),
                                device="meta")
    state = pipeline_to_hf_state_dict(model, load_hf_checkpoint(directory, model, seed=seed))
    return cfg, {k: v for k, v in state.items() if k.startswith("bert.")}


def export_hf_checkpoint(model: BertPipelineModel, state_dict: Mapping[str, torch.Tensor],
                         directory: str | os.PathLike, *,
                         vocab_path: str | os.PathLike | None = None,
                         do_lower_case: bool = True) -> None:
    """Write our state dict as a directory ``BertForPreTraining.from_pretrained`` loads
    (``config.json`` + ``model.safetensors``); with ``vocab_path``, also the tokenizer that
    ``AutoTokenizer.from_pretrained`` loads (see `save_hf_tokenizer`)."""
    save_hf_pretraining(pipeline_to_hf_state_dict(model, state_dict), model.hf_config, directory)
    if vocab_path is not None:
        save_hf_tokenizer(vocab_path, do_lower_case, directory,
                          model.hf_config.max_position_embeddings)
