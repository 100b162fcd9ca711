"""The pre-training data preparation job: raw text in, tokenized and masked Parquet shards out.

    python -m data.prepare_pretraining --input corpus.txt --vocab_path vocab.txt \\
        --output_dir shards/ --max_seq_length 128 --dupe_factor 5 --seed 12345

The driver streams documents from the input (:mod:`data.corpus`: sentence-per-line text,
WikiExtractor JSON, or a Wikipedia XML dump), cuts them into groups of ``--documents_per_shard``
consecutive documents, and hands each group to a Ray task, at most ``--num_workers`` at a time.
A task splits sentences, tokenizes them with transformers' fast WordPiece tokenizer, builds the
examples (:mod:`data.pretraining`) and writes ``part-NNNNN.parquet`` (:mod:`data.shards`).

A shard depends only on its own documents, its index and ``--seed``, so the same input and seed
give byte-identical shards whatever the number of workers. The last group takes the documents of
a too-small remainder (fewer than two) so every shard can draw random next sentences from another
document.

Everything that can be checked is checked before the first task starts: input paths and format,
vocab and its special tokens, flag values, an output directory that already holds shards, and a
corpus with fewer than two documents.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import ray
from tqdm import tqdm
from transformers import BertTokenizerFast

from data.corpus import (INPUT_FORMATS, CorpusError, RawDocument, document_sentences,
                         iter_raw_documents, list_input_files, resolve_format)
from data.pretraining import ExampleConfig, SpecialIds, instances_to_table, make_shard_table
from data.shards import write_shard
from data.vocab import load_tokenizer, maskable_token_ids

SHARD_NAME = "part-{:05d}.parquet"


@dataclass(frozen=True)
class PrepareConfig:
    """One preparation run: where the text is, how to read and tokenize it, where shards go."""

    inputs: tuple[str, ...]
    output_dir: str
    vocab_path: str
    do_lower_case: bool = True
    input_format: str = "auto"
    examples: ExampleConfig = field(default_factory=ExampleConfig)
    documents_per_shard: int = 1000
    num_workers: int | None = None  # Ray tasks at a time; None: the cluster's CPUs
    overwrite: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.inputs, (str, os.PathLike)):
            object.__setattr__(self, "inputs", (os.fspath(self.inputs),))
        object.__setattr__(self, "inputs", tuple(os.fspath(p) for p in self.inputs))
        if not self.inputs:
            raise ValueError("no --input given; pass corpus files or directories")
        if self.input_format != "auto" and self.input_format not in INPUT_FORMATS:
            raise ValueError(f"unknown --input_format {self.input_format!r}; use one of "
                             f"{', '.join(INPUT_FORMATS)} or auto")
        if self.documents_per_shard < 2:
            raise ValueError(f"--documents_per_shard must be >= 2 (random next sentences come "
                             f"from another document of the shard), got {self.documents_per_shard}")
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"--num_workers must be >= 1, got {self.num_workers}")


@dataclass(frozen=True)
class ShardStats:
    """What one preparation task made."""

    shard_index: int
    path: str
    num_documents: int
    num_tokens: int
    num_examples: int


@dataclass(frozen=True)
class PrepareSummary:
    """What a preparation run made, and how fast."""

    output_dir: str
    num_shards: int
    num_documents: int
    num_tokens: int
    num_examples: int
    seconds: float
    num_workers: int

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def tokens_per_second_per_core(self) -> float:
        return self.tokens_per_second / self.num_workers

    def __str__(self) -> str:
        return (f"wrote {self.num_examples} examples in {self.num_shards} shard(s) to "
                f"{self.output_dir} from {self.num_documents} documents, {self.num_tokens} tokens "
                f"in {self.seconds:.1f} s: {self.tokens_per_second:,.0f} tokens/s, "
                f"{self.tokens_per_second_per_core:,.0f} tokens/s per core "
                f"({self.num_workers} worker(s))")


def make_shard_file(raw_documents: Sequence[RawDocument], input_format: str, shard_index: int,
                    tokenizer: BertTokenizerFast, ids: SpecialIds, examples: ExampleConfig,
                    path: str) -> ShardStats:
    """Sentences, tokens and examples of one group of documents, written to ``path``."""
    per_doc = [document_sentences(input_format, raw) for raw in raw_documents]
    flat = [s for doc in per_doc for s in doc]
    encoded = tokenizer(flat, add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"] if flat else []
    documents, k = [], 0
    for doc in per_doc:
        documents.append([e for e in encoded[k:k + len(doc)] if e])
        k += len(doc)
    documents = [d for d in documents if d]
    num_tokens = sum(len(s) for d in documents for s in d)
    if len(documents) >= 2:
        table = make_shard_table(documents, shard_index, examples, ids)
    else:  # a group whose articles were all markup: an empty shard keeps the numbering simple
        table = instances_to_table([], examples.max_seq_length)
    write_shard(table, path)
    return ShardStats(shard_index, path, len(documents), num_tokens, table.num_rows)


def _groups(documents: Iterator[RawDocument], size: int) -> Iterator[list[RawDocument]]:
    """Consecutive groups of ``size`` documents; a last group of fewer than 2 joins the previous."""
    held: list[RawDocument] | None = None
    group: list[RawDocument] = []
    for doc in documents:
        group.append(doc)
        if len(group) == size:
            if held is not None:
                yield held
            held, group = group, []
    if held is not None and len(group) < 2:
        yield held + group
    else:
        if held is not None:
            yield held
        if group:
            yield group


def _peek_two_documents(files: list[str], input_format: str
                        ) -> Iterator[RawDocument]:
    """The documents, after checking (before any work) that at least two have sentences."""
    stream = iter_raw_documents(files, input_format)
    head: list[RawDocument] = []
    with_text = 0
    for doc in stream:
        head.append(doc)
        if document_sentences(input_format, doc):
            with_text += 1
        if with_text == 2:
            break
    if with_text < 2:
        what = "no documents" if with_text == 0 else "only one document"
        raise CorpusError(f"the corpus ({', '.join(files)}, read as {input_format}) has {what} "
                          "with text; BERT's next-sentence pairs need at least two documents "
                          "(in the lines format, separate documents with a blank line)")

    def chained() -> Iterator[RawDocument]:
        yield from head
        yield from stream

    return chained()


def prepare_pretraining(config: PrepareConfig, show_progress: bool = True,
                        ray_address: str | None = None) -> PrepareSummary:
    """Run the preparation job on the current Ray cluster.

    When Ray is not initialized yet, joins ``ray_address`` or starts a local cluster with
    ``num_workers`` CPUs, after the checks.
    """
    files = list_input_files(config.inputs)
    input_format = resolve_format(config.input_format, files)
    tokenizer = load_tokenizer(config.vocab_path, config.do_lower_case)
    ids = SpecialIds(cls=tokenizer.cls_token_id, sep=tokenizer.sep_token_id,
                     mask=tokenizer.mask_token_id, pad=tokenizer.pad_token_id,
                     replacement_ids=tuple(maskable_token_ids(tokenizer)))
    if os.path.exists(config.output_dir) and not os.path.isdir(config.output_dir):
        raise CorpusError(f"{config.output_dir}: --output_dir is a file, not a directory")
    existing = sorted(n for n in os.listdir(config.output_dir)
                      if n.startswith("part-") and n.endswith(".parquet")
                      ) if os.path.isdir(config.output_dir) else []
    if existing and not config.overwrite:
        raise CorpusError(f"{config.output_dir}: already holds {len(existing)} shard(s) "
                          f"({existing[0]} ...); pass --overwrite to replace them or choose "
                          "another --output_dir")
    documents = _peek_two_documents(files, input_format)
    os.makedirs(config.output_dir, exist_ok=True)
    for name in existing:
        os.remove(os.path.join(config.output_dir, name))

    if not ray.is_initialized():
        if ray_address is not None:
            ray.init(address=ray_address)
        else:
            ray.init(num_cpus=config.num_workers, include_dashboard=False)
    num_workers = config.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    start = time.perf_counter()  # throughput counts the work, not starting a cluster
    task = ray.remote(num_cpus=1)(make_shard_file)
    tokenizer_ref = ray.put(tokenizer)

    stats: list[ShardStats] = []
    pending: dict = {}
    progress = tqdm(desc="prepare", unit="doc", disable=not show_progress, file=sys.stderr,
                    dynamic_ncols=True)

    def collect(block: bool) -> None:
        ready, _ = ray.wait(list(pending), num_returns=1 if block else len(pending),
                            timeout=None if block else 0)
        for ref in ready:
            pending.pop(ref)
            s: ShardStats = ray.get(ref)
            stats.append(s)
            progress.update(s.num_documents)
            progress.set_postfix(shards=len(stats), tokens=sum(x.num_tokens for x in stats),
                                 refresh=False)

    try:
        for shard_index, group in enumerate(_groups(documents, config.documents_per_shard)):
            while len(pending) >= num_workers:
                collect(block=True)
            path = os.path.join(config.output_dir, SHARD_NAME.format(shard_index))
            ref = task.remote(group, input_format, shard_index, tokenizer_ref, ids,
                              config.examples, path)
            pending[ref] = shard_index
            collect(block=False)
        while pending:
            collect(block=True)
    finally:
        progress.close()
        for ref in pending:
            ray.cancel(ref)
    summary = PrepareSummary(
        output_dir=config.output_dir, num_shards=len(stats),
        num_documents=sum(s.num_documents for s in stats),
        num_tokens=sum(s.num_tokens for s in stats),
        num_examples=sum(s.num_examples for s in stats),
        seconds=time.perf_counter() - start, num_workers=num_workers)
    if summary.num_examples == 0:
        raise CorpusError(f"no examples were made from {', '.join(files)}: its documents have "
                          "no text left after reading as " + input_format)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data.prepare_pretraining",
        description="Turn raw text into tokenized, masked BERT pre-training shards (Parquet).")
    p.add_argument("--input", nargs="+", required=True,
                   help="corpus files or directories (directories are read recursively)")
    p.add_argument("--input_format", default="auto", choices=("auto",) + INPUT_FORMATS,
                   help="lines: one sentence per line, blank line between documents; "
                        "wikiextractor: WikiExtractor --json output; wikixml: a Wikipedia "
                        "pages-articles .xml or .xml.bz2 dump; auto: by file name or content")
    p.add_argument("--output_dir", required=True, help="where part-NNNNN.parquet shards go")
    p.add_argument("--vocab_path", required=True, help="BERT vocab.txt (one token per line)")
    p.add_argument("--do_lower_case", action=argparse.BooleanOptionalAction, default=True,
                   help="lower-case and strip accents before WordPiece (uncased models)")
    d = ExampleConfig()
    p.add_argument("--max_seq_length", type=int, default=d.max_seq_length)
    p.add_argument("--max_predictions_per_seq", type=int, default=d.max_predictions_per_seq)
    p.add_argument("--masked_lm_prob", type=float, default=d.masked_lm_prob)
    p.add_argument("--short_seq_prob", type=float, default=d.short_seq_prob)
    p.add_argument("--dupe_factor", type=int, default=d.dupe_factor,
                   help="how many times each document is used, with different masks")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--documents_per_shard", type=int, default=1000,
                   help="documents per output shard (and per Ray task)")
    p.add_argument("--num_workers", type=int, default=None,
                   help="Ray tasks at a time (default: the cluster's CPUs)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace shards already in --output_dir")
    p.add_argument("--ray_address", default=None,
                   help="Ray cluster to join (default: start a local one)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = PrepareConfig(
            inputs=tuple(args.input), output_dir=args.output_dir, vocab_path=args.vocab_path,
            do_lower_case=args.do_lower_case, input_format=args.input_format,
            examples=ExampleConfig(
                max_seq_length=args.max_seq_length,
                max_predictions_per_seq=args.max_predictions_per_seq,
                masked_lm_prob=args.masked_lm_prob, short_seq_prob=args.short_seq_prob,
                dupe_factor=args.dupe_factor, seed=args.seed),
            documents_per_shard=args.documents_per_shard, num_workers=args.num_workers,
            overwrite=args.overwrite)
        summary = prepare_pretraining(config, show_progress=not args.quiet,
                                      ray_address=args.ray_address)
    except ValueError as e:  # CorpusError, VocabError, DumpError, flag values
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
