"""The device-array layer that runs on any machine: reading the CUDA Array Interface, DLPack and
stream arguments, building DeviceWeights from borrowed arrays, and the refusals of mixed or
unusable calls.  Nothing here touches a GPU: the arrays are stand-ins that only describe memory."""

import numpy as np
import pytest

import metal_moe as mm
from metal_moe import device as mdev

from native_cases import HIDDEN, inputs, weights


class FakeCudaArray:
    """An object that exports the CUDA Array Interface v3 for an address it does not own."""

    def __init__(self, shape, typestr, ptr=0x7F0000000000, strides=None):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr, "data": (ptr, False),
                                         "strides": strides, "version": 3}


def fake_like(a, ptr=0x7F0000000000):
    return FakeCudaArray(a.shape, a.dtype.str, ptr)


def test_cuda_array_interface_is_read_without_a_copy():
    info = mdev.array_info(FakeCudaArray((4, 256), "<f2", 0x1000), "x")
    assert (info.ptr, info.shape, info.dtype, info.contiguous, info.kind) == (0x1000, (4, 256), "float16", True, "cai")
    strided = mdev.array_info(FakeCudaArray((4, 256), "<f2", 0x1000, strides=(1024, 2)), "x")
    assert not strided.contiguous
    assert mdev.array_info(FakeCudaArray((4, 256), "<f2", 0x1000, strides=(512, 2)), "x").contiguous
    assert mdev.is_device_array(FakeCudaArray((1,), "<f4"))
    assert not mdev.is_device_array(np.zeros(3))
    with pytest.raises(TypeError, match="x: expected a CUDA array"):
        mdev.array_info(object(), "x")


def test_dlpack_capsules_are_read_and_left_unconsumed():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    capsule = a.__dlpack__()
    ptr, shape, strides, dtype, kind, index = mm._native.dlpack_info(capsule)
    assert (ptr, shape, dtype, kind, index) == (a.ctypes.data, (3, 4), "float32", "cpu", 0)
    assert strides in (None, (4, 1))
    # still a valid, unconsumed capsule: reading it twice works, and numpy can still import it
    assert mm._native.dlpack_info(capsule)[0] == a.ctypes.data
    with pytest.raises(TypeError, match="DLPack"):
        mm._native.dlpack_info(object())


def test_a_host_dlpack_array_is_not_taken_for_a_device_array():
    with pytest.raises(ValueError, match="not a CUDA device"):
        class HostDL:
            def __dlpack__(self, stream=None):
                return np.zeros((2, 2), np.float32).__dlpack__()

        mdev.array_info(HostDL(), "x")


def test_stream_arguments():
    assert mdev.current_stream(1234, [], 0) == 1234

    class TorchLike:
        cuda_stream = 77

    class CupyLike:
        ptr = 88

    assert mdev.current_stream(TorchLike(), [], 0) == 77
    assert mdev.current_stream(CupyLike(), [], 0) == 88
    assert mdev.current_stream(None, [mdev.array_info(FakeCudaArray((1,), "<f4"), "x")], 0) == 0
    with pytest.raises(TypeError, match="stream: expected"):
        mdev.current_stream("fast", [], 0)
    with pytest.raises(TypeError, match="stream: expected a CUDA stream, got a bool"):
        mdev.current_stream(True, [], 0)


def _fake_triples(w, base=0x10000):
    out = []
    for i, proj in enumerate(w.projections):
        out.append(tuple(fake_like(a, base + 0x1000 * (3 * i + j)) for j, a in enumerate((proj.trellis, proj.suh,
                                                                                          proj.svh))))
    return out


def test_device_weights_from_borrowed_arrays():
    w = weights("mcg", (6, 2, 3), True)
    gate, up, down = _fake_triples(w)
    shared = [tuple(fake_like(a, 0x90000 + 0x100 * j) for j, a in enumerate((p.trellis, p.suh, p.svh)))
              for p in w.shared]
    dw = mm.DeviceWeights.from_arrays(gate, up, down, codebook="mcg", shared=shared, device=0)
    assert (dw.hidden, dw.intermediate, dw.experts, dw.bits, dw.codebooks) == \
        (w.hidden, w.intermediate, w.experts, (6, 2, 3), ("mcg",) * 3)
    hidden, inter, experts, g, u, d, sh = dw.descriptor
    assert (hidden, inter, experts) == (w.hidden, w.intermediate, w.experts)
    assert g == (0x10000, 0x11000, 0x12000, 12, "mcg") and d[3] == 6 and sh[0][0] == 0x90000
    assert dw.expert_nbytes() == w.expert_nbytes()
    half = weights("mul1", (2.5, 1.5, 3.5), False)
    assert mm.DeviceWeights.from_arrays(*_fake_triples(half), codebook="mul1").bits == (2.5, 1.5, 3.5)


def test_device_weights_refuse_bad_arrays():
    w = weights("mcg", (4, 2, 3), False)
    gate, up, down = _fake_triples(w)
    with pytest.raises(TypeError, match="gate.suh: dtype float32"):
        mm.DeviceWeights.from_arrays((gate[0], FakeCudaArray((8, HIDDEN), "<f4"), gate[2]), up, down)
    with pytest.raises(ValueError, match="up.svh: expected shape"):
        mm.DeviceWeights.from_arrays(gate, (up[0], up[1], FakeCudaArray((8, 5), "<f2")), down)
    with pytest.raises(ValueError, match="down.trellis: must be C-contiguous"):
        t = w.down.trellis
        strides = tuple(2 * s for s in t.strides)
        mm.DeviceWeights.from_arrays(gate, up, (FakeCudaArray(t.shape, "<i2", strides=strides), down[1], down[2]))
    with pytest.raises(ValueError, match="bits"):
        mm.DeviceWeights.from_arrays(gate, up, (FakeCudaArray((8, 24, 16, 24), "<i2"), down[1], down[2]),
                                     codebook="mcg")
    with pytest.raises(ValueError, match="codebook"):
        mm.DeviceWeights.from_arrays(gate, up, down, codebook=("mcg", "mcg"))


@pytest.mark.skipif("cuda" in mm.backends(), reason="this machine has a usable CUDA device")
def test_device_calls_without_a_usable_device_are_refused():
    w = weights("mcg", (4, 2, 3), False)
    dw = mm.DeviceWeights.from_arrays(*_fake_triples(w), codebook="mcg")
    x, ids, p = inputs(2)
    with pytest.raises(ValueError, match="'cuda' is not usable on this machine"):
        mm.fused_moe(fake_like(x), fake_like(ids), fake_like(p), dw)
    with pytest.raises(TypeError, match="weights.to\\('cuda'\\)"):
        mm.fused_moe(fake_like(x), fake_like(ids), fake_like(p), w)
    with pytest.raises(ValueError, match="stream: only calls on CUDA arrays"):
        mm.fused_moe(x, ids, p, w, stream=0)
    if mm._native.backend_built("cuda"):
        with pytest.raises(mm._native.UnsupportedError, match="no device of it is usable"):
            mm.Context("cuda")
