"""A Ray actor around one ``DistTransport`` endpoint, for the transport tests (importable by
Ray workers: tests/ is on their path). Errors come back as (message, seconds waited)."""

import os
import time

import torch

from pd2bw_ray.collectives import CommError, DistTransport, Topology


class Endpoint:
    def setup(self, topology: Topology, stage: int, replica: int, timeout_s: float,
              world_name: str, device: str = "cpu") -> dict:
        self.t = DistTransport(topology, stage, replica, timeout_s, world_name, device)
        return dict(self.t.backends)

    def send(self, peer: int, kind: str, tag: int, tensors) -> None:
        self.t.send(peer, kind, tag, [x.to(self.t.device) for x in tensors])

    def wait_sends(self) -> None:
        self.t.wait_sends()

    def expect(self, peer: int, kind: str, tag: int, layout=None) -> None:
        self.t.expect(peer, kind, tag, layout)

    def take(self, peer: int, kind: str, tag: int):
        """The message's tensors on the CPU, or (error text, seconds) if it failed."""
        t0 = time.monotonic()
        try:
            return [x.cpu().clone() for x in self.t.take(peer, kind, tag, f"message {tag}")]
        except CommError as e:
            return str(e), time.monotonic() - t0

    def allreduce(self, group: str, tensor: torch.Tensor):
        t0 = time.monotonic()
        x = tensor.to(self.t.device)
        try:
            self.t.allreduce(group, x)
        except CommError as e:
            return str(e), time.monotonic() - t0
        return x.cpu()

    def broadcast(self, group: str, tensor: torch.Tensor, src_rank: int):
        x = tensor.to(self.t.device)
        self.t.broadcast(group, x, src_rank)
        return x.cpu()

    def die(self) -> None:
        os._exit(1)

    def pid(self) -> int:
        return os.getpid()
