"""`attention_varlen` and its backward (flash-attn's packed layout) on the CPU path, against the
float64 reference sequence by sequence; torch CPU autograd through it; every bad input refused
naming the argument. (On a GPU the same code runs each sequence on the dense kernels.)"""

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
def packed(draw):
    batch = draw(st.integers(0, 4))
    lengths_q = draw(st.lists(st.integers(0, 70), min_size=batch, max_size=batch))
    lengths_k = draw(st.lists(st.integers(0, 70), min_size=batch, max_size=batch))
    hkv = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 3]))
    d = draw(st.sampled_from([8, 19, 32]))
    mask = draw(st.sampled_from([{}, {"causal": True}, {"window": (5, 2)}, {"window": (-1, 3)}]))
    used = draw(st.booleans())
    seqused = [draw(st.integers(0, n)) for n in lengths_k] if used else None
    dtype = draw(st.sampled_from(["float64", "float32"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return lengths_q, lengths_k, hkv, group, d, mask, seqused, dtype, seed


def _arrays(lengths_q, lengths_k, hkv, group, d, dtype, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((sum(lengths_q), hkv * group, d)).astype(dtype)
    k, v = (rng.standard_normal((sum(lengths_k), hkv, d)).astype(dtype) for _ in range(2))
    cu_q = np.concatenate([[0], np.cumsum(lengths_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lengths_k)]).astype(np.int32)
    return q, k, v, cu_q, cu_k


@settings(max_examples=examples(40), deadline=None)
@given(packed())
def test_matches_the_reference_forward_and_backward(case):
    lengths_q, lengths_k, hkv, group, d, mask, seqused, dtype, seed = case
    q, k, v, cu_q, cu_k = _arrays(lengths_q, lengths_k, hkv, group, d, dtype, seed)
    used = None if seqused is None else np.asarray(seqused, np.int32)
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, seqused_k=used, **mask,
                                        return_lse=True)
    ref, ref_lse = reference.attention_varlen(q, k, v, cu_q, cu_k, seqused_k=used, **mask,
                                              return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == np.float32
    np.testing.assert_allclose(out, ref, **TOL[dtype])
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-6, atol=1e-6)

    rng = np.random.default_rng(seed + 1)
    dout = rng.standard_normal(q.shape).astype(dtype)
    dq, dk, dv = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k,
                                                   seqused_k=used, **mask)
    # The reference gradient, sequence by sequence; keys past seqused_k get none.
    want = [np.zeros(x.shape) for x in (q, k, v)]
    n_used = np.diff(cu_k) if used is None else used
    for b in range(len(lengths_q)):
        rows = slice(cu_q[b], cu_q[b + 1])
        keys = slice(cu_k[b], cu_k[b] + n_used[b])
        if rows.stop == rows.start or keys.stop == keys.start:
            continue
        grads = reference.attention_backward(dout[rows], q[rows], k[keys], v[keys], **mask)
        for total, g, sl in zip(want, grads, (rows, keys, keys), strict=True):
            total[sl] = g
    for got, ref_grad in zip((dq, dk, dv), want, strict=True):
        assert got.dtype == q.dtype
        np.testing.assert_allclose(got, ref_grad, **TOL[dtype])


@pytest.mark.parametrize("mask", [{}, {"causal": True}, {"window": (4, 1)}])
def test_score_modifications_per_sequence(mask):
    """softcap, per-sequence ALiBi slopes ((B, Hq)) and sinks, forward and backward (the sinks'
    gradient summed over the sequences), against the reference sequence by sequence; a
    sequence of no queries and one of no keys included."""
    lengths_q, lengths_k = [7, 0, 5, 9], [11, 6, 0, 9]
    q, k, v, cu_q, cu_k = _arrays(lengths_q, lengths_k, 2, 2, 16, "float64", 3)
    rng = np.random.default_rng(4)
    slopes = rng.uniform(0, 0.5, (4, 4))
    sinks = rng.standard_normal(4)
    mods = {"softcap": 2.0, "sinks": sinks, **mask}
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, alibi_slopes=slopes, **mods,
                                        return_lse=True)
    dout = rng.standard_normal(q.shape)
    dq, dk, dv, dsinks = cuflash.attention_varlen_backward(
        dout, q, k, v, out, lse, cu_q, cu_k, alibi_slopes=slopes, return_dsinks=True, **mods)
    want_dsinks = np.zeros(4)
    for b in range(4):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        ref, ref_lse = reference.attention(q[rows], k[keys], v[keys], alibi_slopes=slopes[b],
                                           **mods, return_lse=True)
        np.testing.assert_allclose(out[rows], ref, **TOL["float64"])
        np.testing.assert_allclose(lse[:, rows], ref_lse, rtol=1e-6, atol=1e-6)
        grads = reference.attention_grads(dout[rows], q[rows], k[keys], v[keys],
                                          alibi_slopes=slopes[b], **mods)
        for got, name, sl in ((dq, "q", rows), (dk, "k", keys), (dv, "v", keys)):
            np.testing.assert_allclose(got[sl], grads[name], **TOL["float64"])
        want_dsinks += grads["sinks"]
    # lse is float32, and the CPU backward recomputes its statistics: dsinks is float64-exact.
    np.testing.assert_allclose(dsinks, want_dsinks, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"^alibi_slopes: expected \(4, Hq\)"):
        cuflash.attention_varlen(q, k, v, cu_q, cu_k, alibi_slopes=slopes[:3])


@pytest.mark.parametrize("dv", [1, 40])
def test_value_head_dim_of_its_own(dv):
    """v (total_k, Hkv, Dv) with Dv != D: out and dout have Dv, forward and backward against the
    reference sequence by sequence (keys past seqused_k get zero dv of v's shape); GQA, causal,
    a sequence of no queries and one of no keys; the oracle's own varlen agrees."""
    lengths_q, lengths_k, used = [7, 0, 5, 9], [11, 6, 0, 9], [8, 6, 0, 9]
    q, k, _, cu_q, cu_k = _arrays(lengths_q, lengths_k, 2, 2, 16, "float64", 8)
    rng = np.random.default_rng(9)
    v = rng.standard_normal((sum(lengths_k), 2, dv))
    seqused = np.asarray(used, np.int32)
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, seqused_k=seqused, causal=True,
                                        return_lse=True)
    assert out.shape == (sum(lengths_q), 4, dv) and out.dtype == q.dtype
    ref = reference.attention_varlen(q, k, v, cu_q, cu_k, seqused_k=seqused, causal=True)
    np.testing.assert_allclose(out, ref, **TOL["float64"])
    dout = rng.standard_normal(out.shape)
    dq, dk, dv_ = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k,
                                                    seqused_k=seqused, causal=True)
    assert (dq.shape, dk.shape, dv_.shape) == (q.shape, k.shape, v.shape)
    want = [np.zeros(x.shape) for x in (q, k, v)]
    for b in range(4):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b] + used[b])
        grads = reference.attention_backward(dout[rows], q[rows], k[keys], v[keys], causal=True)
        for total, g, sl in zip(want, grads, (rows, keys, keys), strict=True):
            total[sl] = g
    for got, w in zip((dq, dk, dv_), want, strict=True):
        np.testing.assert_allclose(got, w, **TOL["float64"])
    with pytest.raises(ValueError, match=rf"dout: expected shape \(21, 4, {dv}\)"):
        cuflash.attention_varlen_backward(q, q, k, v, out, lse, cu_q, cu_k)
    empty = np.zeros(1, np.int32)
    out0 = cuflash.attention_varlen(q[:0], k[:0], v[:0], empty, empty)
    assert out0.shape == (0, 4, dv)


def test_torch_autograd_through_the_packed_batch():
    torch = pytest.importorskip("torch")
    q, k, v, cu_q, cu_k = _arrays([5, 0, 9], [7, 3, 4], 2, 2, 16, "float64", 3)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    out, lse = cuflash.attention_varlen(tq, tk, tv, torch.tensor(cu_q), torch.tensor(cu_k),
                                        causal=True, return_lse=True)
    assert isinstance(out, torch.Tensor) and out.shape == tq.shape
    dout = np.random.default_rng(4).standard_normal(q.shape)
    out.backward(torch.tensor(dout))
    want = cuflash.attention_varlen_backward(dout, q, k, v, out.detach().numpy(),
                                             lse.detach().numpy(), cu_q, cu_k, causal=True)
    for t, w in zip((tq, tk, tv), want, strict=True):
        np.testing.assert_allclose(t.grad.numpy(), w, rtol=1e-10, atol=1e-12)


def test_empty_batch():
    q = np.zeros((0, 2, 8))
    cu = np.zeros(1, np.int32)
    out, lse = cuflash.attention_varlen(q, q[:, :1], q[:, :1], cu, cu, return_lse=True)
    assert out.shape == (0, 2, 8) and lse.shape == (2, 0)
    dq, dk, dv = cuflash.attention_varlen_backward(q, q, q[:, :1], q[:, :1], out, lse, cu, cu)
    assert dq.shape == (0, 2, 8) and dk.shape == dv.shape == (0, 1, 8)


def _good():
    return _arrays([3, 4], [5, 2], 1, 2, 8, "float32", 0)


@pytest.mark.parametrize("change, fragments", [
    (dict(cu_seqlens_q=np.array([0, 3, 7], np.int64)), ("cu_seqlens_q:", "int32", "int64")),
    (dict(cu_seqlens_k=[0, 5, 7]), ("cu_seqlens_k:", "int32 array", "list")),
    (dict(cu_seqlens_q=np.array([1, 3, 7], np.int32)), ("cu_seqlens_q:", "[0] == 0", "got 1")),
    (dict(cu_seqlens_k=np.array([0, 6, 5, 7], np.int32)), ("cu_seqlens_k:", "non-decreasing")),
    (dict(cu_seqlens_q=np.array([0, 3, 8], np.int32)), ("cu_seqlens_q:", "8", "total rows (7)")),
    (dict(cu_seqlens_k=np.array([0, 7], np.int32)), ("cu_seqlens_k:", "expected 3 entries")),
    (dict(cu_seqlens_q=np.array([[0, 3, 7]], np.int32)), ("cu_seqlens_q:", "1-D")),
    (dict(seqused_k=np.array([6, 1], np.int32)), ("seqused_k:", "<= the key length", "[5, 2]")),
    (dict(seqused_k=np.array([1], np.int32)), ("seqused_k:", "shape (2,)")),
    (dict(max_seqlen_q=3), ("max_seqlen_q:", "shorter than the longest sequence (4)")),
    (dict(max_seqlen_k=2.5), ("max_seqlen_k:", "an int or None")),
    (dict(q=np.zeros((1, 7, 2, 8), np.float32)), ("q:", "(total, heads, head_dim)")),
    (dict(v=np.zeros((6, 1, 8), np.float32)), ("v:", "the shape of k")),
    (dict(v=np.zeros((7, 2, 8), np.float32)), ("v:", "the shape of k (7, 1, 8)",
                                                "but for the last axis", "got (7, 2, 8)")),
], ids=lambda x: "" if isinstance(x, dict) else x[0].rstrip(":"))
def test_bad_input_is_refused(change, fragments):
    q, k, v, cu_q, cu_k = _good()
    args = {**dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k), **change}
    with pytest.raises((TypeError, ValueError)) as err:
        cuflash.attention_varlen(**args)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_backward_checks_out_and_lse_shapes():
    q, k, v, cu_q, cu_k = _good()
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True)
    with pytest.raises(ValueError, match=r"lse: expected shape \(2, 7\)"):
        cuflash.attention_varlen_backward(q, q, k, v, out, lse[:, :3], cu_q, cu_k)


def test_jax_arrays_come_back_as_jax():
    jnp = pytest.importorskip("jax.numpy")
    q, k, v, cu_q, cu_k = _arrays([4, 6], [3, 8], 1, 2, 8, "float32", 5)
    out = cuflash.attention_varlen(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                   jnp.asarray(cu_q), jnp.asarray(cu_k), window=(2, 0))
    assert type(out).__module__.startswith("jax")
    ref = reference.attention_varlen(q, k, v, cu_q, cu_k, window=(2, 0))
    np.testing.assert_allclose(np.asarray(out), ref, **TOL["float32"])


@settings(max_examples=examples(25), deadline=None)
@given(packed())
def test_under_jax_jit_with_traced_prefix_sums(case):
    """Traced prefix sums take cuflash.jax.attention_varlen (one call, a document mask): the
    forward, lse and jax.grad equal the eager per-sequence path's forward and backward."""
    jax = pytest.importorskip("jax")
    lengths_q, lengths_k, hkv, group, d, mask, seqused, _, seed = case
    q, k, v, cu_q, cu_k = _arrays(lengths_q, lengths_k, hkv, group, d, "float32", seed)
    used = None if seqused is None else np.asarray(seqused, np.int32)
    dout = np.random.default_rng(seed + 1).standard_normal(q.shape).astype(np.float32)

    @jax.jit
    def run(q, k, v, cu_q, cu_k, used, dout):
        def loss(q, k, v):
            out = cuflash.attention_varlen(q, k, v, cu_q, cu_k, seqused_k=used, **mask)
            return (out * dout).sum()

        out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, seqused_k=used, **mask,
                                            return_lse=True)
        return out, lse, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    out, lse, grads = run(q, k, v, cu_q, cu_k, used, dout)
    want, want_lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, seqused_k=used, **mask,
                                              return_lse=True)
    want_grads = cuflash.attention_varlen_backward(dout, q, k, v, want, want_lse, cu_q, cu_k,
                                                   seqused_k=used, **mask)
    np.testing.assert_allclose(np.asarray(out), want, **TOL["float32"])
    np.testing.assert_allclose(np.asarray(lse), want_lse, rtol=1e-5, atol=1e-5)
    for got, ref in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5)


def test_backward_and_sinks_under_jax_jit():
    """attention_varlen_backward under jit (the vjp of the masked forward) with sinks and their
    gradient, a sequence of no queries and one of no keys, against the eager path."""
    jax = pytest.importorskip("jax")
    q, k, v, cu_q, cu_k = _arrays([7, 0, 5, 9], [11, 6, 0, 9], 2, 2, 16, "float32", 3)
    rng = np.random.default_rng(4)
    sinks = rng.standard_normal(4).astype(np.float32)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    opts = {"causal": True, "window": (4, -1), "softcap": 2.0}
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, sinks=sinks, return_lse=True, **opts)
    want = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, sinks=sinks,
                                             return_dsinks=True, **opts)
    # On the CPU backend: on CUDA the kernels do not combine a softcap with the document mask.
    with jax.default_device(jax.devices("cpu")[0]):
        got = jax.jit(lambda *a: cuflash.attention_varlen_backward(
            *a, sinks=sinks, return_dsinks=True, **opts))(dout, q, k, v, out, lse, cu_q, cu_k)
    for name, g, w in zip(("dq", "dk", "dv", "dsinks"), got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-5, err_msg=name)


def test_traced_prefix_sums_refuse_what_one_packed_call_cannot_do():
    jax = pytest.importorskip("jax")
    q = np.ones((6, 2, 8), np.float32)
    cu = np.array([0, 2, 6], np.int32)
    kv = q[:, :1]
    with pytest.raises(NotImplementedError, match="alibi_slopes: ALiBi needs each sequence"):
        jax.jit(lambda c: cuflash.attention_varlen(q, kv, kv, c, c,
                                                   alibi_slopes=np.ones(2, np.float32)))(cu)
    with pytest.raises(TypeError, match="cu_seqlens_k: expected an int32 array"):
        jax.jit(lambda c: cuflash.attention_varlen(q, kv, kv, c, c.astype(np.int16)))(cu)
    with pytest.raises(ValueError, match="seqused_k: expected shape \\(2,\\)"):
        jax.jit(lambda c: cuflash.attention_varlen(q, kv, kv, c, c, seqused_k=c))(cu)
    with pytest.raises(NotImplementedError, match="dropout_p: not with traced JAX prefix"):
        jax.jit(lambda c: cuflash.attention_varlen(q, kv, kv, c, c, dropout_p=0.1,
                                                   rng=(1, 2)))(cu)
    with pytest.raises(TypeError, match="cache_seqlens: got a traced JAX value"):
        jax.jit(lambda c: cuflash.attention_with_kvcache(
            q[None, :1], kv[None], kv[None], cache_seqlens=c))(np.array([3], np.int32))


def test_dropout_draws_one_stream_per_sequence():
    """Sequence b of a packed call draws (seed, offset + b) (offsets wrapping at 2**64), with
    seqused_k and empty sequences: out against the reference, the gradients against the
    per-sequence reference gradients of those streams, and a sequence equals a one-sequence
    dense call on its stream."""
    rng = np.random.default_rng(12)
    cu_q = np.array([0, 5, 5, 14, 30], np.int32)
    cu_k = np.array([0, 7, 9, 20, 36], np.int32)
    used = np.array([7, 0, 9, 16], np.int32)
    q, dout = (rng.standard_normal((30, 4, 16)) for _ in range(2))
    k, v = (rng.standard_normal((36, 2, 16)) for _ in range(2))
    stream = (3, 2**64 - 2)
    opts = {"causal": True, "dropout_p": 0.3, "rng": stream, "seqused_k": used}
    out, lse = cuflash.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **opts)
    np.testing.assert_allclose(out, reference.attention_varlen(q, k, v, cu_q, cu_k, **opts),
                               rtol=1e-12, atol=1e-12)
    dq, dk, dv = cuflash.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, **opts)
    for b in range(4):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b] + used[b])
        seq = (stream[0], (stream[1] + b) % 2**64)
        dense = cuflash.attention(q[rows], k[keys], v[keys], causal=True, dropout_p=0.3, rng=seq)
        np.testing.assert_array_equal(out[rows], dense)
        want = reference.attention_grads(dout[rows], q[rows], k[keys], v[keys], causal=True,
                                         dropout_p=0.3, rng=seq)
        np.testing.assert_allclose(dq[rows], want["q"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dk[keys], want["k"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dv[keys], want["v"], rtol=1e-10, atol=1e-12)
    # consecutive sequences of one shape would share a mask with one stream: offsets differ
    assert not np.array_equal(cuflash.dropout_mask(q[:5], k[:7], dropout_p=0.3, rng=stream),
                              cuflash.dropout_mask(q[:5], k[:7], dropout_p=0.3,
                                                   rng=(3, 2**64 - 1)))
