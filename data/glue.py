"""GLUE tasks: read the TSV files of the jiant ``download_glue_data.py`` layout, and tokenize them.

``--data_dir`` holds one folder per task (``CoLA/train.tsv``, ``MNLI/dev_matched.tsv`` ...).
Each task's file layout, as published:

========  ==========================================================  =========================
task      columns (tab-separated, no quoting)                         label
========  ==========================================================  =========================
CoLA      no header; source, label, original-label marker, sentence   0 / 1
SST-2     ``sentence label``                                          0 / 1
MRPC      ``Quality #1 ID #2 ID #1 String #2 String``                 Quality: 0 / 1
STS-B     10 columns; sentence1, sentence2 at 7, 8                    score in [0, 5], last
QQP       ``id qid1 qid2 question1 question2 is_duplicate``           0 / 1
MNLI      sentence1, sentence2 at 8, 9; dev has label1..label5        gold_label, last:
                                                                      contradiction,
                                                                      entailment, neutral
QNLI      ``index question sentence label``                           entailment,
                                                                      not_entailment
RTE       ``index sentence1 sentence2 label``                         entailment,
                                                                      not_entailment
WNLI      ``index sentence1 sentence2 label``                         0 / 1
========  ==========================================================  =========================

Splits are ``train`` and ``dev``; MNLI has ``dev_matched`` and ``dev_mismatched`` instead of
``dev``. The unlabelled test files (``test.tsv``; MNLI's ``test_matched.tsv`` and
``test_mismatched.tsv``) have a header, an index first and the sentences by name (STS-B and MNLI
by position, as in their train files); :func:`load_test_examples` reads them and
:func:`write_submission` writes predictions as the GLUE benchmark takes them (``SST-2.tsv``,
``MNLI-m.tsv`` ...: ``index<TAB>prediction``, with the task's label names).

A row with the wrong number of columns, a label that does not parse, or a label outside the
task's list raises :class:`GlueDataError` naming ``file:line``. Rows must have exactly the
header's number of columns, except for STS-B and MNLI, whose label is read from the last column
and whose sentences sit at fixed positions, as in the reference GLUE processors; those allow
extra columns. The real QQP ``train.tsv`` has a few rows with missing fields: by default they are
an error too; pass ``on_malformed="skip"`` to leave them out (a warning gives their count and the
first few ``file:line``).
"""

from __future__ import annotations

import os
import types
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import BertTokenizerFast


class GlueDataError(ValueError):
    """A GLUE path, task name or row cannot be used; the message names it (file:line for rows)."""


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: where its files are, how its rows are laid out, its labels and metrics.

    Columns are given by header name, or by position (an int, -1 for the last) for files read by
    position. ``labels`` is the label list of a classification task (its index is the class id),
    ``None`` for the regression task STS-B.
    """

    name: str
    dir_name: str
    text_a: str | int
    text_b: str | int | None
    label: str | int
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    has_header: bool = True
    num_columns: int | None = None  # files without a header: their column count
    extra_columns_ok: bool = False
    dev_splits: tuple[str, ...] = ("dev",)
    test_text: tuple[str | int, str | int | None] = ("sentence", None)  # test.tsv's sentences
    test_splits: tuple[tuple[str, str], ...] = ()  # (split, GLUE submission file stem)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train",) + self.dev_splits

    @property
    def all_splits(self) -> tuple[str, ...]:
        """The labelled splits and the test splits."""
        return self.splits + tuple(split for split, _ in self.test_splits)


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

#: The GLUE tasks, by lower-case name (read-only).
GLUE_TASKS: types.MappingProxyType[str, GlueTask] = types.MappingProxyType({t.name: t for t in (
    GlueTask("cola", "CoLA", text_a=3, text_b=None, label=1, labels=_BINARY, metrics=("mcc",),
             has_header=False, num_columns=4, test_splits=(("test", "CoLA"),)),
    GlueTask("sst-2", "SST-2", "sentence", None, "label", _BINARY, ("accuracy",),
             test_splits=(("test", "SST-2"),)),
    GlueTask("mrpc", "MRPC", "#1 String", "#2 String", "Quality", _BINARY, ("accuracy", "f1"),
             test_text=("#1 String", "#2 String"), test_splits=(("test", "MRPC"),)),
    GlueTask("sts-b", "STS-B", 7, 8, -1, None, ("pearson", "spearman"), extra_columns_ok=True,
             test_text=(7, 8), test_splits=(("test", "STS-B"),)),
    GlueTask("qqp", "QQP", "question1", "question2", "is_duplicate", _BINARY,
             ("accuracy", "f1"), test_text=("question1", "question2"),
             test_splits=(("test", "QQP"),)),
    GlueTask("mnli", "MNLI", 8, 9, -1, ("contradiction", "entailment", "neutral"),
             ("accuracy",), extra_columns_ok=True,
             dev_splits=("dev_matched", "dev_mismatched"), test_text=(8, 9),
             test_splits=(("test_matched", "MNLI-m"), ("test_mismatched", "MNLI-mm"))),
    GlueTask("qnli", "QNLI", "question", "sentence", "label", _NLI2, ("accuracy",),
             test_text=("question", "sentence"), test_splits=(("test", "QNLI"),)),
    GlueTask("rte", "RTE", "sentence1", "sentence2", "label", _NLI2, ("accuracy",),
             test_text=("sentence1", "sentence2"), test_splits=(("test", "RTE"),)),
    GlueTask("wnli", "WNLI", "sentence1", "sentence2", "label", _BINARY, ("accuracy",),
             test_text=("sentence1", "sentence2"), test_splits=(("test", "WNLI"),)),
)})
_ALIASES = {"sst2": "sst-2", "stsb": "sts-b"}


def get_task(task_name: str) -> GlueTask:
    """The task called ``task_name``, case-insensitively (``CoLA``, ``sst-2``, ``SST2``)."""
    key = task_name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in GLUE_TASKS:
        raise GlueDataError(f"unknown GLUE task {task_name!r}; known tasks: "
                            f"{', '.join(t.dir_name for t in GLUE_TASKS.values())} "
                            "(--task_name is case-insensitive)")
    return GLUE_TASKS[key]


@dataclass(frozen=True)
class GlueExample:
    """One row: its text (one sentence or a pair) and label (class id or score; None in a test
    file)."""

    guid: str  # file:line
    text_a: str
    text_b: str | None
    label: int | float | None


def task_file(data_dir: str | os.PathLike, task: GlueTask, split: str) -> str:
    """The TSV of ``split`` of ``task`` under ``data_dir``, checked to exist."""
    data_dir = os.fspath(data_dir)
    if split not in task.all_splits:
        hint = (" (MNLI has dev_matched and dev_mismatched)" if task.name == "mnli"
                and split == "dev" else "")
        raise GlueDataError(f"{task.dir_name} has no split {split!r}; use one of "
                            f"{', '.join(task.all_splits)}{hint}")
    if not os.path.isdir(data_dir):
        raise GlueDataError(f"{data_dir}: no such --data_dir (it should hold the task folders "
                            f"of jiant's download_glue_data.py, e.g. {task.dir_name}/)")
    folder = os.path.join(data_dir, task.dir_name)
    if not os.path.isdir(folder):
        raise GlueDataError(f"{folder}: no such task folder; --data_dir should contain "
                            f"{task.dir_name}/ with {', '.join(s + '.tsv' for s in task.splits)}")
    path = os.path.join(folder, f"{split}.tsv")
    if not os.path.isfile(path):
        raise GlueDataError(f"{path}: no such file")
    return path


def _column_index(task: GlueTask, header: list[str] | None, column: str | int, path: str) -> int:
    if isinstance(column, int):
        return column
    assert header is not None
    if column not in header:
        raise GlueDataError(f"{path}:1: header has no column {column!r} (it has "
                            f"{', '.join(header)}); is this the {task.dir_name} file of the "
                            "GLUE distribution?")
    return header.index(column)


def _parse_label(task: GlueTask, raw: str, where: str) -> int | float:
    raw = raw.strip()
    if task.labels is None:
        try:
            score = float(raw)
        except ValueError:
            raise GlueDataError(f"{where}: {task.dir_name} score {raw!r} is not a number") \
                from None
        if not 0.0 <= score <= 5.0:
            raise GlueDataError(f"{where}: {task.dir_name} score {score} is outside [0, 5]")
        return score
    if raw not in task.labels:
        raise GlueDataError(f"{where}: {task.dir_name} label {raw!r} is not one of "
                            f"{', '.join(task.labels)}")
    return task.labels.index(raw)


def load_examples(data_dir: str | os.PathLike, task_name: str, split: str,
                  on_malformed: str = "error") -> list[GlueExample]:
    """The labelled rows of one split of one task (see the module docstring for the layouts).

    ``on_malformed``: ``"error"`` (default) raises :class:`GlueDataError` at the first malformed
    row with its ``file:line``; ``"skip"`` leaves such rows out and warns with their count.
    """
    if on_malformed not in ("error", "skip"):
        raise ValueError(f"on_malformed must be 'error' or 'skip', got {on_malformed!r}")
    task = get_task(task_name)
    path = task_file(data_dir, task, split)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise GlueDataError(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise GlueDataError(f"{path}: cannot read: {e.strerror}") from None

    header: list[str] | None = None
    first = 1
    if task.has_header:
        if not lines or not lines[0].strip():
            raise GlueDataError(f"{path}:1: missing header line")
        header = [c.strip() for c in lines[0].rstrip("\r").split("\t")]
        first = 2
    width = len(header) if header is not None else task.num_columns
    cols = [_column_index(task, header, c, path) if c is not None else None
            for c in (task.text_a, task.text_b, task.label)]

    examples: list[GlueExample] = []
    skipped: list[str] = []
    for lineno, line in enumerate(lines[first - 1:], first):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        fields = line.split("\t")
        try:
            if len(fields) != width and not (task.extra_columns_ok and len(fields) > width):
                raise GlueDataError(f"{where}: expected {width} tab-separated columns for "
                                    f"{task.dir_name}, found {len(fields)}")
            a, b, y = cols
            label = _parse_label(task, fields[y], where)
            examples.append(GlueExample(guid=where, text_a=fields[a],
                                        text_b=fields[b] if b is not None else None,
                                        label=label))
        except GlueDataError:
            if on_malformed == "error":
                raise
            skipped.append(where)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} malformed row(s) of {path}: "
                      f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}",
                      stacklevel=2)
    if not examples:
        raise GlueDataError(f"{path}: no rows")
    return examples


def present_test_splits(data_dir: str | os.PathLike, task: GlueTask
                        ) -> list[tuple[str, str]]:
    """The test splits of ``task`` present under ``data_dir``: (split, submission file stem)."""
    folder = os.path.join(os.fspath(data_dir), task.dir_name)
    return [(split, stem) for split, stem in task.test_splits
            if os.path.isfile(os.path.join(folder, f"{split}.tsv"))]


def load_test_examples(data_dir: str | os.PathLike, task_name: str, split: str = "test"
                       ) -> tuple[list[str], list[GlueExample]]:
    """The unlabelled rows of a test file: their indices (first column) and examples (label
    None). A row with fewer columns than the header is an error naming ``file:line``."""
    task = get_task(task_name)
    if split not in dict(task.test_splits):
        raise GlueDataError(f"{task.dir_name} has no test split {split!r}; its test files are "
                            f"{', '.join(s + '.tsv' for s, _ in task.test_splits)}")
    path = task_file(data_dir, task, split)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise GlueDataError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not lines or not lines[0].strip():
        raise GlueDataError(f"{path}:1: missing header line")
    header = [c.strip() for c in lines[0].rstrip("\r").split("\t")]
    a, b = (_column_index(task, header, c, path) if c is not None else None
            for c in task.test_text)
    indices: list[str] = []
    examples: list[GlueExample] = []
    for lineno, line in enumerate(lines[1:], 2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < len(header) or (len(fields) > len(header)
                                         and not task.extra_columns_ok):
            raise GlueDataError(f"{path}:{lineno}: expected {len(header)} tab-separated columns "
                                f"for the {task.dir_name} test file, found {len(fields)}")
        indices.append(fields[0])
        examples.append(GlueExample(guid=f"{path}:{lineno}", text_a=fields[a],
                                    text_b=fields[b] if b is not None else None, label=None))
    if not examples:
        raise GlueDataError(f"{path}: no rows")
    return indices, examples


def write_submission(path: str | os.PathLike, task: GlueTask, indices: Sequence[str],
                     predictions: torch.Tensor) -> None:
    """Predictions in the GLUE benchmark's format: a header ``index<TAB>prediction``, then one
    row per test example with the task's label name (``0``/``1``, ``entailment`` ...) or, for
    STS-B, the score. ``predictions`` are the model's outputs, ``[n, num_labels]``."""
    if len(indices) != predictions.shape[0]:
        raise ValueError(f"{len(indices)} test examples but {predictions.shape[0]} predictions")
    if task.is_regression:
        values = [f"{v:.3f}" for v in predictions.reshape(-1).tolist()]
    else:
        values = [task.labels[i] for i in predictions.argmax(-1).tolist()]
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("index\tprediction\n")
        f.writelines(f"{i}\t{v}\n" for i, v in zip(indices, values))


@dataclass(frozen=True)
class GlueFeatures:
    """Tokenized examples as tensors: ``inputs`` = (input_ids, token_type_ids, attention_mask),
    each int64 [n, max_seq_length], and ``labels`` int64 [n] (float32 [n] for STS-B; None for a
    test file)."""

    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None

    @property
    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.input_ids, self.token_type_ids, self.attention_mask

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def encode_examples(examples: Sequence[GlueExample], tokenizer: BertTokenizerFast,
                    max_seq_length: int) -> GlueFeatures:
    """``[CLS] a [SEP] (b [SEP])``, padded to ``max_seq_length``, truncated longest first."""
    if max_seq_length < 4:
        raise ValueError(f"--max_seq_length {max_seq_length} is too small for "
                         "[CLS] a [SEP] b [SEP]")
    if not examples:
        raise ValueError("no examples to encode")
    pair = examples[0].text_b is not None
    enc = tokenizer([e.text_a for e in examples],
                    [e.text_b for e in examples] if pair else None,
                    max_length=max_seq_length, padding="max_length", truncation="longest_first",
                    return_token_type_ids=True, return_attention_mask=True, return_tensors="pt")
    if examples[0].label is None:
        labels = None
    else:
        is_float = isinstance(examples[0].label, float)
        labels = torch.tensor([e.label for e in examples],
                              dtype=torch.float32 if is_float else torch.int64)
    return GlueFeatures(enc["input_ids"].long(), enc["token_type_ids"].long(),
                        enc["attention_mask"].long(), labels)
