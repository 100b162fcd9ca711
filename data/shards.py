"""Pre-training shards: the Parquet layout, checking a shard's columns, and rows to tensors.

A shard is a Parquet file of fixed-length BERT pre-training examples, one row each:

==========================  ===============================  ====================================
column                      type                             meaning
==========================  ===============================  ====================================
``input_ids``               list<int32>, length L            ``[CLS] A [SEP] B [SEP]`` then
                                                             ``[PAD]`` (id 0), with masked
                                                             positions already replaced
``token_type_ids``          list<int8>, length L             0 for ``[CLS] A [SEP]``, 1 for
                                                             ``B [SEP]``, 0 for padding
``attention_mask``          list<int8>, length L             1 for tokens, 0 for padding
``masked_lm_labels``        list<int32>, length L            the original token where a position
                                                             is predicted, -100 elsewhere
``next_sentence_label``     int8                             0: B follows A, 1: B is random
==========================  ===============================  ====================================

L is ``max_seq_length``. The reader accepts any integer list types (fixed-size or not) as long as
every row of a column has the same length, so pre-masked shards produced elsewhere with these
column names are used as they are.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

if TYPE_CHECKING:
    # torch is imported where tensors are made (table_to_microbatch): Ray Data's read workers
    # and split coordinators import this module and need only pyarrow (torch costs each ~2 s)
    import torch

TOKEN_COLUMNS = ("input_ids", "token_type_ids", "attention_mask", "masked_lm_labels")
COLUMNS = TOKEN_COLUMNS + ("next_sentence_label",)
IGNORE_INDEX = -100  # masked_lm_labels value of a position that is not predicted

#: One microbatch as the trainer takes it: ``(inputs, targets)`` with
#: inputs = (input_ids, token_type_ids, attention_mask, masked_lm_labels), each int64 [b, L],
#: and targets = (masked_lm_labels int64 [b, L], next_sentence_label int64 [b]).
Microbatch = tuple[tuple["torch.Tensor", ...], tuple["torch.Tensor", "torch.Tensor"]]


class ShardError(ValueError):
    """A shard file cannot be used; the message names the file and what is wrong."""


def shard_schema(max_seq_length: int) -> pa.Schema:
    """The schema :mod:`data.prepare_pretraining` writes (see the module docstring)."""
    L = max_seq_length
    return pa.schema([
        ("input_ids", pa.list_(pa.int32(), L)),
        ("token_type_ids", pa.list_(pa.int8(), L)),
        ("attention_mask", pa.list_(pa.int8(), L)),
        ("masked_lm_labels", pa.list_(pa.int32(), L)),
        ("next_sentence_label", pa.int8()),
    ])


def write_shard(table: pa.Table, path: str | os.PathLike) -> None:
    """Write ``table`` to ``path`` atomically (a reader never sees half a shard).

    The writer settings are fixed so that the same rows give the same bytes.
    """
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(table, tmp, compression="zstd", row_group_size=4096)
    os.replace(tmp, path)


def check_shard(path: str | os.PathLike) -> pq.FileMetaData:
    """The Parquet footer of a shard, after checking that it has every column of :data:`COLUMNS`.

    Raises :class:`ShardError` naming the file and the missing columns.
    """
    path = os.fspath(path)
    try:
        meta = pq.read_metadata(path)
    except FileNotFoundError:
        raise ShardError(f"{path}: no such shard file") from None
    except (OSError, pa.ArrowException) as e:
        raise ShardError(f"{path}: not a readable Parquet file: {e}") from None
    names = set(meta.schema.to_arrow_schema().names)
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise ShardError(f"{path}: shard lacks column(s) {', '.join(missing)} (it has "
                         f"{', '.join(sorted(names)) or 'none'}); a pre-training shard needs "
                         f"{', '.join(COLUMNS)}; make shards with python -m "
                         "data.prepare_pretraining")
    return meta


def _matrix(column: pa.ChunkedArray | pa.Array, name: str) -> np.ndarray:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise ShardError(f"column {name} has {arr.null_count} null row(s)")
    n = len(arr)
    if pa.types.is_fixed_size_list(arr.type):
        width = arr.type.list_size
    elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        width = int(lengths[0]) if n else 0
        if n and (lengths != width).any():
            raise ShardError(f"column {name} has rows of different lengths "
                             f"({int(lengths.min())}..{int(lengths.max())}); pre-training rows "
                             "must all be padded to max_seq_length")
    else:
        raise ShardError(f"column {name} has type {arr.type}, expected a list of integers")
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(n, width)


def table_to_microbatch(table: pa.Table) -> Microbatch:
    """A pyarrow batch of shard rows as the trainer's ``(inputs, targets)`` int64 tensors."""
    import torch

    # np.array copies: the tensors must not share Arrow's read-only buffers.
    cols = {name: torch.from_numpy(np.array(_matrix(table.column(name), name), dtype=np.int64))
            for name in TOKEN_COLUMNS}
    nsp = table.column("next_sentence_label").combine_chunks()
    if nsp.null_count:
        raise ShardError(f"column next_sentence_label has {nsp.null_count} null row(s)")
    nsp_t = torch.from_numpy(np.array(nsp.to_numpy(zero_copy_only=False), dtype=np.int64))
    # the labels are also the first stage's fourth input: the last stage scores only the
    # labelled positions (stages.bert's masked-only MLM head)
    return ((cols["input_ids"], cols["token_type_ids"], cols["attention_mask"],
             cols["masked_lm_labels"]),
            (cols["masked_lm_labels"], nsp_t))


def list_shards(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Shard files, in order: each ``.parquet`` file as given, each directory's ``*.parquet``.

    Directories are listed non-recursively and sorted by name. Raises :class:`ShardError` for a
    missing path or a directory without Parquet files.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[str] = []
    for given in paths:
        path = os.fspath(given)
        if os.path.isdir(path):
            found = sorted(os.path.join(path, n) for n in os.listdir(path)
                           if n.endswith(".parquet") and not n.startswith((".", "_")))
            if not found:
                raise ShardError(f"{path}: directory has no .parquet shards; make them with "
                                 "python -m data.prepare_pretraining --output_dir " + path)
            files.extend(found)
        elif os.path.exists(path):
            files.append(path)
        else:
            raise ShardError(f"{path}: no such shard file or directory")
    return files


def labelled_fraction(path: str | os.PathLike, *, max_rows: int = 4096) -> float | None:
    """The share of positions (padding included) that carry a masked-LM label, over the first
    ``max_rows`` rows of the shard at ``path``: what the masked-only MLM head's cost scales
    with (`stages.bert_cost`). None for a shard without rows.

    Preparation masks about 15% of each sequence's tokens with a cap per sequence, so the share
    falls with short sequences and padding (a corpus of short documents) and with the cap.
    """
    path = os.fspath(path)
    check_shard(path)           # names the file and every column it lacks
    try:
        reader = pq.ParquetFile(path)
        first = next(reader.iter_batches(batch_size=max_rows, columns=["masked_lm_labels"]),
                     None)
    except (OSError, pa.ArrowException) as e:
        raise ShardError(f"{path}: cannot read masked_lm_labels: {e}") from None
    if first is None or not first.num_rows:
        return None
    labels = _matrix(first.column(0), "masked_lm_labels")
    return float((labels != IGNORE_INDEX).mean())
