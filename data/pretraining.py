"""BERT pre-training examples from tokenized documents: sentence pairs, next-sentence labels, masks.

This is the algorithm of Google's ``create_pretraining_data.py`` (google-research/bert), kept
function for function so it can be read side by side with it:

* :func:`create_instances_from_document` packs consecutive sentences of a document into segment
  A and B up to ``max_seq_length - 3`` tokens (shorter, with probability ``short_seq_prob``); B is
  the true continuation, or with probability 1/2 (always, when only one sentence is at hand) a
  run of sentences from another document (``next_sentence_label`` 1).
* :func:`create_masked_lm_predictions` picks ``round(masked_lm_prob * len)`` positions (at most
  ``max_predictions_per_seq``, never ``[CLS]``/``[SEP]``/padding); each becomes ``[MASK]`` with
  probability 0.8, a random word piece with 0.1, and stays itself with 0.1.
* :func:`make_shard_table` runs both over every document of one shard ``dupe_factor`` times and
  shuffles the rows.

Two deliberate differences, both so that a shard depends only on its own documents and the seed
(which makes preparation byte-identical however many workers run it):

* Randomness comes from one ``random.Random`` per (seed, shard, duplicate) instead of one for the
  whole corpus, and the row shuffle is per shard instead of global.
* The random B comes from another document *of the same shard* (``documents_per_shard`` of them),
  drawn uniformly among the others, so it is never from the same document; Google's retries ten
  times and may, rarely, take the same document.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa

from data.shards import IGNORE_INDEX, shard_schema

Document = Sequence[Sequence[int]]  # a document: its sentences, each a list of token ids


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the tokens the example builder writes itself, and the pool of random replacements."""

    cls: int
    sep: int
    mask: int
    pad: int
    replacement_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.pad != 0:
            raise ValueError(f"[PAD] must have id 0, got {self.pad}")
        if not self.replacement_ids:
            raise ValueError("replacement_ids is empty: random masked-LM replacements need "
                             "ordinary word pieces")


@dataclass(frozen=True)
class ExampleConfig:
    """How pre-training examples are made (the flags of Google's ``create_pretraining_data.py``)."""

    max_seq_length: int = 128
    max_predictions_per_seq: int = 20
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    dupe_factor: int = 10
    seed: int = 12345

    def __post_init__(self) -> None:
        if self.max_seq_length < 5:
            raise ValueError(f"--max_seq_length {self.max_seq_length} is too small: an example "
                             "needs [CLS] A [SEP] B [SEP] with at least one token in A and B, so "
                             "at least 5 (BERT uses 128 and 512)")
        if self.max_predictions_per_seq < 1:
            raise ValueError(f"--max_predictions_per_seq must be >= 1, got "
                             f"{self.max_predictions_per_seq}")
        if not 0.0 < self.masked_lm_prob < 1.0:
            raise ValueError(f"--masked_lm_prob must be in (0, 1), got {self.masked_lm_prob}")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise ValueError(f"--short_seq_prob must be in [0, 1], got {self.short_seq_prob}")
        if self.dupe_factor < 1:
            raise ValueError(f"--dupe_factor must be >= 1, got {self.dupe_factor}")

    @property
    def max_num_tokens(self) -> int:
        return self.max_seq_length - 3  # room for [CLS], [SEP], [SEP]


@dataclass
class Instance:
    """One example before it becomes a row: tokens, segments, predicted positions, NSP label."""

    tokens: list[int]
    segment_ids: list[int]
    masked_positions: list[int]
    masked_labels: list[int]
    is_random_next: bool


def truncate_seq_pair(tokens_a: list[int], tokens_b: list[int], max_num_tokens: int,
                      rng: random.Random) -> None:
    """Truncate the longer segment, from its front or back at random, until the pair fits."""
    while len(tokens_a) + len(tokens_b) > max_num_tokens:
        trunc = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        assert len(trunc) >= 1
        # Truncating from the front too avoids a bias towards sentence ends.
        if rng.random() < 0.5:
            del trunc[0]
        else:
            trunc.pop()


def create_masked_lm_predictions(tokens: list[int], config: ExampleConfig, ids: SpecialIds,
                                 rng: random.Random) -> tuple[list[int], list[int], list[int]]:
    """``(output_tokens, masked_positions, masked_labels)`` with BERT's 80/10/10 masking."""
    cand_indexes = [i for i, t in enumerate(tokens) if t != ids.cls and t != ids.sep]
    rng.shuffle(cand_indexes)
    output = list(tokens)
    num_to_predict = min(config.max_predictions_per_seq,
                         max(1, int(round(len(tokens) * config.masked_lm_prob))))
    positions: list[int] = []
    for index in cand_indexes[:num_to_predict]:
        if rng.random() < 0.8:
            replacement = ids.mask
        elif rng.random() < 0.5:
            replacement = tokens[index]
        else:
            replacement = ids.replacement_ids[rng.randint(0, len(ids.replacement_ids) - 1)]
        output[index] = replacement
        positions.append(index)
    positions.sort()
    return output, positions, [tokens[i] for i in positions]


def create_instances_from_document(documents: Sequence[Document], document_index: int,
                                   config: ExampleConfig, ids: SpecialIds,
                                   rng: random.Random) -> list[Instance]:
    """All examples of one document (Google's function of the same name; see module docstring)."""
    document = documents[document_index]
    max_num_tokens = config.max_num_tokens
    # Usually fill the whole sequence; sometimes (short_seq_prob) a shorter one, so that the
    # model also sees the short sequences of fine-tuning.
    target_seq_length = max_num_tokens
    if rng.random() < config.short_seq_prob:
        target_seq_length = rng.randint(2, max_num_tokens)

    instances: list[Instance] = []
    current_chunk: list[Sequence[int]] = []
    current_length = 0
    i = 0
    while i < len(document):
        segment = document[i]
        current_chunk.append(segment)
        current_length += len(segment)
        if i == len(document) - 1 or current_length >= target_seq_length:
            if current_chunk:
                a_end = 1
                if len(current_chunk) >= 2:
                    a_end = rng.randint(1, len(current_chunk) - 1)
                tokens_a = [t for seg in current_chunk[:a_end] for t in seg]

                tokens_b: list[int] = []
                is_random_next = False
                if len(current_chunk) == 1 or rng.random() < 0.5:
                    is_random_next = True
                    target_b_length = target_seq_length - len(tokens_a)
                    # Any other document of the shard, uniformly.
                    random_document_index = rng.randrange(len(documents) - 1)
                    if random_document_index >= document_index:
                        random_document_index += 1
                    random_document = documents[random_document_index]
                    random_start = rng.randint(0, len(random_document) - 1)
                    for j in range(random_start, len(random_document)):
                        tokens_b.extend(random_document[j])
                        if len(tokens_b) >= target_b_length:
                            break
                    # The unused segments go back to be used by the next example.
                    i -= len(current_chunk) - a_end
                else:
                    tokens_b = [t for seg in current_chunk[a_end:] for t in seg]
                truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
                assert len(tokens_a) >= 1 and len(tokens_b) >= 1

                tokens = [ids.cls] + tokens_a + [ids.sep] + tokens_b + [ids.sep]
                segment_ids = [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)
                tokens, positions, labels = create_masked_lm_predictions(tokens, config, ids, rng)
                instances.append(Instance(tokens, segment_ids, positions, labels, is_random_next))
            current_chunk = []
            current_length = 0
        i += 1
    return instances


def instances_to_table(instances: Sequence[Instance], max_seq_length: int) -> pa.Table:
    """Instances as shard rows (:func:`data.shards.shard_schema`), padded with id 0."""
    n, L = len(instances), max_seq_length
    input_ids = np.zeros((n, L), dtype=np.int32)
    token_type_ids = np.zeros((n, L), dtype=np.int8)
    attention_mask = np.zeros((n, L), dtype=np.int8)
    labels = np.full((n, L), IGNORE_INDEX, dtype=np.int32)
    nsp = np.zeros(n, dtype=np.int8)
    for row, inst in enumerate(instances):
        k = len(inst.tokens)
        assert k <= L, (k, L)
        input_ids[row, :k] = inst.tokens
        token_type_ids[row, :k] = inst.segment_ids
        attention_mask[row, :k] = 1
        labels[row, inst.masked_positions] = inst.masked_labels
        nsp[row] = int(inst.is_random_next)
    schema = shard_schema(L)

    def fixed(matrix: np.ndarray, field: str) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(
            pa.array(matrix.reshape(-1), type=schema.field(field).type.value_type), L)

    return pa.Table.from_arrays(
        [fixed(input_ids, "input_ids"), fixed(token_type_ids, "token_type_ids"),
         fixed(attention_mask, "attention_mask"), fixed(labels, "masked_lm_labels"),
         pa.array(nsp, type=pa.int8())], schema=schema)


def shard_rng(seed: int, shard_index: int, stream: str) -> random.Random:
    """The random generator of one shard's ``stream`` ("dupe3", "shuffle"), from the seed alone."""
    # A str seed is hashed with SHA-512 by random.Random: stable across runs and machines.
    return random.Random(f"pd2bw-pretraining:{seed}:{shard_index}:{stream}")


def make_shard_table(documents: Sequence[Document], shard_index: int, config: ExampleConfig,
                     ids: SpecialIds) -> pa.Table:
    """All examples of one shard's documents, ``dupe_factor`` passes, rows shuffled.

    ``documents`` must hold at least two non-empty documents (the random B of a next-sentence
    pair comes from another document of the shard).
    """
    documents = [d for d in ([s for s in doc if len(s)] for doc in documents) if d]
    if len(documents) < 2:
        raise ValueError(f"shard {shard_index} has {len(documents)} non-empty document(s); "
                         "next-sentence pairs need at least 2")
    instances: list[Instance] = []
    for dupe in range(config.dupe_factor):
        rng = shard_rng(config.seed, shard_index, f"dupe{dupe}")
        for document_index in range(len(documents)):
            instances.extend(create_instances_from_document(documents, document_index, config,
                                                            ids, rng))
    shard_rng(config.seed, shard_index, "shuffle").shuffle(instances)
    return instances_to_table(instances, config.max_seq_length)
