"""`attention_with_kvcache` on the CPU path against the float64 reference: contiguous and paged
caches (shuffled block tables, any page size), appends that cross page boundaries, GQA, causal
and windows, `cache_batch_idx`; the caches hold the new keys afterwards and are unchanged bit for
bit everywhere else; bad input is refused before any write. (On a GPU the same code runs each
sequence on the dense kernels.)"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import reference
from tests.strategies import examples

TOL = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=2e-5, atol=2e-6)}


@st.composite
def caches(draw):
    batch = draw(st.integers(1, 3))
    hkv, group = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 4]))
    d = draw(st.sampled_from([8, 24]))
    sq = draw(st.integers(1, 5))
    new = draw(st.sampled_from([0, 0, 1, 3, 7]))
    paged = draw(st.booleans())
    page_size = draw(st.sampled_from([1, 4, 16]))
    max_pages = draw(st.integers(1, 6))
    capacity = max_pages * page_size if paged else draw(st.integers(1, 40))
    if capacity < new:
        capacity = new
        max_pages = -(-new // page_size)
    lengths = [draw(st.integers(0, (max_pages * page_size if paged else capacity) - new))
               for _ in range(batch)]
    mask = draw(st.sampled_from([{}, {"causal": False}, {"window": (4, 0)}, {"window": (2, 1)}]))
    dtype = draw(st.sampled_from(["float64", "float32"]))
    seed = draw(st.integers(0, 2**31 - 1))
    leftpad = None if paged else [draw(st.integers(0, n)) for n in lengths]
    rotary = None
    if new:  # rotary needs new keys: (rotary_dim, interleaved)
        rotary = draw(st.sampled_from([None, (d, False), (d, True), (d // 2, False),
                                       (d // 2, True)]))
    return batch, hkv, group, d, sq, new, paged, page_size, max_pages, capacity, lengths, mask, \
        dtype, seed, leftpad, rotary


@settings(max_examples=examples(40), deadline=None)
@given(caches())
def test_matches_the_reference_and_appends_in_place(case):
    (batch, hkv, group, d, sq, new, paged, page_size, max_pages, capacity, lengths, mask, dtype,
     seed, leftpad, rotary) = case
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, sq, hkv * group, d)).astype(dtype)
    table = None
    if paged:
        pages = batch * max_pages + 2  # spare pages no sequence uses
        shape = (pages, page_size, hkv, d)
        table = rng.permutation(pages)[:batch * max_pages].reshape(batch, max_pages)
        table = table.astype(np.int32)
    else:
        shape = (batch, capacity, hkv, d)
    k_cache, v_cache = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    k = v = None
    if new or rng.integers(2):
        k, v = (rng.standard_normal((batch, new, hkv, d)).astype(dtype) for _ in range(2))
    seqlens = np.asarray(lengths, np.int32)
    extra = {}
    if leftpad is not None and rng.integers(2):
        extra["cache_leftpad"] = np.asarray(leftpad, np.int32)
    if rotary is not None:
        positions = 64 + capacity + sq
        angles = rng.uniform(0, 6.3, (positions, rotary[0] // 2))
        extra.update(rotary_cos=np.cos(angles).astype(dtype), rotary_sin=np.sin(angles)
                     .astype(dtype), rotary_interleaved=rotary[1])
    ref, ref_lse = reference.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens,
                                                    k=k, v=v, block_table=table, **mask, **extra,
                                                    return_lse=True)
    before_k, before_v = k_cache.copy(), v_cache.copy()
    out, lse = cuflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, k=k,
                                              v=v, block_table=table, **mask, **extra,
                                              return_lse=True)
    if rotary is not None:  # the cache receives the rotated keys
        start = extra.get("cache_leftpad", np.zeros(batch, np.int32))
        pos = (seqlens - start)[:, None] + np.arange(new)[None]
        k = reference.rotary(k, extra["rotary_cos"][pos].astype(np.float64),
                             extra["rotary_sin"][pos].astype(np.float64),
                             interleaved=rotary[1]).astype(dtype)
    np.testing.assert_allclose(out, ref, **TOL[dtype])
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-6, atol=1e-6)
    assert out.dtype == q.dtype and lse.dtype == np.float32

    # The new keys sit at their positions; every other slot is unchanged, bit for bit.
    written = np.zeros(shape[:2], dtype=bool)
    for b in range(batch):
        for i in range(new):
            pos = lengths[b] + i
            at = (table[b, pos // page_size], pos % page_size) if paged else (b, pos)
            written[at] = True
            np.testing.assert_allclose(k_cache[at], k[b, i], **TOL[dtype])
            np.testing.assert_array_equal(v_cache[at], v[b, i])
    np.testing.assert_array_equal(k_cache[~written], before_k[~written])
    np.testing.assert_array_equal(v_cache[~written], before_v[~written])


def test_cache_batch_idx_picks_the_rows():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 1, 2, 8))
    k_cache, v_cache = (rng.standard_normal((4, 10, 1, 8)) for _ in range(2))
    k, v = (rng.standard_normal((2, 1, 1, 8)) for _ in range(2))
    idx = np.array([3, 1], np.int32)
    want = reference.attention_with_kvcache(q, k_cache[idx], v_cache[idx], cache_seqlens=5, k=k,
                                            v=v)
    out = cuflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=5, k=k, v=v,
                                         cache_batch_idx=idx)
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(k_cache[3, 5], k[0, 0])
    np.testing.assert_array_equal(k_cache[1, 5], k[1, 0])


def test_score_modifications_per_sequence():
    """softcap, per-sequence ALiBi slopes and sinks against the reference on each sequence's
    keys after the append (causal, bottom-right aligned)."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 3, 4, 8))
    k_cache, v_cache = (rng.standard_normal((2, 12, 2, 8)) for _ in range(2))
    k, v = (rng.standard_normal((2, 3, 2, 8)) for _ in range(2))
    seqlens = np.array([4, 7], np.int32)
    slopes, sinks = rng.uniform(0, 0.5, (2, 4)), rng.standard_normal(4)
    out = cuflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, k=k, v=v,
                                         softcap=3.0, alibi_slopes=slopes, sinks=sinks)
    for b in range(2):
        n = seqlens[b] + 3
        want = reference.attention(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n],
                                   causal=True, softcap=3.0, alibi_slopes=slopes[b],
                                   sinks=sinks)
        np.testing.assert_allclose(out[b:b + 1], want, rtol=1e-10, atol=1e-12)


def test_torch_caches_are_written_in_place():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    q = torch.tensor(rng.standard_normal((1, 2, 2, 8)), dtype=torch.float32)
    k_cache, v_cache = (torch.zeros((2, 4, 1, 8)) for _ in range(2))
    k, v = (torch.tensor(rng.standard_normal((1, 3, 1, 8)), dtype=torch.float32)
            for _ in range(2))
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    out = cuflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=3, k=k, v=v,
                                         block_table=table)
    assert isinstance(out, torch.Tensor)
    # Positions 3, 4, 5 of the sequence: page 1 slot 3, then page 0 slots 0 and 1.
    assert torch.equal(k_cache[1, 3], k[0, 0]) and torch.equal(k_cache[0, 0:2], k[0, 1:3])
    want = reference.attention_with_kvcache(q.numpy(), np.zeros((2, 4, 1, 8)),
                                            np.zeros((2, 4, 1, 8)), cache_seqlens=3,
                                            k=k.numpy(), v=v.numpy(), block_table=table.numpy())
    np.testing.assert_allclose(out.numpy(), want, rtol=2e-5, atol=2e-6)


def _good():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, 1, 2, 8)).astype(np.float32)
    k_cache, v_cache = (rng.standard_normal((2, 6, 1, 8)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((2, 2, 1, 8)).astype(np.float32) for _ in range(2))
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v,
                cache_seqlens=np.array([1, 4], np.int32))


@pytest.mark.parametrize("change, fragments", [
    (dict(cache_seqlens=np.array([1, 5], np.int32)), ("cache_seqlens:", "capacity 6", "[1, 5]")),
    (dict(cache_seqlens=np.array([1, 4], np.int64)), ("cache_seqlens:", "int32")),
    (dict(cache_seqlens=np.array([1], np.int32)), ("cache_seqlens:", "shape (2,)")),
    (dict(k=None), ("k, v:", "both")),
    (dict(k=np.zeros((2, 2, 2, 8), np.float32)), ("k:", "(B=2, Snew, 1, 8)")),
    (dict(v_cache=np.zeros((2, 5, 1, 8), np.float32)), ("v_cache:", "shape of k_cache")),
    (dict(k_cache=np.zeros((2, 6, 1, 8)), v_cache=np.zeros((2, 6, 1, 8))),
     ("k_cache:", "dtype float32")),
    (dict(block_table=np.array([[0, 1], [1, 2]], np.int32)), ("block_table:", "[0, 2)")),
    (dict(block_table=np.array([[0], [1]], np.int64)), ("block_table:", "int32")),
    (dict(cache_batch_idx=np.array([0, 0], np.int32)), ("cache_batch_idx:", "distinct")),
    (dict(block_table=np.array([[0, 1], [0, 1]], np.int32), cache_seqlens=np.array([1, 1],
                                                                                np.int32)),
     ("block_table:", "same cache slot")),
    (dict(cache_batch_idx=np.array([0, 2], np.int32)), ("cache_batch_idx:", "[0, 2)")),
    (dict(q=np.zeros((2, 1, 3, 8), np.float32), k_cache=np.zeros((2, 6, 2, 8), np.float32),
          v_cache=np.zeros((2, 6, 2, 8), np.float32)), ("k_cache:", "multiple of Hkv")),
    (dict(cache_leftpad=np.array([2, 0], np.int32)), ("cache_leftpad:", "<= cache_seqlens[b]")),
    (dict(cache_leftpad=np.array([0, 0], np.int32),
          block_table=np.array([[0], [1]], np.int32)), ("cache_leftpad:", "paged")),
    (dict(rotary_cos=np.ones((9, 4), np.float32)), ("rotary_cos, rotary_sin:", "both")),
    (dict(rotary_cos=np.ones((9, 4), np.float32), rotary_sin=np.ones((9, 3), np.float32)),
     ("rotary_cos:", "(seqlen_ro, rotary_dim / 2)")),
    (dict(rotary_cos=np.ones((9, 5), np.float32), rotary_sin=np.ones((9, 5), np.float32)),
     ("rotary_cos:", "rotary_dim <= D = 8")),
    (dict(rotary_cos=np.ones((5, 4), np.float32), rotary_sin=np.ones((5, 4), np.float32)),
     ("rotary_cos:", "5 positions", "up to 5")),
    (dict(k=None, v=None, rotary_cos=np.ones((9, 4), np.float32),
          rotary_sin=np.ones((9, 4), np.float32)), ("rotary_cos:", "needs new keys")),
    (dict(softcap=-1.0), ("softcap:", ">= 0")),
    (dict(alibi_slopes=np.ones(3, np.float32)), ("alibi_slopes:", "(2,) or (2, 2)")),
    (dict(sinks=np.ones((2, 2), np.float32)), ("sinks:", "(2,) (Hq)")),
], ids=lambda x: "" if isinstance(x, dict) else x[0].rstrip(":"))
def test_bad_input_is_refused_before_any_write(change, fragments):
    args = {**_good(), **change}
    before = [args["k_cache"].copy(), args["v_cache"].copy()]
    with pytest.raises((TypeError, ValueError)) as err:
        cuflash.attention_with_kvcache(**args)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))
    np.testing.assert_array_equal(args["k_cache"], before[0])
    np.testing.assert_array_equal(args["v_cache"], before[1])


def test_jax_caches_cannot_take_new_keys():
    jnp = pytest.importorskip("jax.numpy")
    args = {name: jnp.asarray(x) if name != "cache_seqlens" else x
            for name, x in _good().items()}
    with pytest.raises(TypeError, match="k_cache: JAX arrays are immutable"):
        cuflash.attention_with_kvcache(**args)
    args["k"] = args["v"] = None
    out = cuflash.attention_with_kvcache(**args)
    assert type(out).__module__.startswith("jax")
