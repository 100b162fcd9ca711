"""Pre-training preparation: corpora in each input format become shards that follow BERT's recipe.

The test corpus gives every token of every document its own word ``d<doc>t<position>``, so a
row's tokens (unmasked with its labels) say exactly which document and position they came from:
that is the independent reference the next-sentence pairs are checked against.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from data.corpus import CorpusError
from data.prepare_pretraining import PrepareConfig, main, prepare_pretraining
from data.pretraining import ExampleConfig, SpecialIds, make_shard_table
from data.shards import COLUMNS, IGNORE_INDEX
from data.vocab import VocabError, load_tokenizer
from test_data_corpus import page_xml, write_dump

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DROPPED_WORDS = ["templateword", "tableword", "redirectword", "talkword", "refword",
                 "categoryword", "headingword", "listword"]
PAD, UNK, CLS, SEP, MASK = range(5)


def make_documents(num_docs: int, seed: int = 0) -> list[list[list[str]]]:
    """Documents of sentences of unique words ``d<doc>t<position>``."""
    rng = random.Random(seed)
    docs = []
    for d in range(num_docs):
        t = 0
        doc = []
        for _ in range(rng.randint(3, 10)):
            n = rng.randint(2, 9)
            doc.append([f"d{d}t{t + i}" for i in range(n)])
            t += n
        docs.append(doc)
    return docs


def write_vocab(path, docs) -> str:
    words = [w for doc in docs for s in doc for w in s]
    path.write_text("\n".join(SPECIALS + [".", "ada", "writer"] + DROPPED_WORDS + words) + "\n")
    return str(path)


def token_origin(tokenizer) -> dict[int, tuple[int, int]]:
    """Token id -> (document, position) for the ``d<doc>t<position>`` words."""
    origin = {}
    for token, i in tokenizer.get_vocab().items():
        if token.startswith("d") and "t" in token and token[1:].replace("t", "").isdigit():
            d, t = token[1:].split("t")
            origin[i] = (int(d), int(t))
    return origin


def read_rows(out_dir) -> dict[str, np.ndarray]:
    files = sorted(os.path.join(out_dir, n) for n in os.listdir(out_dir))
    tables = [pq.read_table(f) for f in files]
    rows = {}
    for c in COLUMNS:
        if c == "next_sentence_label":
            rows[c] = np.concatenate([t.column(c).to_numpy() for t in tables])
        else:
            rows[c] = np.concatenate([np.stack(t.column(c).to_numpy(zero_copy_only=False))
                                      for t in tables])
    return rows


def shard_digests(out_dir) -> dict[str, str]:
    return {n: hashlib.sha256(open(os.path.join(out_dir, n), "rb").read()).hexdigest()
            for n in sorted(os.listdir(out_dir))}


def check_rows(rows, tokenizer, L: int, max_predictions: int, masked_lm_prob: float = 0.15):
    """Every row against BERT's recipe; returns the rows' (A origins, B origins, label)."""
    ids, types, mask = rows["input_ids"], rows["token_type_ids"], rows["attention_mask"]
    labels, nsp = rows["masked_lm_labels"], rows["next_sentence_label"]
    n = len(nsp)
    assert ids.shape == (n, L) and labels.shape == (n, L)
    origin = token_origin(tokenizer)
    lengths = mask.sum(axis=1)
    predicted = labels != IGNORE_INDEX
    pairs = []
    for r in range(n):
        k = int(lengths[r])
        # Tokens first, then padding with id 0 and mask 0.
        assert (mask[r, :k] == 1).all() and (mask[r, k:] == 0).all()
        assert (ids[r, k:] == PAD).all() and (types[r, k:] == 0).all()
        assert not predicted[r, k:].any()
        original = np.where(predicted[r], labels[r], ids[r])[:k]
        seps = np.flatnonzero(original == SEP)
        assert original[0] == CLS and len(seps) == 2 and seps[1] == k - 1
        a, b = original[1:seps[0]], original[seps[0] + 1:k - 1]
        assert len(a) >= 1 and len(b) >= 1
        assert (types[r, :seps[0] + 1] == 0).all() and (types[r, seps[0] + 1:k] == 1).all()
        # Masked LM: never [CLS]/[SEP], round(15% of the tokens), capped.
        assert not np.isin(labels[r][predicted[r]], [CLS, SEP, PAD]).any()
        assert predicted[r].sum() == min(max_predictions, max(1, int(round(k * masked_lm_prob))))
        assert not (ids[r][~predicted[r]] == MASK).any()
        pairs.append(([origin[t] for t in a if t in origin], [origin[t] for t in b if t in origin],
                      int(nsp[r])))
    return pairs


def check_masking_statistics(rows):
    predicted = rows["masked_lm_labels"] != IGNORE_INDEX
    inputs, labels = rows["input_ids"][predicted], rows["masked_lm_labels"][predicted]
    total = predicted.sum()
    assert total > 3000, "too few predictions for the statistics below"
    frac = total / rows["attention_mask"].sum()
    assert 0.13 < frac < 0.17, frac
    as_mask = np.mean(inputs == MASK)
    kept = np.mean(inputs == labels)
    random_ = 1 - as_mask - kept
    tol = 4 * np.sqrt(0.1 * 0.9 / total)  # 4 standard deviations of a 10% share
    assert abs(as_mask - 0.8) < 4 * np.sqrt(0.16 / total), as_mask
    assert abs(kept - 0.1) < tol + 0.01, kept  # + chance that a random token is the original
    assert abs(random_ - 0.1) < tol, random_


def check_next_sentence_pairs(pairs, docs, random_share=(0.40, 0.62)):
    """No pair crosses documents unless it is a random one; about half are random.

    Google's recipe makes B random whenever a document has a single sentence left, so the share
    of random pairs is a little over 1/2, more so for short documents.
    """
    nsp = np.array([p[2] for p in pairs])
    assert random_share[0] < nsp.mean() < random_share[1], nsp.mean()
    checked = 0
    for a, b, label in pairs:
        if not a or not b:
            continue
        a_docs, b_docs = {d for d, _ in a}, {d for d, _ in b}
        assert len(a_docs) == 1 and len(b_docs) == 1, "a segment mixes documents"
        (da,), (db,) = a_docs, b_docs
        pos_a, pos_b = [t for _, t in a], [t for _, t in b]
        # Each segment is a contiguous run of its document.
        assert pos_a == list(range(pos_a[0], pos_a[0] + len(pos_a)))
        assert pos_b == list(range(pos_b[0], pos_b[0] + len(pos_b)))
        if label == 0:  # "is next": same document, B after A
            assert da == db, "a next-sentence pair crosses documents"
            assert pos_b[0] > pos_a[-1]
        else:  # random next: never the same document
            assert da != db
        checked += 1
    assert checked > 0.9 * len(pairs)


# -- the example builder alone (no Ray) -------------------------------------------------------

def _ids_of(docs, tokenizer):
    return [[tokenizer.convert_tokens_to_ids(s) for s in doc] for doc in docs]


def test_examples_follow_the_recipe_without_ray(tmp_path):
    docs = make_documents(80)
    tok = load_tokenizer(write_vocab(tmp_path / "vocab.txt", docs))
    ids = SpecialIds(CLS, SEP, MASK, PAD, tuple(range(5, len(tok))))
    config = ExampleConfig(max_seq_length=32, max_predictions_per_seq=20, dupe_factor=10, seed=1)
    table = make_shard_table(_ids_of(docs, tok), 0, config, ids)
    rows = {c: (np.stack(table.column(c).to_numpy(zero_copy_only=False))
                if c != "next_sentence_label" else table.column(c).to_numpy()) for c in COLUMNS}
    pairs = check_rows(rows, tok, 32, 20)
    check_masking_statistics(rows)
    check_next_sentence_pairs(pairs, docs)
    # The cap on predictions binds when it is below 15%.
    capped = make_shard_table(_ids_of(docs, tok), 0,
                              ExampleConfig(max_seq_length=32, max_predictions_per_seq=2,
                                            dupe_factor=1, seed=1), ids)
    per_row = (np.stack(capped.column("masked_lm_labels").to_numpy(zero_copy_only=False))
               != IGNORE_INDEX).sum(axis=1)
    assert per_row.max() == 2


def test_short_seq_prob_makes_shorter_sequences(tmp_path):
    docs = make_documents(40)
    tok = load_tokenizer(write_vocab(tmp_path / "vocab.txt", docs))
    ids = SpecialIds(CLS, SEP, MASK, PAD, tuple(range(5, len(tok))))

    def mean_length(p):
        t = make_shard_table(_ids_of(docs, tok), 0, ExampleConfig(
            max_seq_length=64, short_seq_prob=p, dupe_factor=4, seed=3), ids)
        return np.stack(t.column("attention_mask").to_numpy(zero_copy_only=False)).sum(1).mean()

    assert mean_length(1.0) < 0.8 * mean_length(0.0)


# -- the Ray job, each input format ------------------------------------------------------------

def _write_lines(path, docs):
    path.write_text("\n\n".join("\n".join(" ".join(s) for s in doc) for doc in docs) + "\n")


def _sentence_text(s):  # "D3t0 d3t1 d3t2." : a capital start, so the splitter cuts before it
    return " ".join([s[0].capitalize()] + s[1:]) + "."


def test_lines_corpus_to_shards_deterministic_for_any_worker_count(ray_cluster, tmp_path):
    docs = make_documents(80, seed=5)
    _write_lines(tmp_path / "corpus.txt", docs)
    vocab = write_vocab(tmp_path / "vocab.txt", docs)
    examples = ExampleConfig(max_seq_length=32, max_predictions_per_seq=20, dupe_factor=10,
                             seed=7)

    def run(out, workers, seed=7):
        return prepare_pretraining(PrepareConfig(
            inputs=(str(tmp_path / "corpus.txt"),), output_dir=str(tmp_path / out),
            vocab_path=vocab, examples=replace(examples, seed=seed),
            documents_per_shard=10, num_workers=workers), show_progress=False)

    summary = run("w1", 1)
    assert summary.num_shards == 8 and summary.num_documents == 80
    assert summary.num_tokens == sum(len(s) for d in docs for s in d)
    run("w2", 2)
    run("other_seed", 2, seed=8)
    assert shard_digests(tmp_path / "w1") == shard_digests(tmp_path / "w2")
    assert shard_digests(tmp_path / "w1") != shard_digests(tmp_path / "other_seed")

    rows = read_rows(tmp_path / "w1")
    assert len(rows["next_sentence_label"]) == summary.num_examples
    tok = load_tokenizer(vocab)
    pairs = check_rows(rows, tok, 32, 20)
    check_masking_statistics(rows)
    check_next_sentence_pairs(pairs, docs)


def test_wikiextractor_corpus_to_shards(ray_cluster, tmp_path):
    docs = make_documents(30, seed=11)
    (tmp_path / "text" / "AA").mkdir(parents=True)  # WikiExtractor's folder layout
    with open(tmp_path / "text" / "AA" / "wiki_00", "w") as f:
        for d, doc in enumerate(docs):
            text = f"Title {d}\n" + "\n".join(" ".join(_sentence_text(s) for s in doc[i:i + 2])
                                              for i in range(0, len(doc), 2))
            f.write(json.dumps({"id": str(d), "title": f"Title {d}", "text": text}) + "\n")
    vocab = write_vocab(tmp_path / "vocab.txt", docs)
    prepare_pretraining(PrepareConfig(
        inputs=(str(tmp_path / "text"),), output_dir=str(tmp_path / "out"), vocab_path=vocab,
        input_format="auto", examples=ExampleConfig(max_seq_length=48, dupe_factor=3, seed=1),
        documents_per_shard=8), show_progress=False)
    tok = load_tokenizer(vocab)
    rows = read_rows(tmp_path / "out")
    check_next_sentence_pairs(check_rows(rows, tok, 48, 20), docs, random_share=(0.4, 0.75))
    # Every token of the corpus made it in (and no title words: they are not in the vocab).
    seen = set(np.where(rows["masked_lm_labels"] != IGNORE_INDEX, rows["masked_lm_labels"],
                        rows["input_ids"]).ravel().tolist())
    assert set(token_origin(tok)) <= seen
    assert UNK not in seen


def test_wikipedia_dump_to_shards_drops_markup_and_non_articles(ray_cluster, tmp_path):
    docs = make_documents(24, seed=3)
    pages = []
    for d, doc in enumerate(docs):
        sentences = [_sentence_text(s) for s in doc]
        wikitext = ("{{Infobox|name=templateword}}\n'''" + sentences[0][:-1] + "'''.<ref>refword"
                    "</ref> " + " ".join(f"[[Target{d}|{s[:-1]}]]." if i == 1 else s
                                         for i, s in enumerate(sentences[1:], 1))
                    + "\n== headingword ==\n{| class=\"wikitable\"\n| tableword\n|}\n"
                    "* listword\n[[Category:categoryword]]\n")
        pages.append(page_xml(f"Article {d}", 0, wikitext))
        if d % 6 == 0:
            pages.append(page_xml(f"Talk:Article {d}", 1, "Talkword talkword."))
            pages.append(page_xml(f"Redirect {d}", 0, "#REDIRECT [[Article]] redirectword",
                               redirect=f"Article {d}"))
    write_dump(tmp_path / "enwiki-pages-articles.xml.bz2", pages)
    vocab = write_vocab(tmp_path / "vocab.txt", docs)
    summary = prepare_pretraining(PrepareConfig(
        inputs=(str(tmp_path / "enwiki-pages-articles.xml.bz2"),),
        output_dir=str(tmp_path / "out"), vocab_path=vocab,
        examples=ExampleConfig(max_seq_length=48, dupe_factor=3, seed=1),
        documents_per_shard=6), show_progress=False)
    assert summary.num_documents == len(docs)  # no talk pages, no redirects
    tok = load_tokenizer(vocab)
    rows = read_rows(tmp_path / "out")
    check_next_sentence_pairs(check_rows(rows, tok, 48, 20), docs, random_share=(0.4, 0.75))
    dropped = set(tok.convert_tokens_to_ids(DROPPED_WORDS))
    for c in ("input_ids", "masked_lm_labels"):
        assert not np.isin(rows[c], list(dropped)).any()
    original = np.where(rows["masked_lm_labels"] != IGNORE_INDEX, rows["masked_lm_labels"],
                        rows["input_ids"])
    assert not np.isin(original, list(dropped) + [UNK]).any()
    assert set(token_origin(tok)) <= set(original.ravel().tolist())


# -- errors before any work ------------------------------------------------------------------

def test_errors_before_any_work(tmp_path):
    docs = make_documents(4)
    _write_lines(tmp_path / "corpus.txt", docs)
    vocab = write_vocab(tmp_path / "vocab.txt", docs)
    out = tmp_path / "out"

    def cfg(**kw):
        base = dict(inputs=(str(tmp_path / "corpus.txt"),), output_dir=str(out),
                    vocab_path=vocab)
        return PrepareConfig(**{**base, **kw})

    with pytest.raises(CorpusError, match="missing.txt: no such input"):
        prepare_pretraining(cfg(inputs=(str(tmp_path / "missing.txt"),)))
    with pytest.raises(VocabError, match="nope.txt: no such vocab file"):
        prepare_pretraining(cfg(vocab_path=str(tmp_path / "nope.txt")))
    (tmp_path / "bad_vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\nhello\n")
    with pytest.raises(VocabError, match=r"lacks the special token\(s\) \[SEP\] \[MASK\]"):
        prepare_pretraining(cfg(vocab_path=str(tmp_path / "bad_vocab.txt")))
    (tmp_path / "pad_last.txt").write_text("[UNK]\n[CLS]\n[SEP]\n[MASK]\n[PAD]\nword\n")
    with pytest.raises(VocabError, match=r"\[PAD\] must be the first line \(id 0\), found it on "
                                         "line 5"):
        prepare_pretraining(cfg(vocab_path=str(tmp_path / "pad_last.txt")))
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(CorpusError, match="has no documents with text"):
        prepare_pretraining(cfg(inputs=(str(tmp_path / "empty.txt"),)))
    (tmp_path / "one.txt").write_text("just one document\nof two lines\n")
    with pytest.raises(CorpusError, match="only one document"):
        prepare_pretraining(cfg(inputs=(str(tmp_path / "one.txt"),)))
    with pytest.raises(ValueError, match="max_seq_length 4 is too small"):
        cfg(examples=ExampleConfig(max_seq_length=4))
    with pytest.raises(ValueError, match="unknown --input_format 'html'"):
        cfg(input_format="html")
    assert not out.exists()  # nothing was written


def test_cli_reports_errors_and_throughput(ray_cluster, tmp_path, capsys):
    docs = make_documents(12)
    _write_lines(tmp_path / "corpus.txt", docs)
    vocab = write_vocab(tmp_path / "vocab.txt", docs)
    args = ["--input", str(tmp_path / "corpus.txt"), "--vocab_path", vocab, "--output_dir",
            str(tmp_path / "out"), "--max_seq_length", "24", "--dupe_factor", "2",
            "--documents_per_shard", "4", "--quiet"]
    assert main(args + ["--max_seq_length", "3"]) == 2
    assert "--max_seq_length 3 is too small" in capsys.readouterr().err
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "3 shard(s)" in printed and "from 12 documents" in printed
    assert "tokens/s per core" in printed
    assert main(args) == 2  # shards are there already
    assert "already holds 3 shard(s)" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
