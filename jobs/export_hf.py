"""Export a pre-training checkpoint as a transformers directory.

    python jobs/export_hf.py --checkpoint_path ckpt/ --epoch 0 --output_dir bert-export/

``--checkpoint_path`` is the ``--checkpoint_dir`` of ``jobs/pretrain_bert24.py`` (then the
end-of-epoch checkpoint of ``--epoch``, the newest if omitted) or one ``step-*`` directory. The
stages of the checkpoint, whatever their number, are merged into one ``BertForPreTraining``, and
the output directory loads with no extra arguments::

    BertForPreTraining.from_pretrained("bert-export/")
    AutoTokenizer.from_pretrained("bert-export/")

It holds ``config.json``, ``model.safetensors``, the run's ``vocab.txt`` and a tokenizer
(``tokenizer.json``, ``tokenizer_config.json``) with the run's lower-casing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class JobError(ValueError):
    """A flag or input is wrong; the message names it and says what to do."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jobs/export_hf.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", required=True,
                   help="--checkpoint_dir of the pre-training run, or one step-* directory")
    p.add_argument("--epoch", type=int, default=None,
                   help="pre-training epoch whose checkpoint to export (default: the newest)")
    p.add_argument("--output_dir", required=True, help="the transformers directory to write")
    p.add_argument("--vocab_path", default=None,
                   help="default: the vocab the pre-training run recorded")
    p.add_argument("--do_lower_case", action=argparse.BooleanOptionalAction, default=None,
                   help="default: as in pre-training")
    return p


def export(checkpoint_path: str | os.PathLike, output_dir: str | os.PathLike, *,
           epoch: int | None = None, vocab_path: str | None = None,
           do_lower_case: bool | None = None, log=print) -> dict[str, Any]:
    """Write the checkpoint (see the module docstring) to ``output_dir``; what was written."""
    from stages.bert_checkpoint import read_pretrained_bert
    from stages.hf_interop import save_hf_pretraining, save_hf_tokenizer

    pretrained = read_pretrained_bert(checkpoint_path, epoch, report=log)
    extra = pretrained.checkpoint.extra
    vocab = vocab_path or extra.get("vocab_path")
    if not vocab:
        raise JobError(f"{pretrained.checkpoint.path} records no vocab; pass --vocab_path")
    if not os.path.isfile(vocab):
        raise JobError(f"vocab {vocab}: no such file ("
                       + ("--vocab_path" if vocab_path else
                          f"recorded by {pretrained.checkpoint.path}; pass --vocab_path if it "
                          "moved") + ")")
    lower = do_lower_case if do_lower_case is not None else bool(extra.get("do_lower_case", True))
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise JobError(f"--output_dir {out}: exists and is not a directory")
    cfg = pretrained.model_config
    hf_config = cfg.to_transformers()
    save_hf_pretraining(pretrained.hf_state_dict, hf_config, out)
    save_hf_tokenizer(vocab, lower, out, hf_config.max_position_embeddings)
    log(f"[export] {out}: BertForPreTraining ({cfg.num_hidden_layers} layers x "
        f"{cfg.hidden_size}) from {pretrained.checkpoint.path} (epoch {extra.get('epoch')}, "
        f"{pretrained.describe()}, merged), vocab {vocab}, "
        f"do_lower_case={lower}")
    return {"output_dir": str(out), "checkpoint": str(pretrained.checkpoint.path),
            "epoch": extra.get("epoch"), "vocab_path": vocab, "do_lower_case": lower}


def main(argv: Sequence[str] | None = None) -> int:
    """Export; exit status 2 for bad input."""
    from pd2bw_ray.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        export(args.checkpoint_path, args.output_dir, epoch=args.epoch,
               vocab_path=args.vocab_path, do_lower_case=args.do_lower_case)
    except (ValueError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
