"""The transport of Ray actors (``DistTransport``), run over GLOO between two actors: the very
class that carries CUDA tensors over NCCL. Messages whose layouts change, tuples of mixed dtypes,
messages that arrive before their receive is posted, gradients, collectives, and a dead and a hung
peer reported within the timeout."""

import time
import uuid

import pytest
import torch

from pd2bw_ray.actor import CommSetup, transport_class
from pd2bw_ray.collectives import NCCL_GROUP, DistTransport, Topology, group_backend
from transport_helpers import Endpoint

TIMEOUT = 3.0
MARGIN = 3.0     # startup of the wait, Ray's call, a loaded 2-core machine


def _pair(ray, timeout_s=TIMEOUT):
    """Two endpoints: stage 0 and stage 1 of one pipeline (ranks 0 and 1)."""
    topo = Topology.build([[0], [1]])
    cls = ray.remote(num_cpus=0)(Endpoint)
    a, b = cls.remote(), cls.remote()
    world = f"transport-test-{uuid.uuid4().hex[:8]}"
    backends = ray.get([a.setup.remote(topo, 0, 0, timeout_s, world),
                        b.setup.remote(topo, 1, 0, timeout_s, world)], timeout=120)
    assert set(backends[0].values()) == {"gloo"}
    return a, b


def _kill(ray, *actors):
    for x in actors:
        ray.kill(x, no_restart=True)


def _messages():
    g = torch.Generator().manual_seed(5)
    f32 = [torch.randn(2, 3, generator=g)]
    mixed = [torch.randn(4, generator=g, dtype=torch.float64),
             torch.randint(0, 9, (2, 2), generator=g),
             torch.rand(3, generator=g) > 0.5,
             torch.randn(2, 5, generator=g).to(torch.bfloat16)]
    return [f32, [f32[0] + 1], mixed, [t.clone() for t in mixed],
            [torch.randn(5, 3, generator=g)], [torch.randn(1, 3, generator=g)],
            [torch.randn(1, 3, generator=g)]]


def _assert_same(got, want):
    assert len(got) == len(want)
    for x, y in zip(got, want):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y)


@pytest.mark.parametrize("early", [True, False], ids=["sent-before-posted", "posted-ahead"])
def test_activations_whose_layouts_change_arrive_whole_and_in_order(ray_cluster, early):
    ray = ray_cluster
    a, b = _pair(ray)
    try:
        msgs = _messages()
        tags = [2 * i for i in range(len(msgs))]
        if early:   # every message is sent before the receiver posts anything
            ray.get([a.send.remote(1, "act", t, m) for t, m in zip(tags, msgs)])
            time.sleep(0.5)
            ray.get([b.expect.remote(0, "act", t) for t in tags])
        else:
            ray.get([b.expect.remote(0, "act", t) for t in tags])
            ray.get([a.send.remote(1, "act", t, m) for t, m in zip(tags, msgs)])
        got = ray.get([b.take.remote(0, "act", t) for t in tags], timeout=60)
        for g, m in zip(got, msgs):
            _assert_same(g, m)
        ray.get(a.wait_sends.remote(), timeout=30)
    finally:
        _kill(ray, a, b)


def test_gradients_travel_with_the_layout_the_receiver_knows_and_in_posting_order(ray_cluster):
    ray = ray_cluster
    a, b = _pair(ray)
    try:
        grads = [[torch.randn(2, 3), torch.randn(4, dtype=torch.float64)],
                 [torch.randn(5, 3), torch.randn(1, dtype=torch.float64)]]
        for tag, gr in zip((0, 2), grads):
            ray.get(a.expect.remote(1, "grad", tag, [(x.dtype, tuple(x.shape)) for x in gr]))
        ray.get([b.send.remote(0, "grad", tag, gr) for tag, gr in zip((0, 2), grads)])
        out_of_order = ray.get(a.take.remote(1, "grad", 2), timeout=30)
        assert "is not the next gradient expected" in out_of_order[0]
        for tag, gr in zip((0, 2), grads):
            _assert_same(ray.get(a.take.remote(1, "grad", tag), timeout=30), gr)
    finally:
        _kill(ray, a, b)


def test_allreduce_and_broadcast(ray_cluster):
    ray = ray_cluster
    a, b = _pair(ray)
    try:
        x, y = torch.arange(6.0).reshape(2, 3), torch.full((2, 3), 0.5)
        ra, rb = ray.get([a.allreduce.remote("pipeline:0", x),
                          b.allreduce.remote("pipeline:0", y)], timeout=30)
        assert torch.equal(ra, x + y) and torch.equal(rb, x + y)
        ra, rb = ray.get([a.broadcast.remote("pipeline:0", x, 1),
                          b.broadcast.remote("pipeline:0", y, 1)], timeout=30)
        assert torch.equal(ra, y) and torch.equal(rb, y)
    finally:
        _kill(ray, a, b)


def test_a_hung_peer_is_reported_within_the_timeout(ray_cluster):
    ray = ray_cluster
    a, b = _pair(ray)
    try:
        ray.get(b.expect.remote(0, "act", 0))
        text, waited = ray.get(b.take.remote(0, "act", 0), timeout=60)   # stage 0 never sends
        assert "stage 1 replica 0: no message 0 from stage 0 replica 0" in text
        assert f"within {TIMEOUT:.0f} s (is that stage hung?)" in text
        assert TIMEOUT * 0.95 <= waited <= TIMEOUT + MARGIN, waited
        text, waited = ray.get(a.allreduce.remote("pipeline:0", torch.ones(3)), timeout=60)
        assert "stage 0 replica 0: no all-reduce over pipeline:0" in text, text
        assert TIMEOUT * 0.95 <= waited <= TIMEOUT + MARGIN, waited
    finally:
        _kill(ray, a, b)


def test_a_dead_peer_is_reported_at_once(ray_cluster):
    ray = ray_cluster
    a, b = _pair(ray, timeout_s=30.0)
    try:
        ray.get(b.expect.remote(0, "act", 0))
        pending = b.take.remote(0, "act", 0)
        time.sleep(0.5)
        a.die.remote()
        text, waited = ray.get(pending, timeout=60)
        assert "stage 1 replica 0: the connection to stage 0 replica 0 (rank 0) closed" in text
        assert "did that stage die?" in text
        assert waited < 30.0
    finally:
        _kill(ray, a, b)


def test_cuda_and_cpu_stages_use_the_same_transport_class():
    comm = CommSetup("dist", "w")
    assert transport_class(comm) is DistTransport
    assert transport_class(CommSetup("dist", "w", use_nccl=False)) is DistTransport
    # what differs by device is only each group's backend string
    gpu = Topology.build([[0], [1]], devices="cuda")
    mixed = Topology.build([[0], [1]], devices=("cuda", "cpu"))
    cpu = Topology.build([[0], [1]])
    for topo, want in ((gpu, NCCL_GROUP), (mixed, "gloo"), (cpu, "gloo")):
        for name in ("act:0:0", "grad:0:0", "pipeline:0"):     # the groups spanning both ranks
            ranks = topo.group_ranks(name)
            assert group_backend([topo.device_type(r) for r in ranks]) == want
    assert group_backend(["cuda", "cuda"], use_nccl=False) == "gloo"
