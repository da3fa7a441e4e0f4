"""Attention dropout (``dropout_p``, ``rng``) on the CPU: the Philox stream against Random123's
known answers and the documented element layout; keep rate and independence of the mask
(statistical, with bounds of several standard deviations); unbiasedness of the output over many
streams; forward and backward against the float64 reference given the same stream (Hypothesis,
every CPU dtype, GQA, masks, sinks, bias) by the accuracy rule; the reference's gradients against
finite differences; validation. CUDA refuses dropout for now (tested with a stand-in source).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import _dropout, reference
from tests.accuracy import (
    assert_matches_reference,
    backward_eps,
    naive_attention,
    naive_attention_backward,
)
from tests.strategies import examples

# Random123's known-answer vectors for philox4x32_10: (counter, key) -> output.
KNOWN = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize(("counter", "key", "want"), KNOWN)
def test_philox_matches_random123(counter, key, want):
    got = tuple(int(x) for x in _dropout.philox4x32(counter, key))
    assert got == want


def test_an_elements_word_is_where_the_docstring_says():
    """Element (b, h, i, j) reads word j % 4 of the block at counter (n, offset), n = ((b * Hq
    + h) * Sq + i) * ceil(Sk / 4) + j // 4; kept where the word reaches floor(p * 2^32)."""
    shape, p = (2, 3, 5, 11), 0.37
    seed, offset = 0x1234_5678_9ABC_DEF0, 0xFEDC_BA98_7654_3210
    kept = _dropout.keep(shape, p, (seed, offset))
    for b, h, i, j in [(0, 0, 0, 0), (1, 2, 4, 10), (1, 0, 3, 7), (0, 2, 1, 4)]:
        n = ((b * 3 + h) * 5 + i) * 3 + j // 4
        words = _dropout.philox4x32(
            (n & 0xFFFFFFFF, n >> 32, offset & 0xFFFFFFFF, offset >> 32),
            (seed & 0xFFFFFFFF, seed >> 32))
        assert kept[b, h, i, j] == (int(words[j % 4]) >= int(p * 2**32))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_the_keep_rate_is_one_minus_p(p):
    shape = (2, 4, 150, 173)
    n = np.prod(shape)
    kept = _dropout.keep(shape, p, (11, 3))
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(kept.mean() - (1 - p)) < 6 * sigma
    # per row too: no row is systematically off (each row's rate within 6 sigma of its own n)
    rows = kept.mean(axis=-1)
    assert np.all(np.abs(rows - (1 - p)) < 6 * np.sqrt(p * (1 - p) / shape[-1]))


def test_streams_are_independent():
    """Two offsets, two seeds, and neighbouring positions agree as independent draws do:
    ``(1 - p)^2 + p^2`` of the time."""
    shape, p = (1, 2, 200, 200), 0.4
    n = np.prod(shape)
    base = _dropout.keep(shape, p, (5, 0))
    want = (1 - p) ** 2 + p**2
    sigma = np.sqrt(want * (1 - want) / n)
    for other in (_dropout.keep(shape, p, (5, 1)), _dropout.keep(shape, p, (6, 0)),
                  np.roll(base, 1, axis=-1), np.roll(base, 1, axis=-2)):
        assert abs(np.mean(base == other) - want) < 6 * sigma
    assert np.array_equal(base, _dropout.keep(shape, p, (5, 0)))  # a pure function


def test_dropout_is_unbiased():
    """The mean over many streams of the dropped-out output is the output without dropout
    (each probability's expectation is itself): within 6 standard errors, elementwise."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 6, 2, 8)) for _ in range(3))
    p, runs = 0.3, 400
    outs = np.stack([cuflash.attention(q, k, v, causal=True, dropout_p=p, rng=(9, i))
                     for i in range(runs)])
    want = reference.attention(q, k, v, causal=True)
    err = np.abs(outs.mean(axis=0) - want)
    assert np.all(err <= 6 * outs.std(axis=0) / np.sqrt(runs) + 1e-12)


@settings(max_examples=examples(40), deadline=None)
@given(data=st.data())
def test_dropout_matches_the_reference(data):
    """Random shapes (Sk past one CPU key block), GQA, masks, sinks and a bias, every CPU
    dtype: out, lse, dq, dk, dv against the float64 reference of the same stream, by the
    accuracy rule (its naive counterpart drops the same probabilities)."""
    draw = data.draw
    dtype = draw(st.sampled_from(["float16", "float32", "float64"]))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 2))
    b, sq = draw(st.integers(1, 2)), draw(st.integers(1, 40))
    sk = draw(st.sampled_from([1, 7, 33, 520]))
    d = draw(st.sampled_from([8, 16]))
    mask = draw(st.sampled_from([{}, {"causal": True}, {"window": (draw(st.integers(-1, 9)),
                                                                   draw(st.integers(-1, 9)))}]))
    p = draw(st.sampled_from([0.1, 0.5, 0.9]))
    stream = (draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 2**64 - 1)))
    gen = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = gen.standard_normal((b, sq, hq, d)).astype(dtype)
    k, v = (gen.standard_normal((b, sk, hkv, d)).astype(dtype) for _ in range(2))
    dout = gen.standard_normal(q.shape).astype(dtype)
    extra = {}
    if draw(st.booleans()):
        extra["sinks"] = gen.standard_normal(hq).astype(np.float32)
    if draw(st.booleans()):
        extra["bias"] = gen.standard_normal((hq, 1, sk)).astype(dtype)
    opts = {**mask, "dropout_p": p, "rng": stream, **extra}
    out, lse = cuflash.attention(q, k, v, return_lse=True, **opts)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, **opts)

    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, dout))
    ref, ref_lse = reference.attention(q64, k64, v64, return_lse=True, **opts)
    naive_opts = {"causal": mask.get("causal", False), "window": mask.get("window"),
                  "scale": 1 / np.sqrt(d), "dropout_p": p, "rng": stream, **extra}
    naive, naive_lse = naive_attention(q64, k64, v64, dtype=dtype, **naive_opts)
    assert_matches_reference("out", out, ref, naive, dtype=dtype)
    assert_matches_reference("lse", lse, ref_lse, naive_lse, dtype="float32")
    refs = reference.attention_grads(do64, q64, k64, v64, **opts)
    naives = naive_attention_backward(do64, q64, k64, v64, dtype=dtype, **naive_opts)
    eps = backward_eps(do64, q64, k64, v64, dtype=dtype, **naive_opts)
    for name, g, n, e in zip(("dq", "dk", "dv"), grads, naives, eps, strict=True):
        assert_matches_reference(name, g, refs[name[1:]], n, dtype=dtype, eps=e)


@settings(max_examples=examples(25), deadline=None)
@given(data=st.data())
def test_dropout_with_every_modification(data):
    """Dropout beside a score_mod and mask_mod, a softcap, ALiBi, a bias and a mask array (the
    "double" combination of `user_mods_cases.combined`, which equals built-ins alone): out and
    the gradients against the built-ins' reference with the same stream."""
    from tests import user_mods_cases as cases

    draw = data.draw
    dtype = draw(st.sampled_from(["float32", "float64"]))
    b, sq, sk, hq, d = 2, draw(st.integers(1, 30)), draw(st.integers(1, 30)), 4, 8
    gen = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    case = cases.combined("double", b, hq, sq, sk, gen,
                          softcap=draw(st.sampled_from([0.0, 3.0])),
                          alibi=draw(st.sampled_from([None, (hq,)])),
                          bias_shape=draw(st.sampled_from([None, (hq, sq, sk)])),
                          mask_shape=draw(st.sampled_from([None, (sq, sk)])),
                          documents_mask=draw(st.booleans()), dtype=dtype)
    q = gen.standard_normal((b, sq, hq, d)).astype(dtype)
    k, v = (gen.standard_normal((b, sk, 2, d)).astype(dtype) for _ in range(2))
    dout = gen.standard_normal(q.shape).astype(dtype)
    stream = (draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 2**64 - 1)))
    drop = {"dropout_p": draw(st.sampled_from([0.2, 0.6])), "rng": stream}
    opts = {"causal": True, "score_mod": case.score_mod, "mask_mod": case.mask_mod,
            "aux": case.aux or None, **case.given, **drop}
    out, lse = cuflash.attention(q, k, v, return_lse=True, **opts)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, **opts)
    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, dout))
    built = {"causal": True, "scale": case.scale_factor / np.sqrt(d), **case.builtin, **drop}
    ref = reference.attention(q64, k64, v64, **built)
    naive, _ = naive_attention(q64, k64, v64, dtype=dtype, **built)
    assert_matches_reference("out", out, ref, naive, dtype=dtype)
    refs = reference.attention_grads(do64, q64, k64, v64, **built)
    naives = naive_attention_backward(do64, q64, k64, v64, dtype=dtype, **built)
    eps = backward_eps(do64, q64, k64, v64, dtype=dtype, **built)
    for name, g, n, e in zip(("dq", "dk", "dv"), grads, naives, eps, strict=True):
        assert_matches_reference(name, g, refs[name[1:]], n, dtype=dtype, eps=e)


def test_the_reference_gradients_hold_against_finite_differences():
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((1, 5, 2, 4)), rng.standard_normal((1, 6, 1, 4))
    v, dout = rng.standard_normal((1, 6, 1, 3)), rng.standard_normal((1, 5, 2, 3))
    opts = {"dropout_p": 0.3, "rng": (7, 1), "causal": True}
    grads = reference.attention_grads(dout, q, k, v, **opts)
    args = {"q": q, "k": k, "v": v}
    for name, x in args.items():
        numeric = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            step = np.zeros_like(x)
            step[idx] = 1e-6
            hi = reference.attention(**{**args, name: x + step}, **opts)
            lo = reference.attention(**{**args, name: x - step}, **opts)
            numeric[idx] = np.sum((hi - lo) * dout) / 2e-6
        np.testing.assert_allclose(grads[name], numeric, atol=1e-8, err_msg=name)


def test_the_mask_is_the_one_the_call_applies():
    """`cuflash.dropout_mask` is what the call drops: the reference with p = 0 on the dropped-out
    probabilities equals the call (3-D inputs too), and p = 0 keeps everything."""
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((9, 2, 8)) for _ in range(3))
    kept = cuflash.dropout_mask(q, k, dropout_p=0.25, rng=(3, 4))
    assert kept.shape == (2, 9, 9) and kept.dtype == np.bool_
    probs = _softmax(q, k)
    want = np.einsum("hij,jhd->ihd", probs * kept / 0.75, v)
    got = cuflash.attention(q, k, v, dropout_p=0.25, rng=(3, 4))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert cuflash.dropout_mask(q, k, dropout_p=0.0, rng=None).all()


def _softmax(q, k):
    s = np.einsum("ihd,jhd->hij", q, k) / np.sqrt(q.shape[-1])
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_the_mask_follows_positions_not_layouts():
    """The same stream drops the same (b, h, i, j) in both layouts, 3-D or not, into out= or
    not, with GQA: results equal the bshd call's, transposed."""
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, 9, 4, 8))
    k, v = (rng.standard_normal((1, 11, 2, 8)) for _ in range(2))
    opts = {"dropout_p": 0.4, "rng": (8, 9), "causal": True}
    want, want_lse = cuflash.attention(q, k, v, return_lse=True, **opts)
    t = [x.swapaxes(1, 2).copy() for x in (q, k, v)]
    got = np.empty_like(t[0])
    _, lse = cuflash.attention(*t, layout="bhsd", out=got, return_lse=True, **opts)
    np.testing.assert_array_equal(got.swapaxes(1, 2), want)
    np.testing.assert_array_equal(lse, want_lse)
    np.testing.assert_array_equal(cuflash.attention(q[0], k[0], v[0], **opts), want[0])
    np.testing.assert_array_equal(cuflash.dropout_mask(*t[:2], layout="bhsd", dropout_p=0.4,
                                                       rng=(8, 9)),
                                  cuflash.dropout_mask(q, k, dropout_p=0.4, rng=(8, 9)))


def test_p_zero_is_no_dropout_bit_for_bit():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 7, 2, 8)).astype(np.float32) for _ in range(3))
    plain = cuflash.attention(q, k, v, causal=True)
    assert np.array_equal(cuflash.attention(q, k, v, causal=True, dropout_p=0.0, rng=(1, 2)),
                          plain)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"dropout_p": 0.5}, ValueError, r"^rng: dropout_p > 0 needs rng"),
    ({"dropout_p": 1.0, "rng": (1, 2)}, ValueError, r"^dropout_p: expected a number in \[0, 1\)"),
    ({"dropout_p": -0.1, "rng": (1, 2)}, ValueError, r"^dropout_p: expected a number"),
    ({"dropout_p": True, "rng": (1, 2)}, TypeError, r"^dropout_p: expected a real number"),
    ({"dropout_p": "0.1", "rng": (1, 2)}, TypeError, r"^dropout_p: expected a real number"),
    ({"dropout_p": 0.1, "rng": 5}, TypeError, r"^rng: expected \(seed, offset\)"),
    ({"dropout_p": 0.1, "rng": (1, -2)}, TypeError, r"^rng: expected \(seed, offset\)"),
    ({"dropout_p": 0.1, "rng": (1, 2**64)}, TypeError, r"^rng: expected \(seed, offset\)"),
    ({"dropout_p": 0.1, "rng": (1.0, 2)}, TypeError, r"^rng: expected \(seed, offset\)"),
    ({"dropout_p": 0.1, "rng": (1, 2, 3)}, TypeError, r"^rng: expected \(seed, offset\)"),
])
def test_bad_dropout_arguments_are_named(kwargs, error, match):
    q = np.zeros((1, 4, 2, 8))
    with pytest.raises(error, match=match):
        cuflash.attention(q, q, q, **kwargs)
    with pytest.raises(error, match=match):
        cuflash.attention_backward(q, q, q, q, q, np.zeros((1, 2, 4), np.float32), **kwargs)


def test_cuda_inputs_refuse_dropout_naming_it(monkeypatch):
    """The CUDA kernels do not apply dropout yet: a CUDA source is refused before any work."""
    from cuflash import _core, _interop

    real = _interop.source_of

    def on_cuda(x, name):
        found = real(x, name)
        return _interop.Source("cupy", "cuda", 0) if name in ("q", "k", "v") else found

    monkeypatch.setattr(_interop, "source_of", on_cuda)
    q = np.zeros((1, 4, 2, 8), np.float16)
    with pytest.raises(NotImplementedError, match=r"^dropout_p: the CUDA kernels do not apply"):
        _core.validate(q, q, q, causal=False, scale=None, layout="bshd", dropout_p=0.1,
                       rng=(1, 2))


def test_torch_autograd_takes_dropout_and_manual_seed_rules_it():
    """Tensors that require grad: the gradients of the explicit stream equal the reference's;
    without rng the stream comes from torch's generator (the same after torch.manual_seed, a
    new one each call), and the backward drops what the forward dropped."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal(shape) for shape in ((2, 6, 2, 8), (2, 9, 1, 8), (2, 9, 1, 8),
                                                       (2, 6, 2, 8))]
    q, k, v = (torch.tensor(x, requires_grad=True) for x in arrays[:3])
    dout = torch.tensor(arrays[3])
    out = cuflash.attention(q, k, v, causal=True, dropout_p=0.4, rng=(12, 34))
    out.backward(dout)
    want = reference.attention_grads(arrays[3], *arrays[:3], causal=True, dropout_p=0.4,
                                     rng=(12, 34))
    for name, x in (("q", q), ("k", k), ("v", v)):
        np.testing.assert_allclose(x.grad.numpy(), want[name], rtol=1e-10, atol=1e-12)

    def step():
        xs = [torch.tensor(x, requires_grad=True) for x in arrays[:3]]
        out = cuflash.torch.attention(*xs, dropout_p=0.4)
        out.backward(dout)
        return out.detach().numpy(), xs[0].grad.numpy()

    torch.manual_seed(5)
    first, again = step(), step()
    torch.manual_seed(5)
    replayed = step()
    assert not np.array_equal(first[0], again[0])
    for a, b in zip(first, replayed, strict=True):
        assert np.array_equal(a, b)
    # the backward of a drawn stream is the gradient of that stream's forward
    torch.manual_seed(5)
    seed, offset = torch.randint(0, 2**62, (2,), dtype=torch.int64).tolist()
    np.testing.assert_allclose(first[1], reference.attention_grads(
        arrays[3], *arrays[:3], dropout_p=0.4, rng=(seed, offset))["q"], rtol=1e-10, atol=1e-12)


def test_torch_compile_traces_dropout():
    """torch.compile(fullgraph=True) traces dropout into the custom ops: with an explicit
    stream (a seed past 2**63 too) forward and gradients equal eager autograd's; without one
    the graph draws a new stream each run, which torch.manual_seed rules."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    arrays = [rng.standard_normal(shape) for shape in ((2, 6, 2, 8), (2, 9, 1, 8), (2, 9, 1, 8))]

    def loss(q, k, v, stream):
        out = cuflash.torch.attention(q, k, v, causal=True, dropout_p=0.3, rng=stream)
        return (out * out).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for stream in ((1, 2), (2**64 - 5, 2**63 + 7)):
        results = []
        for fn in (loss, compiled):
            xs = [torch.tensor(x, requires_grad=True) for x in arrays]
            value = fn(*xs, stream)
            value.backward()
            results.append((value.item(), *(x.grad.numpy() for x in xs)))
        for got, want in zip(*results, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)

    def drawn(q, k, v):
        return cuflash.torch.attention(q, k, v, dropout_p=0.5)

    run = torch.compile(drawn, fullgraph=True, backend="aot_eager")
    xs = [torch.tensor(x) for x in arrays]
    torch.manual_seed(3)
    first, second = run(*xs), run(*xs)
    torch.manual_seed(3)
    again = run(*xs)
    assert not torch.equal(first, second) and torch.equal(first, again)
