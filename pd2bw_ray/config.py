"""Pipeline layout and runtime configuration: small frozen dataclasses validated on construction.

`PipelineConfig` is the `conf.json` of PipeDream: which stage each module runs on, and which
(global) ranks run each stage. Ranks of stage ``s`` are its replicas, in order: replica ``r`` of
every stage forms pipeline ``r``. Activations flow between replica ``r`` of neighbouring stages;
replicas of one stage average their gradients.
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

SCHEDULES = ("2bw", "flush", "gpipe", "interleaved", "zb-h1")


class ConfigError(ValueError):
    """A configuration a user wrote is wrong; the message says where and what to do."""


@dataclass(frozen=True)
class PipelineConfig:
    """Module-to-stage and stage-to-rank maps (PipeDream's ``conf.json``).

    ``module_to_stage_map[k]`` is the stage of module ``k``; stages are contiguous and start at 0.
    ``stage_to_rank_map[str(s)]`` lists the global ranks holding stage ``s``; every stage has the
    same number of replicas and every rank in ``0..n-1`` is used exactly once, except that stage
    ``s`` and ``s + p`` may hold exactly the same ranks (for every ``s``): each of the
    ``ranks_per_pipeline`` = ``p`` ranks of a pipeline then holds ``stages_per_rank`` virtual
    stages (the interleaved schedule's layout).
    """

    module_to_stage_map: tuple[int, ...]
    stage_to_rank_map: Mapping[str, tuple[int, ...]]
    source: str = field(default="<PipelineConfig>", compare=False)
    ranks_per_pipeline: int = field(default=0, init=False, compare=False, repr=False)

    def __init__(
        self,
        module_to_stage_map: Sequence[int],
        stage_to_rank_map: Mapping[Any, Sequence[int]],
        source: str = "<PipelineConfig>",
    ) -> None:
        where = source
        if not isinstance(module_to_stage_map, (list, tuple)) or not module_to_stage_map:
            raise ConfigError(f"{where}: module_to_stage_map must be a non-empty list of stage "
                              f"indices, got {module_to_stage_map!r}")
        for k, s in enumerate(module_to_stage_map):
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ConfigError(f"{where}: module_to_stage_map[{k}] = {s!r} is not a stage "
                                  "index (a non-negative integer)")
        m2s = tuple(int(s) for s in module_to_stage_map)
        if m2s[0] != 0:
            raise ConfigError(f"{where}: module_to_stage_map must start at stage 0, "
                              f"got {list(m2s)}")
        for k in range(1, len(m2s)):
            if m2s[k] not in (m2s[k - 1], m2s[k - 1] + 1):
                raise ConfigError(
                    f"{where}: stages in module_to_stage_map must be contiguous and increase by "
                    f"at most 1 from one module to the next; module {k} goes to stage {m2s[k]} "
                    f"after module {k - 1} on stage {m2s[k - 1]} (map: {list(m2s)})")
        num_stages = m2s[-1] + 1

        if not isinstance(stage_to_rank_map, Mapping):
            raise ConfigError(f"{where}: stage_to_rank_map must be an object mapping stage "
                              f"(\"0\", \"1\", ...) to a list of ranks, got {stage_to_rank_map!r}")
        s2r: dict[str, tuple[int, ...]] = {}
        for key, ranks in stage_to_rank_map.items():
            try:
                s = int(key)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: stage_to_rank_map key {key!r} is not a stage "
                                  "index") from None
            if s < 0 or s >= num_stages:
                raise ConfigError(f"{where}: stage_to_rank_map names stage {s}, but "
                                  f"module_to_stage_map has stages 0..{num_stages - 1}")
            if str(s) in s2r:
                raise ConfigError(f"{where}: stage {s} appears twice in stage_to_rank_map")
            if not isinstance(ranks, (list, tuple)) or not all(
                    isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks):
                raise ConfigError(f"{where}: stage_to_rank_map[\"{s}\"] must be a list of "
                                  f"non-negative integer ranks, got {ranks!r}")
            s2r[str(s)] = tuple(int(r) for r in ranks)
        for s in range(num_stages):
            if not s2r.get(str(s)):
                raise ConfigError(f"{where}: stage {s} has no ranks in stage_to_rank_map; give it "
                                  f"a list such as \"{s}\": [{s}]")
        # Virtual stages (PipeDream's conf, extended): the ranks of stage s may be exactly those
        # of stage s % p, where p stages come before the first one that repeats stage 0's ranks.
        p = next((s for s in range(1, num_stages) if s2r[str(s)] == s2r["0"]), num_stages)
        virtual = p < num_stages and num_stages % p == 0 and all(
            s2r[str(s)] == s2r[str(s % p)] for s in range(num_stages))
        seen: dict[int, int] = {}
        for s in range(p if virtual else num_stages):
            for r in s2r[str(s)]:
                if r in seen:
                    raise ConfigError(
                        f"{where}: rank {r} is used twice (stage {seen[r]} and stage {s}); each "
                        "rank runs exactly one stage replica, or several virtual stages: stage s "
                        "and s + p with exactly the same ranks, for every stage (p ranks per "
                        "pipeline)")
                seen[r] = s
        widths = {s: len(s2r[str(s)]) for s in range(num_stages)}
        if len(set(widths.values())) != 1:
            raise ConfigError(f"{where}: every stage needs the same number of replicas, got "
                              + ", ".join(f"stage {s}: {n}" for s, n in widths.items()))
        n = len(seen)
        if sorted(seen) != list(range(n)):
            missing = sorted(set(range(n)) - set(seen))
            raise ConfigError(f"{where}: ranks must be exactly 0..{n - 1}; missing {missing}, "
                              f"found {sorted(seen)}")
        object.__setattr__(self, "module_to_stage_map", m2s)
        object.__setattr__(self, "stage_to_rank_map",
                           {str(s): s2r[str(s)] for s in range(num_stages)})
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "ranks_per_pipeline", p if virtual else num_stages)

    @property
    def num_stages(self) -> int:
        return self.module_to_stage_map[-1] + 1

    @property
    def num_replicas(self) -> int:
        return len(self.stage_to_rank_map["0"])

    @property
    def stages_per_rank(self) -> int:
        """Stages each rank holds: 1, or v > 1 virtual stages (stage s on the ranks of s % p)."""
        return self.num_stages // self.ranks_per_pipeline

    @property
    def world_size(self) -> int:
        return self.ranks_per_pipeline * self.num_replicas

    def rank(self, stage: int, replica: int) -> int:
        return self.stage_to_rank_map[str(stage)][replica]

    def modules_of_stage(self, stage: int) -> list[int]:
        return [k for k, s in enumerate(self.module_to_stage_map) if s == stage]

    def to_dict(self) -> dict:
        return {"module_to_stage_map": list(self.module_to_stage_map),
                "stage_to_rank_map": {k: list(v) for k, v in self.stage_to_rank_map.items()}}

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "<dict>") -> "PipelineConfig":
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: expected a JSON object with module_to_stage_map and "
                              f"stage_to_rank_map, got {type(d).__name__}")
        missing = [k for k in ("module_to_stage_map", "stage_to_rank_map") if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing key(s) {missing}; a conf.json looks like "
                              '{"module_to_stage_map": [0, 1, 1], '
                              '"stage_to_rank_map": {"0": [0], "1": [1]}}')
        return cls(d["module_to_stage_map"], d["stage_to_rank_map"], source=source)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "PipelineConfig":
        path = os.fspath(path)
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such conf file (pass --config_path with an "
                              "existing conf.json)") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read conf file: {e.strerror}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            # PipeDream's README prints its conf as a Python dict ({'module_to_stage_map': ...});
            # a conf pasted from there is read as the literal it is (never evaluated as code)
            try:
                d = ast.literal_eval(text.strip())
            except (ValueError, SyntaxError):
                raise ConfigError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}"
                                  ) from None
        return cls.from_dict(d, source=path)


@dataclass(frozen=True)
class ActorResources:
    """What each stage-replica actor asks Ray for, and how many torch threads it uses.

    Fractional CPUs let more stage actors than cores share a small machine (e.g. 6 actors with
    ``num_cpus=0.25`` on 2 cores). ``num_gpus`` > 0 puts each replica on a GPU and selects NCCL.
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    torch_threads: int = 1
    placement_strategy: str = "PACK"

    def __post_init__(self) -> None:
        if self.num_cpus < 0:
            raise ConfigError(f"ActorResources.num_cpus must be >= 0, got {self.num_cpus}")
        if self.num_gpus < 0:
            raise ConfigError(f"ActorResources.num_gpus must be >= 0, got {self.num_gpus}")
        if self.torch_threads < 1:
            raise ConfigError(f"ActorResources.torch_threads must be >= 1, got "
                              f"{self.torch_threads}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ConfigError(f"ActorResources.placement_strategy must be PACK, SPREAD, "
                              f"STRICT_PACK or STRICT_SPREAD, got {self.placement_strategy!r}")

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"


@dataclass(frozen=True)
class StageOptions:
    """Per-stage execution options.

    ``recompute``: stage indices that keep only their inputs during forward and recompute the
    forward during backward (``torch.utils.checkpoint``). ``autocast_bf16``: run forward in bf16
    autocast on GPU; weights, gradients and optimizer state stay fp32.
    """

    recompute: tuple[int, ...] = ()
    autocast_bf16: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "recompute", tuple(int(s) for s in self.recompute))


@dataclass(frozen=True)
class CommConfig:
    """Collective communication settings.

    ``timeout_s`` bounds every wait on a peer (activation, gradient, all-reduce), on the CPU and
    the GPU: a peer that died or hangs produces an error naming the stage and replica instead of
    a hang. ``backend``: "auto" (or "nccl", which insists on GPU actors) sends CUDA tensors over
    NCCL and CPU tensors over GLOO (torch's ``cpu:gloo,cuda:nccl`` groups); "gloo" sends
    everything over GLOO, CUDA tensors through host memory.
    """

    timeout_s: float = 120.0
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ConfigError(f"CommConfig.timeout_s must be > 0, got {self.timeout_s}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"CommConfig.backend must be auto, gloo or nccl, got "
                              f"{self.backend!r}")
