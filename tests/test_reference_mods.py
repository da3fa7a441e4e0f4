"""The float64 oracle of the score and mask modifications (`cuflash.reference` with softcap,
alibi_slopes, sinks, bias, mask), forward and every gradient, against an independent torch
float64 implementation differentiated by autograd; the identities that tie them to plain
attention; bad options refused naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cuflash import reference
from tests.strategies import examples

torch = pytest.importorskip("torch")


def _torch_attention(q, k, v, *, scale, causal, window, softcap, alibi, sinks, bias, mask):
    """(B, Sq, Hq, D) inputs; the same rules written directly in torch."""
    b, sq, hq = q.shape[:3]
    sk, hkv = k.shape[1], k.shape[2]
    qh = q.transpose(1, 2)
    kh, vh = (x.transpose(1, 2).repeat_interleave(hq // hkv, dim=1) for x in (k, v))
    s = scale * qh @ kh.transpose(-1, -2)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq)[:, None] + (sk - sq)
    j = torch.arange(sk)[None, :]
    if alibi is not None:
        s = s - alibi.reshape(-1, hq)[:, :, None, None] * (i - j).abs()
    if bias is not None:
        s = s + bias
    seen = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        seen &= j <= i
    if window is not None:
        left, right = window
        if left >= 0:
            seen &= j >= i - left
        if right >= 0:
            seen &= j <= i + right
    seen = seen.expand(b, hq, sq, sk)
    if mask is not None:
        seen = seen & mask
    s = s.masked_fill(~seen, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks[None, :, None, None].expand(b, hq, sq, 1)], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    if sinks is not None:
        p = p[..., :-1]
    return (p @ vh).transpose(1, 2), lse


@st.composite
def options(draw):
    b, sq, sk = draw(st.integers(1, 2)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    hkv, group, d = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])), 4
    hq = hkv * group
    opts = {}
    if draw(st.booleans()):
        opts["softcap"] = draw(st.sampled_from([0.5, 5.0, 30.0]))
    if draw(st.booleans()):
        opts["alibi_slopes"] = draw(st.sampled_from([(hq,), (b, hq)]))
    if draw(st.booleans()):
        opts["sinks"] = (hq,)
    if draw(st.booleans()):
        opts["bias"] = draw(st.sampled_from([(b, hq, sq, sk), (1, hq, sq, sk), (sq, sk),
                                             (b, 1, 1, sk)]))
    if draw(st.booleans()):
        opts["mask"] = draw(st.sampled_from([(b, hq, sq, sk), (sq, sk), (1, 1, 1, sk)]))
    masking = draw(st.sampled_from([{}, {"causal": True}, {"window": (2, 1)}]))
    return b, sq, sk, hkv, group, d, opts, masking, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=examples(60), deadline=None)
@given(options())
def test_forward_and_gradients_match_torch_autograd(case):
    b, sq, sk, hkv, group, d, opts, masking, seed = case
    rng = np.random.default_rng(seed)
    hq = hkv * group
    q = rng.standard_normal((b, sq, hq, d))
    k, v = (rng.standard_normal((b, sk, hkv, d)) for _ in range(2))
    dout = rng.standard_normal(q.shape)
    args = {}
    for name, shape in opts.items():
        if name == "softcap":
            args[name] = shape
        elif name == "mask":
            args[name] = rng.random(shape) < 0.7
        elif name == "alibi_slopes":
            args[name] = rng.uniform(0.01, 1.0, shape)
        else:
            args[name] = rng.standard_normal(shape)
    out, lse = reference.attention(q, k, v, **masking, **args, return_lse=True)
    grads = reference.attention_grads(dout, q, k, v, **masking, **args)

    t = {name: torch.tensor(x, requires_grad=True) for name, x in
         (("q", q), ("k", k), ("v", v))}
    for name in ("bias", "sinks"):
        if name in args:
            t[name] = torch.tensor(args[name], requires_grad=True)
    t_out, t_lse = _torch_attention(
        t["q"], t["k"], t["v"], scale=1 / np.sqrt(d), causal=masking.get("causal", False),
        window=masking.get("window"), softcap=args.get("softcap", 0.0),
        alibi=torch.tensor(args["alibi_slopes"]) if "alibi_slopes" in args else None,
        sinks=t.get("sinks"), bias=t.get("bias"),
        mask=torch.tensor(args["mask"]) if "mask" in args else None)
    np.testing.assert_allclose(out, t_out.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lse, t_lse.detach().numpy(), rtol=1e-10, atol=1e-12)
    # Rows that see no key have zero output; torch's autograd through them is NaN-free too.
    t_out.backward(torch.tensor(dout))
    for name, x in t.items():
        want = x.grad.numpy()
        np.testing.assert_allclose(grads[name], want, rtol=1e-9, atol=1e-11, err_msg=name)
    dq, dk, dv = reference.attention_backward(dout, q, k, v, **masking, **args)
    for got, name in ((dq, "q"), (dk, "k"), (dv, "v")):
        np.testing.assert_array_equal(got, grads[name])


def test_neutral_options_are_plain_attention():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 5, 2, 8)) for _ in range(3))
    plain = reference.attention(q, k, v, causal=True, return_lse=True)
    neutral = reference.attention(q, k, v, causal=True, return_lse=True,
                                  bias=np.zeros((5, 5)), mask=np.ones((5, 5), bool),
                                  alibi_slopes=np.zeros(2))
    for a, b in zip(plain, neutral, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)


def test_a_sink_takes_its_share_and_empty_rows_keep_it():
    q = np.zeros((1, 2, 1, 4))
    k = v = np.ones((1, 1, 1, 4))
    out, lse = reference.attention(q, k, v, sinks=np.array([0.0]), return_lse=True,
                                   causal=True)  # row 0 sees no key (Sq > Sk)
    np.testing.assert_allclose(out[0, 1, 0], 0.5)  # exp(0) / (exp(0) + exp(0)) of v = 1
    np.testing.assert_allclose(lse[0, 0], [0.0, np.log(2.0)])
    np.testing.assert_array_equal(out[0, 0, 0], 0.0)


@pytest.mark.parametrize("option, value, kind, fragment", [
    ("softcap", -1.0, ValueError, "softcap:"),
    ("softcap", True, TypeError, "softcap:"),
    ("alibi_slopes", np.ones(3), ValueError, "alibi_slopes: expected shape (2,) or (1, 2)"),
    ("sinks", np.ones((1, 2)), ValueError, "sinks: expected shape (2,)"),
    ("bias", np.ones((3, 5)), ValueError, "bias: expected a shape broadcastable"),
    ("bias", np.ones((5, 5), complex), TypeError, "bias: expected an array of real numbers"),
    ("mask", np.ones((5, 5)), TypeError, "mask: expected a boolean array"),
    ("mask", np.ones((2, 2, 2, 5, 5), bool), ValueError, "mask: expected a shape"),
])
def test_bad_options_are_refused(option, value, kind, fragment):
    x = np.ones((1, 5, 2, 4))
    with pytest.raises(kind, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        reference.attention(x, x, x, **{option: value})
