"""GLUE test files in their published layouts and predictions in the benchmark's submission format
(written out by hand here, as the GLUE distribution and its submission page give them)."""

from __future__ import annotations

import pytest
import torch

from data.glue import (GlueDataError, encode_examples, get_task, load_test_examples,
                       present_test_splits, write_submission)
from data.vocab import load_tokenizer
from job_helpers import ROOT

MNLI_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
               "sentence1_parse\tsentence2_parse\tsentence1\tsentence2")
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def test_mnli_test_files_give_two_submissions_with_label_names(tmp_path):
    for split, a in (("test_matched", "the cat sat"), ("test_mismatched", "a dog ran")):
        write(tmp_path / "MNLI" / f"{split}.tsv", [
            MNLI_HEADER,
            f"0\t31\t31e\tfiction\t(x)\t(y)\t(X)\t(Y)\t{a}\tit sat",
            f"1\t32\t32n\tfiction\t(x)\t(y)\t(X)\t(Y)\t{a} twice\tnothing"])
    task = get_task("MNLI")
    assert present_test_splits(tmp_path, task) == [("test_matched", "MNLI-m"),
                                          ("test_mismatched", "MNLI-mm")]
    indices, examples = load_test_examples(tmp_path, "MNLI", "test_mismatched")
    assert indices == ["0", "1"]
    assert [(e.text_a, e.text_b, e.label) for e in examples] == [
        ("a dog ran", "it sat", None), ("a dog ran twice", "nothing", None)]
    features = encode_examples(examples, load_tokenizer(ROOT / "data/sample/vocab.txt"), 16)
    assert features.labels is None and features.input_ids.shape == (2, 16)
    # logits over (contradiction, entailment, neutral)
    write_submission(tmp_path / "MNLI-mm.tsv", task, indices,
                     torch.tensor([[0.1, 2.0, 0.3], [3.0, -1.0, 0.0]]))
    assert (tmp_path / "MNLI-mm.tsv").read_text() == (
        "index\tprediction\n0\tentailment\n1\tcontradiction\n")


def test_stsb_scores_and_binary_labels(tmp_path):
    write(tmp_path / "STS-B" / "test.tsv", [
        STSB_HEADER, "0\tmain-news\t2016\t2016\t0001\tsrc\tsrc\tA man plays.\tA man sings."])
    indices, examples = load_test_examples(tmp_path, "STS-B")
    assert (examples[0].text_a, examples[0].text_b) == ("A man plays.", "A man sings.")
    write_submission(tmp_path / "STS-B.tsv", get_task("STS-B"), indices, torch.tensor([[3.14159]]))
    assert (tmp_path / "STS-B.tsv").read_text() == "index\tprediction\n0\t3.142\n"
    write(tmp_path / "SST-2" / "test.tsv", ["index\tsentence", "0\tgood", "1\tbad"])
    indices, _ = load_test_examples(tmp_path, "SST-2")
    write_submission(tmp_path / "SST-2.tsv", get_task("SST-2"), indices,
                     torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert (tmp_path / "SST-2.tsv").read_text() == "index\tprediction\n0\t1\n1\t0\n"


def test_test_file_errors_name_the_line(tmp_path):
    write(tmp_path / "RTE" / "test.tsv", ["index\tsentence1\tsentence2", "0\tonly one"])
    with pytest.raises(GlueDataError, match=r"RTE/test.tsv:2: expected 3 tab-separated columns"):
        load_test_examples(tmp_path, "RTE")
    with pytest.raises(GlueDataError, match="no test split 'test'.*test_matched.tsv"):
        load_test_examples(tmp_path, "MNLI", "test")
    assert present_test_splits(tmp_path, get_task("QNLI")) == []
