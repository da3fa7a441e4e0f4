"""The replay machinery on the CPU: `KernelCall` fills its argument buffers as the kernel reads
them, and only GPU arrays of torch and CuPy are ever replayed (everything else validates on
every call)."""

from __future__ import annotations

import ctypes
import types

import numpy as np
import pytest

import cuflash
from cuflash.cuda import _kernel_call, _launch, _replay


def _fake_function():
    return types.SimpleNamespace(kernel=types.SimpleNamespace(ptr=0xABC), name="probe")


def test_kernel_call_fills_pointers_maps_and_arguments(monkeypatch):
    seen = []

    def launch(handle, gx, gy, gz, bx, by, bz, smem, stream, argv, extra):
        params = np.frombuffer(ctypes.string_at(argv[0], _launch.FWD_PARAMS.itemsize),
                               dtype=_launch.FWD_PARAMS)[0]
        maps = [ctypes.string_at(argv[i], 128) for i in (1, 2)]
        tail = np.frombuffer(ctypes.string_at(argv[3], 8), dtype=np.uint64)[0]
        config = tuple(getattr(x, "value", x) for x in (gx, gy, gz, bx, by, bz, smem, stream))
        seen.append((getattr(handle, "value", handle), config, params, maps, int(tail)))
        return 0

    monkeypatch.setattr(_kernel_call, "_driver_launch", lambda: (launch, None))
    params = np.zeros((), dtype=_launch.FWD_PARAMS)
    params["seqlen_q"] = 77
    encoded = []

    def encoder(tag):
        def encode(ptr):
            encoded.append((tag, ptr))
            return bytes([tag]) * 120 + ptr.to_bytes(8, "little")
        return encode

    call = _kernel_call.KernelCall(_fake_function(), 0, (3, 2, 1), 128, 4096, params,
                                   _launch.FWD_POINTERS,
                                   tensor_maps=(("k", encoder(1)), ("o", encoder(2))),
                                   args=(np.uint64(99),))
    for round_ in range(2):
        call((10, 20, 30, 40, 50 + round_), stream=7)
    call((11, 20, 30, 40, 0), stream=8)
    assert len(seen) == 3
    handle, config, params_seen, maps, tail = seen[-1]
    assert handle == 0xABC and config == (3, 2, 1, 128, 1, 1, 4096, 8)
    assert [int(params_seen[f]) for f in _launch.FWD_POINTERS] == [11, 20, 30, 40, 0]
    assert int(params_seen["seqlen_q"]) == 77, "a replay must leave the other fields alone"
    assert maps[0][-8:] == (20).to_bytes(8, "little") and maps[0][0] == 1
    assert maps[1][-8:] == (40).to_bytes(8, "little") and maps[1][0] == 2
    assert tail == 99
    # Each map is encoded once per pointer: the replays on known buffers encode nothing.
    assert sorted(set(encoded)) == sorted(encoded) == [(1, 20), (2, 40)]


def test_kernel_call_refuses_scattered_pointer_fields():
    with pytest.raises(ValueError, match="not consecutive"):
        _kernel_call.KernelCall(_fake_function(), 0, (1, 1, 1), 32, 0,
                                np.zeros((), dtype=_launch.FWD_PARAMS), ("q", "v"))


def test_kernel_call_reports_driver_errors(monkeypatch):
    monkeypatch.setattr(_kernel_call, "_driver_launch", lambda: (lambda *a: 1, None))
    monkeypatch.setattr(_kernel_call, "_error_name", lambda code: "CUDA_ERROR_INVALID_VALUE")
    call = _kernel_call.KernelCall(_fake_function(), 0, (1, 1, 1), 32, 0,
                                   np.zeros((), dtype=_launch.FWD_PARAMS), _launch.FWD_POINTERS)
    with pytest.raises(RuntimeError, match="probe: CUDA_ERROR_INVALID_VALUE"):
        call((1, 2, 3, 4, 5), stream=0)


def test_cpu_arrays_are_never_replayed_and_always_validated():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 9, 2, 8), dtype=np.float32)
    before = _replay.size()
    for _ in range(2):
        cuflash.attention(q, q, q, causal=True)
    assert _replay.size() == before
    with pytest.raises(ValueError, match="scale"):
        cuflash.attention(q, q, q, scale=-1.0)
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(q)
    assert _replay.forward_key(t, t, t, None, (False,)) is None
    assert _replay.forward_key(q, q, q, None, (False,)) is None



def test_fuzz_examples_switch(monkeypatch):
    from tests.strategies import examples

    monkeypatch.delenv("CUFLASH_FUZZ_EXAMPLES", raising=False)
    assert examples(25) == 25
    monkeypatch.setenv("CUFLASH_FUZZ_EXAMPLES", "2000")
    assert examples(25) == 2000
    for bad in ("0", "-3", "many"):
        monkeypatch.setenv("CUFLASH_FUZZ_EXAMPLES", bad)
        with pytest.raises(ValueError, match="CUFLASH_FUZZ_EXAMPLES: expected a positive"):
            examples(25)


def test_side_pointers_follow_the_kernels_order_and_copy_slopes_and_sinks():
    """A replay's pointers for the arrays beside q, k, v: sinks, then slopes, bias, mask (0 where
    absent); the slopes and sinks as new Accum copies of the recorded shapes, the bias and the
    mask in place."""
    copies = []

    class Framework:
        @staticmethod
        def accum_copy(x, shape, float64):
            copies.append(np.broadcast_to(x, shape).astype(np.float64 if float64 else np.float32))
            return copies[-1]

        @staticmethod
        def pointer(x):
            return x.__array_interface__["data"][0]

    fw = Framework()
    slopes, sinks = np.arange(3.0), np.ones(3)
    bias, mask = np.zeros((1, 3, 4, 5)), np.ones((4, 5), bool)
    both = _replay.SidePointers(fw, sinks=True, mods=True, sinks_shape=(3,),
                                slopes_shape=(2, 3), float64=False)
    pointers, keep = both((slopes, sinks, bias, mask))
    assert [c.shape for c in copies] == [(3,), (2, 3)] and keep == copies
    assert all(c.dtype == np.float32 for c in copies)
    assert pointers == (fw.pointer(copies[0]), fw.pointer(copies[1]), fw.pointer(bias),
                        fw.pointer(mask))
    np.testing.assert_array_equal(copies[1], [[0, 1, 2], [0, 1, 2]])
    assert both((None, sinks, None, None))[0][1:] == (0, 0, 0)
    backward = _replay.SidePointers(fw, sinks=False, mods=True, sinks_shape=(3,),
                                    slopes_shape=(2, 3), float64=False, backward=True)
    pointers, _ = backward((None, sinks, bias, None))
    assert pointers == (0, fw.pointer(bias), 0, 0)  # slopes, bias, mask, then a null dbias
    only_sinks = _replay.SidePointers(fw, sinks=True, mods=False, sinks_shape=(3,),
                                      slopes_shape=(2, 3), float64=True)
    pointers, keep = only_sinks((None, sinks, None, None))
    assert len(pointers) == 1 and keep[0].dtype == np.float64
    none = _replay.SidePointers(fw, sinks=False, mods=False, sinks_shape=(3,),
                                slopes_shape=(2, 3), float64=False)
    assert none((slopes, sinks, bias, mask)) == ((), [])


def test_side_arrays_of_another_framework_are_not_replayed():
    class Framework:
        @staticmethod
        def side(x):
            return None if isinstance(x, np.ndarray) else ("layout",)

    assert _replay._side_key(Framework(), (None, "device", None, None)) == \
        (None, ("layout",), None, None)
    assert _replay._side_key(Framework(), (None, "device", np.ones(3), None)) is None
