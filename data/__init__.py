"""Data for pd2bw-ray: BERT pre-training shards and their stream, GLUE tasks, the sample corpus.

Pre-training, raw text to the trainer:

* :mod:`data.corpus`, :mod:`data.sentences`, :mod:`data.wikitext`: read documents from
  sentence-per-line text, WikiExtractor JSON or a Wikipedia XML dump.
* :mod:`data.vocab`: the WordPiece vocab, loaded into transformers' fast tokenizer.
* :mod:`data.pretraining`: Google's recipe for sentence pairs, next-sentence labels and masks.
* :mod:`data.shards`: the Parquet layout of prepared examples.
* :mod:`data.prepare_pretraining`: the Ray job (and CLI) that writes shards.
* :mod:`data.streaming`: the shards as the trainer's steps, with Ray Data; resumable.
* :mod:`data.wait_meter`: how long training waits for data.

Fine-tuning: :mod:`data.glue` (the nine GLUE tasks' files) and :mod:`data.glue_metrics`.

:mod:`data.sample` holds a generated corpus, its vocab and an SST-2-style task for the demo.
"""
