"""transformers checkpoints in and out, through the commands a user runs: a pre-training run
exported (jobs/export_hf.py, --export_hf) and reloaded with from_pretrained; GLUE fine-tuning from
a transformers directory and from a pre-training checkpoint, its saved classifier reloaded, its
test-set predictions in GLUE's submission format.

References are transformers' own models and tokenizers; the pipeline side is the checkpoint's
stage weights loaded into the pipeline stages, which score every position when called without
labels.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score
from transformers import (AutoTokenizer, BertForPreTraining, BertForSequenceClassification,
                          BertModel)

from data.vocab import load_tokenizer
from job_helpers import ROOT, TINY, bad_lines, run
from stages.bert import build_bert_pipeline
from stages.bert_config import BertModelConfig
from stages.partition import parse_module_spec

DEMO = BertModelConfig.from_json(ROOT / "configs" / "bert_config_demo.json")
VOCAB = ROOT / "data" / "sample" / "vocab.txt"
SPLIT = "models.bert4.layers=1.5,2.5"
TEXTS = ["The dialogue is clever, and the Music is gripping.",
         "A dreadful play", "UNAFFABLE results ... no!"]


@pytest.fixture(scope="module")
def pretrained(shards, tmp_path_factory):
    """One epoch of pre-training on 2 stages, exported at its end with --export_hf. The split
    cuts layer 1 between its attention (stage 0) and its feed-forward (stage 1)."""
    tmp = tmp_path_factory.mktemp("pretrain")
    p = run(["jobs/pretrain_bert24.py", *TINY, "--module", SPLIT, "--train_path", shards,
             "--num_train_epochs", 1,
             "--train_batch_size", 16, "--gradient_accumulation_steps", 1, "--learning_rate",
             "5e-4", "--checkpoint_dir", tmp / "ck", "--export_hf", tmp / "at_end"])
    return tmp / "ck", tmp / "at_end", p.stdout


def stage_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(step_dir.glob("stage*.weights.safetensors")):
        state.update({k.removeprefix("buffer::"): v for k, v in load_file(f).items()})
    return state


def encode(tokenizer, texts=TEXTS, max_length=32):
    enc = tokenizer(texts, texts[::-1], padding="max_length", truncation=True,
                    max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["token_type_ids"], enc["attention_mask"]


def test_export_reloads_in_transformers_with_the_pipelines_logits_and_tokenizer(pretrained,
                                                                                  tmp_path):
    ck, at_end, stdout = pretrained
    out = tmp_path / "export"
    p = run(["jobs/export_hf.py", "--checkpoint_path", ck, "--epoch", 0, "--output_dir", out])
    assert f"[export] {out}" in p.stdout
    assert bad_lines(p.stdout, p.stderr) == [], p.stderr
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer.json",
            "tokenizer_config.json"} <= {f.name for f in out.iterdir()}
    assert (out / "vocab.txt").read_bytes() == VOCAB.read_bytes()

    hf_model, info = BertForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf_model.eval()
    # The pipeline: the checkpoint's two stages, as the run trained them.
    step_dir, = sorted(ck.glob("step-*"))
    model = build_bert_pipeline(DEMO, parse_module_spec(SPLIT, 4))
    model.load_state_dict(stage_weights(step_dir))
    assert "layer.1.attention.self.query.weight" in dict(model.modules[0].named_parameters())
    assert "layer.1.intermediate.dense.weight" in dict(model.modules[1].named_parameters())
    assert f"as {SPLIT} (2 modules: [1.5, 2.5] layers)" in stdout
    tokenizer = AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer(VOCAB, do_lower_case=True)   # what pre-training tokenized with
    inputs = encode(ours)
    for a, b in zip(encode(tokenizer), inputs):
        assert torch.equal(a, b)
    assert tokenizer.tokenize(TEXTS[2]) == ours.tokenize(TEXTS[2])
    assert tokenizer.tokenize("Music")[0] == "music"     # the run's lower-casing
    x = inputs
    with torch.no_grad():
        for module in model.modules:
            module.eval()
            x = module(*x)          # without labels: every position is scored
        theirs = hf_model(input_ids=inputs[0], token_type_ids=inputs[1],
                          attention_mask=inputs[2])
    assert x[0].shape == theirs.prediction_logits.shape == (3, 32, DEMO.vocab_size)
    torch.testing.assert_close(x[0], theirs.prediction_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x[1], theirs.seq_relationship_logits, rtol=1e-5, atol=1e-6)

    # --export_hf at the end of the run wrote the same directory.
    assert f"[export] {at_end}" in stdout
    a, b = load_file(out / "model.safetensors"), load_file(at_end / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (at_end / "vocab.txt").read_bytes() == VOCAB.read_bytes()


def test_export_errors_name_the_flag_and_what_to_do(pretrained, tmp_path):
    ck, _, _ = pretrained
    p = run(["jobs/export_hf.py", "--checkpoint_path", tmp_path / "nothing", "--output_dir",
             tmp_path / "o"], ok=False)
    assert p.returncode == 2 and "nothing" in p.stderr and "no checkpoints" in p.stderr
    p = run(["jobs/export_hf.py", "--checkpoint_path", ck, "--epoch", 7, "--output_dir",
             tmp_path / "o"], ok=False)
    assert p.returncode == 2 and "epoch 7" in p.stderr and "epochs found: [0]" in p.stderr
    p = run(["jobs/export_hf.py", "--checkpoint_path", ck, "--output_dir", tmp_path / "o",
             "--vocab_path", tmp_path / "missing.txt"], ok=False)
    assert p.returncode == 2 and "--vocab_path" in p.stderr and "missing.txt" in p.stderr
    p = run(["jobs/pretrain_bert24.py", *TINY, "--train_path", ck, "--num_minibatches", 2,
             "--export_hf", tmp_path / "x"], ok=False)
    assert p.returncode == 2 and "--export_hf needs --num_train_epochs" in p.stderr


def glue_dir(tmp_path: Path) -> Path:
    """The bundled SST-2 with a test.tsv in GLUE's layout (index, sentence) from its dev set."""
    d = tmp_path / "glue" / "SST-2"
    d.mkdir(parents=True)
    for split in ("train", "dev"):
        shutil.copy(ROOT / "data/sample/glue/SST-2" / f"{split}.tsv", d)
    rows = (d / "dev.tsv").read_text().splitlines()[1:]
    (d / "test.tsv").write_text("index\tsentence\n" + "".join(
        f"{i}\t{r.split(chr(9))[0].upper() if i % 2 else r.split(chr(9))[0]}\n"
        for i, r in enumerate(rows[:40])))
    return d.parent


def check_saved_classifier(out: Path, data: Path, job_scores: dict) -> None:
    """The saved model, reloaded by transformers alone, scores dev as the job did and predicts
    test.tsv as the job's GLUE submission file says."""
    model = BertForSequenceClassification.from_pretrained(out / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.id2label == {0: "0", 1: "1"}
    with open(data / "SST-2" / "dev.tsv") as f:
        dev = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    with open(data / "SST-2" / "test.tsv") as f:
        test = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))

    def predict(sentences):
        enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=32,
                        return_tensors="pt")
        with torch.no_grad():
            return model(**enc).logits.argmax(-1).tolist()

    dev_preds = predict([r["sentence"] for r in dev])
    assert accuracy_score([int(r["label"]) for r in dev], dev_preds) == \
        job_scores["dev"]["accuracy"]
    submission = (out / "SST-2.tsv").read_text().splitlines()
    assert submission[0] == "index\tprediction"
    assert submission[1:] == [f"{r['index']}\t{model.config.id2label[p]}"
                              for r, p in zip(test, predict([r["sentence"] for r in test]))]


@pytest.mark.parametrize("kind", ["BertForPreTraining", "BertModel"])
def test_fine_tuning_from_a_transformers_directory_saves_a_classifier_that_reloads(kind,
                                                                                   tmp_path):
    import json

    torch.manual_seed(3)
    cls = BertForPreTraining if kind == "BertForPreTraining" else BertModel
    hf = cls(DEMO.to_transformers())
    hf.save_pretrained(tmp_path / "hf")
    shutil.copy(VOCAB, tmp_path / "hf" / "vocab.txt")   # as bert-base-uncased ships it
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    data = glue_dir(tmp_path)
    # For the bare BertModel a learning rate of 1e-9: AdamW moves a weight by at most about
    # lr per update, so the saved encoder must be the directory's own to within 1e-6.
    lr = "1e-3" if kind == "BertForPreTraining" else "1e-9"
    p = run(["jobs/finetune_glue.py", "--data_dir", data, "--task_name", "SST-2", "--do_train",
             "--do_eval", "--checkpoint_path", tmp_path / "hf", "--max_seq_length", 32,
             "--train_batch_size", 16, "--num_train_epochs", 1, "--learning_rate", lr,
             "--num_cpus_per_replica", 0.5, "--output_dir", tmp_path / "out"])
    assert "transformers directory" in p.stdout and "vocab.txt" in p.stdout
    assert bad_lines(p.stdout, p.stderr) == [], p.stderr[-3000:]
    scores = json.loads((tmp_path / "out" / "scores_sst-2.json").read_text())["scores"]
    check_saved_classifier(tmp_path / "out", data, scores)
    if kind == "BertModel":
        saved = BertForSequenceClassification.from_pretrained(tmp_path / "out" / "model").bert
        theirs = hf.state_dict()
        for k, v in saved.state_dict().items():
            torch.testing.assert_close(v, theirs[k], rtol=0, atol=1e-6, msg=k)


def test_fine_tuning_from_a_pretraining_checkpoint_saves_a_classifier_that_reloads(pretrained,
                                                                                   tmp_path):
    import json

    ck, _, _ = pretrained
    data = glue_dir(tmp_path)
    p = run(["jobs/finetune_glue.py", "--data_dir", data, "--task_name", "SST-2", "--do_train",
             "--do_eval", "-m", "models.bert4.depth=2", "--num_stages", 2, "--checkpoint_path",
             ck, "--epoch", 0, "--max_seq_length", 32, "--train_batch_size", 16,
             "--num_train_epochs", 1, "--learning_rate", "1e-3", "--num_cpus_per_replica", 0.5,
             "--output_dir", tmp_path / "out"])
    assert "dev: accuracy" in p.stdout
    assert bad_lines(p.stdout, p.stderr) == [], p.stderr[-4000:]
    scores = json.loads((tmp_path / "out" / "scores_sst-2.json").read_text())["scores"]
    check_saved_classifier(tmp_path / "out", data, scores)


def test_fine_tuning_flags_that_describe_a_pretraining_run_are_refused_for_a_directory(tmp_path):
    BertModel(DEMO.to_transformers()).save_pretrained(tmp_path / "hf")
    p = run(["jobs/finetune_glue.py", "--data_dir", ROOT / "data/sample/glue", "--task_name",
             "SST-2", "--do_eval", "--checkpoint_path", tmp_path / "hf", "--num_stages", 2],
            ok=False)
    assert p.returncode == 2 and "--num_stages" in p.stderr and "transformers directory" in p.stderr
    p = run(["jobs/finetune_glue.py", "--data_dir", ROOT / "data/sample/glue", "--task_name",
             "SST-2", "--do_eval", "--checkpoint_path", tmp_path / "hf"], ok=False)
    assert p.returncode == 2 and "no vocab.txt" in p.stderr and "--vocab_path" in p.stderr
