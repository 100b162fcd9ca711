"""Moving activations and gradients between stage replicas, and reducing gradients over groups.

A ``Transport`` is what a stage executor talks to. Three implementations:

- ``GlooTransport`` (CPU actors): the world is a ``ray.util.collective`` GLOO group (its rendezvous
  goes through Ray's internal KV, so no address or port is configured). Ray 2.60's GLOO group maps
  every further group onto ranks ``0..n-1`` of the first one and has no per-operation timeout, so
  the groups this runtime needs (one per link, per stage, per pipeline, per tied weight) are made
  with ``torch.distributed.new_group`` on top of that world, each with ``CommConfig.timeout_s``:
  a peer that hangs makes the waiting side fail after the timeout, a peer that dies makes it fail
  at once ("Connection closed by peer").
- ``NcclTransport`` (GPU actors): ``ray.util.collective`` NCCL groups (cupy), one per group.
- ``ThreadTransport``: stages as threads of one process (tests, debugging), no sockets.

Messages: an activation is a tuple of tensors of any dtype and shape, so it travels with a
fixed-size int64 header (kind, count, dtypes, shapes) in front of one packed byte payload. A
gradient message has the layout of the floating outputs it answers, which the receiver knows, so
it is only the payload.

GLOO sends an activation as one message, header and payload together, when its layout is the
previous one on that link (always, once a run is going): both ends remember the last layout of
each link, so the receiver knows the size to receive. When the layout changes (or on a link's
first message) the header comes in a message of the size the receiver expects, marked "payload
follows", and the payload in a second one. GLOO receives are posted as soon as the executor knows
them (``dist.irecv``) and completed by GLOO's own thread, so a message that arrives early lands
in place and nothing in Python runs until the executor needs it. NCCL receives block, so the NCCL
transport receives in the background instead (one ``Inbox`` thread per incoming link), header and
payload as two messages.
"""

from __future__ import annotations

import datetime
import functools
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

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
    parameter set i)."""

    num_stages: int
    num_replicas: int
    ranks: tuple[tuple[int, ...], ...]          # ranks[s][r]
    groups: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def build(cls, ranks: Sequence[Sequence[int]], tie_stages: Sequence[Sequence[int]] = ()
              ) -> "Topology":
        d, w = len(ranks), len(ranks[0])
        groups: list[tuple[str, tuple[int, ...]]] = []
        for s in range(d - 1):
            for r in range(w):
                groups.append((f"act:{s}:{r}", (ranks[s][r], ranks[s + 1][r])))
                groups.append((f"grad:{s}:{r}", (ranks[s][r], ranks[s + 1][r])))
        for s in range(d):
            groups.append((f"replicas:{s}", tuple(ranks[s])))
        for r in range(w):
            groups.append((f"pipeline:{r}", tuple(ranks[s][r] for s in range(d))))
        for i, stages in enumerate(tie_stages):
            groups.append((f"tie:{i}", tuple(sorted(ranks[s][r] for s in stages
                                                    for r in range(w)))))
        return cls(d, w, tuple(tuple(x) for x in ranks), tuple(groups))

    @property
    def world_size(self) -> int:
        return self.num_stages * self.num_replicas

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

    def link(self, peer_stage: int, kind: str) -> str:
        """Name of the link group carrying ``kind`` between this stage and ``peer_stage``."""
        lo = min(self.stage, peer_stage)
        return f"{kind}:{lo}:{self.replica}"

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
    if "Timed out" in text or "timed out" in text:
        return CommError(f"{where}: no {what} from {peer} within {timeout_s:.0f} s "
                         f"(is that stage hung?)")
    if "Connection closed" in text or "Connection reset" in text:
        return CommError(f"{where}: the connection to {peer} closed while waiting for {what} "
                         f"(did that stage die?)")
    return CommError(f"{where}: receiving {what} from {peer} failed: {err}")


class Inbox:
    """Messages of one incoming link, received by a background thread in registration order."""

    def __init__(self, name: str, recv_one: Callable[[int, Layout | None], list[torch.Tensor]],
                 timeout_s: float):
        self.name = name
        self._recv_one = recv_one
        self._timeout_s = timeout_s
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._done: dict[int, list[torch.Tensor]] = {}
        self._error: BaseException | None = None
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def expect(self, tag: int, layout: Layout | None) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._pump, name=self.name, daemon=True)
            self._thread.start()
        self._requests.put((tag, layout))

    def take(self, tag: int, what: str, where: str, peer: str) -> list[torch.Tensor]:
        deadline = time.monotonic() + self._timeout_s + 5.0
        with self._cv:
            while tag not in self._done and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CommError(f"{where}: no {what} from {peer} within "
                                    f"{self._timeout_s:.0f} s (is that stage hung or dead?)")
                self._cv.wait(left)
            if tag in self._done:
                return self._done.pop(tag)
            err = self._error
        raise comm_failure(err, where, what, peer, self._timeout_s) from err

    def _pump(self) -> None:
        while True:
            req = self._requests.get()
            if req is None:
                return
            tag, layout = req
            try:
                tensors = self._recv_one(tag, layout)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting executor
                with self._cv:
                    self._error = e
                    self._cv.notify_all()
                return
            with self._cv:
                self._done[tag] = tensors
                self._cv.notify_all()

    def close(self) -> None:
        self._requests.put(None)


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
# Process transports


class _ProcessTransport(Transport):
    """A transport whose receives block (NCCL): ``Inbox`` threads receive each incoming link in
    the background; an activation travels as a header message and a payload message."""

    def __init__(self, topology, stage, replica, timeout_s, device: torch.device):
        super().__init__(topology, stage, replica, timeout_s)
        self.device = device
        self._inboxes: dict[tuple[int, str], Inbox] = {}

    def _inbox(self, peer_stage: int, kind: str) -> Inbox:
        key = (peer_stage, kind)
        if key not in self._inboxes:
            def recv_one(tag, layout, peer_stage=peer_stage, kind=kind):
                return self._recv_message(peer_stage, kind, tag, layout)
            self._inboxes[key] = Inbox(f"pd2bw-recv-{kind}-from-{peer_stage}", recv_one,
                                       self.timeout_s)
        return self._inboxes[key]

    def expect(self, peer_stage, kind, tag, layout):
        self._inbox(peer_stage, kind).expect(tag, layout)

    def take(self, peer_stage, kind, tag, what):
        return self._inbox(peer_stage, kind).take(tag, what, self.where,
                                                  self.peer_name(peer_stage))

    def _recv_message(self, peer_stage, kind, tag, layout):
        if layout is None:
            header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
            self._recv_raw(peer_stage, kind, header, tag)
            layout, _ = decode_header(header)
        payload = torch.empty(payload_size(layout), dtype=torch.uint8, device=self.device)
        self._recv_raw(peer_stage, kind, payload, tag | 1)
        return unpack(payload, layout)

    def _send_message(self, peer_stage, kind, tag, tensors, with_header: bool):
        if with_header:
            self._send_raw(peer_stage, kind, encode_header(layout_of(tensors), self.device), tag)
        self._send_raw(peer_stage, kind, pack(tensors, self.device), tag | 1)

    def send(self, peer_stage, kind, tag, tensors):
        self._send_message(peer_stage, kind, tag, tensors, with_header=(kind == "act"))

    @abstractmethod
    def _send_raw(self, peer_stage: int, kind: str, tensor: torch.Tensor, tag: int) -> None:
        ...

    @abstractmethod
    def _recv_raw(self, peer_stage: int, kind: str, tensor: torch.Tensor, tag: int) -> None:
        ...

    def close(self):
        for box in self._inboxes.values():
            box.close()


@dataclass
class _IncomingActivations:
    """The receiving end of one GLOO activation link: tags registered and not yet taken (in
    order), the receive posted for the first of them, and the layout its message will have if
    unchanged (the last one received; None before the first)."""

    expected: deque = field(default_factory=deque)
    posted: tuple[int, Any, torch.Tensor] | None = None     # (tag, work, buffer)
    layout: Layout | None = None


class GlooTransport(Transport):
    """CPU transport: GLOO process groups with a per-group timeout, asynchronous receives posted
    ahead, no threads of its own (see the module docstring for the message protocol)."""

    def __init__(self, topology: Topology, stage: int, replica: int, timeout_s: float,
                 world_name: str):
        super().__init__(topology, stage, replica, timeout_s)
        import torch.distributed as dist
        from ray.util import collective as col

        self._dist = dist
        col.init_collective_group(topology.world_size, self.rank, backend="gloo",
                                  group_name=world_name, gloo_timeout=int(timeout_s * 1000))
        self._world_name = world_name
        timeout = datetime.timedelta(seconds=timeout_s)
        self._groups = {}
        for name, ranks in topology.groups:   # every rank creates every group, same order
            pg = dist.new_group(list(ranks), timeout=timeout, backend="gloo")
            if self.rank in ranks:
                self._groups[name] = pg
        self._pending: deque = deque()
        self._sent_layout: dict[int, Layout] = {}                 # peer stage -> last act layout
        self._incoming: dict[int, _IncomingActivations] = {}      # peer stage -> act link
        self._grads: dict[tuple[int, int], tuple[Any, torch.Tensor, Layout]] = {}

    # ---------------------------------------------------------------- sending

    def _reap(self) -> None:
        while self._pending and self._pending[0][0].is_completed():
            self._pending.popleft()

    def _isend(self, peer_stage: int, kind: str, buf: torch.Tensor, tag: int) -> None:
        work = self._dist.isend(buf, dst=self.topology.rank(peer_stage, self.replica),
                                group=self._groups[self.link(peer_stage, kind)], tag=tag)
        self._pending.append((work, buf, peer_stage))

    def send(self, peer_stage, kind, tag, tensors):
        self._reap()
        if kind != "act":
            self._isend(peer_stage, kind, pack(tensors), tag | 1)
            return
        layout = layout_of(tensors)
        last = self._sent_layout.get(peer_stage)
        if layout == last:
            self._isend(peer_stage, kind, pack(tensors, header=encode_header(layout, inline=True)),
                        tag)
            return
        # The receiver expects a message of the last layout's size: the new header goes in one
        # of that size, the payload after it.
        first = torch.zeros(HEADER_BYTES + (payload_size(last) if last is not None else 0),
                            dtype=torch.uint8)
        first[:HEADER_BYTES].view(torch.int64).copy_(encode_header(layout))
        self._isend(peer_stage, kind, first, tag)
        self._isend(peer_stage, kind, pack(tensors), tag | 1)
        self._sent_layout[peer_stage] = layout

    def wait_sends(self):
        while self._pending:
            work, _, peer = self._pending.popleft()
            try:
                work.wait()
            except RuntimeError as e:
                raise CommError(f"{self.where}: sending to {self.peer_name(peer)} failed: "
                                f"{e}") from e

    # ---------------------------------------------------------------- receiving

    def _irecv(self, peer_stage: int, kind: str, buf: torch.Tensor, tag: int):
        return self._dist.irecv(buf, src=self.topology.rank(peer_stage, self.replica),
                                group=self._groups[self.link(peer_stage, kind)], tag=tag)

    def _wait(self, work, peer_stage: int, what: str) -> None:
        try:
            work.wait()
        except RuntimeError as e:
            raise comm_failure(e, self.where, what, self.peer_name(peer_stage),
                               self.timeout_s) from e

    def _post_activation(self, peer_stage: int, link: _IncomingActivations) -> None:
        tag = link.expected[0]
        size = HEADER_BYTES + (payload_size(link.layout) if link.layout is not None else 0)
        buf = torch.empty(size, dtype=torch.uint8)
        link.posted = (tag, self._irecv(peer_stage, "act", buf, tag), buf)

    def expect(self, peer_stage, kind, tag, layout):
        if kind == "act":
            link = self._incoming.setdefault(peer_stage, _IncomingActivations())
            link.expected.append(tag)
            if link.posted is None:
                self._post_activation(peer_stage, link)
            return
        if layout is None:
            raise CommError(f"{self.where}: a {kind} message needs its layout")
        buf = torch.empty(payload_size(layout), dtype=torch.uint8)
        self._grads[(peer_stage, tag)] = (self._irecv(peer_stage, kind, buf, tag | 1), buf,
                                          layout)

    def take(self, peer_stage, kind, tag, what):
        if kind != "act":
            if (peer_stage, tag) not in self._grads:
                raise CommError(f"{self.where}: {what} was never expected (schedule bug)")
            work, buf, layout = self._grads.pop((peer_stage, tag))
            self._wait(work, peer_stage, what)
            return unpack(buf, layout)
        link = self._incoming.get(peer_stage)
        if link is None or not link.expected or link.expected[0] != tag:
            raise CommError(f"{self.where}: {what} is not the next activation expected from "
                            f"{self.peer_name(peer_stage)} (schedule bug)")
        assert link.posted is not None and link.posted[0] == tag
        _, work, buf = link.posted
        self._wait(work, peer_stage, what)
        layout, inline = decode_header(buf[:HEADER_BYTES].view(torch.int64))
        if inline:
            if layout != link.layout:
                raise CommError(f"{self.where}: {what} from {self.peer_name(peer_stage)} came "
                                f"with layout {layout}, expected {link.layout} (stages out of "
                                "step?)")
            tensors = unpack(buf[HEADER_BYTES:], layout)
        else:
            payload = torch.empty(payload_size(layout), dtype=torch.uint8)
            self._wait(self._irecv(peer_stage, "act", payload, tag | 1), peer_stage, what)
            tensors = unpack(payload, layout)
            link.layout = layout
        link.expected.popleft()
        link.posted = None
        if link.expected:
            self._post_activation(peer_stage, link)
        return tensors

    # ---------------------------------------------------------------- collectives

    def allreduce(self, group, tensor):
        self._dist.all_reduce(tensor, group=self._groups[group])

    def broadcast(self, group, tensor, src_rank):
        self._dist.broadcast(tensor, src=src_rank, group=self._groups[group])

    def close(self):
        try:
            from ray.util import collective as col
            col.destroy_collective_group(self._world_name)
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass


class NcclTransport(_ProcessTransport):
    """GPU transport: one ``ray.util.collective`` NCCL group per group of the topology.

    NCCL point-to-point operations block the calling thread, so sends go through one background
    thread per outgoing link, in order; receives use the inboxes like GLOO. NCCL has no operation
    timeout: the inbox's wait bounds how long the executor waits for a peer.
    """

    def __init__(self, topology: Topology, stage: int, replica: int, timeout_s: float,
                 world_name: str, device: torch.device):
        super().__init__(topology, stage, replica, timeout_s, device)
        from ray.util import collective as col

        self._col = col
        self._names: dict[str, tuple[str, tuple[int, ...]]] = {}
        for name, ranks in topology.groups:
            if self.rank in ranks:
                gname = f"{world_name}:{name}"
                col.init_collective_group(len(ranks), ranks.index(self.rank), backend="nccl",
                                          group_name=gname)
                self._names[name] = (gname, ranks)
        # Create the communicators eagerly, in the global group order, so no two ranks wait on
        # each other's first use of different groups.
        for name, _ in topology.groups:
            if name in self._names and not name.startswith(("act:", "grad:")):
                self.allreduce(name, torch.zeros(1, device=device))
        self._outboxes: dict[tuple[int, str], queue.SimpleQueue] = {}
        self._send_errors: list[BaseException] = []
        self._unsent = 0
        self._send_cv = threading.Condition()

    def _peer_index(self, peer_stage, kind) -> tuple[str, int]:
        gname, ranks = self._names[self.link(peer_stage, kind)]
        return gname, ranks.index(self.topology.rank(peer_stage, self.replica))

    def _send_raw(self, peer_stage, kind, tensor, tag):
        key = (peer_stage, kind)
        if key not in self._outboxes:
            q: queue.SimpleQueue = queue.SimpleQueue()
            self._outboxes[key] = q
            threading.Thread(target=self._sender, args=(q, peer_stage, kind), daemon=True,
                             name=f"pd2bw-send-{kind}-to-{peer_stage}").start()
        with self._send_cv:
            self._unsent += 1
        self._outboxes[key].put(tensor)

    def _sender(self, q, peer_stage, kind):
        gname, peer = self._peer_index(peer_stage, kind)
        while True:
            t = q.get()
            if t is None:
                return
            try:
                self._col.send(t, peer, gname)
            except BaseException as e:  # noqa: BLE001 - reported by wait_sends
                self._send_errors.append(e)
            with self._send_cv:
                self._unsent -= 1
                self._send_cv.notify_all()

    def _recv_raw(self, peer_stage, kind, tensor, tag):
        gname, peer = self._peer_index(peer_stage, kind)
        self._col.recv(tensor, peer, gname)

    def wait_sends(self):
        with self._send_cv:
            if not self._send_cv.wait_for(lambda: self._unsent == 0, self.timeout_s):
                raise CommError(f"{self.where}: sends not delivered within {self.timeout_s} s")
        if self._send_errors:
            raise CommError(f"{self.where}: sending failed: {self._send_errors[0]}")

    def allreduce(self, group, tensor):
        self._col.allreduce(tensor, group_name=self._names[group][0])

    def broadcast(self, group, tensor, src_rank):
        gname, ranks = self._names[group]
        self._col.broadcast(tensor, src_rank=ranks.index(src_rank), group_name=gname)

    def close(self):
        super().close()
        for q in self._outboxes.values():
            q.put(None)
        for gname, _ in self._names.values():
            try:
                self._col.destroy_collective_group(gname)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
