"""GLUE: each task's published TSV layout, its labels, its metric against hand-computed values."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from data.glue import GLUE_TASKS, GlueDataError, encode_examples, get_task, load_examples
from data.glue_metrics import glue_metrics
from data.vocab import load_tokenizer


def write(data_dir, task_dir: str, name: str, lines: list[str]) -> None:
    folder = data_dir / task_dir
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def tsv(*fields) -> str:
    return "\t".join(str(f) for f in fields)


MNLI_TRAIN_HEADER = tsv("index", "promptID", "pairID", "genre", "sentence1_binary_parse",
                        "sentence2_binary_parse", "sentence1_parse", "sentence2_parse",
                        "sentence1", "sentence2", "label1", "gold_label")
MNLI_DEV_HEADER = tsv("index", "promptID", "pairID", "genre", "sentence1_binary_parse",
                      "sentence2_binary_parse", "sentence1_parse", "sentence2_parse",
                      "sentence1", "sentence2", "label1", "label2", "label3", "label4", "label5",
                      "gold_label")
STSB_HEADER = tsv("index", "genre", "filename", "year", "old_index", "source1", "source2",
                  "sentence1", "sentence2", "score")


def mnli_row(i, s1, s2, gold, dev=False):
    labels = [gold] * (5 if dev else 1)
    return tsv(i, 100 + i, f"{i}e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", s1, s2,
               *labels, gold)


def test_cola_no_header_four_columns_and_matthews_corr(tmp_path):
    rows = [("gj04", 1, "", "Our friends won't buy this analysis."),
            ("gj04", 1, "", "One more pseudo generalization and I'm giving up."),
            ("gj04", 0, "*", "They drank the pub."),
            ("gj04", 0, "*", "The more we study verbs, the crazier they get get."),
            ("cj99", 1, "", "Day by day the facts are getting murkier."),
            ("cj99", 0, "*", "Bill ate the peaches and Harry did the grapes.")]
    write(tmp_path, "CoLA", "dev.tsv", [tsv(*r) for r in rows])
    ex = load_examples(tmp_path, "cola", "dev")
    assert [e.label for e in ex] == [1, 1, 0, 0, 1, 0]
    assert ex[2].text_a == "They drank the pub." and ex[2].text_b is None
    assert ex[2].guid.endswith("CoLA/dev.tsv:3")
    # TP=2 TN=2 FP=1 FN=1: (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3
    assert glue_metrics("CoLA", [1, 0, 0, 1, 1, 0], [e.label for e in ex]) == {
        "mcc": pytest.approx(1 / 3)}
    write(tmp_path, "CoLA", "train.tsv", [tsv(*rows[0]), tsv("gj04", 1, "no sentence")])
    with pytest.raises(GlueDataError, match=r"CoLA/train.tsv:2: expected 4 .* found 3"):
        load_examples(tmp_path, "CoLA", "train")


def test_sst2_accuracy_and_logits(tmp_path):
    write(tmp_path, "SST-2", "dev.tsv", ["sentence\tlabel", "a charming film .\t1",
                                         "dull .\t0", "it 's a wonderful life .\t1",
                                         "tedious and long .\t0"])
    ex = load_examples(tmp_path, "SST-2", "dev")
    gold = [e.label for e in ex]
    assert gold == [1, 0, 1, 0] and ex[1].text_a == "dull ."
    assert glue_metrics("sst-2", [1, 0, 0, 0], gold) == {"accuracy": 0.75}
    logits = torch.tensor([[0.1, 2.0], [3.0, 0.0], [1.0, -1.0], [0.0, 0.5]])  # argmax 1 0 0 1
    assert glue_metrics("SST2", logits, torch.tensor(gold)) == {"accuracy": 0.5}
    write(tmp_path, "SST-2", "train.tsv", ["sentence\tlabel", "fine .\t1", "no label here"])
    with pytest.raises(GlueDataError, match=r"SST-2/train.tsv:3: expected 2 tab-separated "
                                            "columns for SST-2, found 1"):
        load_examples(tmp_path, "sst-2", "train")
    write(tmp_path, "SST-2", "train.tsv", ["sentence\tlabel", "fine .\t1", "bad .\tpositive"])
    with pytest.raises(GlueDataError, match=r"SST-2/train.tsv:3: SST-2 label 'positive' is not "
                                            "one of 0, 1"):
        load_examples(tmp_path, "sst-2", "train")


def test_mrpc_columns_accuracy_and_f1(tmp_path):
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    rows = [tsv(1, 702876, 702977, 'He said "yes".', "He agreed."),
            tsv(1, 2108705, 2108831, "Yucaipa owned Dominick's.", "Yucaipa bought Dominick's."),
            tsv(0, 1330381, 1330521, "The dollar fell.", "Stocks rose."),
            tsv(1, 3344667, 3344648, "A cat sat.", "A cat was sitting."),
            tsv(0, 1236820, 1236712, "It rained.", "The sun shone.")]
    write(tmp_path, "MRPC", "train.tsv", [header] + rows)
    ex = load_examples(tmp_path, "mrpc", "train")
    assert ex[0].text_a == 'He said "yes".' and ex[0].text_b == "He agreed."  # no quoting
    gold = [e.label for e in ex]
    assert gold == [1, 1, 0, 1, 0]
    # predictions 1 0 0 1 1: accuracy 3/5; TP=2 FP=1 FN=1: F1 = 2*2 / (2*2 + 1 + 1) = 2/3
    assert glue_metrics("MRPC", [1, 0, 0, 1, 1], gold) == {
        "accuracy": pytest.approx(0.6), "f1": pytest.approx(2 / 3)}


def test_stsb_regression_pearson_and_spearman(tmp_path):
    scores = [0.0, 2.5, 5.0, 1.0]
    rows = [tsv(i, "main-news", "2012", "2012test", f"{i:04d}", "none", "none",
                f"first {i} .", f"second {i} .", s) for i, s in enumerate(scores)]
    write(tmp_path, "STS-B", "dev.tsv", [STSB_HEADER] + rows)
    ex = load_examples(tmp_path, "sts-b", "dev")
    assert [e.label for e in ex] == scores and ex[1].text_b == "second 1 ."
    assert get_task("stsb").is_regression
    pred = [0.5, 4.0, 3.0, 1.5]
    # Pearson by its definition; Spearman: ranks 1 4 3 2 vs 1 3 4 2, 1 - 6*2 / (4*(16-1)) = 0.8
    mx, my = sum(scores) / 4, sum(pred) / 4
    cov = sum((x - mx) * (y - my) for x, y in zip(scores, pred))
    r = cov / math.sqrt(sum((x - mx) ** 2 for x in scores) * sum((y - my) ** 2 for y in pred))
    out = glue_metrics("STS-B", torch.tensor(pred).unsqueeze(1), [e.label for e in ex])
    assert out == {"pearson": pytest.approx(r), "spearman": pytest.approx(0.8)}
    assert r == pytest.approx(0.72718, abs=1e-5)
    write(tmp_path, "STS-B", "train.tsv", [STSB_HEADER, rows[0].rsplit("\t", 1)[0] + "\tabc"])
    with pytest.raises(GlueDataError, match=r"STS-B/train.tsv:2: STS-B score 'abc' is not a "
                                            "number"):
        load_examples(tmp_path, "STS-B", "train")


def test_qqp_malformed_rows_error_by_default_and_can_be_skipped(tmp_path):
    header = tsv("id", "qid1", "qid2", "question1", "question2", "is_duplicate")
    rows = [tsv(0, 1, 2, "How do I learn?", "How can I learn?", 1),
            tsv(1, 3, 4, "What is AI?", "Who is Ada?", 0),
            tsv(2, 5, 6, "Why is the sky blue?", "Why does the sky look blue?", 1),
            tsv(3, 7, 8, "Where is Oslo?", "Where is Lyon?", 0)]
    write(tmp_path, "QQP", "dev.tsv", [header] + rows)
    ex = load_examples(tmp_path, "QQP", "dev")
    gold = [e.label for e in ex]
    # predictions 1 1 1 0: accuracy 3/4; TP=2 FP=1 FN=0: F1 = 4/5
    assert glue_metrics("qqp", [1, 1, 1, 0], gold) == {"accuracy": 0.75,
                                                       "f1": pytest.approx(0.8)}
    # As in the real train.tsv: a row cut short by a newline inside a question.
    write(tmp_path, "QQP", "train.tsv",
          [header, rows[0], tsv(9, 10, 11, "How do I"), "cook rice?\t0", rows[1]])
    with pytest.raises(GlueDataError, match=r"QQP/train.tsv:3: expected 6 .* found 4"):
        load_examples(tmp_path, "qqp", "train")
    with pytest.warns(UserWarning, match=r"skipped 2 malformed row\(s\) .*train.tsv:3, "
                                         r".*train.tsv:4"):
        ex = load_examples(tmp_path, "qqp", "train", on_malformed="skip")
    assert [e.text_a for e in ex] == ["How do I learn?", "What is AI?"]


def test_mnli_matched_and_mismatched_dev_sets(tmp_path):
    write(tmp_path, "MNLI", "train.tsv", [MNLI_TRAIN_HEADER,
                                          mnli_row(0, "A man eats.", "A person eats.",
                                                   "entailment")])
    write(tmp_path, "MNLI", "dev_matched.tsv", [MNLI_DEV_HEADER] + [
        mnli_row(0, "It is raining.", "It is dry.", "contradiction", dev=True),
        mnli_row(1, "He ran.", "He moved.", "entailment", dev=True),
        mnli_row(2, "She sang.", "She sang well.", "neutral", dev=True)])
    write(tmp_path, "MNLI", "dev_mismatched.tsv", [MNLI_DEV_HEADER] + [
        mnli_row(0, "Cats purr.", "Cats are quiet.", "neutral", dev=True),
        mnli_row(1, "Rain fell.", "It was dry.", "contradiction", dev=True)])
    train = load_examples(tmp_path, "MNLI", "train")
    assert (train[0].text_a, train[0].text_b, train[0].label) == ("A man eats.",
                                                                  "A person eats.", 1)
    matched = load_examples(tmp_path, "mnli", "dev_matched")
    mismatched = load_examples(tmp_path, "mnli", "dev_mismatched")
    assert [e.label for e in matched] == [0, 1, 2] and [e.label for e in mismatched] == [2, 0]
    assert glue_metrics("mnli", [0, 1, 1], [e.label for e in matched]) == {
        "accuracy": pytest.approx(2 / 3)}
    assert glue_metrics("mnli", [2, 0], [e.label for e in mismatched]) == {"accuracy": 1.0}
    with pytest.raises(GlueDataError, match="MNLI has dev_matched and dev_mismatched"):
        load_examples(tmp_path, "mnli", "dev")
    write(tmp_path, "MNLI", "train.tsv", [MNLI_TRAIN_HEADER,
                                          mnli_row(0, "A.", "B.", "contradicts")])
    with pytest.raises(GlueDataError, match=r"MNLI/train.tsv:2: MNLI label 'contradicts' is not "
                                            "one of contradiction, entailment, neutral"):
        load_examples(tmp_path, "mnli", "train")


@pytest.mark.parametrize("task,header,labels", [
    ("QNLI", "index\tquestion\tsentence\tlabel", ("entailment", "not_entailment")),
    ("RTE", "index\tsentence1\tsentence2\tlabel", ("entailment", "not_entailment")),
    ("WNLI", "index\tsentence1\tsentence2\tlabel", ("0", "1")),
])
def test_pair_tasks_with_label_text(tmp_path, task, header, labels):
    gold_text = [labels[0], labels[1], labels[1], labels[0], labels[1]]
    write(tmp_path, task, "dev.tsv", [header] + [tsv(i, f"first {i}?", f"second {i}.", y)
                                                 for i, y in enumerate(gold_text)])
    ex = load_examples(tmp_path, task.lower(), "dev")
    assert [(e.text_a, e.text_b) for e in ex][1] == ("first 1?", "second 1.")
    gold = [e.label for e in ex]
    assert gold == [0, 1, 1, 0, 1]
    assert glue_metrics(task, [0, 1, 0, 0, 0], gold) == {"accuracy": pytest.approx(3 / 5)}
    write(tmp_path, task, "train.tsv", [header, tsv(0, "a", "b", labels[0]),
                                        tsv(1, "c", "d", "maybe")])
    with pytest.raises(GlueDataError, match=rf"{task}/train.tsv:3: {task} label 'maybe'"):
        load_examples(tmp_path, task, "train")


def test_every_task_has_its_metrics():
    assert {t.dir_name: t.metrics for t in GLUE_TASKS.values()} == {
        "CoLA": ("mcc",), "SST-2": ("accuracy",), "MRPC": ("accuracy", "f1"),
        "STS-B": ("pearson", "spearman"), "QQP": ("accuracy", "f1"), "MNLI": ("accuracy",),
        "QNLI": ("accuracy",), "RTE": ("accuracy",), "WNLI": ("accuracy",)}


def test_names_and_paths_in_errors(tmp_path):
    with pytest.raises(GlueDataError, match="unknown GLUE task 'colaa'; known tasks: CoLA, "
                                            "SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI"):
        get_task("colaa")
    with pytest.raises(GlueDataError, match="nowhere: no such --data_dir"):
        load_examples(tmp_path / "nowhere", "rte", "train")
    with pytest.raises(GlueDataError, match=r"RTE: no such task folder"):
        load_examples(tmp_path, "rte", "train")
    (tmp_path / "RTE").mkdir()
    with pytest.raises(GlueDataError, match=r"RTE/train.tsv: no such file"):
        load_examples(tmp_path, "RTE", "train")
    write(tmp_path, "RTE", "train.tsv", ["idx\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment"])
    write(tmp_path, "RTE", "dev.tsv", ["index\tpremise\thypothesis\tlabel"])
    with pytest.raises(GlueDataError, match=r"RTE/dev.tsv:1: header has no column 'sentence1'"):
        load_examples(tmp_path, "RTE", "dev")


def test_encoding_pairs_and_single_sentences(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\ncat\nsat\non\nmat\n.\n")
    tok = load_tokenizer(vocab)
    write(tmp_path, "RTE", "dev.tsv", ["index\tsentence1\tsentence2\tlabel",
                                       "0\tThe cat sat\ton the mat.\tnot_entailment"])
    pair = encode_examples(load_examples(tmp_path, "rte", "dev"), tok, max_seq_length=9)
    # 3 + 4 tokens + 3 specials = 10 > 9: longest-first drops the last token of the longer B.
    assert pair.input_ids.tolist() == [[2, 5, 6, 7, 3, 8, 5, 9, 3]]
    assert pair.token_type_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1]]
    assert pair.attention_mask.tolist() == [[1] * 9]
    assert pair.labels.tolist() == [1] and pair.labels.dtype == torch.int64
    write(tmp_path, "SST-2", "dev.tsv", ["sentence\tlabel", "the CAT .\t1"])
    single = encode_examples(load_examples(tmp_path, "sst-2", "dev"), tok, max_seq_length=8)
    assert single.input_ids.tolist() == [[2, 5, 6, 10, 3, 0, 0, 0]]
    assert single.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]
    assert all(t.dtype == torch.int64 for t in single.inputs) and len(single) == 1
    write(tmp_path, "STS-B", "dev.tsv", [STSB_HEADER, tsv(0, "g", "f", "y", "o", "s", "s",
                                                          "the cat", "the mat", "3.8")])
    scores = encode_examples(load_examples(tmp_path, "sts-b", "dev"), tok, max_seq_length=8)
    assert scores.labels.dtype == torch.float32
    assert scores.labels.tolist() == [pytest.approx(3.8)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about on clean files
        load_examples(tmp_path, "sts-b", "dev")
