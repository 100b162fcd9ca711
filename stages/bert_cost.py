"""What each part of BERT costs to train, and the ``depth=D`` partition balanced by that cost.

The planner (`pd2bw_ray.planner`) models a stage's time per weight update as
``m (F_s + G_s) + U_s``: forward and backward of the microbatches, plus the optimizer step. Its
parts are a stage kind's fixed part (the embeddings on the first stage; the pooler, the heads and
the loss on the last) and one encoder layer. `analytic_profile` fills the planner's
`ModelProfile` from operation counts instead of measurements, for when no measured profile of the
running device is at hand (``--profile_path`` gives one; `stages.bert_planner` measures them):

- **time** = matmul FLOPs / ``DeviceRates.matmul_flops_per_s`` + bytes moved by elementwise work
  / ``DeviceRates.memory_bytes_per_s``; a backward costs twice the forward's FLOPs;
- **encoder layer**, per token: ``8 H^2 + 4 H I`` FLOPs (Q, K, V, output, the two MLP matmuls)
  plus ``4 s H`` for attention scores and their use;
- **embeddings**: a gather, sums and a LayerNorm forward; backward, the dense word-embedding
  gradient ``V x H`` (zeroed, filled, accumulated) every microbatch;
- **heads**: the pooler and next-sentence classifier per sequence; the MLM transform and decoder
  on the labelled positions only (``mlm_fraction`` of the tokens, the masked-only head of
  `stages.bert`), the cross-entropy over their ``V`` logits, and the decoder's dense weight
  gradient. 15% by default; the pre-training job measures it on its first shard, since short
  sequences and padding leave fewer labels (a corpus of short documents: about 10%), which
  makes the heads about a third cheaper;
- **optimizer step** (``U``): ``DeviceRates.update_s_per_param`` per parameter (AdamW), plus
  copying the new weight version into 2BW's other slot.

Only ratios matter for balancing, so the rates need only be right relative to each other. The
defaults were measured with one thread on the 2-core development machine (`CPU_ONE_THREAD`:
a 1024x384x1536 matmul, a 47 MB in-place add and `stages.bert_optim.BertAdamW`, torch's fused
AdamW kernel, on 14.2 M parameters: 16 ms, against 91 ms for its per-tensor loop);
`GPU` is an H100-class device's published bf16 dense and memory rates with a multi-tensor AdamW.
Stash bytes are not modelled here (0): this profile balances time, the measured one also memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from pd2bw_ray.planner import (KINDS, Cluster, MicrobatchProfile, ModelProfile, Network, Part,
                               WeightPart, estimate_stage, fastest_partition)
from stages.bert_config import BertModelConfig
from stages.partition import BertPartition

FP32 = 4
#: labelled share of positions in full-length sequences prepared with 15% masking
MLM_FRACTION = 0.15


@dataclass(frozen=True)
class DeviceRates:
    """How fast a device does the three kinds of work the model counts."""

    name: str
    matmul_flops_per_s: float
    memory_bytes_per_s: float
    update_s_per_param: float       # one AdamW step, per parameter

    def seconds(self, flops: float, nbytes: float) -> float:
        return flops / self.matmul_flops_per_s + nbytes / self.memory_bytes_per_s


CPU_ONE_THREAD = DeviceRates("cpu (1 thread)", matmul_flops_per_s=1.1e11,
                             memory_bytes_per_s=3.0e10, update_s_per_param=1.1e-9)
GPU = DeviceRates("cuda", matmul_flops_per_s=4.0e14, memory_bytes_per_s=3.0e12,
                  update_s_per_param=2.0e-11)


def rates_for(device: str, torch_threads: int = 1) -> DeviceRates:
    if device.startswith("cuda"):
        return GPU
    t = max(1, torch_threads)
    return DeviceRates(f"cpu ({t} thread{'s' if t > 1 else ''})",
                       matmul_flops_per_s=CPU_ONE_THREAD.matmul_flops_per_s * t,
                       memory_bytes_per_s=CPU_ONE_THREAD.memory_bytes_per_s * t,
                       update_s_per_param=CPU_ONE_THREAD.update_s_per_param / t)


def layer_parameters(c: BertModelConfig) -> int:
    h, i = c.hidden_size, c.intermediate_size
    return 4 * (h * h + h) + (h * i + i) + (i * h + h) + 2 * 2 * h


def embedding_parameters(c: BertModelConfig) -> int:
    h = c.hidden_size
    return (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * h + 2 * h


def head_parameters(c: BertModelConfig) -> int:
    """Pooler, next-sentence classifier, MLM transform and the decoder (its own tied copy)."""
    h, v = c.hidden_size, c.vocab_size
    return (h * h + h) + (2 * h + 2) + (h * h + h + 2 * h) + (v * h + v)


def _part(rates: DeviceRates, fwd_flops: float, fwd_bytes: float, bwd_bytes: float) -> Part:
    forward = rates.seconds(fwd_flops, fwd_bytes)
    backward = rates.seconds(2 * fwd_flops, bwd_bytes)
    return Part(forward_s=forward, backward_s=backward, recompute_backward_s=forward + backward,
                stash_bytes=0, recompute_stash_bytes=0)


def _add(a: Part, b: Part) -> Part:
    return Part(*(x + y for x, y in zip(
        (a.forward_s, a.backward_s, a.recompute_backward_s, a.stash_bytes,
         a.recompute_stash_bytes),
        (b.forward_s, b.backward_s, b.recompute_backward_s, b.stash_bytes,
         b.recompute_stash_bytes))))


def _weights(rates: DeviceRates, params: int) -> WeightPart:
    # AdamW, then the copy of the new version into 2BW's other slot (read and write)
    update = params * rates.update_s_per_param + rates.seconds(0, 2 * FP32 * params)
    return WeightPart(param_bytes=FP32 * params, optimizer_bytes=2 * FP32 * params,
                      update_s=update)


def analytic_microbatch(c: BertModelConfig, *, seq_length: int, microbatch_size: int,
                        rates: DeviceRates,
                        mlm_fraction: float = MLM_FRACTION) -> MicrobatchProfile:
    """The planner's per-microbatch costs of ``microbatch_size`` sequences of ``seq_length``."""
    b, s, h, i, v = microbatch_size, seq_length, c.hidden_size, c.intermediate_size, c.vocab_size
    a = c.num_attention_heads
    tokens = b * s
    labelled = mlm_fraction * tokens
    # one encoder layer: matmuls, attention, and its elementwise work (LayerNorms, GELU, softmax,
    # dropout, residuals) about ten passes over the hidden states and three over the MLP's
    layer_bytes = FP32 * (tokens * (10 * h + 3 * i) + 3 * b * a * s * s)
    layer = _part(rates, tokens * (8 * h * h + 4 * h * i) + 4 * b * s * s * h, layer_bytes,
                  2 * layer_bytes + 3 * FP32 * layer_parameters(c))
    # embeddings: gathers, sums, LayerNorm; backward adds the dense V x H word-embedding
    # gradient each microbatch (zero-filled, index-added, accumulated into .grad)
    emb_bytes = FP32 * tokens * h * 8
    embeddings = _part(rates, 0, emb_bytes, emb_bytes + 4 * FP32 * v * h)
    # heads: pooler + NSP per sequence; transform + decoder + cross-entropy on labelled positions;
    # backward adds the decoder's dense weight gradient (accumulated into .grad)
    head_flops = b * (2 * h * h + 4 * h) + labelled * (2 * h * h + 2 * h * v)
    head_bytes = FP32 * (labelled * (4 * v + 6 * h) + b * 2 * h)
    heads = _part(rates, head_flops, head_bytes, 2 * head_bytes + 3 * FP32 * v * h)
    zero = Part(0.0, 0.0, 0.0, 0, 0)
    base = {"first": embeddings, "middle": zero, "last": heads, "only": _add(embeddings, heads)}
    message = FP32 * tokens * h + 8 * 2 * tokens        # hidden states; mask and labels (int64)
    return MicrobatchProfile(microbatch_size=b, layer={k: layer for k in KINDS}, base=base,
                             activation_message_bytes=message,
                             gradient_message_bytes=FP32 * tokens * h)


def analytic_profile(c: BertModelConfig, *, seq_length: int, microbatch_sizes: Sequence[int],
                     rates: DeviceRates, mlm_fraction: float = MLM_FRACTION) -> ModelProfile:
    """A planner `ModelProfile` of ``c`` from operation counts (see the module docstring)."""
    emb, heads = _weights(rates, embedding_parameters(c)), _weights(rates, head_parameters(c))
    only = WeightPart(emb.param_bytes + heads.param_bytes,
                      emb.optimizer_bytes + heads.optimizer_bytes, emb.update_s + heads.update_s)
    return ModelProfile(
        num_layers=c.num_hidden_layers, seq_length=seq_length,
        layer_weights=_weights(rates, layer_parameters(c)),
        base_weights={"first": emb, "middle": WeightPart(0, 0, 0.0), "last": heads,
                      "only": only},
        microbatches=tuple(analytic_microbatch(c, seq_length=seq_length, microbatch_size=mb,
                                               rates=rates, mlm_fraction=mlm_fraction)
                           for mb in sorted(set(microbatch_sizes))),
        tied_bytes=FP32 * c.vocab_size * c.hidden_size,
        description={"kind": "analytic", "rates": rates.name, "mlm_fraction": mlm_fraction})


@dataclass(frozen=True)
class StageCosts:
    """A partition and each stage's predicted compute per microbatch (seconds): forward and
    backward plus its share (1/m) of the optimizer step."""

    partition: BertPartition
    per_microbatch_s: tuple[float, ...]
    source: str

    @property
    def spread(self) -> float:
        """(largest - smallest) / largest."""
        return 1 - min(self.per_microbatch_s) / max(self.per_microbatch_s)

    def describe(self) -> str:
        d = self.partition.num_stages
        parts = []
        for s, cost in enumerate(self.per_microbatch_s):
            r = self.partition.layer_range(s)
            what = (["emb"] if s == 0 else []) + (
                [f"layers {r.start}..{r.stop - 1}" if len(r) > 1 else f"layer {r.start}"]
                if len(r) else []) + (["heads"] if s == d - 1 else [])
            parts.append(f"stage {s}: {'+'.join(what)} {cost * 1e3:.1f} ms")
        return (f"predicted compute per microbatch ({self.source}): " + "; ".join(parts)
                + f" (spread {self.spread:.0%})")


@dataclass(frozen=True)
class CostModel:
    """What `parse_module_spec` needs to split ``models.bert<L>.depth=<D>`` by cost: a profile
    (analytic or measured) and the job's microbatch size and microbatches per update."""

    profile: ModelProfile
    microbatch_size: int
    num_microbatches: int

    @classmethod
    def analytic(cls, c: BertModelConfig, *, seq_length: int, microbatch_size: int,
                 num_microbatches: int, device: str = "cpu", torch_threads: int = 1,
                 mlm_fraction: float = MLM_FRACTION) -> "CostModel":
        profile = analytic_profile(c, seq_length=seq_length, microbatch_sizes=(microbatch_size,),
                                   rates=rates_for(device, torch_threads),
                                   mlm_fraction=mlm_fraction)
        return cls(profile, microbatch_size, num_microbatches)

    @property
    def source(self) -> str:
        desc = self.profile.description
        if desc.get("kind") == "analytic":
            return (f"analytic, {desc['rates']}, {desc['mlm_fraction']:.1%} of positions "
                    "labelled")
        return "measured profile" + (f", {desc['device']}" if "device" in desc else "")

    def _cluster(self, depth: int) -> Cluster:
        # balancing compute: no memory limit, no network cost
        return Cluster(num_workers=depth, memory_per_worker=2**62,
                       network=Network(intra_node_bandwidth=1e30, inter_node_bandwidth=1e30,
                                       latency_s=0.0, comm_overlaps_compute=True))

    def stage_cost(self, stage: int, depth: int, layers: int) -> float:
        """Predicted compute per microbatch of ``stage`` of ``depth`` holding ``layers`` layers."""
        m = max(self.num_microbatches, depth)
        return estimate_stage(self.profile, self._cluster(depth), stage=stage, depth=depth,
                              microbatch_size=self.microbatch_size, num_microbatches=m,
                              recompute=False, layers=layers).compute_s / m

    def stage_costs(self, partition: BertPartition) -> StageCosts:
        d = partition.num_stages
        costs = tuple(self.stage_cost(s, d, n) for s, n in enumerate(partition.layers_per_stage))
        return StageCosts(partition, costs, self.source)

    def balanced_partition(self, depth: int) -> BertPartition:
        """The layers per stage with the least largest stage cost (`fastest_partition`)."""
        m = max(self.num_microbatches, depth)
        counts = fastest_partition(self.profile, self._cluster(depth), depth=depth,
                                   microbatch_size=self.microbatch_size, num_microbatches=m,
                                   recompute=False, respect_memory=False)
        assert counts is not None      # no memory limit: some partition always exists
        return BertPartition(tuple(counts))
