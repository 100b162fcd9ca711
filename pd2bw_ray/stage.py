"""The math of one stage replica: weight versions, activation stash, gradients, optimizer step.

A plain class, no Ray and no communication: the executor feeds it received activations and
gradients and sends what it returns. Tested in-process against single-process references.

Weight versions live in two *slots* of leaf tensors. A forward runs the stage's modules with their
parameters pointing at the slot holding the microbatch's version (repointed only when the version
changes, which consecutive microbatches rarely do), and the autograd graph keeps references to
exactly those tensors, so a microbatch's backward uses the version of its forward (weight
stashing) without copying weights. An update writes the new version into the slot not holding the
newest one; the schedule guarantees no microbatch in flight still uses it.

Gradients are accumulated per step, not per slot: under 2bw steps 0 and 1 both run on ``W(0)``
(``W(-1) = W(0)``) and their backwards interleave, so each backward accumulates into its own step's
buffers.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .split_backward import SplitBackward, plan_split

OptimizerFactory = Callable[[list[tuple[str, nn.Parameter]]], torch.optim.Optimizer]
#: param-group settings of torch's optimizers that choose a kernel, not the math
KERNEL_CHOICES = ("fused", "foreach")


class StageError(RuntimeError):
    """Something went wrong inside a stage; the message names the stage and what to do."""


def as_tuple(x: Any) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


@dataclass
class _Stashed:
    """What a microbatch in flight keeps between its forward and its backward."""

    step: int
    version: int
    inputs: list[torch.Tensor]            # floating inputs that need a gradient (stage > 0)
    # One entry per floating output sent downstream, in order (the gradient message's layout);
    # None where that output needs no gradient, so received gradients pair by position.
    outputs: list[torch.Tensor | None] = field(default_factory=list)
    loss: torch.Tensor | None = None       # last stage: the scaled loss
    nbytes: int = 0                        # activation memory it holds (unique storages)
    # A split backward: what ``backward_input`` found and recorded, kept for ``backward_weight``
    split: SplitBackward | None = None
    # A split backward with no input to differentiate (the first stage): ``backward_input``
    # computed nothing and kept its output gradients here; ``backward_weight`` runs the whole
    # backward with them
    deferred: tuple[torch.Tensor, ...] | None = None


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _SavedBytes:
    """Counts the bytes of the distinct storages autograd saves for backward during a forward,
    leaving out the weights (they belong to a version, not to the microbatch)."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.storages: dict[int, int] = {}

    def add(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in self.exclude:
            self.storages[ptr] = st.nbytes()

    def hooks(self):
        def pack(t):
            self.add(t)
            # Detached: a saved output kept with its grad_fn would make a cycle (node -> saved
            # tensor -> node) that only a backward without retain_graph breaks; a split
            # backward retains the graph in every pass, and the cycle would outlive the
            # microbatch. The data and version counter are the same tensor's.
            return t.detach()
        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


class Stage:
    """One stage replica's modules, weights (at most two versions) and optimizer.

    ``modules`` maps global module index -> module; parameters are named ``"<index>.<name>"``.
    ``local_ties`` lists groups of such names on this stage that are one logical parameter
    (they share one tensor). ``grad_scale`` multiplies each microbatch loss (``1/(m*w)``) so that
    summing gradients over microbatches and replicas gives the mean.
    """

    def __init__(
        self,
        *,
        stage: int,
        num_stages: int,
        modules: Mapping[int, nn.Module],
        optimizer_factory: OptimizerFactory,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        local_ties: Sequence[Sequence[str]] = (),
        grad_scale: float = 1.0,
        device: str | torch.device = "cpu",
        recompute: bool = False,
        autocast_bf16: bool = False,
        initial_state: Mapping[str, torch.Tensor] | None = None,
        first_version: int = 0,
        two_versions: bool = True,
        lr_schedule: Callable[[int], float] | None = None,
    ) -> None:
        self.stage = stage
        self.num_stages = num_stages
        self.is_last = stage == num_stages - 1
        if self.is_last and loss_fn is None:
            raise StageError(f"stage {stage} is the last stage and needs a loss_fn")
        self.device = torch.device(device)
        self.module_ids = sorted(modules)
        self.modules = {k: modules[k].to(self.device) for k in self.module_ids}
        for mod in self.modules.values():
            mod.train()
        self.loss_fn = loss_fn
        self.grad_scale = grad_scale
        self.recompute = recompute
        self.autocast_bf16 = autocast_bf16
        self.two_versions = two_versions   # 2bw; flush/gpipe update their single version in place

        # Canonical name of every parameter; tied names on this stage share one canonical name.
        alias: dict[str, str] = {}
        for group in local_ties:
            group = [n for n in group]
            for n in group[1:]:
                alias[n] = group[0]
        self.alias = alias
        self.param_names: list[str] = []       # canonical names, in a fixed order
        self._module_param_names: dict[int, list[tuple[str, str]]] = {}  # k -> [(local, canon)]
        seen: set[str] = set()
        for k in self.module_ids:
            pairs = []
            for local, _ in self.modules[k].named_parameters(remove_duplicate=False):
                full = f"{k}.{local}"
                canon = alias.get(full, full)
                pairs.append((local, canon))
                if canon not in seen:
                    seen.add(canon)
                    self.param_names.append(canon)
            self._module_param_names[k] = pairs
        known = {f"{k}.{local}" for k in self.module_ids for local, _ in
                 self.modules[k].named_parameters(remove_duplicate=False)}
        for group in local_ties:
            for n in group:
                if n not in known:
                    raise StageError(f"stage {stage}: tied parameter {n!r} is not a parameter of "
                                     f"modules {self.module_ids}")
        params = self._module_params()
        if initial_state is not None:
            self._load_into(params, initial_state)
        for group in local_ties:
            ref = params[group[0]]
            for n in group[1:]:
                if params[n].shape != ref.shape:
                    raise StageError(f"stage {stage}: tied parameters {group[0]!r} "
                                     f"{tuple(ref.shape)} and {n!r} {tuple(params[n].shape)} "
                                     "differ in shape")

        # Slot 0 shares storage with the modules' own parameters (no copy).
        slot0 = {n: params[n].detach().requires_grad_(True) for n in self.param_names}
        self._slots: list[dict[str, torch.Tensor] | None] = [slot0, None]
        self._slot_version: list[int | None] = [first_version, None]
        self._newest = 0
        # Optimizer parameters alias the storage of the slot holding the newest version, so the
        # optimizer state (keyed by these objects) follows the weights from slot to slot.
        # They get their own autograd version counter (``.data`` aliasing, not ``detach()``,
        # which would share slot 0's): an optimizer step on one slot must not invalidate the
        # graphs of microbatches in flight on the other.
        self._opt_params = {}
        for n in self.param_names:
            p = nn.Parameter(torch.empty(0, dtype=slot0[n].dtype, device=slot0[n].device))
            p.data = slot0[n].data
            self._opt_params[n] = p
        # A stage without parameters (e.g. an activation function alone) has no optimizer; its
        # updates only advance the version.
        self.optimizer = (optimizer_factory([(n, self._opt_params[n]) for n in self.param_names])
                          if self.param_names else None)
        # LambdaLR semantics: update t uses lr = initial_lr * lr_schedule(t) in every group.
        # initial_lr lives in the param groups, so it is saved with the optimizer state.
        self.lr_schedule = lr_schedule
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        # (module owning the parameter, its attribute name, canonical name) for _bind
        self._param_owners: list[tuple[nn.Module, str, str]] = []
        for k in self.module_ids:
            for local, canon in self._module_param_names[k]:
                prefix, _, leaf = local.rpartition(".")
                self._param_owners.append((self.modules[k].get_submodule(prefix), leaf, canon))
        self._bound: Mapping[str, torch.Tensor] | None = None
        self._stash: dict[tuple[int, int], _Stashed] = {}
        self._grads: dict[int, dict[str, torch.Tensor | None]] = {}
        self.peak_stash_bytes = 0
        self.peak_in_flight = 0

    # ---------------------------------------------------------------- parameters and versions

    def _module_params(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for k in self.module_ids:
            for local, p in self.modules[k].named_parameters(remove_duplicate=False):
                out[f"{k}.{local}"] = p
        return out

    def _load_into(self, params: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]):
        buffers = {f"{k}.{local}": b for k in self.module_ids
                   for local, b in self.modules[k].state_dict(keep_vars=True).items()
                   if f"{k}.{local}" not in params}
        for name, target in list(params.items()) + list(buffers.items()):
            if name not in state:
                continue
            src = state[name]
            if tuple(src.shape) != tuple(target.shape):
                raise StageError(f"stage {self.stage}: initial state {name!r} has shape "
                                 f"{tuple(src.shape)}, the module expects {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(src.to(target.dtype))

    def versions(self) -> list[int]:
        """Weight versions held now (at most two)."""
        return sorted(v for v in self._slot_version if v is not None)

    @property
    def newest_version(self) -> int:
        v = self._slot_version[self._newest]
        assert v is not None
        return v

    def _slot_of(self, version: int) -> dict[str, torch.Tensor]:
        for i, v in enumerate(self._slot_version):
            if v == version:
                slot = self._slots[i]
                assert slot is not None
                return slot
        raise StageError(f"stage {self.stage}: weight version {version} is not held (holds "
                         f"{self.versions()}); the schedule and the stage disagree")

    def _bind(self, slot: Mapping[str, torch.Tensor]) -> None:
        """Point every module parameter at ``slot``'s tensor (tied names at the shared one).
        Like ``torch.func.functional_call`` without restoring afterwards: the modules keep the
        slot's tensors until a forward (or a recomputation) needs the other slot."""
        if self._bound is slot:
            return
        for owner, leaf, canon in self._param_owners:
            owner._parameters[leaf] = slot[canon]
        self._bound = slot

    def named_weights(self, version: int | None = None) -> dict[str, torch.Tensor]:
        """Parameters (all names, tied aliases included) and buffers of a version (newest)."""
        slot = self._slot_of(self.newest_version if version is None else version)
        out: dict[str, torch.Tensor] = {}
        for k in self.module_ids:
            params = dict(self._module_param_names[k])
            for local, t in self.modules[k].state_dict(keep_vars=True).items():
                out[f"{k}.{local}"] = (slot[params[local]] if local in params else t).detach()
        return out

    # ---------------------------------------------------------------- forward and backward

    def _run_chain(self, slot: Mapping[str, torch.Tensor], *inputs: torch.Tensor) -> tuple:
        x: Any = inputs
        self._bind(slot)
        for k in self.module_ids:
            x = self.modules[k](*as_tuple(x))
        return as_tuple(x)

    def _autocast(self):
        if not self.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def forward(self, step: int, microbatch: int, version: int, inputs: Sequence[Any],
                targets: Any = None) -> tuple | float:
        """Run the stage's modules on ``version``. Returns the outputs to send downstream, or on
        the last stage the (unscaled) loss value. The graph is stashed until ``backward``."""
        key = (step, microbatch)
        if key in self._stash:
            raise StageError(f"stage {self.stage}: forward of step {step} microbatch "
                             f"{microbatch} while it is already in flight")
        slot = self._slot_of(version)
        inputs = [x.to(self.device) if isinstance(x, torch.Tensor) else x for x in inputs]
        grad_inputs: list[torch.Tensor] = []
        if self.stage > 0:
            for x in inputs:
                if isinstance(x, torch.Tensor) and is_float(x):
                    x.requires_grad_(True)
                    grad_inputs.append(x)
        saved = _SavedBytes({t.untyped_storage().data_ptr() for t in slot.values()})
        with self._autocast(), saved.hooks():
            if self.recompute:
                out = checkpoint(self._run_chain, slot, *inputs, use_reentrant=False)
            else:
                out = self._run_chain(slot, *inputs)
        with self._autocast():
            entry = _Stashed(step, version, grad_inputs)
            if self.is_last:
                last = out[0] if len(out) == 1 else out
                loss = self.loss_fn(last, targets)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise StageError(f"stage {self.stage}: loss_fn must return a scalar tensor, "
                                     f"got {type(loss).__name__} {getattr(loss, 'shape', '')}")
                entry.loss = loss.reshape(()) * self.grad_scale
                self._remember(key, entry, saved, inputs)
                return float(loss.detach())
        for o in out:
            if not isinstance(o, torch.Tensor):
                raise StageError(f"stage {self.stage}: module {self.module_ids[-1]} returned a "
                                 f"{type(o).__name__}; stage outputs must be tensors or tuples "
                                 "of tensors")
        entry.outputs = [o if o.requires_grad else None for o in out if is_float(o)]
        self._remember(key, entry, saved, list(inputs) + list(out))
        return tuple(o.detach() for o in out)

    def _remember(self, key, entry: _Stashed, saved: _SavedBytes, held) -> None:
        for t in held:
            if isinstance(t, torch.Tensor):
                saved.add(t)
        entry.nbytes = saved.total
        self._stash[key] = entry
        self.peak_in_flight = max(self.peak_in_flight, len(self._stash))
        self.peak_stash_bytes = max(self.peak_stash_bytes,
                                    sum(e.nbytes for e in self._stash.values()))

    @staticmethod
    def grad_layout(outputs: Sequence[torch.Tensor]) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        """Dtype and shape of the gradient message for these outputs: one per floating output."""
        return [(o.dtype, tuple(o.shape)) for o in outputs if is_float(o)]

    def backward(self, step: int, microbatch: int,
                 output_grads: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Backpropagate a stashed microbatch; gradients of the weights accumulate into the
        step's buffers. ``output_grads`` has one tensor per floating output sent downstream.
        Returns the gradient of each floating input (zeros where an input was unused)."""
        key = (step, microbatch)
        entry = self._stash.pop(key, None)
        if entry is None:
            raise StageError(f"stage {self.stage}: backward of step {step} microbatch "
                             f"{microbatch} without its forward")
        self._accumulate(step, entry, output_grads)
        result = []
        for x in entry.inputs:
            result.append(x.grad if x.grad is not None else torch.zeros_like(x))
            x.grad = None
        return result

    def _accumulate(self, step: int, entry: _Stashed,
                    output_grads: Sequence[torch.Tensor] | None) -> None:
        """Run a microbatch's whole backward, its weight gradients accumulating into the step's
        buffers (autograd adds into them in place; the first microbatch's become them)."""
        slot = self._slot_of(entry.version)
        buf = self._grads.setdefault(step, {})
        for n in self.param_names:
            slot[n].grad = buf.get(n)
        try:
            roots, grads = self._roots(entry, output_grads)
            if roots:
                torch.autograd.backward(roots, grads)
        finally:
            for n in self.param_names:
                buf[n] = slot[n].grad
                slot[n].grad = None

    def _roots(self, entry: _Stashed, output_grads: Sequence[torch.Tensor] | None
               ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Where a microbatch's backward starts: the scaled loss on the last stage, else the
        outputs that need a gradient with their received gradients (one per floating output,
        paired by position)."""
        if self.is_last:
            assert entry.loss is not None
            return [entry.loss], None
        if output_grads is None:
            raise StageError(f"stage {self.stage}: backward needs output gradients")
        float_outs = entry.outputs
        if len(output_grads) != len(float_outs):
            raise StageError(f"stage {self.stage}: got {len(output_grads)} output "
                             f"gradients for {len(float_outs)} floating outputs")
        outs, grads = [], []
        for o, g in zip(float_outs, output_grads):
            if o is not None:
                outs.append(o)
                grads.append(g.to(o.device, o.dtype))
        return outs, grads

    def backward_input(self, step: int, microbatch: int,
                       output_grads: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The first half of a split backward (Zero Bubble's ``I``): the gradient of each floating
        input, as ``backward`` returns it, and no weight gradient. The graph stays (with the
        microbatch in flight) until ``backward_weight``."""
        entry = self._stash.get((step, microbatch))
        if entry is None:
            raise StageError(f"stage {self.stage}: input-gradient backward of step {step} "
                             f"microbatch {microbatch} without its forward")
        if entry.split is not None or entry.deferred is not None:
            raise StageError(f"stage {self.stage}: a second input-gradient backward of step "
                             f"{step} microbatch {microbatch}")
        if not entry.inputs:
            # Nothing to differentiate here (the first stage): the whole backward waits for W,
            # which runs it as one pass, as an unsplit backward would.
            entry.deferred = tuple(output_grads or ())
            entry.nbytes += _nbytes(entry.deferred)
            self.peak_stash_bytes = max(self.peak_stash_bytes,
                                        sum(e.nbytes for e in self._stash.values()))
            return []
        roots, grads = self._roots(entry, output_grads)
        weights = [self._slot_of(entry.version)[n] for n in self.param_names]
        entry.split = plan_split(roots, grads, entry.inputs, weights)
        got = entry.split.input_pass(entry.inputs)
        # until W, the microbatch also holds the gradients recorded for it
        entry.nbytes += entry.split.recorded_bytes()
        self.peak_stash_bytes = max(self.peak_stash_bytes,
                                    sum(e.nbytes for e in self._stash.values()))
        return [g if g is not None else torch.zeros_like(x) for g, x in zip(got, entry.inputs)]

    def backward_weight(self, step: int, microbatch: int) -> None:
        """The second half of a split backward (``W``): the weight gradients of a microbatch
        whose ``backward_input`` ran, accumulated into the step's buffers as ``backward`` does;
        the microbatch's graph and activations are freed."""
        key = (step, microbatch)
        entry = self._stash.get(key)
        if entry is None or (entry.split is None and entry.deferred is None):
            raise StageError(f"stage {self.stage}: weight-gradient backward of step {step} "
                             f"microbatch {microbatch} before its input-gradient backward")
        del self._stash[key]
        if entry.deferred is not None:
            self._accumulate(step, entry, None if self.is_last else list(entry.deferred))
            return
        slot = self._slot_of(entry.version)
        buf = self._grads.setdefault(step, {})
        got = entry.split.weight_pass([slot[n] for n in self.param_names])
        for n, g in zip(self.param_names, got):
            if g is None:
                continue
            cur = buf.get(n)
            # the first one is copied: autograd may hand out a tensor it also gave elsewhere
            buf[n] = g.detach().clone() if cur is None else cur.add_(g)

    def in_flight(self) -> list[tuple[int, int]]:
        return sorted(self._stash)

    # ---------------------------------------------------------------- update

    def take_grads(self, step: int) -> list[torch.Tensor]:
        """The step's accumulated gradients, one per canonical parameter (zeros if unused)."""
        if any(e.step == step for e in self._stash.values()):
            raise StageError(f"stage {self.stage}: gradients of step {step} taken while some of "
                             "its microbatches are still in flight")
        buf = self._grads.pop(step, {})
        slot = self._slots[self._newest]
        assert slot is not None
        return [buf.get(n) if buf.get(n) is not None else torch.zeros_like(slot[n])
                for n in self.param_names]

    def apply_update(self, step: int, grads: Sequence[torch.Tensor], clip_coef: float = 1.0) -> int:
        """Create version ``step + 1`` from the newest version and ``grads`` (already averaged
        over microbatches and replicas, tied copies summed), scaled by ``clip_coef``.

        The new version goes into the slot not holding the newest version; its previous
        contents must not be used by any microbatch in flight."""
        new_version = step + 1
        if new_version != self.newest_version + 1:
            raise StageError(f"stage {self.stage}: update of step {step} would create version "
                             f"{new_version}, but the newest is {self.newest_version}")
        target = 1 - self._newest if self.two_versions else self._newest
        old = self._slot_version[target]
        if old is not None and any(e.version == old for e in self._stash.values()):
            raise StageError(f"stage {self.stage}: cannot overwrite version {old}: microbatches "
                             f"{[k for k, e in self._stash.items() if e.version == old]} still "
                             "use it (a third version would be needed)")
        src = self._slots[self._newest]
        assert src is not None
        if self._slots[target] is None:
            self._slots[target] = {n: torch.empty_like(src[n]).requires_grad_(True)
                                   for n in self.param_names}
        dst = self._slots[target]
        if dst is not src:
            with torch.no_grad():
                for n in self.param_names:
                    dst[n].copy_(src[n])
        for n, g in zip(self.param_names, grads):
            p = self._opt_params[n]
            p.data = dst[n].data
            p.grad = g if clip_coef == 1.0 else g * clip_coef
        if self.optimizer is not None:
            if self.lr_schedule is not None:
                factor = float(self.lr_schedule(step))
                for group in self.optimizer.param_groups:
                    group["lr"] = group["initial_lr"] * factor
            self.optimizer.step()
        for p in self._opt_params.values():
            p.grad = None
        self._slot_version[target] = new_version
        self._newest = target
        return new_version

    def memory(self) -> dict[str, int]:
        """Bytes held now: weights (every version held), gradient buffers, optimizer state,
        stashed activations; and the peak of stashed activations and of microbatches in flight
        since the last ``reset_peaks``."""
        weights = sum(_nbytes(slot.values()) for slot in self._slots if slot is not None)
        grads = sum(_nbytes(g for g in buf.values() if g is not None)
                    for buf in self._grads.values())
        optim = 0
        if self.optimizer is not None:
            for st in self.optimizer.state.values():
                optim += _nbytes(v for v in st.values() if isinstance(v, torch.Tensor))
        return {"weights": weights, "weight_versions": len(self.versions()),
                "gradients": grads, "optimizer": optim,
                "stash": sum(e.nbytes for e in self._stash.values()),
                "peak_stash": self.peak_stash_bytes, "peak_in_flight": self.peak_in_flight}

    def reset_peaks(self) -> None:
        self.peak_stash_bytes = sum(e.nbytes for e in self._stash.values())
        self.peak_in_flight = len(self._stash)

    # ---------------------------------------------------------------- checkpoints

    def export_state(self) -> dict[str, Any]:
        """Everything needed to continue exactly: the newest version and (2bw) the one before,
        persistent buffers, the optimizer state. Tensors are CPU copies; names are canonical."""
        if self._stash or self._grads:
            raise StageError(f"stage {self.stage}: cannot checkpoint with microbatches in flight "
                             f"({self.in_flight()}); checkpoint between train() calls")
        newest = self._slots[self._newest]
        assert newest is not None
        prev_i = 1 - self._newest
        prev = self._slots[prev_i] if self._slot_version[prev_i] is not None else None
        buffers = {}
        for k in self.module_ids:
            params = {local for local, _ in self._module_param_names[k]}
            for local, b in self.modules[k].state_dict(keep_vars=True).items():
                if local not in params:
                    buffers[f"{k}.{local}"] = b.detach().cpu().clone()
        return {
            "newest_version": self.newest_version,
            "weights": {n: t.detach().cpu().clone() for n, t in newest.items()},
            "previous_version": self._slot_version[prev_i] if prev is not None else None,
            "previous": ({n: t.detach().cpu().clone() for n, t in prev.items()}
                         if prev is not None else None),
            "buffers": buffers,
            "optimizer": (self.optimizer.state_dict() if self.optimizer is not None else None),
        }

    def import_state(self, state: Mapping[str, Any]) -> None:
        """Inverse of ``export_state``. A state without a previous version continues 2bw with
        ``W(t-1) := W(t)``, as training starts with ``W(-1) = W(0)``."""
        if self._stash or self._grads:
            raise StageError(f"stage {self.stage}: cannot load a checkpoint with microbatches "
                             "in flight")
        weights = state["weights"]
        missing = [n for n in self.param_names if n not in weights]
        unknown = [n for n in weights if n not in self.param_names]
        if missing or unknown:
            raise StageError(f"stage {self.stage}: checkpoint weights do not match the stage's "
                             f"parameters: missing {missing[:5]}, unknown {unknown[:5]}")
        newest_v = int(state["newest_version"])
        prev = state.get("previous") if self.two_versions else None
        prev_v = state.get("previous_version") if prev is not None else None
        if self.two_versions and prev is None:
            prev, prev_v = weights, newest_v - 1

        def fill(i: int, values: Mapping[str, torch.Tensor]) -> None:
            if self._slots[i] is None:
                ref = self._slots[1 - i]
                assert ref is not None
                self._slots[i] = {n: torch.empty_like(ref[n]).requires_grad_(True)
                                  for n in self.param_names}
            slot = self._slots[i]
            assert slot is not None
            with torch.no_grad():
                for n in self.param_names:
                    if tuple(values[n].shape) != tuple(slot[n].shape):
                        raise StageError(f"stage {self.stage}: checkpoint {n} has shape "
                                         f"{tuple(values[n].shape)}, expected "
                                         f"{tuple(slot[n].shape)}")
                    slot[n].copy_(values[n])

        fill(0, weights)
        self._slot_version[0] = newest_v
        self._newest = 0
        if prev is not None:
            fill(1, prev)
            self._slot_version[1] = int(prev_v)
        else:
            self._slots[1], self._slot_version[1] = None, None
        slot0 = self._slots[0]
        assert slot0 is not None
        for n in self.param_names:
            self._opt_params[n].data = slot0[n].data
        buffers = {f"{k}.{local}": b for k in self.module_ids
                   for local, b in self.modules[k].state_dict(keep_vars=True).items()}
        with torch.no_grad():
            for name, value in state.get("buffers", {}).items():
                if name in buffers:
                    buffers[name].copy_(value)
        if self.optimizer is not None and state.get("optimizer") is not None:
            # load_state_dict keeps tensors that already have the right dtype and device: copy
            # them, so that no two stage replicas ever share optimizer state.
            saved = copy.deepcopy(state["optimizer"])
            # Which kernel runs the update (torch's fused or for-each ones: the same math) is
            # this optimizer's, as built here, not the recorded one: a checkpoint of a per-tensor
            # AdamW resumes on the fused kernel. Set before loading, so that torch places the
            # step counts where that kernel wants them.
            for recorded, built in zip(saved.get("param_groups", ()),
                                       self.optimizer.param_groups):
                for key in KERNEL_CHOICES:
                    if key in built:
                        recorded[key] = built[key]
            self.optimizer.load_state_dict(saved)

    def set_lr(self, lr: float) -> None:
        """Set every group's learning rate (the base of ``lr_schedule``, if there is one)."""
        for group in self.optimizer.param_groups if self.optimizer is not None else ():
            group["lr"] = lr
            group["initial_lr"] = lr

    def lr(self) -> float | None:
        """The learning rate of the first parameter group at the last update."""
        return self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else None


def clip_coefficient(total_norm: float, max_norm: float | None) -> float:
    """``torch.nn.utils.clip_grad_norm_``'s factor: ``min(1, max_norm / (norm + 1e-6))``."""
    if max_norm is None:
        return 1.0
    if not math.isfinite(total_norm):
        return float("nan")
    return min(1.0, max_norm / (total_norm + 1e-6))
