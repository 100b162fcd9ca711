"""Message framing between stages (no processes): headers, packing, and the single-message form
GLOO uses while a link's layout stays the same."""

import pytest
import torch

from pd2bw_ray.collectives import (HEADER_BYTES, CommError, decode_header, encode_header,
                                   layout_of, pack, payload_size, unpack)


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 5, generator=g),                       # float32
            torch.randint(0, 100, (2, 7), generator=g),            # int64
            torch.randn(4, generator=g, dtype=torch.float64)[::2],  # non-contiguous
            torch.zeros(0, 3),                                     # empty
            torch.tensor([True, False, True])]                     # bool, 3 bytes


@pytest.mark.parametrize("inline", [False, True])
def test_header_round_trip(inline):
    tensors = sample_tensors()
    layout, got_inline = decode_header(encode_header(layout_of(tensors), inline=inline))
    assert layout == [(t.dtype, tuple(t.shape)) for t in tensors]
    assert got_inline is inline


def test_pack_unpack_round_trip_with_and_without_header():
    tensors = sample_tensors()
    layout = layout_of(tensors)
    plain = pack(tensors)
    assert plain.numel() == payload_size(layout)
    for a, b in zip(unpack(plain, layout), tensors):
        assert a.dtype == b.dtype and torch.equal(a, b)
    message = pack(tensors, header=encode_header(layout, inline=True))
    assert message.numel() == HEADER_BYTES + payload_size(layout)
    got_layout, inline = decode_header(message[:HEADER_BYTES].view(torch.int64))
    assert inline and got_layout == layout
    for a, b in zip(unpack(message[HEADER_BYTES:], got_layout), tensors):
        assert torch.equal(a, b)


def test_cached_header_is_not_changed_by_packing():
    tensors = sample_tensors()
    h = encode_header(layout_of(tensors), inline=True)
    before = h.clone()
    pack(tensors, header=h)
    assert torch.equal(h, before)
    assert encode_header(layout_of(tensors), inline=True) is h      # cached per layout


def test_bad_messages_are_named():
    with pytest.raises(CommError, match="malformed activation header"):
        decode_header(torch.zeros(HEADER_BYTES // 8, dtype=torch.int64))
    with pytest.raises(CommError, match="does not match its layout"):
        unpack(torch.zeros(8, dtype=torch.uint8), [(torch.float32, (3,))])
    with pytest.raises(CommError, match="at most"):
        encode_header([(torch.float32, (1,))] * 100)
    with pytest.raises(CommError, match="dimensions"):
        encode_header([(torch.float32, (1,) * 9)])


def test_step_data_wire_round_trip_through_pickle():
    """Inputs and targets go to the actors with CPU tensors as numpy arrays; what arrives is
    equal in value, dtype and shape, nested structure included; bfloat16 travels as a tensor."""
    import pickle

    from ray import cloudpickle

    from pd2bw_ray.wire import WireTensor, from_wire, to_wire

    g = torch.Generator().manual_seed(1)
    data = {(3, 0): (torch.randint(0, 9, (2, 4), generator=g), [torch.rand(2, generator=g)]),
            (3, 1): {"mask": torch.tensor([True, False]),
                     "half": torch.randn(3, generator=g).half(),
                     "bf16": torch.randn(3, generator=g).bfloat16(),
                     "f64": torch.randn(2, 2, generator=g, dtype=torch.float64).t()},
            (3, 2): 7}
    wire = to_wire(data)
    assert isinstance(wire[(3, 0)][0], WireTensor)
    assert isinstance(wire[(3, 1)]["bf16"], torch.Tensor)
    back = from_wire(pickle.loads(cloudpickle.dumps(wire, protocol=5)))

    def same(a, b):
        if isinstance(a, torch.Tensor):
            assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        elif isinstance(a, dict):
            assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        elif isinstance(a, (tuple, list)):
            assert type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
        else:
            assert a == b
        return True

    assert same(data, back)
    # a read-only buffer (what Ray hands over for large objects) arrives as a writable copy
    arr = torch.arange(4).numpy()
    arr.flags.writeable = False
    t = from_wire(WireTensor(arr))
    t += 1
    assert arr.tolist() == [0, 1, 2, 3] and t.tolist() == [1, 2, 3, 4]
