"""--module partition specs, the conf.json helper, and the confs shipped in configs/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pd2bw_ray.config import ConfigError, PipelineConfig
from stages.bert import build_bert_pipeline
from stages.bert_config import BertModelConfig
from stages.partition import (BertPartition, PartitionError, balanced_partition, format_conf_json,
                              parse_module_spec, pipeline_conf)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The seed's depth-8 conf for 64 workers, written out by hand.
SEED_CONF_8x8 = {
    "module_to_stage_map": [0, 1, 2, 3, 4, 5, 6, 7, 7],
    "stage_to_rank_map": {
        "0": [0, 1, 2, 3, 4, 5, 6, 7], "1": [8, 9, 10, 11, 12, 13, 14, 15],
        "2": [16, 17, 18, 19, 20, 21, 22, 23], "3": [24, 25, 26, 27, 28, 29, 30, 31],
        "4": [32, 33, 34, 35, 36, 37, 38, 39], "5": [40, 41, 42, 43, 44, 45, 46, 47],
        "6": [48, 49, 50, 51, 52, 53, 54, 55], "7": [56, 57, 58, 59, 60, 61, 62, 63],
    },
}


@pytest.mark.parametrize("layers, depth, expected", [
    (24, 1, (24,)),
    (24, 2, (12, 12)),
    (24, 8, (3, 3, 3, 3, 3, 3, 3, 3)),
    (24, 5, (5, 5, 5, 5, 4)),     # 4 extra layers: stages 1, 2, 3 first, then stage 0
    (24, 7, (3, 4, 4, 4, 3, 3, 3)),
    (4, 3, (1, 2, 1)),
    (5, 2, (3, 2)),
    (4, 4, (1, 1, 1, 1)),
])
def test_balanced_partition(layers, depth, expected):
    assert balanced_partition(layers, depth).layers_per_stage == expected


def test_balanced_partition_is_even_for_every_depth():
    for layers in range(1, 33):
        for depth in range(1, layers + 1):
            counts = balanced_partition(layers, depth).layers_per_stage
            assert len(counts) == depth and sum(counts) == layers
            assert max(counts) - min(counts) <= 1


def test_layer_ranges_and_module_map():
    partition = parse_module_spec("models.bert24.layers=2,4,4,4,4,3,2,1", 24)
    assert [list(partition.layer_range(s)) for s in (0, 1, 7)] == [[0, 1], [2, 3, 4, 5], [23]]
    assert partition.stage_of_layer(20) == 5
    assert partition.module_to_stage_map == (0, 1, 2, 3, 4, 5, 6, 7, 7)
    assert partition.to_spec() == "models.bert24.layers=2,4,4,4,4,3,2,1"
    assert parse_module_spec(partition.to_spec(), 24) == partition


@pytest.mark.parametrize("spec, expected", [
    ("models.bert24.depth=8", (3,) * 8),
    (" models.bert24.depth=2 ", (12, 12)),
    ("models.bert24.layers=2, 4,4,4,4,3,2,1", (2, 4, 4, 4, 4, 3, 2, 1)),
    ("models.bert24.layers=0,12,12", (0, 12, 12)),   # the first stage holds only the embeddings
    ("models.bert24.layers=12,12,0", (12, 12, 0)),   # the last stage holds only the heads
    ("models.bert24.layers=24", (24,)),
    ("models.bert24.layers=12.5,11.5", (12.5, 11.5)),        # layer 12 cut in two
    ("models.bert24.layers=0.5,23.5", (0.5, 23.5)),
    ("models.bert24.layers=3.0,2.5,18.5", (3, 2.5, 18.5)),
])
def test_parse_good_specs(spec, expected):
    assert parse_module_spec(spec, 24).layers_per_stage == expected


@pytest.mark.parametrize("spec, message", [
    ("bert24.depth=8", "is not a BERT partition; expected one of models.bert<L>.depth=<D> or "
                       "models.bert<L>.layers=<n0>,<n1>,..."),
    ("models.gpt24.depth=8", "is not a BERT partition"),
    ("models.bert24.width=8", "is not a BERT partition"),
    ("models.bert12.depth=4", "names a 12-layer BERT but configs/x.json has num_hidden_layers=24; "
                              "use models.bert24.depth=..."),
    ("models.bert24.depth=0", "depth '0' is not a positive integer"),
    ("models.bert24.depth=two", "depth 'two' is not a positive integer"),
    ("models.bert24.depth=25", "depth 25 exceeds the 24 encoder layers"),
    ("models.bert24.layers=3,3,x", r"bad item\(s\) \['x'\]"),
    ("models.bert24.layers=3,-3,24", r"bad item\(s\) \['-3'\]"),
    ("models.bert24.layers=", r"bad item\(s\) \[''\]"),
    ("models.bert24.layers=12,11", "layer counts sum to 23, but the model has 24 layers"),
    ("models.bert24.layers=12,0,12", "stage 1 has no encoder layers"),
    ("models.bert24.layers=12.5,11", "layer counts sum to 23.5, but the model has 24 layers"),
    ("models.bert24.layers=12.25,11.75", r"bad item\(s\) \['12.25', '11.75'\]"),
    ("models.bert24.layers=12.5,11.5,0.5,-0.5", r"bad item\(s\) \['-0.5'\]"),
])
def test_parse_bad_specs(spec, message):
    with pytest.raises(PartitionError, match=re.escape(f"--module {spec!r}")) as info:
        parse_module_spec(spec, 24, config_source="configs/x.json")
    assert re.search(message if "\\" in message else re.escape(message), str(info.value)), \
        str(info.value)


def test_half_layers_name_their_blocks():
    partition = parse_module_spec("models.bert6.layers=1.5,2,2.5", 6)
    assert partition.has_halves and partition.num_layers == 6
    assert [list(partition.block_range(s)) for s in range(3)] == [
        [0, 1, 2], [3, 4, 5, 6], [7, 8, 9, 10, 11]]
    # layer 1 is cut after its attention, layer 3 after its attention
    assert [list(partition.layer_range(s)) for s in range(3)] == [[0, 1], [1, 2, 3], [3, 4, 5]]
    assert partition.layer_blocks(1) == {1: (False, True), 2: (True, True), 3: (True, False)}
    assert partition.stage_of_layer(1) == 0 and partition.stage_of_layer(3) == 1
    assert [partition.layers_text(s) for s in range(3)] == [
        "layer 0+layer 1 attention", "layer 1 feed-forward+layer 2+layer 3 attention",
        "layer 3 feed-forward+layers 4..5"]
    assert partition.layers_text(1, short=True) == "1f+2+3a"
    assert partition.to_spec() == "models.bert6.layers=1.5,2,2.5"
    assert parse_module_spec(partition.to_spec(), 6) == partition
    assert BertPartition.from_blocks((3, 4, 5)) == partition
    assert BertPartition((3.0, 3)) == BertPartition((3, 3))
    assert BertPartition((3.0, 3)).layers_per_stage == (3, 3)
    assert not BertPartition((3, 3)).has_halves


def test_partition_validates_on_construction():
    with pytest.raises(PartitionError, match="stage 1: layer count -1"):
        BertPartition((2, -1, 3))
    with pytest.raises(PartitionError, match="non-empty tuple"):
        BertPartition(())
    with pytest.raises(PartitionError, match="stage 0: layer count 1.25"):
        BertPartition((1.25, 2.75))
    with pytest.raises(PartitionError, match="halves must add up to whole layers"):
        BertPartition((1.5, 2))
    with pytest.raises(PartitionError, match="stage 1: layer count nan"):
        BertPartition((1, float("nan"), 2))


def test_pipeline_conf_is_stage_major():
    assert pipeline_conf(8, 8).to_dict() == SEED_CONF_8x8
    conf = pipeline_conf(3, 2)
    assert conf.to_dict() == {"module_to_stage_map": [0, 1, 2, 2],
                              "stage_to_rank_map": {"0": [0, 1], "1": [2, 3], "2": [4, 5]}}
    assert conf.rank(stage=1, replica=0) == 2
    with pytest.raises(PartitionError, match="num_replicas must be a positive integer"):
        pipeline_conf(2, 0)


SHIPPED = sorted(CONFIGS.glob("conf_bert24_depth*_replicas*.json"))


def test_shipped_confs_cover_depths_2_4_8():
    names = {p.name for p in SHIPPED}
    pure_pipelines = {f"conf_bert24_depth{d}_replicas1.json" for d in (2, 4, 8)}
    with_replicas = {"conf_bert24_depth2_replicas4.json", "conf_bert24_depth4_replicas2.json",
                     "conf_bert24_depth8_replicas8.json"}
    assert pure_pipelines | with_replicas <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_conf_validates_and_matches_its_partition(path):
    depth, replicas = map(int, re.fullmatch(r"conf_bert24_depth(\d+)_replicas(\d+)\.json",
                                            path.name).groups())
    conf = PipelineConfig.from_json(path)
    assert (conf.num_stages, conf.num_replicas) == (depth, replicas)
    partition = parse_module_spec(f"models.bert24.depth={depth}", 24)
    assert conf.module_to_stage_map == partition.module_to_stage_map
    assert conf == pipeline_conf(depth, replicas)
    assert path.read_text() == format_conf_json(conf)


def test_seed_conf_is_shipped_exactly():
    conf = PipelineConfig.from_json(CONFIGS / "conf_bert24_depth8_replicas8.json")
    assert conf.to_dict() == SEED_CONF_8x8


def test_the_seeds_conf_pasted_as_printed_reads_as_its_literal(tmp_path):
    """PipeDream's README prints conf.json as a Python dict (single quotes); pasted into a file
    it is read as that literal, and code in it is never run."""
    pasted = tmp_path / "conf.json"
    pasted.write_text(repr(SEED_CONF_8x8) + "\n")
    assert "'module_to_stage_map'" in pasted.read_text()
    assert PipelineConfig.from_json(pasted).to_dict() == SEED_CONF_8x8
    code = tmp_path / "code.json"
    code.write_text("__import__('os').getcwd()")
    with pytest.raises(ConfigError, match=rf"{code}:1:1: malformed JSON"):
        PipelineConfig.from_json(code)


def test_model_checks_the_conf_it_runs_under():
    config = BertModelConfig.from_json(CONFIGS / "bert_config_bert-large-uncased.json")
    model = build_bert_pipeline(config, parse_module_spec("models.bert24.depth=4", 24),
                                device="meta")
    model.check_pipeline_config(
        PipelineConfig.from_json(CONFIGS / "conf_bert24_depth4_replicas2.json"))
    model.check_pipeline_config(pipeline_conf(4, 1))
    # PipeDream's grouping: the 4 modules on 2 stages or on 1, with or without the loss entry
    for m2s in ([0, 0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 0, 0]):
        model.check_pipeline_config(PipelineConfig(m2s, {str(s): [s] for s in
                                                         range(m2s[-1] + 1)}))
    wrong = CONFIGS / "conf_bert24_depth8_replicas1.json"
    with pytest.raises(ConfigError, match=rf"{wrong}: module_to_stage_map .* has 9 entries, but "
                                          r"--module models.bert24.layers=6,6,6,6 \(4 modules\) "
                                          r"needs 4"):
        model.check_pipeline_config(PipelineConfig.from_json(wrong))
    with pytest.raises(ConfigError, match=r"puts the loss \(last entry\) on stage 1, but the "
                                          r"last module .* is on stage 0"):
        model.check_pipeline_config(PipelineConfig([0, 0, 0, 0, 1], {"0": [0], "1": [1]}))
    with pytest.raises(ConfigError, match=r"contiguous .* module 2 goes to stage 0 after "
                                          r"module 1 on stage 1"):
        model.check_pipeline_config(PipelineConfig([0, 1, 0, 1], {"0": [0], "1": [1]}))
