"""Moving activations and gradients between stage replicas, and reducing gradients over groups.

A ``Transport`` is what a stage executor talks to. Two implementations:

- ``DistTransport`` (Ray actors, CPU and GPU alike): torch.distributed process groups. The world is
  a ``ray.util.collective`` GLOO group (its rendezvous goes through Ray's internal KV, so no address
  or port is configured, and it leaves no actor behind). The groups this runtime needs (one per
  link, per stage, per pipeline, per tied weight) are made with ``torch.distributed.new_group`` on
  top of that world. A group whose members all compute on a GPU is a ``cpu:gloo,cuda:nccl`` group:
  CUDA tensors go over NCCL, CPU tensors over GLOO; any other group is GLOO, and CUDA tensors
  travel through host memory (a GPU stage can talk to a CPU stage). Every wait passes
  ``CommConfig.timeout_s`` to torch's work object, which for NCCL blocks the host until the GPU
  work is done or the time is up: a peer that hangs makes the waiting side fail after the timeout,
  a peer that dies makes it fail at once on GLOO ("Connection closed by peer") and after the
  timeout on NCCL. Stream order is torch's: a work object makes the current stream wait for the
  communication, and a send's buffer is kept until its work has completed.
- ``ThreadTransport``: stages as threads of one process (tests, debugging), no sockets.

Messages: an activation is a tuple of tensors of any dtype and shape, so it travels with a
fixed-size int64 header (kind, count, dtypes, shapes) in front of one packed byte payload. A
gradient message has the layout of the floating outputs it answers, which the receiver knows, so
it is only the payload.

An activation is one message, header and payload together, when its layout is the previous one on
that link (always, once a run is going): both ends remember the last layout of each link, so the
receiver knows the size to receive. When the layout changes (or on a link's first message) the
header comes in a message of the size the receiver expects, marked "payload follows", and the
payload in a second one. Receives are posted as soon as the executor knows them (``irecv``) and
completed by the backend's own thread or stream, so a message that arrives early lands in place and
nothing in Python runs until the executor needs it. NCCL matches messages by order, not by tag, so
on every link at most one activation receive is posted at a time, and gradients are taken in the
order their receives were posted (checked, on GLOO too).
"""

from __future__ import annotations

import datetime
import functools
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

Layout = list[tuple[torch.dtype, tuple[int, ...]]]

_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)
_DTYPE_CODE = {dt: i for i, dt in enumerate(_DTYPES)}
HEADER_LEN = 256
HEADER_BYTES = HEADER_LEN * 8
HEADER_SEPARATE = 0x2B3   # header magic: the payload follows in the next message
HEADER_INLINE = 0x2B4     # header magic: the payload follows in the same message
_MAX_DIMS = 8
_PER_TENSOR = 2 + _MAX_DIMS
MAX_TENSORS = (HEADER_LEN - 2) // _PER_TENSOR
_ALIGN = 16


class CommError(RuntimeError):
    """A peer did not deliver (died, hung past the timeout, or sent something unexpected)."""


# ------------------------------------------------------------------------------------------------
# Message packing


def layout_of(tensors: Sequence[torch.Tensor]) -> Layout:
    return [(t.dtype, tuple(t.shape)) for t in tensors]


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    size = _ITEMSIZE.get(dtype)
    return n * (size if size is not None else torch.empty((), dtype=dtype).element_size())


_ITEMSIZE = {dt: torch.empty((), dtype=dt).element_size() for dt in _DTYPES}


@functools.lru_cache(maxsize=256)
def _offsets_of(layout: tuple[tuple[torch.dtype, tuple[int, ...]], ...]
                ) -> tuple[tuple[int, ...], int]:
    offsets, off = [], 0
    for dt, shape in layout:
        offsets.append(off)
        off += -(-_nbytes(dt, shape) // _ALIGN) * _ALIGN
    return tuple(offsets), off


def _offsets(layout: Layout) -> tuple[tuple[int, ...], int]:
    return _offsets_of(tuple(layout))


@functools.lru_cache(maxsize=256)
def _header_of(layout: tuple[tuple[torch.dtype, tuple[int, ...]], ...], inline: bool
               ) -> torch.Tensor:
    if len(layout) > MAX_TENSORS:
        raise CommError(f"a stage output has {len(layout)} tensors; at most {MAX_TENSORS} can "
                        "travel between stages (pack them into fewer tensors)")
    h = [0] * HEADER_LEN
    h[0] = HEADER_INLINE if inline else HEADER_SEPARATE
    h[1] = len(layout)
    for j, (dt, shape) in enumerate(layout):
        if dt not in _DTYPE_CODE:
            raise CommError(f"cannot send tensors of dtype {dt} between stages")
        if len(shape) > _MAX_DIMS:
            raise CommError(f"cannot send a tensor with {len(shape)} dimensions (max {_MAX_DIMS})")
        base = 2 + j * _PER_TENSOR
        h[base] = _DTYPE_CODE[dt]
        h[base + 1] = len(shape)
        h[base + 2: base + 2 + len(shape)] = shape
    return torch.tensor(h, dtype=torch.int64)


def encode_header(layout: Layout, device: torch.device | str = "cpu", inline: bool = False
                  ) -> torch.Tensor:
    """The int64 header describing ``layout``; ``inline``: the payload follows in the same
    message (otherwise in the next one). Do not modify the result (it is cached)."""
    h = _header_of(tuple(layout), inline)
    return h if torch.device(device).type == "cpu" else h.to(device)


def decode_header(h: torch.Tensor) -> tuple[Layout, bool]:
    """The layout a header describes, and whether its payload is in the same message."""
    h = h.cpu().tolist()
    if h[0] not in (HEADER_SEPARATE, HEADER_INLINE):
        raise CommError("received a malformed activation header (stages out of step?)")
    layout = []
    for j in range(h[1]):
        base = 2 + j * _PER_TENSOR
        ndim = h[base + 1]
        layout.append((_DTYPES[h[base]], tuple(h[base + 2: base + 2 + ndim])))
    return layout, h[0] == HEADER_INLINE


def pack(tensors: Sequence[torch.Tensor], device: torch.device | str | None = None,
         header: torch.Tensor | None = None) -> torch.Tensor:
    """All tensors' bytes in one uint8 buffer (each aligned to 16 bytes), after ``header``'s
    bytes if one is given."""
    layout = layout_of(tensors)
    offsets, total = _offsets(layout)
    dev = device if device is not None else (tensors[0].device if tensors else "cpu")
    start = 0 if header is None else HEADER_BYTES
    buf = torch.empty(start + total, dtype=torch.uint8, device=dev)
    if header is not None:
        buf[:start].view(torch.int64).copy_(header)
    for t, off in zip(tensors, offsets):
        n = t.numel() * t.element_size()
        if n:
            buf[start + off:start + off + n].copy_(
                t.detach().contiguous().reshape(-1).view(torch.uint8))
    return buf


def unpack(buf: torch.Tensor, layout: Layout) -> list[torch.Tensor]:
    """Inverse of ``pack``: tensors are views into ``buf``."""
    offsets, total = _offsets(layout)
    if buf.numel() != total:
        raise CommError(f"payload of {buf.numel()} bytes does not match its layout "
                        f"({total} bytes)")
    out = []
    for (dt, shape), off in zip(layout, offsets):
        n = _nbytes(dt, shape)
        out.append(buf[off:off + n].view(dt).view(shape))
    return out


def payload_size(layout: Layout) -> int:
    return _offsets(layout)[1]


def message_tag(step: int, microbatch: int, num_microbatches: int) -> int:
    """Even tag of a microbatch's message (its header; the payload uses ``tag | 1``). Wraps
    safely: only a few messages per link are ever outstanding."""
    return ((step * num_microbatches + microbatch) % (1 << 28)) * 2


# ------------------------------------------------------------------------------------------------
# Topology: every group of the world, in one global order


@dataclass(frozen=True)
class Topology:
    """Ranks of every (stage, replica) and every communication group, in the order in which all
    ranks create them. Group names: ``act:s:r`` (stage s -> s+1, replica r), ``grad:s:r``
    (s+1 -> s), ``replicas:s``, ``pipeline:r``, ``tie:i`` (all replicas of the stages holding tied
    parameter set i); with virtual stages (``wrap``; "stage" is then a rank's position in its
    pipeline) ``act:{d-1}:r`` and ``grad:{d-1}:r`` link the last position back to the first, so
    that each direction of a pair of ranks has its own group (NCCL runs one group's operations in
    order). ``devices[rank]`` is the device type ("cpu" or "cuda") that rank computes on; it
    decides each group's backend (``group_backend``)."""

    num_stages: int
    num_replicas: int
    ranks: tuple[tuple[int, ...], ...]          # ranks[s][r]
    groups: tuple[tuple[str, tuple[int, ...]], ...]
    devices: tuple[str, ...] = ()               # by rank; empty: every rank on the CPU

    @classmethod
    def build(cls, ranks: Sequence[Sequence[int]], tie_stages: Sequence[Sequence[int]] = (),
              devices: Sequence[str] | str = "cpu", wrap: bool = False) -> "Topology":
        """``devices``: one device type for every rank, or one per rank."""
        d, w = len(ranks), len(ranks[0])
        groups: list[tuple[str, tuple[int, ...]]] = []
        for s in range(d - 1):
            for r in range(w):
                groups.append((f"act:{s}:{r}", (ranks[s][r], ranks[s + 1][r])))
                groups.append((f"grad:{s}:{r}", (ranks[s][r], ranks[s + 1][r])))
        if wrap and d > 1:
            for r in range(w):
                groups.append((f"act:{d - 1}:{r}", (ranks[d - 1][r], ranks[0][r])))
                groups.append((f"grad:{d - 1}:{r}", (ranks[d - 1][r], ranks[0][r])))
        for s in range(d):
            groups.append((f"replicas:{s}", tuple(ranks[s])))
        for r in range(w):
            groups.append((f"pipeline:{r}", tuple(ranks[s][r] for s in range(d))))
        for i, stages in enumerate(tie_stages):
            groups.append((f"tie:{i}", tuple(sorted(ranks[s][r] for s in stages
                                                    for r in range(w)))))
        n = d * w
        types = (n * (devices,)) if isinstance(devices, str) else tuple(devices)
        if len(types) != n or not set(types) <= {"cpu", "cuda"}:
            raise ValueError(f"devices must be 'cpu' or 'cuda', one for all {n} ranks or one "
                             f"per rank, got {devices!r}")
        return cls(d, w, tuple(tuple(x) for x in ranks), tuple(groups), types)

    @property
    def world_size(self) -> int:
        return self.num_stages * self.num_replicas

    def device_type(self, rank: int) -> str:
        return self.devices[rank] if self.devices else "cpu"

    def rank(self, stage: int, replica: int) -> int:
        return self.ranks[stage][replica]

    def where(self, rank: int) -> tuple[int, int]:
        for s, row in enumerate(self.ranks):
            if rank in row:
                return s, row.index(rank)
        raise KeyError(rank)

    def group_ranks(self, name: str) -> tuple[int, ...]:
        for n, ranks in self.groups:
            if n == name:
                return ranks
        raise KeyError(name)


# ------------------------------------------------------------------------------------------------
# Transport interface


class Transport(ABC):
    """Point-to-point messages to/from neighbouring stages of the same replica, and group
    reductions. ``kind`` is "act" or "grad". Sends are asynchronous; ``take`` blocks up to a
    timeout for a message registered with ``expect``."""

    def __init__(self, topology: Topology, stage: int, replica: int, timeout_s: float):
        self.topology = topology
        self.stage = stage
        self.replica = replica
        self.rank = topology.rank(stage, replica)
        self.timeout_s = timeout_s
        self.where = f"stage {stage} replica {replica}"

    def peer_name(self, stage: int) -> str:
        return f"stage {stage} replica {self.replica} (rank {self.topology.rank(stage, self.replica)})"

    def link(self, peer_stage: int, kind: str, sending: bool) -> str:
        """Name of the link group carrying ``kind`` between this stage and ``peer_stage``: the
        one named after the stage the activations go out from (with virtual stages, the last
        position sends activations on to the first)."""
        source = self.stage if (kind == "act") == sending else peer_stage
        return f"{kind}:{source}:{self.replica}"

    @abstractmethod
    def send(self, peer_stage: int, kind: str, tag: int, tensors: Sequence[torch.Tensor]) -> None:
        ...

    @abstractmethod
    def expect(self, peer_stage: int, kind: str, tag: int, layout: Layout | None) -> None:
        """Register that message ``tag`` will come from ``peer_stage`` (``layout`` None: it
        carries a header)."""

    @abstractmethod
    def take(self, peer_stage: int, kind: str, tag: int, what: str) -> list[torch.Tensor]:
        """The registered message, waiting at most the timeout; ``what`` names it in errors."""

    @abstractmethod
    def allreduce(self, group: str, tensor: torch.Tensor) -> None:
        """In-place sum over ``group``."""

    @abstractmethod
    def broadcast(self, group: str, tensor: torch.Tensor, src_rank: int) -> None:
        ...

    def wait_sends(self) -> None:
        """Block until every send issued so far was delivered (bounded by the timeout)."""

    def close(self) -> None:
        """Stop background threads."""


def comm_failure(err: BaseException, where: str, what: str, peer: str, timeout_s: float
                 ) -> CommError:
    """A receive's failure as the error the user sees: which stage waited for what from whom,
    and the likely cause."""
    text = str(err)
    if any(w in text for w in ("Timed out", "timed out", "timing out", "Timeout")):
        return CommError(f"{where}: no {what} from {peer} within {timeout_s:.0f} s "
                         f"(is that stage hung?)")
    if "Connection closed" in text or "Connection reset" in text:
        return CommError(f"{where}: the connection to {peer} closed while waiting for {what} "
                         f"(did that stage die?)")
    return CommError(f"{where}: receiving {what} from {peer} failed: {err}")


# ------------------------------------------------------------------------------------------------
# In-process transport (threads)


class ThreadHub:
    """Shared state of a ``ThreadTransport`` world: mailboxes and reduction rendezvous."""

    def __init__(self, topology: Topology):
        self.topology = topology
        self.cv = threading.Condition()
        self.mail: dict[tuple[str, int, int], dict[int, list[torch.Tensor]]] = {}
        self.rounds: dict[tuple[str, int], dict[int, torch.Tensor]] = {}
        self.results: dict[tuple[str, int], torch.Tensor] = {}
        self.readers: dict[tuple[str, int], int] = {}
        self.seq: dict[tuple[str, int], int] = {}

    def transport(self, stage: int, replica: int, timeout_s: float = 60.0) -> "ThreadTransport":
        return ThreadTransport(self, stage, replica, timeout_s)


class ThreadTransport(Transport):
    """Stages as threads of one process: messages are tensor copies in shared dictionaries."""

    def __init__(self, hub: ThreadHub, stage: int, replica: int, timeout_s: float):
        super().__init__(hub.topology, stage, replica, timeout_s)
        self.hub = hub

    def send(self, peer_stage, kind, tag, tensors):
        dst = self.topology.rank(peer_stage, self.replica)
        with self.hub.cv:
            box = self.hub.mail.setdefault((kind, self.rank, dst), {})
            box[tag] = [t.detach().clone() for t in tensors]
            self.hub.cv.notify_all()

    def expect(self, peer_stage, kind, tag, layout):
        pass

    def take(self, peer_stage, kind, tag, what):
        src = self.topology.rank(peer_stage, self.replica)
        deadline = time.monotonic() + self.timeout_s
        with self.hub.cv:
            while True:
                box = self.hub.mail.get((kind, src, self.rank), {})
                if tag in box:
                    return box.pop(tag)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommError(f"{self.where}: no {what} from {self.peer_name(peer_stage)} "
                                    f"within {self.timeout_s:.0f} s")
                self.hub.cv.wait(left)

    def _collective(self, group: str, tensor: torch.Tensor, combine) -> None:
        """Rendezvous of the group's members on their n-th call; the last to arrive combines
        the contributions (in rank order), every member copies the result."""
        ranks = self.topology.group_ranks(group)
        hub = self.hub
        with hub.cv:
            seq = hub.seq.get((group, self.rank), 0)
            hub.seq[(group, self.rank)] = seq + 1
            key = (group, seq)
            contrib = hub.rounds.setdefault(key, {})
            contrib[self.rank] = tensor.detach().clone()
            if len(contrib) == len(ranks):
                hub.results[key] = combine([contrib[r] for r in ranks], ranks)
                hub.readers[key] = len(ranks)
                del hub.rounds[key]
                hub.cv.notify_all()
            deadline = time.monotonic() + self.timeout_s
            while key not in hub.results:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommError(f"{self.where}: {group} collective timed out after "
                                    f"{self.timeout_s:.0f} s")
                hub.cv.wait(left)
            tensor.copy_(hub.results[key])
            hub.readers[key] -= 1
            if hub.readers[key] == 0:
                del hub.results[key], hub.readers[key]

    def allreduce(self, group, tensor):
        def total(parts, ranks):
            acc = parts[0].clone()
            for p in parts[1:]:
                acc += p
            return acc
        self._collective(group, tensor, total)

    def broadcast(self, group, tensor, src_rank):
        self._collective(group, tensor, lambda parts, ranks: parts[ranks.index(src_rank)].clone())




# ------------------------------------------------------------------------------------------------
# torch.distributed transport (Ray actors, CPU and GPU)

NCCL_GROUP = "cpu:gloo,cuda:nccl"
# The process groups' own timeout, past the one every wait passes: NCCL's watchdog aborts the
# process when a group's timeout expires, and the waiting side must report first.
GROUP_TIMEOUT_SLACK_S = 30.0
_WARM_UP_TAG = 1 << 30      # above every message tag (message_tag wraps below 2**29)


def group_backend(device_types: Sequence[str], use_nccl: bool = True) -> str:
    """The torch.distributed backend of a group whose members compute on ``device_types``:
    GLOO for CPU tensors, plus NCCL for CUDA tensors where every member is on a GPU."""
    if use_nccl and device_types and all(t == "cuda" for t in device_types):
        return NCCL_GROUP
    return "gloo"


@dataclass
class _IncomingActivations:
    """The receiving end of one activation link: tags registered and not yet taken (in order),
    the receive posted for the first of them, and the layout its message will have if unchanged
    (the last one received; None before the first)."""

    expected: deque = field(default_factory=deque)
    posted: tuple[int, Any, torch.Tensor] | None = None     # (tag, work, buffer)
    layout: Layout | None = None


class DistTransport(Transport):
    """torch.distributed groups with asynchronous sends, receives posted ahead, and every wait
    bounded by ``timeout_s``; no threads of its own (see the module docstring for the message
    protocol). ``device`` is where this rank computes; ``use_nccl=False`` keeps CUDA tensors on
    GLOO too (through host memory). The GPU-only lines are marked "GPU:"."""

    def __init__(self, topology: Topology, stage: int, replica: int, timeout_s: float,
                 world_name: str, device: torch.device | str = "cpu", use_nccl: bool = True):
        super().__init__(topology, stage, replica, timeout_s)
        import torch.distributed as dist
        from ray.util import collective as col

        self._dist = dist
        self.device = torch.device(device)
        if self.device.type == "cuda":     # GPU: NCCL works on the current device
            torch.cuda.set_device(self.device)
        col.init_collective_group(topology.world_size, self.rank, backend="gloo",
                                  group_name=world_name, gloo_timeout=int(timeout_s * 1000))
        self._world_name = world_name
        self._wait_timeout = datetime.timedelta(seconds=timeout_s)
        group_timeout = datetime.timedelta(seconds=timeout_s + GROUP_TIMEOUT_SLACK_S)
        self._groups: dict[str, Any] = {}
        self._wire: dict[str, torch.device] = {}   # group -> device its tensors travel on
        self.backends: dict[str, str] = {}
        for name, ranks in topology.groups:   # every rank creates every group, same order
            backend = group_backend([topology.device_type(r) for r in ranks], use_nccl)
            pg = dist.new_group(list(ranks), timeout=group_timeout, backend=backend)
            if self.rank in ranks:
                self._groups[name] = pg
                self.backends[name] = backend
                # GPU: a NCCL group carries this rank's CUDA tensors as they are
                self._wire[name] = self.device if backend == NCCL_GROUP else torch.device("cpu")
        self._pending: deque = deque()          # (work, buffer kept alive until done, peer)
        self._sent_layout: dict[int, Layout] = {}                 # peer stage -> last act layout
        self._incoming: dict[int, _IncomingActivations] = {}      # peer stage -> act link
        self._grads: dict[int, deque] = {}      # peer stage -> (tag, work, buffer, layout)
        self._warm_up()

    def _warm_up(self) -> None:
        """One tiny operation on every group of this rank, in the global group order. NCCL makes
        a communicator on a group's first use, which blocks until the peers use it too: a
        receive posted ahead would then wait, inside the executor, for a send its peer makes only
        after more messages from this rank."""
        for name, ranks in self.topology.groups:
            if name not in self._groups:
                continue
            t = torch.zeros(1, device=self._wire[name])
            if name.startswith(("act:", "grad:")):
                peer = ranks[1] if self.rank == ranks[0] else ranks[0]
                op = self._dist.isend if self.rank == ranks[0] else self._dist.irecv
                work = op(t, peer, group=self._groups[name], tag=_WARM_UP_TAG)
            else:
                work = self._dist.all_reduce(t, group=self._groups[name], async_op=True)
            self._wait(work, f"the first message on group {name}",
                       f"the other members of {name} (ranks {list(ranks)})")

    def _wait(self, work, what: str | None, peer: str) -> None:
        """Wait for a work object at most ``timeout_s`` (for NCCL this blocks the host until the
        GPU work completed; the current stream then also waits for it). ``what`` comes from
        ``peer``, or with ``what`` None it is a send to ``peer``."""
        t0 = time.monotonic()
        try:
            work.wait(timeout=self._wait_timeout)
        except RuntimeError as e:
            timed_out = time.monotonic() - t0 >= 0.95 * self.timeout_s
            if what is None:
                why = "is that stage hung?" if timed_out else f"did that stage die? {e}"
                raise CommError(f"{self.where}: a message to {peer} was not delivered within "
                                f"{self.timeout_s:.0f} s ({why})") from e
            if timed_out:
                raise CommError(f"{self.where}: no {what} from {peer} within "
                                f"{self.timeout_s:.0f} s (is that stage hung?)") from e
            raise comm_failure(e, self.where, what, peer, self.timeout_s) from e

    # ---------------------------------------------------------------- sending

    def _reap(self) -> None:
        while self._pending and self._pending[0][0].is_completed():
            self._pending.popleft()

    def _isend(self, peer_stage: int, kind: str, buf: torch.Tensor, tag: int) -> None:
        work = self._dist.isend(buf, dst=self.topology.rank(peer_stage, self.replica),
                                group=self._groups[self.link(peer_stage, kind, True)], tag=tag)
        self._pending.append((work, buf, peer_stage))

    def send(self, peer_stage, kind, tag, tensors):
        self._reap()
        wire = self._wire[self.link(peer_stage, kind, True)]
        if kind != "act":
            self._isend(peer_stage, kind, pack(tensors, wire), tag | 1)
            return
        layout = layout_of(tensors)
        last = self._sent_layout.get(peer_stage)
        if layout == last:
            self._isend(peer_stage, kind,
                        pack(tensors, wire, header=encode_header(layout, inline=True)), tag)
            return
        # The receiver expects a message of the last layout's size: the new header goes in one
        # of that size, the payload after it.
        first = torch.zeros(HEADER_BYTES + (payload_size(last) if last is not None else 0),
                            dtype=torch.uint8, device=wire)
        first[:HEADER_BYTES].view(torch.int64).copy_(encode_header(layout))
        self._isend(peer_stage, kind, first, tag)
        self._isend(peer_stage, kind, pack(tensors, wire), tag | 1)
        self._sent_layout[peer_stage] = layout

    def wait_sends(self):
        while self._pending:
            work, _, peer = self._pending[0]
            self._wait(work, None, self.peer_name(peer))
            self._pending.popleft()

    # ---------------------------------------------------------------- receiving

    def _irecv(self, peer_stage: int, kind: str, size: int, tag: int):
        group = self.link(peer_stage, kind, False)
        buf = torch.empty(size, dtype=torch.uint8, device=self._wire[group])
        work = self._dist.irecv(buf, src=self.topology.rank(peer_stage, self.replica),
                                group=self._groups[group], tag=tag)
        return work, buf

    def _post_activation(self, peer_stage: int, link: _IncomingActivations) -> None:
        tag = link.expected[0]
        size = HEADER_BYTES + (payload_size(link.layout) if link.layout is not None else 0)
        work, buf = self._irecv(peer_stage, "act", size, tag)
        link.posted = (tag, work, buf)

    def expect(self, peer_stage, kind, tag, layout):
        if kind == "act":
            link = self._incoming.setdefault(peer_stage, _IncomingActivations())
            link.expected.append(tag)
            if link.posted is None:
                self._post_activation(peer_stage, link)
            return
        if layout is None:
            raise CommError(f"{self.where}: a {kind} message needs its layout")
        work, buf = self._irecv(peer_stage, kind, payload_size(layout), tag | 1)
        self._grads.setdefault(peer_stage, deque()).append((tag, work, buf, layout))

    def take(self, peer_stage, kind, tag, what):
        peer = self.peer_name(peer_stage)
        if kind != "act":
            posted = self._grads.get(peer_stage)
            if not posted or posted[0][0] != tag:
                raise CommError(f"{self.where}: {what} is not the next gradient expected from "
                                f"{peer} (expected tags {[p[0] for p in posted or ()]}; NCCL "
                                "matches messages in the order receives are posted: schedule "
                                "bug)")
            _, work, buf, layout = posted.popleft()
            self._wait(work, what, peer)
            return unpack(buf, layout)
        link = self._incoming.get(peer_stage)
        if link is None or not link.expected or link.expected[0] != tag:
            raise CommError(f"{self.where}: {what} is not the next activation expected from "
                            f"{peer} (schedule bug)")
        assert link.posted is not None and link.posted[0] == tag
        _, work, buf = link.posted
        self._wait(work, what, peer)
        layout, inline = decode_header(buf[:HEADER_BYTES].view(torch.int64))
        if inline:
            if layout != link.layout:
                raise CommError(f"{self.where}: {what} from {peer} came with layout {layout}, "
                                f"expected {link.layout} (stages out of step?)")
            tensors = unpack(buf[HEADER_BYTES:], layout)
        else:
            work, payload = self._irecv(peer_stage, "act", payload_size(layout), tag | 1)
            self._wait(work, what, peer)
            tensors = unpack(payload, layout)
            link.layout = layout
        link.expected.popleft()
        link.posted = None
        if link.expected:
            self._post_activation(peer_stage, link)
        return tensors

    # ---------------------------------------------------------------- collectives

    def _collective(self, group: str, tensor: torch.Tensor, what: str, issue) -> None:
        wire = self._wire[group]
        buf = tensor if tensor.device == wire else tensor.to(wire)
        self._wait(issue(buf, self._groups[group]), f"{what} over {group}",
                   f"the other members (ranks {list(self.topology.group_ranks(group))})")
        if buf is not tensor:
            tensor.copy_(buf)

    def allreduce(self, group, tensor):
        self._collective(group, tensor, "all-reduce", lambda t, pg: self._dist.all_reduce(
            t, group=pg, async_op=True))

    def broadcast(self, group, tensor, src_rank):
        self._collective(group, tensor, "broadcast", lambda t, pg: self._dist.broadcast(
            t, src=src_rank, group=pg, async_op=True))

    def close(self):
        """Leave the world and destroy every group (NCCL communicators included)."""
        from ray.util import collective as col

        try:
            col.destroy_collective_group(self._world_name)
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass
        if self._dist.is_initialized():
            try:
                self._dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
