"""Pipeline checkpoints: tensors in safetensors, metadata in JSON, written atomically, verified.

Layout of one checkpoint (a directory ``<root>/step-00000123``)::

    manifest.json                   format, step, schedule, conf, versions, per-file sha256, extra
    stage000.weights.safetensors    newest weights W(t) of stage 0 (canonical names) + buffers
    stage000.previous.safetensors   W(t-1) (2bw only: step t runs on it)
    stage000.optimizer.safetensors  optimizer state tensors, keys "<param name>::<state key>"
    stage000.optimizer.json         optimizer hyper-parameters and non-tensor state
    rng.safetensors                 every stage replica's torch RNG state (dropout)

A checkpoint is written into a hidden temporary directory next to its final place, every file is
fsync'ed, ``manifest.json`` (with the checksums) is written last, and the directory is renamed into
place: a crash mid-write never leaves a directory that looks complete. Loading verifies every
checksum; ``latest_checkpoint`` reports a corrupted checkpoint and falls back to the one before.
Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load as st_load

FORMAT = "pd2bw-checkpoint/1"
STEP_PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not fit the pipeline."""


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint on disk."""

    path: Path
    manifest: dict

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def extra(self) -> dict:
        return dict(self.manifest.get("extra", {}))

    def read(self, name: str) -> dict[str, torch.Tensor]:
        return st_load((self.path / name).read_bytes())

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text())


def stage_file(stage: int, what: str) -> str:
    return f"stage{stage:03d}.{what}"


# ------------------------------------------------------------------------------------------------
# optimizer state <-> (tensors, JSON)


def _jsonable(x: Any) -> Any:
    if isinstance(x, tuple):
        return {"__tuple__": [_jsonable(v) for v in x]}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, float) and x != x:
        return {"__float__": "nan"}
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    raise CheckpointError(f"cannot store optimizer setting of type {type(x).__name__} as JSON")


def _from_json(x: Any) -> Any:
    if isinstance(x, dict):
        if set(x) == {"__tuple__"}:
            return tuple(_from_json(v) for v in x["__tuple__"])
        if set(x) == {"__float__"}:
            return float(x["__float__"])
        return {k: _from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    return x


def optimizer_to_files(state_dict: Mapping[str, Any], names: list[str]
                       ) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` (params indexed 0..n-1 in ``names`` order) into tensors
    keyed ``"<name>::<key>"`` and JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for i, st in state_dict["state"].items():
        name = names[int(i)]
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}::{key}"] = v.detach().cpu().contiguous()
            else:
                other.setdefault(name, {})[key] = _jsonable(v)
    meta = {"names": names, "param_groups": _jsonable(state_dict["param_groups"]),
            "other_state": other}
    return tensors, meta


def optimizer_from_files(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                         names: list[str]) -> dict[str, Any]:
    saved_names = list(meta["names"])
    if saved_names != names:
        raise CheckpointError(f"optimizer state is for parameters {saved_names[:3]}..., the stage "
                              f"has {names[:3]}...")
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        name, _, k = key.partition("::")
        state.setdefault(index[name], {})[k] = t
    for name, rest in meta.get("other_state", {}).items():
        state.setdefault(index[name], {}).update(_from_json(rest))
    return {"state": state, "param_groups": _from_json(meta["param_groups"])}


# ------------------------------------------------------------------------------------------------
# writing


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(root: str | os.PathLike, step: int, files: Mapping[str, bytes],
                     manifest: Mapping[str, Any], keep: int | None = None) -> Path:
    """Write ``files`` and a manifest (with their checksums) as ``<root>/step-<step>``,
    atomically. ``keep``: delete all but the newest ``keep`` checkpoints afterwards."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{STEP_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        checksums = {}
        for name, data in files.items():
            _write(tmp / name, data)
            checksums[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        full = dict(manifest)
        full.update({"format": FORMAT, "step": step, "files": checksums,
                     "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        _write(tmp / "manifest.json", (json.dumps(full, indent=1) + "\n").encode())
        _fsync_dir(tmp)
        if final.exists():   # re-checkpointing the same step: swap, then drop the old one
            old = root / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------------------
# reading


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete-looking checkpoint directories under ``root``, oldest first (temporary
    directories of interrupted writes are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit():
            out.append(p)
    return sorted(out, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint: manifest present and well-formed, every file present with
    its recorded size and sha256."""
    path = Path(path)
    mpath = path / "manifest.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not mpath.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no manifest.json)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mpath}: corrupted manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: not a {FORMAT} manifest")
    for name, info in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: file {name} is missing")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{f}: truncated or altered ({size} bytes, manifest says "
                                  f"{info['bytes']})")
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"{f}: corrupted (sha256 does not match the manifest)")
    return Checkpoint(path, manifest)


def latest_checkpoint(root: str | os.PathLike,
                      report: Callable[[str], None] = print) -> Checkpoint | None:
    """The newest checkpoint under ``root`` that verifies; each one that does not is reported
    (``report``) and skipped. None if there is none."""
    for path in reversed(list_checkpoints(root)):
        try:
            return open_checkpoint(path)
        except CheckpointError as e:
            report(f"[pd2bw] skipping checkpoint: {e}")
    return None


def resolve_checkpoint(path: str | os.PathLike,
                       report: Callable[[str], None] = print) -> Checkpoint:
    """A checkpoint directory, or the newest valid checkpoint under a root directory."""
    p = Path(path)
    if (p / "manifest.json").exists():
        return open_checkpoint(p)
    ck = latest_checkpoint(p, report)
    if ck is None:
        raise CheckpointError(f"{p}: no complete checkpoint found (expected {STEP_PREFIX}* "
                              "directories with a manifest.json)")
    return ck


@dataclass(frozen=True)
class CheckpointConfig:
    """Which checkpoints `prune_checkpoints` keeps under a root: every one whose ``extra`` marks
    it with ``keep_marked`` (a job's end-of-epoch checkpoints, which fine-tuning and exports name
    by epoch) and the newest ``num_to_keep`` of the others (0: none of them)."""

    num_to_keep: int = 2
    keep_marked: str = "end_of_epoch"

    def __post_init__(self) -> None:
        if isinstance(self.num_to_keep, bool) or not isinstance(self.num_to_keep, int) \
                or self.num_to_keep < 0:
            raise ValueError(f"CheckpointConfig.num_to_keep must be an integer >= 0, got "
                             f"{self.num_to_keep!r}")


def prune_checkpoints(root: str | os.PathLike, config: CheckpointConfig) -> list[Path]:
    """Delete the checkpoints under ``root`` that ``config`` does not keep; returns them. A
    checkpoint whose manifest cannot be read is left alone (``latest_checkpoint`` reports it)."""
    unmarked = []
    for path in list_checkpoints(root):
        try:
            extra = json.loads((path / "manifest.json").read_text()).get("extra", {})
        except (OSError, json.JSONDecodeError):
            continue
        if not extra.get(config.keep_marked, False):
            unmarked.append(path)
    doomed = unmarked[:len(unmarked) - config.num_to_keep] if config.num_to_keep else unmarked
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# ------------------------------------------------------------------------------------------------
# The files of a pipeline's state


def stage_files(exported: Mapping[tuple[int, int], Mapping[str, Any]]
                ) -> tuple[dict[str, bytes], list[dict[str, Any]]]:
    """The files of a checkpoint (see the layout above) from every stage replica's
    ``StageActor.export_state`` (weights and optimizer from replica 0, RNG from all), and the
    manifest's per-stage entries."""
    from safetensors.torch import save as st_save

    files: dict[str, bytes] = {}
    stages = []
    rng: dict[str, torch.Tensor] = {}
    for (s, r), st in sorted(exported.items()):
        rng[f"stage{s}.replica{r}"] = st["rng"]
        if "cuda_rng" in st:
            rng[f"stage{s}.replica{r}.cuda"] = st["cuda_rng"]
        if r != 0:
            continue
        names = list(st["weights"])
        files[stage_file(s, "weights.safetensors")] = st_save(
            {**st["weights"], **{f"buffer::{k}": v for k, v in st["buffers"].items()}})
        if st["previous"] is not None:
            files[stage_file(s, "previous.safetensors")] = st_save(st["previous"])
        if st["optimizer"] is not None:
            tensors, meta = optimizer_to_files(st["optimizer"], names)
            files[stage_file(s, "optimizer.safetensors")] = st_save(tensors)
            files[stage_file(s, "optimizer.json")] = json.dumps(meta).encode()
        stages.append({"stage": s, "param_names": names,
                       "newest_version": st["newest_version"],
                       "previous_version": st["previous_version"]})
    files["rng.safetensors"] = st_save(rng)
    return files, stages


def stage_states(ck: Checkpoint, num_replicas: int) -> dict[tuple[int, int], dict[str, Any]]:
    """The inverse of ``stage_files``: each stage replica's ``StageActor.import_state``
    argument (every replica of a stage gets the stage's weights; the RNG state it had, if the
    checkpoint has one for it)."""
    rng = ck.read("rng.safetensors")
    out: dict[tuple[int, int], dict[str, Any]] = {}
    for info in ck.manifest["stages"]:
        s = info["stage"]
        weights = ck.read(stage_file(s, "weights.safetensors"))
        state: dict[str, Any] = {
            "newest_version": info["newest_version"],
            "weights": {k: v for k, v in weights.items() if not k.startswith("buffer::")},
            "buffers": {k[len("buffer::"):]: v for k, v in weights.items()
                        if k.startswith("buffer::")},
            "previous": None, "previous_version": info["previous_version"],
            "optimizer": None,
        }
        if (ck.path / stage_file(s, "previous.safetensors")).exists():
            state["previous"] = ck.read(stage_file(s, "previous.safetensors"))
        if (ck.path / stage_file(s, "optimizer.safetensors")).exists():
            state["optimizer"] = optimizer_from_files(
                ck.read(stage_file(s, "optimizer.safetensors")),
                ck.read_json(stage_file(s, "optimizer.json")), info["param_names"])
        for r in range(num_replicas):
            out[(s, r)] = {**state, "rng": rng.get(f"stage{s}.replica{r}"),
                           "cuda_rng": rng.get(f"stage{s}.replica{r}.cuda")}
    return out
