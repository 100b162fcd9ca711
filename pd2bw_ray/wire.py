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


def to_wire(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        if x.device.type == "cpu" and x.dtype in _NUMPY_DTYPES and x.layout == torch.strided:
            return WireTensor(x.detach().resolve_conj().resolve_neg().numpy())
        return x
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(to_wire(v) for v in x)
    if isinstance(x, list):
        return [to_wire(v) for v in x]
    if isinstance(x, dict):
        return {k: to_wire(v) for k, v in x.items()}
    return x


def from_wire(x: Any) -> Any:
    if isinstance(x, WireTensor):
        a = x.array
        # Buffers Ray hands over are read-only; torch warns on those, and a stage may write
        # into its inputs, so those are copied (small: inputs and targets of microbatches).
        return torch.from_numpy(a if a.flags.writeable else a.copy())
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(from_wire(v) for v in x)
    if isinstance(x, list):
        return [from_wire(v) for v in x]
    if isinstance(x, dict):
        return {k: from_wire(v) for k, v in x.items()}
    return x
