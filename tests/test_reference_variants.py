"""The float64 oracle's variants: sliding window, packed variable-length batches, and a KV
cache (contiguous and paged). Each is held to an independent formulation: an explicit loop over
(query, key) pairs for the window's mask, per-sequence dense attention for varlen and the cache.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuflash import reference


def _rand(rng, *shape):
    return rng.standard_normal(shape)


def _loop_attention(q, k, v, sees, scale):
    """(Sq, H, D) attention with an explicit per-pair visibility function, one head, one row
    at a time: zeros and lse -inf for a row that sees nothing."""
    sq, h, d = q.shape
    out = np.zeros((sq, h, d))
    lse = np.full((h, sq), -np.inf)
    for head in range(h):
        for i in range(sq):
            keys = [j for j in range(k.shape[0]) if sees(i, j)]
            if not keys:
                continue
            s = np.array([scale * q[i, head] @ k[j, head] for j in keys])
            m = s.max()
            w = np.exp(s - m)
            lse[head, i] = m + np.log(w.sum())
            out[i, head] = sum(wj * v[j, head] for wj, j in zip(w / w.sum(), keys, strict=True))
    return out, lse


@settings(max_examples=60, deadline=None)
@given(sq=st.integers(1, 7), sk=st.integers(0, 9), left=st.integers(-1, 10),
       right=st.integers(-1, 10), causal=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_window_matches_the_pairwise_definition(sq, sk, left, right, causal, seed):
    rng = np.random.default_rng(seed)
    q, k, v = _rand(rng, sq, 2, 4), _rand(rng, sk, 2, 4), _rand(rng, sk, 2, 4)
    shift = sk - sq
    eff_right = min(right, 0) if causal and right >= 0 else (0 if causal else right)

    def sees(i, j):
        return ((left < 0 or j >= i + shift - left)
                and (eff_right < 0 or j <= i + shift + eff_right))

    want, want_lse = _loop_attention(q, k, v, sees, 0.5)
    out, lse = reference.attention(q, k, v, window=(left, right), causal=causal, scale=0.5,
                                   return_lse=True)
    np.testing.assert_allclose(out, want, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    np.testing.assert_allclose(lse[np.isfinite(lse)], want_lse[np.isfinite(want_lse)],
                               atol=1e-12)


def test_unbounded_window_is_no_mask_and_left_unbounded_right_zero_is_causal():
    rng = np.random.default_rng(0)
    q, k, v, dout = _rand(rng, 2, 5, 4, 8), _rand(rng, 2, 9, 2, 8), _rand(rng, 2, 9, 2, 8), \
        _rand(rng, 2, 5, 4, 8)
    np.testing.assert_array_equal(reference.attention(q, k, v, window=(-1, -1)),
                                  reference.attention(q, k, v))
    np.testing.assert_array_equal(reference.attention(q, k, v, window=(-1, 0)),
                                  reference.attention(q, k, v, causal=True))
    for got, want in zip(reference.attention_backward(dout, q, k, v, window=(-1, 0)),
                         reference.attention_backward(dout, q, k, v, causal=True), strict=True):
        np.testing.assert_array_equal(got, want)


def test_window_backward_matches_finite_differences():
    rng = np.random.default_rng(1)
    q, k, v, dout = _rand(rng, 4, 2, 3), _rand(rng, 6, 1, 3), _rand(rng, 6, 1, 3), \
        _rand(rng, 4, 2, 3)
    window = (2, 1)
    dq, dk, dv = reference.attention_backward(dout, q, k, v, window=window)
    eps = 1e-6
    for grad, x in ((dq, q), (dk, k), (dv, v)):
        for index in np.ndindex(x.shape):
            saved = x[index]
            x[index] = saved + eps
            up = np.sum(dout * reference.attention(q, k, v, window=window))
            x[index] = saved - eps
            down = np.sum(dout * reference.attention(q, k, v, window=window))
            x[index] = saved
            assert abs((up - down) / (2 * eps) - grad[index]) < 1e-6


@pytest.mark.parametrize("window, error, match", [
    ((3,), TypeError, "pair"), ("ab", TypeError, "pair"), (5, TypeError, "pair"),
    ((1.0, 2), TypeError, "ints"), ((True, 2), TypeError, "ints"), ((-2, 0), ValueError, ">= -1"),
    ((0, -3), ValueError, ">= -1"),
])
def test_bad_window_names_it(window, error, match):
    q = np.zeros((2, 1, 4))
    with pytest.raises(error, match=f"window: .*{match}"):
        reference.attention(q, q, q, window=window)


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 7)), min_size=1, max_size=4),
       causal=st.booleans(), used=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_varlen_is_dense_attention_per_sequence(lengths, causal, used, seed):
    rng = np.random.default_rng(seed)
    lq = np.array([a for a, _ in lengths])
    lk = np.array([b for _, b in lengths])
    cu_q = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lk)]).astype(np.int32)
    q, k, v = _rand(rng, cu_q[-1], 4, 8), _rand(rng, cu_k[-1], 2, 8), _rand(rng, cu_k[-1], 2, 8)
    seqused = (rng.integers(0, lk + 1)).astype(np.int32) if used else None
    out, lse = reference.attention_varlen(q, k, v, cu_q, cu_k, seqused_k=seqused, causal=causal,
                                          return_lse=True)
    assert out.shape == q.shape and lse.shape == (4, cu_q[-1])
    for b in range(len(lengths)):
        rows = slice(cu_q[b], cu_q[b + 1])
        n = lk[b] if seqused is None else seqused[b]
        keys = slice(cu_k[b], cu_k[b] + n)
        want, want_lse = reference.attention(q[rows], k[keys], v[keys], causal=causal,
                                             return_lse=True)
        np.testing.assert_array_equal(out[rows], want)
        np.testing.assert_array_equal(lse[:, rows], want_lse)


@pytest.mark.parametrize("cu_q, cu_k, seqused, error, match", [
    ([0, 2.0, 4], [0, 1, 2], None, TypeError, "cu_seqlens_q: expected integers"),
    ([1, 2, 4], [0, 1, 2], None, ValueError, "cu_seqlens_q: expected prefix sums"),
    ([0, 3, 2], [0, 1, 2], None, ValueError, "cu_seqlens_q: expected prefix sums"),
    ([0, 2, 4], [0, 1, 3], None, ValueError, "cu_seqlens_k: .*ending at the total 2"),
    ([0, 4], [0, 1, 2], None, ValueError, "cu_seqlens_k: expected 2 entries"),
    ([0, 2, 4], [0, 1, 2], [1, 2], ValueError, "seqused_k: expected 0 <="),
])
def test_varlen_bad_input_names_the_argument(cu_q, cu_k, seqused, error, match):
    q, k = np.zeros((4, 2, 4)), np.zeros((2, 2, 4))
    with pytest.raises(error, match=match):
        reference.attention_varlen(q, k, k, np.array(cu_q), np.array(cu_k),
                                   seqused_k=None if seqused is None else np.array(seqused))


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), sq=st.integers(1, 4), snew=st.integers(0, 3),
       page=st.sampled_from([2, 4]), causal=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_kvcache_contiguous_and_paged_equal_dense_attention(batch, sq, snew, page, causal, seed):
    rng = np.random.default_rng(seed)
    capacity = 12
    lengths = rng.integers(0, capacity - snew + 1, size=batch)
    q = _rand(rng, batch, sq, 4, 8)
    k_cache, v_cache = _rand(rng, batch, capacity, 2, 8), _rand(rng, batch, capacity, 2, 8)
    new_k, new_v = _rand(rng, batch, snew, 2, 8), _rand(rng, batch, snew, 2, 8)
    kc_before, vc_before = k_cache.copy(), v_cache.copy()
    out, lse = reference.attention_with_kvcache(
        q, k_cache, v_cache, k=new_k, v=new_v, cache_seqlens=lengths, causal=causal,
        return_lse=True)
    np.testing.assert_array_equal(k_cache, kc_before)  # the oracle never writes
    np.testing.assert_array_equal(v_cache, vc_before)
    for b in range(batch):
        keys = np.concatenate([k_cache[b, :lengths[b]], new_k[b]])
        values = np.concatenate([v_cache[b, :lengths[b]], new_v[b]])
        want, want_lse = reference.attention(q[b], keys, values, causal=causal, return_lse=True)
        np.testing.assert_array_equal(out[b], want)
        np.testing.assert_array_equal(lse[b], want_lse)
    # The same cache as shuffled pages.
    pages_per_seq = capacity // page
    order = rng.permutation(batch * pages_per_seq)
    paged_k = np.empty((batch * pages_per_seq, page, 2, 8))
    paged_v = np.empty_like(paged_k)
    table = np.empty((batch, pages_per_seq), dtype=np.int32)
    for b in range(batch):
        for p in range(pages_per_seq):
            slot = order[b * pages_per_seq + p]
            table[b, p] = slot
            paged_k[slot] = k_cache[b, p * page:(p + 1) * page]
            paged_v[slot] = v_cache[b, p * page:(p + 1) * page]
    paged = reference.attention_with_kvcache(q, paged_k, paged_v, k=new_k, v=new_v,
                                             cache_seqlens=lengths, block_table=table,
                                             causal=causal)
    np.testing.assert_array_equal(paged, out)


def test_kvcache_bad_input_names_the_argument():
    q, cache = np.zeros((2, 1, 2, 4)), np.zeros((2, 6, 1, 4))
    with pytest.raises(ValueError, match=r"cache_seqlens: .* <= the cache's 6"):
        reference.attention_with_kvcache(q, cache, cache, k=np.zeros((2, 2, 1, 4)),
                                         v=np.zeros((2, 2, 1, 4)), cache_seqlens=[5, 1])
    with pytest.raises(TypeError, match="cache_seqlens: expected integers"):
        reference.attention_with_kvcache(q, cache, cache, cache_seqlens=[1.5, 1])
    with pytest.raises(ValueError, match="k, v: pass both"):
        reference.attention_with_kvcache(q, cache, cache, k=np.zeros((2, 1, 1, 4)),
                                         cache_seqlens=1)
    with pytest.raises(ValueError, match=r"block_table: expected page indices in \[0, 2\)"):
        reference.attention_with_kvcache(q, cache, cache, cache_seqlens=1,
                                         block_table=np.array([[0], [2]]))


def test_rotary_turns_each_pair_by_its_angle():
    theta = np.array([[[0.3, 1.1]]])  # (B=1, S=1, rotary_dim / 2 = 2)
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0]).reshape(1, 1, 1, 5)  # D = 5: the last passes
    c, s = np.cos(theta), np.sin(theta)
    halves = reference.rotary(x, c, s)  # pairs (0, 2) and (1, 3)
    want = [1 * c[0, 0, 0] - 3 * s[0, 0, 0], 2 * c[0, 0, 1] - 4 * s[0, 0, 1],
            1 * s[0, 0, 0] + 3 * c[0, 0, 0], 2 * s[0, 0, 1] + 4 * c[0, 0, 1], 5.0]
    np.testing.assert_allclose(halves[0, 0, 0], want, rtol=1e-15)
    pairs = reference.rotary(x, c, s, interleaved=True)  # pairs (0, 1) and (2, 3)
    want = [1 * c[0, 0, 0] - 2 * s[0, 0, 0], 1 * s[0, 0, 0] + 2 * c[0, 0, 0],
            3 * c[0, 0, 1] - 4 * s[0, 0, 1], 3 * s[0, 0, 1] + 4 * c[0, 0, 1], 5.0]
    np.testing.assert_allclose(pairs[0, 0, 0], want, rtol=1e-15)
