"""How BERT's encoder layers are split into pipeline stages, and the ``--module`` flag naming it.

A partition is the number of encoder layers on each stage. The embeddings always go with the first
stage's layers and the pooler and pre-training heads with the last stage's. Each stage is one
module of the pipeline, and the loss is one extra trailing module on the last stage (PipeDream's
``conf.json`` convention), so for ``D`` stages::

    module_to_stage_map = [0, 1, ..., D-1, D-1]

**Half layers.** A cut may also fall inside an encoder layer, between its attention block
(self-attention, output projection, residual and LayerNorm) and its feed-forward block (the two
MLP matmuls, residual and LayerNorm): a count ending in ``.5`` holds half a layer at that end.
``3.5,2.5`` puts layers 0..2 and layer 3's attention on stage 0, layer 3's feed-forward and layers
4..5 on stage 1. What crosses such a cut is the same ``[b, seq, hidden]`` tensor as between whole
layers. By FLOPs a layer is about a third attention and two thirds feed-forward (with dropout on
the attention probabilities nearly half and half, `stages.bert_cost`), so half layers let the
stages' costs even out where whole layers cannot (the heads on the last stage cost a fraction of a
layer).

``--module`` accepts two forms (``L`` = number of encoder layers, must match the BERT config)::

    models.bert<L>.depth=<D>              L layers over D stages, balanced by predicted cost
    models.bert<L>.layers=<n0>,<n1>,...   n_s layers on stage s (uneven splits, halves allowed);
                                          sum = L

e.g. ``models.bert24.depth=8``, ``models.bert24.layers=2,4,4,4,4,3,2,1`` or
``models.bert6.layers=3.5,2.5``.

``depth=D`` with a cost model (`stages.bert_cost.CostModel`, what the jobs pass) splits the layers
so that the stages' predicted compute (forward, backward and optimizer step, with the embeddings
on the first stage and the heads and loss on the last) is as even as half layers allow. Without
one, the layer counts are as even as possible (`balanced_partition`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Sequence

from pd2bw_ray.config import PipelineConfig

MODULE_SPEC_FORMS = ("models.bert<L>.depth=<D>", "models.bert<L>.layers=<n0>,<n1>,...")
_MODULE_SPEC = re.compile(r"models\.bert(?P<layers>[0-9]+)\.(?P<kind>depth|layers)=(?P<value>.*)")


class PartitionError(ValueError):
    """A partition or ``--module`` spec is malformed or does not fit the BERT config."""


@dataclass(frozen=True)
class BertPartition:
    """Encoder layers per stage: stage ``s`` runs layers ``layer_range(s)`` (global indices).

    A count may end in ``.5`` (see the module docstring): the stage then holds only the attention
    block of its last layer, or only the feed-forward block of its first. Internally a layer is
    two *blocks*, block ``2i`` its attention and ``2i + 1`` its feed-forward; ``block_range(s)``
    is what stage ``s`` runs. Stages other than the first and the last must hold at least one
    block; the first may hold only the embeddings and the last only the pooler and heads.
    """

    layers_per_stage: tuple[int | float, ...]

    def __post_init__(self) -> None:
        counts = self.layers_per_stage
        if not isinstance(counts, tuple) or not counts:
            raise PartitionError(f"layers_per_stage must be a non-empty tuple of layer counts, "
                                 f"got {counts!r}")
        for s, n in enumerate(counts):
            if (isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n)
                    or n < 0 or (2 * n) != int(2 * n)):
                raise PartitionError(f"stage {s}: layer count {n!r} is neither a non-negative "
                                     f"integer nor one ending in .5 (layers_per_stage="
                                     f"{[_count_text(c) for c in counts]})")
        # keep whole counts as ints, so equal partitions compare (and print) equal
        object.__setattr__(self, "layers_per_stage", tuple(
            int(n) if n == int(n) else float(n) for n in counts))
        if self.num_blocks % 2:
            raise PartitionError(f"layers_per_stage {[_count_text(c) for c in counts]} sums to "
                                 f"{sum(counts)}: the halves must add up to whole layers")
        for s in range(1, len(counts) - 1):
            if counts[s] == 0:
                raise PartitionError(f"stage {s} has no encoder layers (layers_per_stage="
                                     f"{[_count_text(c) for c in counts]}); only the first stage "
                                     "(embeddings) and the last stage (heads) may hold none: drop "
                                     "the stage or move a layer onto it")

    @property
    def num_stages(self) -> int:
        return len(self.layers_per_stage)

    @property
    def num_blocks(self) -> int:
        return int(round(2 * sum(self.layers_per_stage)))

    @property
    def num_layers(self) -> int:
        return self.num_blocks // 2

    @property
    def has_halves(self) -> bool:
        return any(isinstance(n, float) for n in self.layers_per_stage)

    def block_range(self, stage: int) -> range:
        """The blocks stage ``stage`` runs: block ``2i`` is layer ``i``'s attention, ``2i + 1``
        its feed-forward."""
        if not 0 <= stage < self.num_stages:
            raise IndexError(f"stage {stage} out of range 0..{self.num_stages - 1}")
        start = int(round(2 * sum(self.layers_per_stage[:stage])))
        return range(start, start + int(round(2 * self.layers_per_stage[stage])))

    def layer_range(self, stage: int) -> range:
        """The layers stage ``stage`` runs in whole or in part."""
        blocks = self.block_range(stage)
        if not blocks:
            return range(blocks.start // 2, blocks.start // 2)
        return range(blocks.start // 2, (blocks.stop - 1) // 2 + 1)

    def layer_blocks(self, stage: int) -> dict[int, tuple[bool, bool]]:
        """Each layer of ``layer_range(stage)``: (holds its attention, holds its feed-forward)."""
        blocks = self.block_range(stage)
        return {i: (2 * i in blocks, 2 * i + 1 in blocks) for i in self.layer_range(stage)}

    def stage_of_layer(self, layer: int) -> int:
        """The stage running ``layer`` (its attention, where the layer is cut in two)."""
        for s in range(self.num_stages):
            if 2 * layer in self.block_range(s):
                return s
        raise IndexError(f"layer {layer} out of range 0..{self.num_layers - 1}")

    def layers_text(self, stage: int, *, short: bool = False) -> str:
        """What ``stage`` runs of the encoder: ``layers 0..2 + 3 attention`` (``0..2+3a`` when
        ``short``); ``""`` for none."""
        parts = self.layer_blocks(stage)
        whole = [i for i, (a, f) in parts.items() if a and f]
        out = []
        for i, (a, f) in parts.items():
            if not (a and f) and f:
                out.append(f"{i}f" if short else f"layer {i} feed-forward")
        if whole:
            span = f"{whole[0]}..{whole[-1]}" if len(whole) > 1 else f"{whole[0]}"
            out.append(span if short else f"layer{'s' if len(whole) > 1 else ''} {span}")
        for i, (a, f) in parts.items():
            if not (a and f) and a:
                out.append(f"{i}a" if short else f"layer {i} attention")
        return "+".join(out)

    @property
    def module_to_stage_map(self) -> tuple[int, ...]:
        """One module per stage, plus the loss as a trailing module on the last stage."""
        return tuple(range(self.num_stages)) + (self.num_stages - 1,)

    def to_spec(self) -> str:
        """The ``--module`` value that names this partition exactly."""
        return (f"models.bert{self.num_layers}.layers="
                + ",".join(_count_text(n) for n in self.layers_per_stage))

    @classmethod
    def from_blocks(cls, blocks_per_stage: Sequence[int]) -> "BertPartition":
        """The partition whose stage ``s`` runs ``blocks_per_stage[s]`` blocks (half layers)."""
        return cls(tuple(b // 2 if b % 2 == 0 else b / 2 for b in blocks_per_stage))


def _count_text(n: int | float) -> str:
    if isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n):
        return str(int(n)) if n == int(n) else str(float(n))
    return repr(n)


def balanced_partition(num_layers: int, depth: int) -> BertPartition:
    """``num_layers`` layers over ``depth`` stages, stage sizes differing by at most one.

    When the split is uneven, the extra layers go first to the stages that hold neither the
    embeddings nor the heads (stages 1, 2, ...), then to the first stage, then to the last.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise PartitionError(f"depth must be a positive integer, got {depth!r}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise PartitionError(f"num_layers must be a positive integer, got {num_layers!r}")
    if depth > num_layers:
        raise PartitionError(f"depth {depth} exceeds the {num_layers} encoder layers; use a depth "
                             f"of at most {num_layers} (each stage needs at least one layer)")
    base, extra = divmod(num_layers, depth)
    counts = [base] * depth
    order = list(range(1, depth - 1)) + [0] + ([depth - 1] if depth > 1 else [])
    for s in order[:extra]:
        counts[s] += 1
    return BertPartition(tuple(counts))


def parse_module_spec(spec: str, num_layers: int, *, flag: str = "--module",
                      config_source: str = "the BERT config",
                      cost_model=None) -> BertPartition:
    """Parse a ``--module`` value (see the module docstring) for a BERT with ``num_layers`` layers.

    ``config_source`` names where ``num_layers`` came from (e.g. the --bert_config_path file), so a
    mismatch can say which two things disagree. ``cost_model`` (a `stages.bert_cost.CostModel`)
    balances ``depth=D`` by predicted cost instead of by layer count.
    """
    if not isinstance(spec, str):
        raise PartitionError(f"{flag} must be a string such as models.bert24.depth=8, got {spec!r}")
    match = _MODULE_SPEC.fullmatch(spec.strip())
    if match is None:
        raise PartitionError(f"{flag} {spec!r} is not a BERT partition; expected one of "
                             f"{' or '.join(MODULE_SPEC_FORMS)}, e.g. "
                             f"models.bert{num_layers}.depth=4")
    spec_layers = int(match["layers"])
    if spec_layers != num_layers:
        raise PartitionError(f"{flag} {spec!r} names a {spec_layers}-layer BERT but "
                             f"{config_source} has num_hidden_layers={num_layers}; use "
                             f"models.bert{num_layers}.{match['kind']}=... or another config")
    value = match["value"].strip()
    if match["kind"] == "depth":
        if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
            raise PartitionError(f"{flag} {spec!r}: depth {value!r} is not a positive integer")
        try:
            counts = balanced_partition(num_layers, int(value))   # checks the depth
            return counts if cost_model is None else cost_model.balanced_partition(int(value))
        except PartitionError as e:
            raise PartitionError(f"{flag} {spec!r}: {e}") from None
    items = [item.strip() for item in value.split(",")]
    bad = [item for item in items if not re.fullmatch(r"[0-9]+(\.[05])?", item)]
    if bad:
        raise PartitionError(f"{flag} {spec!r}: layer counts must be comma-separated "
                             f"non-negative integers or halves (n.5), e.g. "
                             f"{balanced_partition(num_layers, min(2, num_layers)).to_spec()}; "
                             f"bad item(s) {bad}")
    counts = tuple(int(item) if "." not in item else float(item) for item in items)
    if sum(counts) != num_layers:
        raise PartitionError(f"{flag} {spec!r}: layer counts sum to {sum(counts):g}, but the model "
                             f"has {num_layers} layers")
    try:
        return BertPartition(counts)
    except PartitionError as e:
        raise PartitionError(f"{flag} {spec!r}: {e}") from None


def spec_depth(spec: str) -> int | None:
    """``D`` when ``spec`` is ``models.bert<L>.depth=<D>``, else None. Such a spec names D
    modules; their layer counts are chosen by a cost model when the partition is built, so a
    record of the split (a checkpoint's) is what says which layers each module holds."""
    match = _MODULE_SPEC.fullmatch(spec.strip()) if isinstance(spec, str) else None
    if match is None or match["kind"] != "depth" or not match["value"].strip().isdigit():
        return None
    return int(match["value"])


def pipeline_conf(num_stages: int, num_replicas: int = 1,
                  stages_per_rank: int = 1) -> PipelineConfig:
    """The ``conf.json`` for ``num_stages`` BERT stages x ``num_replicas`` replicas.

    Modules are one per stage plus the trailing loss; ranks are stage-major, so stage ``s`` holds
    ranks ``s*W .. s*W + W-1`` and replica ``r`` of every stage forms pipeline ``r``. With
    ``stages_per_rank`` v > 1 (virtual stages, for the interleaved schedule) a pipeline has
    p = num_stages / v ranks and stage ``s`` takes the ranks of stage ``s mod p``.
    """
    for name, value in (("num_stages", num_stages), ("num_replicas", num_replicas),
                        ("stages_per_rank", stages_per_rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PartitionError(f"{name} must be a positive integer, got {value!r}")
    if num_stages % stages_per_rank:
        raise PartitionError(f"{num_stages} stages do not split into {stages_per_rank} stages "
                             "per rank")
    p = num_stages // stages_per_rank
    module_to_stage_map = list(range(num_stages)) + [num_stages - 1]
    stage_to_rank_map = {str(s): list(range((s % p) * num_replicas,
                                            (s % p + 1) * num_replicas))
                         for s in range(num_stages)}
    virtual = f", {stages_per_rank} per rank" if stages_per_rank > 1 else ""
    return PipelineConfig(module_to_stage_map, stage_to_rank_map,
                          source=f"<pipeline_conf({num_stages}, {num_replicas}{virtual})>")


def format_conf_json(config: PipelineConfig) -> str:
    """``config`` as conf.json text with one line per stage (how the files in configs/ look)."""
    d = config.to_dict()
    lines = ["{", f'  "module_to_stage_map": {json.dumps(d["module_to_stage_map"])},',
             '  "stage_to_rank_map": {']
    stages = list(d["stage_to_rank_map"].items())
    for i, (stage, ranks) in enumerate(stages):
        comma = "," if i < len(stages) - 1 else ""
        lines.append(f"    {json.dumps(stage)}: {json.dumps(ranks)}{comma}")
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"
