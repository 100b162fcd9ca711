"""Random BERT pre-training microbatches, shaped like real ones, for tests and smoke runs.

Each sequence is ``[CLS] A [SEP] B [SEP] [PAD]...`` with a random length, token types 0/1 for the
two segments, about ``mlm_probability`` of its ordinary tokens replaced by ``[MASK]`` (at least
one), MLM labels of -100 everywhere else, and a random next-sentence label. A microbatch is
``((input_ids, token_type_ids, attention_mask, masked_lm_labels), (masked_lm_labels,
next_sentence_label))``, all int64: what `stages.bert.BertStage` and
`stages.bert.BertPretrainingLoss` take. The labels among the inputs make the last stage score only
the labelled positions; drop them (``inputs[:3]``) to score every position.
"""

from __future__ import annotations

import torch

PAD_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3
FIRST_ORDINARY_ID = 4

Microbatch = tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, torch.Tensor]]


def random_pretraining_microbatch(generator: torch.Generator, *, microbatch_size: int,
                                  seq_length: int, vocab_size: int,
                                  mlm_probability: float = 0.15,
                                  labels_per_sequence: int | None = None) -> Microbatch:
    """One microbatch (see the module docstring). ``labels_per_sequence`` labels exactly that many
    positions of every sequence instead of each ordinary token with ``mlm_probability`` (at most
    the shortest sequence's ordinary tokens, ``max(5, seq_length // 2) - 3``)."""
    if seq_length < 5:
        raise ValueError(f"seq_length must be at least 5 ([CLS] a [SEP] b [SEP]), got {seq_length}")
    if vocab_size <= FIRST_ORDINARY_ID:
        raise ValueError(f"vocab_size must exceed {FIRST_ORDINARY_ID} (ids 0..3 are special), "
                         f"got {vocab_size}")
    most = max(5, seq_length // 2) - 3
    if labels_per_sequence is not None and not 1 <= labels_per_sequence <= most:
        raise ValueError(f"labels_per_sequence must be in 1..{most} for seq_length {seq_length}, "
                         f"got {labels_per_sequence}")
    shape = (microbatch_size, seq_length)
    input_ids = torch.full(shape, PAD_ID, dtype=torch.long)
    token_type_ids = torch.zeros(shape, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, -100, dtype=torch.long)

    def randint(low: int, high: int) -> int:  # inclusive bounds
        return int(torch.randint(low, high + 1, (), generator=generator))

    for i in range(microbatch_size):
        length = randint(max(5, seq_length // 2), seq_length)
        len_a = randint(1, length - 4)
        sep_a = 1 + len_a
        ids = torch.randint(FIRST_ORDINARY_ID, vocab_size, (length,), generator=generator)
        ids[0], ids[sep_a], ids[length - 1] = CLS_ID, SEP_ID, SEP_ID
        ordinary = torch.ones(length, dtype=torch.bool)
        ordinary[[0, sep_a, length - 1]] = False
        masked = ordinary & (torch.rand(length, generator=generator) < mlm_probability)
        if labels_per_sequence is not None:
            candidates = ordinary.nonzero().flatten()
            pick = torch.randperm(len(candidates), generator=generator)[:labels_per_sequence]
            masked = torch.zeros_like(ordinary)
            masked[candidates[pick]] = True
        elif not masked.any():
            candidates = ordinary.nonzero().flatten()
            masked[candidates[randint(0, len(candidates) - 1)]] = True
        labels[i, :length] = torch.where(masked, ids, -100)
        input_ids[i, :length] = torch.where(masked, MASK_ID, ids)
        token_type_ids[i, sep_a + 1:length] = 1
        attention_mask[i, :length] = 1
    next_sentence_label = torch.randint(0, 2, (microbatch_size,), generator=generator)
    return (input_ids, token_type_ids, attention_mask, labels), (labels, next_sentence_label)


def expected_labels_per_sequence(seq_length: int, mlm_probability: float = 0.15) -> int:
    """Labelled positions of an average random sequence (lengths are uniform in
    ``seq_length // 2 .. seq_length``): what the planner profiles the masked-only head at."""
    most = max(5, seq_length // 2) - 3
    return min(most, max(1, round(mlm_probability * 0.75 * seq_length)))


def random_pretraining_steps(*, num_steps: int, num_microbatches: int, microbatch_size: int,
                             seq_length: int, vocab_size: int, seed: int = 0,
                             mlm_probability: float = 0.15,
                             labels_per_sequence: int | None = None) -> list[list[Microbatch]]:
    """``num_steps`` steps of ``num_microbatches`` microbatches each (what ``trainer.train`` takes),
    the same for the same arguments."""
    generator = torch.Generator().manual_seed(seed)
    return [[random_pretraining_microbatch(generator, microbatch_size=microbatch_size,
                                           seq_length=seq_length, vocab_size=vocab_size,
                                           mlm_probability=mlm_probability,
                                           labels_per_sequence=labels_per_sequence)
             for _ in range(num_microbatches)]
            for _ in range(num_steps)]
