"""How step data travels from the driver to the stage actors.

Ray pickles a CPU torch tensor through torch's own storage pickling, about 50 microseconds a tensor
each way; a numpy array it passes as an out-of-band buffer, about 15 times faster. A chunk of
short steps carries many small tensors (inputs of every microbatch to the first stage, targets to
the last), so the driver sends CPU tensors as numpy arrays (`to_wire`) and the actor turns them
back (`from_wire`): the same values, dtype and shape, sharing the received buffer. Tensors numpy
cannot hold (bfloat16, other devices) travel as they are. Tuples, lists and dicts are walked.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# dtypes whose tensors convert to numpy and back unchanged
_NUMPY_DTYPES = frozenset({
    torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128})


class WireTensor:
    """A CPU tensor in transit, as a numpy array."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array

    def __reduce__(self):
        return (WireTensor, (self.array,))


def _map(x: Any, leaf) -> Any:
    """``leaf`` applied to every non-container in tuples (not named tuples), lists and dicts."""
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(_map(v, leaf) for v in x)
    if isinstance(x, list):
        return [_map(v, leaf) for v in x]
    if isinstance(x, dict):
        return {k: _map(v, leaf) for k, v in x.items()}
    return leaf(x)


def _tensor_to_wire(x: Any) -> Any:
    if (isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dtype in _NUMPY_DTYPES
            and x.layout == torch.strided):
        return WireTensor(x.detach().resolve_conj().resolve_neg().numpy())
    return x


def _wire_to_tensor(x: Any) -> Any:
    if isinstance(x, WireTensor):
        a = x.array
        # Buffers Ray hands over are read-only; torch warns on those, and a stage may write
        # into its inputs, so those are copied (small: inputs and targets of microbatches).
        return torch.from_numpy(a if a.flags.writeable else a.copy())
    return x


def to_wire(x: Any) -> Any:
    """``x`` with its CPU tensors as `WireTensor`."""
    return _map(x, _tensor_to_wire)


def from_wire(x: Any) -> Any:
    """Inverse of `to_wire`."""
    return _map(x, _wire_to_tensor)
