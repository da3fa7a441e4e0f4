"""The split-KV decoding path's host side on the CPU: how many splits it picks, which calls it
refuses and why, and `num_splits` checked on every path (the kernel itself: test_gpu_decode.py,
and its compile in test_compile.py)."""

from __future__ import annotations

import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import cuflash
from cuflash._interop import Source
from cuflash._variant import Variant
from cuflash.cuda import _decode
from tests import decode_cases
from tests.strategies import examples


@pytest.fixture
def h100(monkeypatch):
    """An H100's shape: 132 SMs of 228 KB."""
    monkeypatch.setattr(_decode, "_device_shape", lambda device_id: (132, 233472))


@pytest.mark.parametrize("streams, row_tiles, tiles", [
    (8, 1, 128), (8, 1, 2048), (1, 1, 128), (128, 1, 128), (512, 1, 64), (8, 1, 1), (64, 1, 3),
    (64, 1, 512), (1, 1, 7), (16, 2, 128), (16, 8, 4096), (200, 1, 64)])
def test_splits_one_per_sm_within_one_wave(h100, streams, row_tiles, tiles):
    smem = _decode.decode_spec("bfloat16", 128, "none", "none").smem_bytes
    resident = 132 * (233472 // (smem + 1024))
    splits = _decode.num_splits_for(streams, row_tiles, tiles, smem, 0)
    most = min(-(-tiles // _decode.MIN_TILES_PER_SPLIT), _decode.MAX_SPLITS,
               132 // streams, resident // (streams * row_tiles))
    assert 1 <= splits <= max(most, 1)
    if most <= 1:
        assert splits == 1
        return
    assert streams * splits <= 132 and streams * row_tiles * splits <= resident
    # The longest split is as short as `most` splits make it, and no fewer splits do that.
    longest = -(-tiles // splits)
    assert longest == -(-tiles // most)
    assert -(-tiles // (splits - 1)) > longest if splits > 1 else True


def test_the_split_counts_measured_best_on_the_h100(h100):
    """bf16 D 128 cells of docs/performance.md's sweeps (streams = batch x KV heads; 16 query
    rows a tile, so 8/1 at 4 steps has 2 row tiles), each the fastest count timed."""
    smem = _decode.decode_spec("bfloat16", 128, "none", "none").smem_bytes
    best = {  # (streams, row_tiles, tiles): splits
        (8, 1, 128): 16,     # 32/8 B1 8k: 19.3 us (32 splits 20.0, 33 21.7)
        (8, 1, 2048): 16,    # 32/8 B1 128k: 178.3 us (33 splits 183.0)
        (128, 1, 128): 1,    # 32/8 B16 8k: 174.6 us (2 splits 182.9)
        (64, 1, 512): 2,     # 32/8 B8 32k: 351.4 us (4 splits 356.7, 5 440)
        (1, 1, 128): 64,     # 8/1 B1 8k: 10.8 us (128 splits 12.2)
        (1, 1, 2048): 128,   # 8/1 B1 128k: 33.4 us
        (16, 1, 128): 8,     # 8/1 B16 8k: 30.7 us (16 splits 31.6)
        (8, 1, 512): 16,     # 8/1 B8 32k: 52.7 us (32 splits 54.0)
        (64, 1, 64): 2,      # 8/1 B64 4k: 52.5 us (4 splits 53.6)
        (16, 2, 128): 8,     # 8/1 Sq4 B16 8k: 34.1 us (16 splits 40.5)
        (8, 2, 512): 16,     # 8/1 Sq4 B8 32k: 58.6 us (8 splits 83.5)
        (64, 2, 64): 2,      # 8/1 Sq4 B64 4k: 57.2 us (1 split 79.1)
    }
    for (streams, row_tiles, tiles), splits in best.items():
        assert _decode.num_splits_for(streams, row_tiles, tiles, smem, 0) == splits, (
            streams, row_tiles, tiles)
    # Pages of 16, 32/8: one block an SM ran at 0.73-0.84x of two (128k: 2,201 against 2,858
    # GB/s at 16 and 33 splits; B16 8k: 2,342 against 2,877 at 1 and 2).
    assert _decode.num_splits_for(8, 1, 2048, smem, 0, paged=True) == 33
    assert _decode.num_splits_for(128, 1, 128, smem, 0, paged=True) == 2


def _view(shape, dtype="float16", ptr=4096, strides=None):
    """A stand-in for a CuPy view: what `reason` reads."""
    itemsize = np.dtype(dtype).itemsize
    if strides is None:
        strides = tuple(int(np.prod(shape[i + 1:])) * itemsize for i in range(len(shape)))
    return types.SimpleNamespace(shape=shape, dtype=np.dtype(dtype), strides=strides,
                                 data=types.SimpleNamespace(ptr=ptr))


CUDA = Source("cupy", "cuda", 0)


@pytest.fixture
def smem(monkeypatch):
    """The shared memory a block may have: an H100's unless a test says otherwise."""
    limit = {"bytes": 232448}
    monkeypatch.setattr(_decode._compile, "smem_limit", lambda device_id: limit["bytes"])
    return limit


@pytest.mark.parametrize("change, fragment", [
    ({}, None),
    ({"smem": 101376}, "102400 bytes of shared memory"),
    ({"smem": 101376, "dim": 64}, None),
    ({"batch": 65536}, "batch 65536"),
    ({"steps": 0}, "nothing to compute"),
    ({"cc": 75}, "compute capability 7.5"),
    ({"dtype": "float32"}, "dtype float32"),
    ({"dim": 320}, "head dim 320"),
    ({"steps": 17}, "17 query steps"),
    ({"variant": Variant.of(bias=True)}, "score modification 'mods'"),
    ({"page_size": 48}, "page size 48"),
    ({"ptr": 4104}, "not 16-byte aligned"),
    ({"dim": 36}, "not 16-byte aligned"),
])
def test_reason_names_what_the_kernel_cannot_take(change, fragment, smem, monkeypatch):
    monkeypatch.delenv(_decode.SWITCH_ENV, raising=False)
    dim, steps, dtype = change.get("dim", 128), change.get("steps", 1), change.get("dtype",
                                                                                   "float16")
    smem["bytes"] = change.get("smem", smem["bytes"])
    q = _view((change.get("batch", 2), steps, 8, dim), dtype)
    cache = _view((2, 64, 2, dim), dtype, ptr=change.get("ptr", 4096))
    why = _decode.reason(q, cache, cache, variant=change.get("variant", Variant.of()), src=CUDA,
                         page_size=change.get("page_size", 64), paged="page_size" in change,
                         cc=change.get("cc", 90))
    if fragment is None:
        assert why is None
    else:
        assert why is not None and fragment in why


def test_the_kernels_can_be_switched_off(smem, monkeypatch):
    """CUFLASH_DECODE_KERNEL=0 sends every call to the per-sequence path (any other value, or
    none, leaves the kernels on)."""
    q, cache = _view((2, 1, 8, 128)), _view((2, 64, 2, 128))

    def why():
        return _decode.reason(q, cache, cache, variant=Variant.of(), src=CUDA, page_size=64,
                              paged=False, cc=90)

    monkeypatch.delenv(_decode.SWITCH_ENV, raising=False)
    assert why() is None
    monkeypatch.setenv(_decode.SWITCH_ENV, "1")
    assert why() is None
    monkeypatch.setenv(_decode.SWITCH_ENV, "0")
    assert "CUFLASH_DECODE_KERNEL=0" in why()


@pytest.mark.parametrize(("bad", "kind"), [(-1, ValueError), (1.5, TypeError),
                                           (True, TypeError), ("2", TypeError)])
def test_num_splits_is_checked_before_any_write(bad, kind):
    q = np.zeros((1, 1, 2, 8))
    k_cache, v_cache = np.zeros((1, 4, 1, 8)), np.zeros((1, 4, 1, 8))
    new = np.ones((1, 1, 1, 8))
    with pytest.raises(kind, match="num_splits"):
        cuflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=1, k=new, v=new,
                                       num_splits=bad)
    assert not k_cache.any()


def test_num_splits_does_not_change_the_cpu_result():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 4, 8))
    k_cache, v_cache = (rng.standard_normal((2, 20, 2, 8)) for _ in range(2))
    outs = [cuflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=17,
                                           num_splits=n) for n in (0, 1, 7)]
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


@settings(max_examples=examples(40), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(decode_cases.decode_cases())
def test_the_gpu_suites_oracle_agrees_with_the_cpu_path(case):
    """tests/test_gpu_decode.py's expected values (windows, softcap, ALiBi, sinks, rotary,
    leftpad, cache rows, pages, appends) against the CPU path on the same case in float32: a
    failure there is then the kernel's, not the oracle's."""
    case = {**case, "dtype": "float32"}
    host, dev, opts = decode_cases.build(case, lambda x, dtype: x.astype(np.float32))
    want, want_lse, k_after, v_after, written = decode_cases.expected(case, host, opts)
    out, lse = cuflash.attention_with_kvcache(dev["q"], dev["k_cache"], dev["v_cache"],
                                              k=dev["k"], v=dev["v"],
                                              num_splits=case["splits"], **opts)
    np.testing.assert_allclose(out, want, rtol=2e-4, atol=2e-4)
    seen = np.isfinite(want_lse)
    np.testing.assert_array_equal(np.isfinite(lse), seen)
    np.testing.assert_allclose(lse[seen], want_lse[seen], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(dev["v_cache"], v_after)
    np.testing.assert_array_equal(dev["k_cache"][~written], k_after[~written])
    np.testing.assert_allclose(dev["k_cache"][written], k_after[written], rtol=1e-5, atol=1e-5)
