"""What the benchmark trains: the models cut into pipeline stages, and their microbatches.

Three workloads, each a small frozen dataclass that every process (the driver, Ray actors, the
spawned ``torch.distributed.pipelining`` ranks) turns into the same stage modules with the same
initial weights, so every variant trains the same model on the same data, with the workload's optimizer
(``workload.optimizer``):

- `BertWorkload`: BERT pre-training (MLM + NSP) from `stages`, sized so that one microbatch's
  forward and backward take tens of milliseconds on one core, far above the cost of moving its
  activations between processes.
- `MlpWorkload`: ``Linear(1024) + GELU`` blocks on 32-row microbatches, SGD: 128 KiB of
  activations per microbatch for about 15 ms of compute per stage at d = 2, so the cost of moving
  a message between two stages shows next to the compute.
- `TinyWorkload`: a chain of ``Linear(width, width)`` stages whose compute is next to nothing, so
  its throughput measures a runtime's fixed cost per microbatch (driver, messages, bookkeeping).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
BERT_CONFIG = os.path.join(BENCH, "bert_config_bench.json")
LEARNING_RATE = 1e-4
SGD_LEARNING_RATE = 1e-3

Microbatch = tuple[Any, Any]   # (inputs, targets)


def make_adam(params: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
    """Adam over ``PipelineTrainer``'s (name, parameter) pairs: BERT's and the tiny chain's."""
    return torch.optim.Adam([p for _, p in params], lr=LEARNING_RATE)


def make_sgd(params: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
    """Plain SGD over (name, parameter) pairs: the MLP's (no optimizer state to speak of)."""
    return torch.optim.SGD([p for _, p in params], lr=SGD_LEARNING_RATE)


@dataclass(frozen=True, eq=False)
class StageChain:
    """A model as pipeline stages: ``modules[s]`` runs on stage ``s``; ``loss_fn(last_output,
    targets)``; ``tied_parameters``: groups of ``"<module index>.<name>"`` that are one weight;
    ``module_to_stage_map`` as ``PipelineConfig`` takes it."""

    modules: tuple[nn.Module, ...]
    loss_fn: nn.Module
    tied_parameters: tuple[tuple[str, ...], ...]
    module_to_stage_map: tuple[int, ...]

    @property
    def depth(self) -> int:
        return len(self.modules)

    def parameter(self, name: str) -> nn.Parameter:
        k, _, local = name.partition(".")
        return self.modules[int(k)].get_parameter(local)


@dataclass(frozen=True)
class BertWorkload:
    """BERT from ``config_path`` (a Google-format bert_config.json) on random pre-training
    microbatches. ``partitions[d]`` is the number of encoder layers on each of ``d`` stages; the
    embeddings go with the first stage and the MLM/NSP heads with the last. Depths not given
    there are split as the jobs split ``depth=D``: balanced by predicted cost
    (`stages.bert_cost`); the report prints the measured per-stage times."""

    config_path: str = BERT_CONFIG
    microbatch_size: int = 4
    seq_length: int = 128
    partitions: tuple[tuple[int, tuple[int, ...]], ...] = ()
    seed: int = 0
    name: str = "bert"

    def __post_init__(self) -> None:
        from stages.bert_config import BertModelConfig

        cfg = BertModelConfig.from_json(self.config_path)
        if self.seq_length > cfg.max_position_embeddings:
            raise ValueError(f"seq_length {self.seq_length} exceeds max_position_embeddings "
                             f"{cfg.max_position_embeddings} of {self.config_path}")
        for d, layers in self.partitions:
            if len(layers) != d or sum(layers) != cfg.num_hidden_layers:
                raise ValueError(f"partition for depth {d} is {layers}: it needs {d} layer counts "
                                 f"summing to {cfg.num_hidden_layers} ({self.config_path})")

    @property
    def config(self):
        from stages.bert_config import BertModelConfig

        return BertModelConfig.from_json(self.config_path)

    def partition(self, depth: int) -> tuple[int, ...]:
        from stages.bert_cost import CostModel

        given = dict(self.partitions)
        if depth in given:
            return given[depth]
        cost = CostModel.analytic(self.config, seq_length=self.seq_length,
                                  microbatch_size=self.microbatch_size,
                                  num_microbatches=2 * depth)
        return cost.balanced_partition(depth).layers_per_stage

    def chain(self, depth: int) -> StageChain:
        from stages.bert import build_bert_pipeline
        from stages.partition import BertPartition

        model = build_bert_pipeline(self.config, BertPartition(self.partition(depth)),
                                    seed=self.seed)
        return StageChain(tuple(model.modules), model.loss_fn,
                          tuple(tuple(g) for g in model.tied_parameters),
                          tuple(model.module_to_stage_map))

    def steps(self, num_steps: int, num_microbatches: int, seed: int) -> list[list[Microbatch]]:
        from stages.bert_batches import random_pretraining_steps

        return random_pretraining_steps(num_steps=num_steps, num_microbatches=num_microbatches,
                                        microbatch_size=self.microbatch_size,
                                        seq_length=self.seq_length,
                                        vocab_size=self.config.vocab_size, seed=seed)

    def optimizer(self, params: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        return make_adam(params)

    def describe(self, depths: tuple[int, ...] = ()) -> dict[str, Any]:
        cfg = self.config
        return {"model": "BertForPreTraining stages (stages/)", "config": os.path.relpath(
                    self.config_path, ROOT), **cfg.to_dict(),
                "microbatch_size": self.microbatch_size, "seq_length": self.seq_length,
                "encoder layers per stage": {d: list(self.partition(d)) for d in depths}}


@dataclass(frozen=True)
class TinyWorkload:
    """``depth`` stages of ``Linear(width, width)`` on ``microbatch_size`` x ``width`` inputs,
    mean squared error: nothing to compute, so a runtime's fixed cost per microbatch shows."""

    width: int = 16
    microbatch_size: int = 1
    seed: int = 0
    name: str = "tiny"

    def chain(self, depth: int) -> StageChain:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            modules = tuple(nn.Linear(self.width, self.width) for _ in range(depth))
        return StageChain(modules, nn.MSELoss(), (), tuple(range(depth)))

    def steps(self, num_steps: int, num_microbatches: int, seed: int) -> list[list[Microbatch]]:
        g = torch.Generator().manual_seed(seed)
        shape = (self.microbatch_size, self.width)
        return [[(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
                 for _ in range(num_microbatches)] for _ in range(num_steps)]

    def optimizer(self, params: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        return make_adam(params)

    def describe(self, depths: tuple[int, ...] = ()) -> dict[str, Any]:
        return {"model": f"Linear({self.width}, {self.width}) per stage, MSE loss",
                "microbatch_size": self.microbatch_size, "optimizer": "Adam"}


@dataclass(frozen=True)
class MlpWorkload:
    """``num_blocks`` x [``Linear(width, width)`` + GELU] split evenly over the stages, on
    ``microbatch_size`` x ``width`` inputs, mean squared error, SGD: per microbatch a stage
    boundary carries ``microbatch_size * width`` floats each way (128 KiB by default)."""

    width: int = 1024
    num_blocks: int = 8
    microbatch_size: int = 32
    seed: int = 0
    name: str = "mlp"

    def chain(self, depth: int) -> StageChain:
        if self.num_blocks % depth:
            raise ValueError(f"the mlp workload's {self.num_blocks} blocks do not split evenly "
                             f"over {depth} stages; choose a depth dividing {self.num_blocks}")
        per = self.num_blocks // depth
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            blocks = [nn.Sequential(nn.Linear(self.width, self.width), nn.GELU())
                      for _ in range(self.num_blocks)]
        modules = tuple(nn.Sequential(*blocks[s * per:(s + 1) * per]) for s in range(depth))
        return StageChain(modules, nn.MSELoss(), (), tuple(range(depth)))

    def steps(self, num_steps: int, num_microbatches: int, seed: int) -> list[list[Microbatch]]:
        g = torch.Generator().manual_seed(seed)
        shape = (self.microbatch_size, self.width)
        return [[(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
                 for _ in range(num_microbatches)] for _ in range(num_steps)]

    def optimizer(self, params: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        return make_sgd(params)

    def describe(self, depths: tuple[int, ...] = ()) -> dict[str, Any]:
        return {"model": f"{self.num_blocks} x [Linear({self.width}, {self.width}) + GELU], "
                         "split evenly over the stages, MSE loss",
                "microbatch_size": self.microbatch_size, "optimizer": "SGD",
                "learning_rate": SGD_LEARNING_RATE,
                "activation bytes per microbatch": 4 * self.microbatch_size * self.width}


Workload = BertWorkload | MlpWorkload | TinyWorkload
