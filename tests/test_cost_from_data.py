"""The masked-only head's predicted cost follows the training data's labelled share.

Preparation masks 15% of a sequence's tokens, capped per sequence, so corpora of short documents
(short sequences, padding) carry fewer labels; the heads' decoder runs on those positions only.
`data.shards.labelled_fraction` measures the share on a shard, and the pre-training job balances
``models.bert<L>.depth=D`` with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.shards import ShardError, labelled_fraction
from stages.bert_cost import MLM_FRACTION, CostModel
from test_bert_cost import MINI6

ROOT = Path(__file__).resolve().parents[1]
SEQ = 128


def write_shard(path: Path, labels_per_row: list[int], *, row_group_size: int = 4096) -> None:
    """A shard of ``SEQ``-token rows; row ``r`` has labels at its first ``labels_per_row[r]``
    positions after [CLS] and -100 elsewhere."""
    n = len(labels_per_row)
    labels = np.full((n, SEQ), -100, dtype=np.int32)
    for r, k in enumerate(labels_per_row):
        labels[r, 1:1 + k] = 7
    table = pa.table({
        "input_ids": pa.array(list(np.ones((n, SEQ), dtype=np.int32)), pa.list_(pa.int32())),
        "token_type_ids": pa.array([[0] * SEQ] * n, pa.list_(pa.int8())),
        "attention_mask": pa.array([[1] * SEQ] * n, pa.list_(pa.int8())),
        "masked_lm_labels": pa.array(list(labels), pa.list_(pa.int32())),
        "next_sentence_label": pa.array([0] * n, pa.int8()),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)


def test_labelled_fraction_counts_labels_over_all_positions(tmp_path):
    counts = [(r * 7) % 20 for r in range(300)]          # 0..19 labels per row
    write_shard(tmp_path / "a.parquet", counts, row_group_size=64)
    assert labelled_fraction(tmp_path / "a.parquet") == pytest.approx(sum(counts) / (300 * SEQ))
    # only the first rows are read: across row groups, cut inside the second one
    assert labelled_fraction(tmp_path / "a.parquet", max_rows=100) == pytest.approx(
        sum(counts[:100]) / (100 * SEQ))
    write_shard(tmp_path / "empty.parquet", [])
    assert labelled_fraction(tmp_path / "empty.parquet") is None


def test_labelled_fraction_names_a_shard_it_cannot_read(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(ShardError, match="bad.parquet"):
        labelled_fraction(bad)
    pq.write_table(pa.table({"input_ids": pa.array([[1] * SEQ], pa.list_(pa.int32()))}),
                   tmp_path / "nolabels.parquet")
    with pytest.raises(ShardError, match="nolabels.parquet.*masked_lm_labels"):
        labelled_fraction(tmp_path / "nolabels.parquet")


def test_fewer_labels_make_the_heads_cheaper():
    full = CostModel.analytic(MINI6, seq_length=SEQ, microbatch_size=8, num_microbatches=4)
    sparse = CostModel.analytic(MINI6, seq_length=SEQ, microbatch_size=8, num_microbatches=4,
                                mlm_fraction=0.10)
    # the last stage with no layer: the pooler, the heads and their optimizer step
    assert sparse.stage_cost(1, 2, 0) < 0.8 * full.stage_cost(1, 2, 0)
    # the layers and the embeddings do not depend on the labels
    assert sparse.stage_cost(0, 2, 3) == pytest.approx(full.stage_cost(0, 2, 3), rel=1e-12)


def layout_of(train_path: Path, tmp_path: Path, depth: int, **kwargs) -> tuple:
    from jobs.pretrain_bert24 import build_parser, load_model_and_layout

    config = tmp_path / "bert_config.json"
    config.write_text(json.dumps(MINI6.to_dict()))
    argv = ["--module", f"models.bert6.depth={depth}", "--bert_config_path", str(config),
            "--vocab_path", str(ROOT / "data/sample/vocab.txt"), "--train_path",
            str(train_path), "--do_train", "--do_lower_case", "--max_seq_length", str(SEQ),
            "--train_batch_size", "8", "--gradient_accumulation_steps", "2"]
    lines: list[str] = []
    layout = load_model_and_layout(build_parser().parse_args(argv), log=lines.append, **kwargs)
    return layout.partition, lines


def test_the_job_balances_depth_with_the_labelled_share_of_its_shards(tmp_path):
    # about 10% of the positions labelled, as the job bench's short-document corpus has
    counts = [10 + r % 6 for r in range(512)]
    write_shard(tmp_path / "shards" / "part-00000.parquet", counts)
    share = sum(counts) / (len(counts) * SEQ)
    partition, lines = layout_of(tmp_path / "shards", tmp_path, 2)
    (predicted,) = [line for line in lines if "predicted compute per microbatch" in line]
    assert f"{share:.1%} of positions labelled" in predicted
    at = {f: CostModel.analytic(MINI6, seq_length=SEQ, microbatch_size=8, num_microbatches=4,
                                mlm_fraction=f).balanced_partition(2) for f in (share,
                                                                              MLM_FRACTION)}
    assert partition == at[share]
    # the share decides the split here: with 15% the heads weigh enough to move half a layer
    assert at[share] != at[MLM_FRACTION]


def test_raw_text_input_is_balanced_at_the_default_share(tmp_path):
    partition, lines = layout_of(ROOT / "data/sample/corpus.txt", tmp_path, 3)
    (predicted,) = [line for line in lines if "predicted compute per microbatch" in line]
    assert f"{MLM_FRACTION:.1%} of positions labelled" in predicted


def test_a_resumed_depth_run_keeps_the_split_its_checkpoint_records(tmp_path):
    """A run started when the cost model chose 2,3,1 (e.g. before it read the data's labels)
    resumes with that split; the module count must still match for it to apply."""
    write_shard(tmp_path / "shards" / "part-00000.parquet", [12] * 256)
    fresh, _ = layout_of(tmp_path / "shards", tmp_path, 3)
    assert fresh.to_spec() == "models.bert6.layers=2,2.5,1.5"
    resumed, lines = layout_of(tmp_path / "shards", tmp_path, 3,
                               resume_module="models.bert6.layers=2,3,1")
    assert resumed.to_spec() == "models.bert6.layers=2,3,1"
    assert any("resuming the checkpoint's split models.bert6.layers=2,3,1" in line
               for line in lines)
    assert any(line.startswith("[pretrain] models.bert6.layers=2,3,1: predicted")
               for line in lines)
    # another depth is not this run's split (check_resume_matches refuses the checkpoint)
    other, _ = layout_of(tmp_path / "shards", tmp_path, 3, resume_module="models.bert6.layers=3,3")
    assert other == fresh
