"""The bundled sample data: reproducible, covered by its vocab, usable end to end."""

from __future__ import annotations

import os

import numpy as np
import torch
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression

from data.glue import load_examples
from data.prepare_pretraining import PrepareConfig, prepare_pretraining
from data.pretraining import ExampleConfig
from data.sample.generate import generate
from data.streaming import PretrainingStream, StreamConfig
from data.vocab import load_tokenizer
from test_data_prepare import check_rows, read_rows

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                      "sample")
CORPUS = os.path.join(SAMPLE, "corpus.txt")
VOCAB = os.path.join(SAMPLE, "vocab.txt")
GLUE_DIR = os.path.join(SAMPLE, "glue")


def _documents() -> list[list[str]]:
    with open(CORPUS, encoding="utf-8") as f:
        return [block.split("\n") for block in f.read().strip().split("\n\n")]


def test_committed_text_is_what_the_generator_writes(tmp_path):
    generate(str(tmp_path))
    for rel in ("corpus.txt", "glue/SST-2/train.tsv", "glue/SST-2/dev.tsv"):
        with open(os.path.join(SAMPLE, rel), "rb") as a, open(tmp_path / rel, "rb") as b:
            assert a.read() == b.read(), f"data/sample/{rel} differs from the generator's output"
    total = sum(os.path.getsize(os.path.join(root, n))
                for root, _, names in os.walk(SAMPLE) for n in names if "__pycache__" not in root)
    assert total < 2 * 1024 * 1024


def test_corpus_shape_and_vocab_coverage():
    docs = _documents()
    assert 200 <= len(docs) <= 1000
    assert 2000 <= sum(len(d) for d in docs) <= 10000
    tok = load_tokenizer(VOCAB)
    assert 1000 <= len(tok) <= 2000 and tok.pad_token_id == 0
    sentences = [s for d in docs for s in d]
    sentences += [e.text_a for split in ("train", "dev")
                  for e in load_examples(GLUE_DIR, "sst-2", split)]
    ids = tok(sentences, add_special_tokens=False)["input_ids"]
    assert not any(tok.unk_token_id in s for s in ids), "a word of the sample is not in its vocab"


def test_sst2_sample_is_balanced_and_learnable():
    train = load_examples(GLUE_DIR, "sst-2", "train")
    dev = load_examples(GLUE_DIR, "sst-2", "dev")
    assert 300 <= len(train) <= 1000 and 80 <= len(dev) <= 200
    assert sum(e.label for e in train) == len(train) // 2
    assert not {e.text_a for e in dev} & {e.text_a for e in train}
    # A bag of words gets most of it; "but" sentences need word order (the second clause wins).
    vec = CountVectorizer(ngram_range=(1, 2)).fit([e.text_a for e in train])
    clf = LogisticRegression(max_iter=1000).fit(vec.transform([e.text_a for e in train]),
                                                [e.label for e in train])
    acc = clf.score(vec.transform([e.text_a for e in dev]), [e.label for e in dev])
    assert 0.75 < acc, acc


def test_sample_corpus_prepares_and_streams(ray_cluster, tmp_path):
    summary = prepare_pretraining(PrepareConfig(
        inputs=(CORPUS,), output_dir=str(tmp_path / "shards"), vocab_path=VOCAB,
        examples=ExampleConfig(max_seq_length=64, max_predictions_per_seq=10, dupe_factor=2,
                               seed=12345),
        documents_per_shard=64), show_progress=False)
    print(summary)
    assert summary.num_documents == len(_documents()) and summary.num_shards == 6
    rows = read_rows(tmp_path / "shards")
    pairs = check_rows(rows, load_tokenizer(VOCAB), 64, 10)
    assert 0.4 < np.mean([p[2] for p in pairs]) < 0.62
    stream = PretrainingStream(StreamConfig(shards=(str(tmp_path / "shards"),),
                                            train_batch_size=16, microbatches=2, num_replicas=1,
                                            seed=0, num_epochs=1))
    steps = list(stream)
    assert len(steps) == stream.steps_per_epoch == summary.num_examples // 32
    (input_ids, _, _, input_labels), (labels, nsp) = steps[0][0]
    assert torch.equal(input_labels, labels)     # the masked-only head's input
    assert input_ids.shape == labels.shape == (16, 64) and nsp.shape == (16,)

