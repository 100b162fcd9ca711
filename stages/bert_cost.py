"""What each part of BERT costs to train, and the ``depth=D`` partition balanced by that cost.

The planner (`pd2bw_ray.planner`) models a stage's time per weight update as
``m (F_s + G_s) + U_s``: forward and backward of the microbatches, plus the optimizer step. Its
parts are a stage kind's fixed part (the embeddings on the first stage; the pooler, the heads and
the loss on the last) and one encoder layer. `analytic_profile` fills the planner's
`ModelProfile` from operation counts instead of measurements, for when no measured profile of the
running device is at hand (``--profile_path`` gives one; `stages.bert_planner` measures them):

- **time** = matmul FLOPs / ``DeviceRates.matmul_flops_per_s`` + bytes moved by elementwise work
  / ``DeviceRates.memory_bytes_per_s`` + elements dropped out x
  ``DeviceRates.dropout_s_per_element``; a backward costs twice the forward's FLOPs;
- **dropout** (where the config's probabilities are not 0) draws a random number per element:
  on one CPU thread about 8 ns per element forward and backward, against under 2 ns for a
  multiply, so the attention probabilities' dropout (``b x heads x s x s`` elements) makes a
  BERT layer's attention block about half its cost at MiniLM's shape, not the third its FLOPs
  say (measured: 95 ms attention and 97 ms feed-forward per microbatch of 8 x 128);
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

**Half layers.** A partition may cut a layer between its attention block and its feed-forward
block (`stages.partition`). `attention_share` is the attention block's share of a layer's cost
by the same counts (about a third for BERT's shapes: ``8 H^2 + 4 s H`` of the layer's
``8 H^2 + 4 H I + 4 s H`` FLOPs per token), and a stage holding ``a`` attention and ``f``
feed-forward blocks costs what ``a * share + f * (1 - share)`` layers cost. `CostModel`'s
``depth=D`` split takes a cut inside a layer only where it makes the slowest stage at least
`HALF_LAYER_GAIN` cheaper than the best split of whole layers.

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
#: how much cheaper (relative) the slowest stage must get for ``depth=D`` to cut inside a layer:
#: below this the analytic model cannot tell the splits apart, and whole layers are the usual cut
HALF_LAYER_GAIN = 0.05


@dataclass(frozen=True)
class DeviceRates:
    """How fast a device does the three kinds of work the model counts."""

    name: str
    matmul_flops_per_s: float
    memory_bytes_per_s: float
    update_s_per_param: float       # one AdamW step, per parameter
    dropout_s_per_element: float    # dropout's forward (random draw, mask) and backward

    def seconds(self, flops: float, nbytes: float, dropped: float = 0.0) -> float:
        return (flops / self.matmul_flops_per_s + nbytes / self.memory_bytes_per_s
                + dropped * self.dropout_s_per_element)


CPU_ONE_THREAD = DeviceRates("cpu (1 thread)", matmul_flops_per_s=1.1e11,
                             memory_bytes_per_s=3.0e10, update_s_per_param=1.1e-9,
                             dropout_s_per_element=8e-9)
# on a GPU dropout is fused elementwise work: a mask byte written and read, the data twice
GPU = DeviceRates("cuda", matmul_flops_per_s=4.0e14, memory_bytes_per_s=3.0e12,
                  update_s_per_param=2.0e-11, dropout_s_per_element=18 / 3.0e12)


def rates_for(device: str, torch_threads: int = 1) -> DeviceRates:
    if device.startswith("cuda"):
        return GPU
    t = max(1, torch_threads)
    return DeviceRates(f"cpu ({t} thread{'s' if t > 1 else ''})",
                       matmul_flops_per_s=CPU_ONE_THREAD.matmul_flops_per_s * t,
                       memory_bytes_per_s=CPU_ONE_THREAD.memory_bytes_per_s * t,
                       update_s_per_param=CPU_ONE_THREAD.update_s_per_param / t,
                       dropout_s_per_element=CPU_ONE_THREAD.dropout_s_per_element / t)


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


def attention_parameters(c: BertModelConfig) -> int:
    """Q, K, V and the output projection, and the attention block's LayerNorm."""
    h = c.hidden_size
    return 4 * (h * h + h) + 2 * h


def dropout_elements(c: BertModelConfig, *, microbatch_size: int, seq_length: int
                     ) -> tuple[int, int, int]:
    """Elements dropped out per microbatch in the embeddings, an attention block (its
    probabilities and its output) and a feed-forward block (its output); 0 where the config's
    probability is 0."""
    b, s = microbatch_size, seq_length
    hidden = b * s * c.hidden_size if c.hidden_dropout_prob > 0 else 0
    probs = b * c.num_attention_heads * s * s if c.attention_probs_dropout_prob > 0 else 0
    return hidden, probs + hidden, hidden


def attention_share(c: BertModelConfig, *, seq_length: int, microbatch_size: int,
                    num_microbatches: int, rates: DeviceRates) -> float:
    """The attention block's share of an encoder layer's predicted time per weight update
    (``num_microbatches`` forwards and backwards plus the optimizer step), counted as
    `analytic_microbatch` counts a whole layer."""
    b, s, h, i = microbatch_size, seq_length, c.hidden_size, c.intermediate_size
    tokens, a = b * s, c.num_attention_heads
    attention_params = attention_parameters(c)
    feed_forward_params = layer_parameters(c) - attention_params

    _, attention_dropped, feed_forward_dropped = dropout_elements(
        c, microbatch_size=b, seq_length=s)

    def block(flops: float, nbytes: float, params: int, dropped: int) -> float:
        train = rates.seconds(3 * flops, 3 * nbytes + 3 * FP32 * params, dropped)
        return num_microbatches * train + _weights(rates, params).update_s

    attention = block(tokens * 8 * h * h + 4 * b * s * s * h,
                      FP32 * (tokens * 5 * h + 3 * b * a * s * s), attention_params,
                      attention_dropped)
    feed_forward = block(tokens * 4 * h * i, FP32 * tokens * (5 * h + 3 * i), feed_forward_params,
                         feed_forward_dropped)
    return attention / (attention + feed_forward)


def _part(rates: DeviceRates, fwd_flops: float, fwd_bytes: float, bwd_bytes: float,
          dropped: float = 0.0) -> Part:
    # dropout's cost (forward and backward together) goes with the forward, which draws
    forward = rates.seconds(fwd_flops, fwd_bytes, dropped)
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
    emb_dropped, attention_dropped, feed_forward_dropped = dropout_elements(
        c, microbatch_size=b, seq_length=s)
    layer = _part(rates, tokens * (8 * h * h + 4 * h * i) + 4 * b * s * s * h, layer_bytes,
                  2 * layer_bytes + 3 * FP32 * layer_parameters(c),
                  attention_dropped + feed_forward_dropped)
    # embeddings: gathers, sums, LayerNorm; backward adds the dense V x H word-embedding
    # gradient each microbatch (zero-filled, index-added, accumulated into .grad)
    emb_bytes = FP32 * tokens * h * 8
    embeddings = _part(rates, 0, emb_bytes, emb_bytes + 4 * FP32 * v * h, emb_dropped)
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
            layers = self.partition.layers_text(s)
            what = (["emb"] if s == 0 else []) + ([layers] if layers else []) + (
                ["heads"] if s == d - 1 else [])
            parts.append(f"stage {s}: {'+'.join(what)} {cost * 1e3:.1f} ms")
        return (f"predicted compute per microbatch ({self.source}): " + "; ".join(parts)
                + f" (spread {self.spread:.0%})")


@dataclass(frozen=True)
class CostModel:
    """What `parse_module_spec` needs to split ``models.bert<L>.depth=<D>`` by cost: a profile
    (analytic or measured), the job's microbatch size and microbatches per update, and the
    attention block's share of a layer (`attention_share`), which prices half layers."""

    profile: ModelProfile
    microbatch_size: int
    num_microbatches: int
    attention_share: float

    def __post_init__(self) -> None:
        if not 0.0 < self.attention_share < 1.0:
            raise ValueError(f"attention_share must be between 0 and 1, got "
                             f"{self.attention_share!r}")

    @classmethod
    def analytic(cls, c: BertModelConfig, *, seq_length: int, microbatch_size: int,
                 num_microbatches: int, device: str = "cpu", torch_threads: int = 1,
                 mlm_fraction: float = MLM_FRACTION) -> "CostModel":
        rates = rates_for(device, torch_threads)
        profile = analytic_profile(c, seq_length=seq_length, microbatch_sizes=(microbatch_size,),
                                   rates=rates, mlm_fraction=mlm_fraction)
        return cls.of_profile(profile, c, microbatch_size=microbatch_size,
                              num_microbatches=num_microbatches, rates=rates)

    @classmethod
    def of_profile(cls, profile: ModelProfile, c: BertModelConfig, *, microbatch_size: int,
                   num_microbatches: int, rates: DeviceRates) -> "CostModel":
        """``profile`` (measured or analytic) with the attention share counted for ``c`` on a
        device of ``rates``."""
        share = attention_share(c, seq_length=profile.seq_length,
                                microbatch_size=microbatch_size,
                                num_microbatches=num_microbatches, rates=rates)
        return cls(profile, microbatch_size, num_microbatches, share)

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

    def stage_cost(self, stage: int, depth: int, layers: float) -> float:
        """Predicted compute per microbatch of ``stage`` of ``depth`` holding ``layers`` layers
        (a fraction counts what many layers' worth of blocks it holds, `block_layers`)."""
        m = max(self.num_microbatches, depth)
        return estimate_stage(self.profile, self._cluster(depth), stage=stage, depth=depth,
                              microbatch_size=self.microbatch_size, num_microbatches=m,
                              recompute=False, layers=layers).compute_s / m

    def block_layers(self, blocks: range) -> float:
        """What the blocks ``blocks`` (`BertPartition.block_range`) cost, in layers."""
        attention = len(range(blocks.start + blocks.start % 2, blocks.stop, 2))
        return attention * self.attention_share + (len(blocks) - attention) * (
            1 - self.attention_share)

    def stage_costs(self, partition: BertPartition) -> StageCosts:
        d = partition.num_stages
        costs = tuple(self.stage_cost(s, d, self.block_layers(partition.block_range(s)))
                      for s in range(d))
        return StageCosts(partition, costs, self.source)

    def balanced_partition(self, depth: int) -> BertPartition:
        """The split with the least largest stage cost: of whole layers (`fastest_partition`),
        or of half layers where that makes the largest stage cost `HALF_LAYER_GAIN` less."""
        m = max(self.num_microbatches, depth)
        counts = fastest_partition(self.profile, self._cluster(depth), depth=depth,
                                   microbatch_size=self.microbatch_size, num_microbatches=m,
                                   recompute=False, respect_memory=False)
        assert counts is not None      # no memory limit: some partition always exists
        whole = BertPartition(tuple(counts))
        halves = self.balanced_blocks(depth)
        if (max(self.stage_costs(halves).per_microbatch_s)
                < (1 - HALF_LAYER_GAIN) * max(self.stage_costs(whole).per_microbatch_s)):
            return halves
        return whole

    def balanced_blocks(self, depth: int) -> BertPartition:
        """The split of the blocks (half layers) with the least largest stage cost; among equal
        ones, the fewest layers cut in two. Two dynamic programmes over (stage, first block):
        the least largest cost, then the fewest cuts among splits whose stages all stay
        within it."""
        blocks = 2 * self.profile.num_layers
        if depth > blocks + 2:
            raise ValueError(f"depth {depth} exceeds the {blocks} half layers and the two ends")
        low = [0 if s in (0, depth - 1) else 1 for s in range(depth)] if depth > 1 else [blocks]
        costs: dict[tuple[int, int, int], float] = {}

        def cost(s: int, start: int, stop: int) -> float:
            if (s, start, stop) not in costs:
                costs[s, start, stop] = self.stage_cost(
                    s, depth, self.block_layers(range(start, stop)))
            return costs[s, start, stop]

        def sizes(s: int, j: int) -> range:            # what stage s may hold from block j
            return (range(blocks - j, blocks - j + 1) if s == depth - 1
                    else range(low[s], blocks - j + 1))

        # least[s][j]: the least largest cost of stages s.. holding blocks j..
        least: list[dict[int, float]] = [{} for _ in range(depth + 1)]
        least[depth][blocks] = 0.0
        for s in range(depth - 1, -1, -1):
            for j in range(blocks + 1):
                options = [max(cost(s, j, j + n), least[s + 1][j + n]) for n in sizes(s, j)
                           if n >= low[s] and j + n in least[s + 1]]
                if options:
                    least[s][j] = min(options)
        cap = least[0][0] * (1 + 1e-12)
        # cuts[s][j]: (layers cut, size of stage s) over splits of stages s.. within the cap
        cuts: list[dict[int, tuple[int, int]]] = [{} for _ in range(depth + 1)]
        cuts[depth][blocks] = (0, 0)
        for s in range(depth - 1, -1, -1):
            for j in range(blocks + 1):
                options = [(cuts[s + 1][j + n][0] + (j + n) % 2, n) for n in sizes(s, j)
                           if n >= low[s] and j + n in cuts[s + 1] and cost(s, j, j + n) <= cap]
                if options:
                    cuts[s][j] = min(options)
        out, j = [], 0
        for s in range(depth):
            out.append(cuts[s][j][1])
            j += out[-1]
        return BertPartition.from_blocks(out)
