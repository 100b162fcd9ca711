"""Reading the pre-training job's partitioned checkpoints back as one BERT.

A checkpoint written by ``jobs/pretrain_bert24.py`` holds one weights file per stage (names
``"<module index>.<name>"`` of that run's partition) and records the modules (``module``: how
``--module`` cut BERT), the stages they ran on (the conf's ``module_to_stage_map``), the bert
config, the vocab and the epoch in its manifest. `read_pretrained_bert` merges the stages into
a transformers ``BertForPreTraining`` state dict, whatever the number of stages was.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pd2bw_ray.checkpoint import (Checkpoint, CheckpointError, list_checkpoints, open_checkpoint,
                                  stage_file)
from stages.bert import build_bert_pipeline
from stages.bert_config import BertModelConfig
from stages.hf_interop import pipeline_to_hf_state_dict
from stages.partition import BertPartition, parse_module_spec


@dataclass(frozen=True)
class PretrainedBert:
    """A pre-training checkpoint merged into one model."""

    hf_state_dict: dict[str, torch.Tensor]     # BertForPreTraining names (on-disk form)
    model_config: BertModelConfig
    partition: BertPartition                   # the modules (--module) the run cut BERT into
    checkpoint: Checkpoint
    module_to_stage_map: tuple[int, ...]       # the modules' stages (the run's conf.json)

    @property
    def num_stages(self) -> int:
        """Pipeline stages the checkpoint was trained on (several modules may share one)."""
        return self.module_to_stage_map[-1] + 1

    def describe(self) -> str:
        n, d = self.partition.num_stages, self.num_stages
        return (f"{n} module{'s' if n > 1 else ''} ({self.partition.to_spec()}) on {d} "
                f"stage{'s' if d > 1 else ''} (module_to_stage_map "
                f"{list(self.module_to_stage_map)})")


def find_epoch_checkpoint(path: str | os.PathLike, epoch: int | None = None,
                          report=print) -> Checkpoint:
    """``path`` itself if it is a checkpoint; else, under the root ``path``, the verified
    end-of-epoch checkpoint of ``epoch`` (the newest end-of-epoch one if None). Corrupted
    checkpoints are reported and skipped."""
    p = Path(path)
    if (p / "manifest.json").exists():
        ck = open_checkpoint(p)
        if epoch is not None and ck.extra.get("epoch") != epoch:
            raise CheckpointError(f"{p} is from epoch {ck.extra.get('epoch')}, not {epoch}")
        return ck
    candidates = list_checkpoints(p)
    if not candidates:
        raise CheckpointError(f"{p}: no checkpoints (expected step-* directories written by "
                              "jobs/pretrain_bert24.py --checkpoint_dir)")
    epochs_seen = []
    for c in reversed(candidates):
        try:
            extra = json.loads((c / "manifest.json").read_text()).get("extra", {})
        except (OSError, json.JSONDecodeError):
            extra = {}
        if not extra.get("end_of_epoch"):
            continue
        epochs_seen.append(extra.get("epoch"))
        if epoch is None or extra.get("epoch") == epoch:
            try:
                return open_checkpoint(c)
            except CheckpointError as e:
                report(f"[pd2bw] skipping checkpoint: {e}")
    raise CheckpointError(f"{p}: no valid end-of-epoch checkpoint"
                          + (f" for epoch {epoch} (epochs found: {sorted(set(epochs_seen))})"
                             if epoch is not None else ""))


def read_pretrained_bert(path: str | os.PathLike, epoch: int | None = None,
                         report=print) -> PretrainedBert:
    ck = find_epoch_checkpoint(path, epoch, report)
    extra = ck.extra
    if "bert_config" not in extra or "module" not in extra:
        raise CheckpointError(f"{ck.path}: the manifest does not record the bert config and "
                              "partition; was it written by jobs/pretrain_bert24.py?")
    cfg = BertModelConfig.from_dict(extra["bert_config"], source=f"{ck.path}/manifest.json")
    partition = parse_module_spec(extra["module"], cfg.num_hidden_layers)
    model = build_bert_pipeline(cfg, partition, device="meta")
    state: dict[str, torch.Tensor] = {}
    for info in ck.manifest["stages"]:
        weights = ck.read(stage_file(info["stage"], "weights.safetensors"))
        for k, v in weights.items():
            state[k[len("buffer::"):] if k.startswith("buffer::") else k] = v
    for group in model.tied_parameters:     # aliases kept once when tied on the same stage
        present = next((state[n] for n in group if n in state), None)
        for n in group:
            if n not in state and present is not None:
                state[n] = present
    # the stages: the conf the library wrote into the manifest (older job checkpoints did not
    # record the map in "extra"; the manifest's conf is there in all of them)
    stage_map = tuple(ck.manifest["config"]["module_to_stage_map"])
    return PretrainedBert(pipeline_to_hf_state_dict(model, state), cfg, partition, ck,
                          stage_map)
