"""BERT for pre-training (MLM + NSP) as a chain of pipeline stages built from transformers' modules.

``transformers.BertForPreTraining`` is cut, unchanged, into one `BertStage` per pipeline stage:

    stage 0     BertEmbeddings + BertLayer x n_0     (input_ids, token_type_ids, mask[, labels])
                                                     -> (h, mask[, labels])
    stage s     BertLayer x n_s                      (h, mask[, labels]) -> (h, mask[, labels])
    stage D-1   BertLayer x n_{D-1} + BertPooler + BertPreTrainingHeads
                                                     (h, mask[, labels]) -> (mlm_scores, nsp_scores)
    loss        BertPretrainingLoss((mlm_scores, nsp_scores), (mlm_labels, nsp_labels))

Where a partition cuts a layer in two (`stages.partition`, counts ending in ``.5``), the stage
before the cut holds that layer's ``attention`` (`BertAttentionBlock`) and the stage after it the
layer's ``intermediate`` and ``output`` (`BertFeedForwardBlock`), under the layer's own index, so
every parameter keeps its transformers name and the two halves compute exactly what
``BertLayer.forward`` does.

**Masked-only MLM head.** In training the MLM labels travel with the inputs (a fourth input of the
first stage, passed on like the mask: ``b x seq`` int64, small beside the hidden states). The last
stage then gathers the labelled positions (label != -100) before the prediction transform and the
decoder, as NVIDIA's BERT and Megatron do, so ``mlm_scores`` is ``[labelled positions, vocab]``
instead of ``[b, seq, vocab]``: the decoder, the largest matmul of the model, runs on about 15% of
the positions, and the logits kept for backward shrink by the same factor. The number of labelled
positions varies per microbatch. Without labels (three inputs) the last stage scores every
position, ``[b, seq, vocab]``, as ``BertForPreTraining`` does; the loss takes either and is
``BertForPreTraining``'s loss in both cases.

The 2-D padding mask (int64, 1 = token, 0 = padding) travels between stages with the hidden states;
each stage turns it into the mask its attention implementation wants with transformers' own
``create_bidirectional_mask``, exactly as ``BertModel`` does. Stages hold no state across calls,
so the runtime may recompute them with ``torch.utils.checkpoint``.

Two ties of ``BertForPreTraining`` cross or live inside the heads:

* the MLM decoder weight is the word embedding. Stages never alias parameters across modules, so
  the last stage owns a copy (``cls.predictions.decoder.weight``) that starts equal to stage 0's
  ``embeddings.word_embeddings.weight``; the pair is listed in ``tied_parameters`` and the runtime
  keeps the copies equal (their gradients are summed).
* transformers 5 ties ``cls.predictions.decoder.bias`` to ``cls.predictions.bias`` by name in
  ``BertForPreTraining``. The head's forward only uses the decoder's bias, so a stage keeps that one
  and drops the alias: every parameter of a stage is used and none is aliased.
  `stages.hf_interop` maps it back to HF's ``cls.predictions.bias``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from transformers import BertConfig, BertForPreTraining
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import (BertEmbeddings, BertLayer, BertPooler,
                                                    BertPreTrainingHeads)
from transformers.pytorch_utils import apply_chunking_to_forward

from pd2bw_ray.config import ConfigError, PipelineConfig
from stages.bert_config import BertModelConfig
from stages.partition import BertPartition, PartitionError

WORD_EMBEDDING = "embeddings.word_embeddings.weight"
MLM_DECODER_WEIGHT = "cls.predictions.decoder.weight"
IGNORE_INDEX = -100       # masked_lm_labels of a position that is not predicted


class BertAttentionBlock(nn.Module):
    """The first half of a `BertLayer` cut in two: its ``attention`` (self-attention, output
    projection, residual and LayerNorm), called as ``BertLayer.forward`` calls it."""

    def __init__(self, layer: BertLayer) -> None:
        super().__init__()
        if getattr(layer, "add_cross_attention", False):
            raise PartitionError("a BERT layer with cross-attention cannot be cut in two")
        self.attention = layer.attention

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None
                ) -> torch.Tensor:
        return self.attention(hidden_states, attention_mask)[0]


class BertFeedForwardBlock(nn.Module):
    """The second half of a `BertLayer` cut in two: ``intermediate`` and ``output`` (the MLP,
    residual and LayerNorm), chunked as ``BertLayer.forward`` chunks them."""

    def __init__(self, layer: BertLayer) -> None:
        super().__init__()
        self.chunk_size_feed_forward = layer.chunk_size_feed_forward
        self.seq_len_dim = layer.seq_len_dim
        self.intermediate = layer.intermediate
        self.output = layer.output

    def feed_forward_chunk(self, attention_output: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(attention_output), attention_output)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        return apply_chunking_to_forward(self.feed_forward_chunk, self.chunk_size_feed_forward,
                                         self.seq_len_dim, hidden_states)


class BertStage(nn.Module):
    """A contiguous slice of ``BertForPreTraining``: encoder layers (keyed by their global index,
    so parameter names read ``layer.7.attention...``; a layer cut in two is a `BertAttentionBlock`
    or a `BertFeedForwardBlock`), with the embeddings on the first stage and the pooler and
    pre-training heads on the last. See the module docstring for inputs/outputs."""

    def __init__(self, config: BertConfig,
                 layers: Mapping[int, BertLayer | BertAttentionBlock | BertFeedForwardBlock], *,
                 embeddings: BertEmbeddings | None = None, pooler: BertPooler | None = None,
                 heads: BertPreTrainingHeads | None = None) -> None:
        super().__init__()
        if (pooler is None) != (heads is None):
            raise ValueError("the pooler and the pre-training heads go on the same (last) stage; "
                             "pass both or neither")
        self.config = config
        self.embeddings = embeddings
        self.layer = nn.ModuleDict({str(i): layers[i] for i in sorted(layers)})
        self.pooler = pooler
        self.cls = heads

    @property
    def is_first(self) -> bool:
        return self.embeddings is not None

    @property
    def is_last(self) -> bool:
        return self.cls is not None

    def extra_repr(self) -> str:
        layers = [int(i) for i in self.layer]
        span = f"layers {layers[0]}..{layers[-1]}" if layers else "no layers"
        halves = [f"{i}: {type(m).__name__}" for i, m in self.layer.items()
                  if not isinstance(m, BertLayer)]
        return (f"{span}{' (' + ', '.join(halves) + ')' if halves else ''}, "
                f"embeddings={self.is_first}, heads={self.is_last}")

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.is_first:
            if len(inputs) not in (3, 4):
                raise TypeError(f"the first BERT stage takes (input_ids, token_type_ids, "
                                f"attention_mask[, masked_lm_labels]), got {len(inputs)} "
                                "tensor(s)")
            input_ids, token_type_ids, attention_mask, *labels = inputs
            hidden_states = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        else:
            if len(inputs) not in (2, 3):
                raise TypeError(f"a BERT stage after the first takes (hidden_states, "
                                f"attention_mask[, masked_lm_labels]), got {len(inputs)} "
                                "tensor(s)")
            hidden_states, attention_mask, *labels = inputs
        if len(self.layer):
            # The same call BertModel makes: an additive float mask for eager attention, a boolean
            # mask (or None when nothing is padded) for sdpa. A lone feed-forward block needs none.
            mask = None
            if any(not isinstance(m, BertFeedForwardBlock) for m in self.layer.values()):
                mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states,
                                                 attention_mask=attention_mask)
            for layer in self.layer.values():
                hidden_states = layer(hidden_states, mask)
        if not self.is_last:
            return (hidden_states, attention_mask, *labels)
        seq_relationship_score = self.cls.seq_relationship(self.pooler(hidden_states))
        if labels:
            hidden_states = labelled_positions(hidden_states, labels[0])
        return self.cls.predictions(hidden_states), seq_relationship_score


def labelled_positions(sequence: torch.Tensor, masked_lm_labels: torch.Tensor) -> torch.Tensor:
    """The rows of ``sequence`` (``[b, seq, ...]``) at the positions whose label is not -100, in
    row-major order: ``[labelled positions, ...]``. `BertPretrainingLoss` takes the labels in the
    same order."""
    positions = (masked_lm_labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    return sequence.reshape(-1, *sequence.shape[2:]).index_select(0, positions)


class BertPretrainingLoss(nn.Module):
    """``BertForPreTraining``'s loss: masked-LM cross-entropy (labels of -100 ignored) plus
    next-sentence cross-entropy, each a mean over the microbatch.

    Called as ``loss_fn((mlm_scores, seq_relationship_score), (masked_lm_labels,
    next_sentence_label))``. ``mlm_scores`` is either every position's, ``[b, seq, vocab]``, or
    only the labelled positions', ``[n, vocab]`` in row-major order (`labelled_positions`, the
    last stage's output in training); both give the same loss. A microbatch whose labels are all
    -100 has an undefined (NaN) MLM loss, as in transformers.
    """

    def __init__(self) -> None:
        super().__init__()
        self.cross_entropy = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)

    def forward(self, outputs: tuple[torch.Tensor, torch.Tensor],
                targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        prediction_scores, seq_relationship_score = outputs
        masked_lm_labels, next_sentence_label = targets
        labels = masked_lm_labels.reshape(-1)
        if prediction_scores.dim() == 2:          # the labelled positions only
            labels = labels[labels != IGNORE_INDEX]
            if prediction_scores.size(0) != labels.numel():
                raise ValueError(f"{prediction_scores.size(0)} MLM scores for {labels.numel()} "
                                 "labelled positions: the last stage and the loss were given "
                                 "different masked_lm_labels")
        vocab_size = prediction_scores.size(-1)
        masked_lm_loss = self.cross_entropy(prediction_scores.reshape(-1, vocab_size), labels)
        next_sentence_loss = self.cross_entropy(seq_relationship_score.reshape(-1, 2),
                                                next_sentence_label.reshape(-1))
        return masked_lm_loss + next_sentence_loss


@dataclass(frozen=True, eq=False)
class BertPipelineModel:
    """Everything ``PipelineTrainer`` needs for BERT pre-training, plus how it was cut.

    ``modules[s]`` runs on stage ``s``; ``tied_parameters`` names the word-embedding / MLM-decoder
    pair as ``"<module index>.<param name>"``; ``module_to_stage_map`` includes the trailing loss.
    State dicts use keys ``"<module index>.<name>"`` (``module.state_dict()`` names).
    """

    modules: tuple[BertStage, ...]
    loss_fn: BertPretrainingLoss
    tied_parameters: tuple[tuple[str, ...], ...]
    partition: BertPartition
    hf_config: BertConfig

    @property
    def module_to_stage_map(self) -> tuple[int, ...]:
        return self.partition.module_to_stage_map

    @property
    def layers_per_stage(self) -> tuple[int, ...]:
        return self.partition.layers_per_stage

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{k}.{name}": t for k, module in enumerate(self.modules)
                for name, t in module.state_dict().items()}

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load ``"<module index>.<name>"`` keys into the stages; every key must match exactly."""
        per_module: list[dict[str, torch.Tensor]] = [{} for _ in self.modules]
        unknown = []
        for key, value in state_dict.items():
            index, _, name = key.partition(".")
            if not index.isdigit() or int(index) >= len(self.modules):
                unknown.append(key)
            else:
                per_module[int(index)][name] = value
        expected = self.state_dict().keys()
        unknown += [key for key in state_dict if key not in expected and key not in unknown]
        missing = [key for key in expected if key not in state_dict]
        if unknown or missing:
            raise KeyError(f"state dict does not fit this {self.partition.to_spec()} BERT: "
                           f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
                           f"unexpected {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
        for module, sub in zip(self.modules, per_module):
            module.load_state_dict(sub, strict=True)

    @property
    def num_modules(self) -> int:
        """Modules of the pipeline (``--module``'s depth); a conf.json groups them onto stages."""
        return len(self.modules)

    def check_pipeline_config(self, config: PipelineConfig, *, module_flag: str = "--module"
                              ) -> None:
        """Raise `ConfigError` unless ``config`` (a conf.json) places this partition's modules
        on stages, as PipeDream's ``module_to_stage_map`` does: one entry per module, in order,
        plus optionally one trailing entry for the loss on the last module's stage. Several
        modules may share a stage (contiguous runs: `PipelineConfig` checks that), so a depth-8
        partition runs on 8, 4, 2 or 1 stages."""
        got = list(config.module_to_stage_map)
        n = self.num_modules
        spec = f"{module_flag} {self.partition.to_spec()} ({n} modules)"
        examples = (f"e.g. {list(self.module_to_stage_map)} (one module per stage) or "
                    f"{[0] * (n + 1)} (all on one stage)")
        if len(got) not in (n, n + 1):
            raise ConfigError(
                f"{config.source}: module_to_stage_map {got} has {len(got)} entries, but "
                f"{spec} needs {n} (one stage per module) plus an optional trailing entry for "
                f"the loss; {examples}")
        if len(got) == n + 1 and got[n] != got[n - 1]:
            raise ConfigError(
                f"{config.source}: module_to_stage_map {got} puts the loss (last entry) on stage "
                f"{got[n]}, but the last module of {spec} is on stage {got[n - 1]}; the loss "
                f"runs with the last module: make the last entry {got[n - 1]}")


def build_bert_pipeline(model_config: BertModelConfig, partition: BertPartition, *,
                        device: str | torch.device = "cpu", attn_implementation: str = "sdpa",
                        seed: int | None = None) -> BertPipelineModel:
    """Build BERT for pre-training cut into ``partition``'s stages, initialised as transformers
    initialises ``BertForPreTraining``.

    ``device="meta"`` allocates nothing (to inspect shapes and parameter counts of a large model);
    ``seed`` makes the initialisation reproducible without touching the global RNG.
    """
    if partition.num_layers != model_config.num_hidden_layers:
        raise PartitionError(f"partition {partition.to_spec()} has {partition.num_layers} layers "
                             f"but {model_config.source} has num_hidden_layers="
                             f"{model_config.num_hidden_layers}")
    hf_config = model_config.to_transformers(attn_implementation)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng, torch.device(device):
        if seed is not None:
            torch.manual_seed(seed)
        hf_model = BertForPreTraining(hf_config)
    return _split(hf_model, partition)


def _split(hf_model: BertForPreTraining, partition: BertPartition) -> BertPipelineModel:
    """Move ``hf_model``'s submodules into stages (``hf_model`` is spent afterwards)."""
    config = hf_model.config
    last = partition.num_stages - 1
    heads = hf_model.cls
    decoder = heads.predictions.decoder
    # The decoder weight is the word embedding in HF; the last stage gets its own equal copy.
    decoder.weight = nn.Parameter(decoder.weight.detach().clone())
    # HF ties decoder.bias and predictions.bias (one Parameter, two names); forward uses only the
    # decoder's, so drop the second name to keep every stage parameter used and unaliased.
    del heads.predictions.bias
    modules = []
    for s in range(partition.num_stages):
        layers = {}
        for i, (attention, feed_forward) in partition.layer_blocks(s).items():
            layer = hf_model.bert.encoder.layer[i]
            layers[i] = (layer if attention and feed_forward else
                         BertAttentionBlock(layer) if attention else BertFeedForwardBlock(layer))
        modules.append(BertStage(
            config, layers,
            embeddings=hf_model.bert.embeddings if s == 0 else None,
            pooler=hf_model.bert.pooler if s == last else None,
            heads=heads if s == last else None))
    return BertPipelineModel(
        modules=tuple(modules), loss_fn=BertPretrainingLoss(),
        tied_parameters=((f"0.{WORD_EMBEDDING}", f"{last}.{MLM_DECODER_WEIGHT}"),),
        partition=partition, hf_config=config)


def stage_parameter_counts(model: BertPipelineModel) -> tuple[int, ...]:
    """Parameters each stage holds (a tied copy counts on every stage that holds one)."""
    counts = [0] * model.partition.num_stages
    for k, module in enumerate(model.modules):
        counts[model.module_to_stage_map[k]] += sum(p.numel() for p in module.parameters())
    return tuple(counts)


def tied_copy_count(model: BertPipelineModel) -> int:
    """Parameters held more than once because of ``tied_parameters`` (all copies but the first)."""
    params = {f"{k}.{name}": p for k, module in enumerate(model.modules)
              for name, p in module.named_parameters()}
    return sum(params[name].numel() for group in model.tied_parameters for name in group[1:])


def format_parameter_table(model: BertPipelineModel) -> str:
    """A printable table of layers and parameters per stage."""
    counts = stage_parameter_counts(model)
    total = sum(counts)
    last = len(counts) - 1
    spans = ["+".join((["emb"] if s == 0 else [])
                      + [model.partition.layers_text(s, short=True) or "-"]
                      + (["heads"] if s == last else [])) for s in range(len(counts))]
    w = max(14, *map(len, spans))
    rows = [f"{'stage':>5}  {'layers':<{w}}  {'parameters':>13}  {'share':>6}"]
    for s, count in enumerate(counts):
        rows.append(f"{s:>5}  {spans[s]:<{w}}  {count:>13,}  {count / total:>6.1%}")
    tied = tied_copy_count(model)
    rows.append(f"{'total':>5}  {'':<{w}}  {total:>13,}  "
                f"(unique {total - tied:,}; tied decoder copy {tied:,})")
    if model.partition.has_halves:
        rows.append("(layers cut in two: 3a is layer 3's attention block, 3f its feed-forward)")
    return "\n".join(rows)
