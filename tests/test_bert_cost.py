"""``models.bert<L>.depth=<D>`` balanced by predicted cost (stages.bert_cost).

The partition search is checked against an exhaustive search over every split of the layers;
where the stages' predicted costs cannot come within 10% of each other, the exhaustive search
shows that no split of whole layers does.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.bert_config import BertModelConfig
from stages.bert_cost import CostModel, analytic_profile, rates_for
from stages.partition import BertPartition, parse_module_spec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LARGE = BertModelConfig.from_json(CONFIGS / "bert_config_bert-large-uncased.json")
# MiniLM-L6's shape with BERT's uncased vocab: 6 layers x 384, vocab 30522
MINI6 = BertModelConfig.from_dict({**LARGE.to_dict(), "hidden_size": 384, "num_hidden_layers": 6,
                                   "num_attention_heads": 12, "intermediate_size": 1536})


def exhaustive(model: CostModel, num_layers: int, depth: int):
    """Over every split the runtime accepts (stages between the first and the last hold a layer):
    the least possible cost of the slowest stage, and whether any split has all stages within 10%
    of each other (a search that prunes a prefix once its stages are already further apart)."""
    cost = {(s, n): model.stage_cost(s, depth, n) for s in range(depth)
            for n in range(num_layers + 1)}
    low = [0 if s in (0, depth - 1) else 1 for s in range(depth)] if depth > 1 else [num_layers]

    def best(s: int, left: int) -> float:          # dynamic programme over (stage, layers left)
        if s == depth - 1:
            return cost[s, left] if left >= low[s] else float("inf")
        return min((max(cost[s, n], best(s + 1, left - n)) for n in range(low[s], left + 1)),
                   default=float("inf"))

    def even(s: int, left: int, lo: float, hi: float) -> bool:
        if s == depth:
            return left == 0
        for n in range(low[s], left + 1):
            c = cost[s, n]
            a, b = min(lo, c), max(hi, c)
            if 1 - a / b <= 0.10 and even(s + 1, left - n, a, b):
                return True
        return False

    from functools import lru_cache
    best = lru_cache(maxsize=None)(best)
    return best(0, num_layers), even(0, num_layers, float("inf"), 0.0)


CASES = [(LARGE, 2), (LARGE, 4), (LARGE, 8), (MINI6, 2), (MINI6, 3)]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("config, depth", CASES,
                         ids=[f"bert{c.num_hidden_layers}-h{c.hidden_size}-d{d}"
                              for c, d in CASES])
def test_default_partition_is_the_best_split_and_as_even_as_layers_allow(config, depth, device):
    L = config.num_hidden_layers
    model = CostModel.analytic(config, seq_length=128, microbatch_size=8,
                               num_microbatches=2 * depth, device=device)
    chosen = parse_module_spec(f"models.bert{L}.depth={depth}", L, cost_model=model)
    costs = model.stage_costs(chosen)
    assert chosen.num_layers == L and chosen.num_stages == depth
    best, some_split_within_10_percent = exhaustive(model, L, depth)
    # no split of whole layers has a cheaper slowest stage (which sets the pipeline's pace)
    assert max(costs.per_microbatch_s) == pytest.approx(best, rel=1e-12)
    if costs.spread > 0.10:
        # ... and none is within 10% either: the granularity of whole layers does not allow it
        assert not some_split_within_10_percent, costs.describe()


def test_cost_balance_beats_layer_count_balance_where_the_heads_weigh():
    """MiniLM-L6's shape at depth 3: the heads (decoder over a 30522 vocab) cost about a layer,
    so the last stage gets one layer fewer than an even 2-2-2 split gives it."""
    model = CostModel.analytic(MINI6, seq_length=128, microbatch_size=8, num_microbatches=6)
    even = model.stage_costs(parse_module_spec("models.bert6.depth=3", 6))
    chosen = model.stage_costs(parse_module_spec("models.bert6.depth=3", 6, cost_model=model))
    assert even.partition.layers_per_stage == (2, 2, 2)
    assert chosen.partition.layers_per_stage[-1] < 2
    assert max(chosen.per_microbatch_s) < 0.99 * max(even.per_microbatch_s)


def test_masked_head_is_a_fraction_of_the_full_vocabulary_head():
    """The analytic head follows the masked-only head: its decoder runs on the labelled positions
    only, so the heads cost about a sixth of what scoring every position would."""
    rates = rates_for("cpu")
    masked = analytic_profile(MINI6, seq_length=128, microbatch_sizes=(8,), rates=rates)
    full = analytic_profile(MINI6, seq_length=128, microbatch_sizes=(8,), rates=rates,
                            mlm_fraction=1.0)
    m, f = masked.at(8).base["last"], full.at(8).base["last"]
    assert 0.1 < (m.forward_s + m.backward_s) / (f.forward_s + f.backward_s) < 0.3


def test_without_a_cost_model_depth_splits_layer_counts():
    assert parse_module_spec("models.bert24.depth=8", 24).layers_per_stage == (3,) * 8


def test_stage_costs_are_described_per_stage():
    model = CostModel.analytic(MINI6, seq_length=128, microbatch_size=8, num_microbatches=4)
    text = model.stage_costs(parse_module_spec("models.bert6.depth=2", 6,
                                               cost_model=model)).describe()
    assert "stage 0: emb+layers 0..2" in text and "stage 1: layers 3..5+heads" in text
    assert "analytic, cpu (1 thread)" in text and "spread" in text
