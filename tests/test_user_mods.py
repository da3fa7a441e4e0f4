"""Your own score and mask modifications (`cuflash.ScoreMod`, `cuflash.MaskMod`, ``aux=``) on the
CPU: forward and backward against the float64 reference by the accuracy rule, each user form
written to equal a built-in (softcap, ALiBi, a relative-position bias with a document mask), and
the reference of the user's NumPy forms against the built-in's; validation; the generated C++ for
every kernel family, compiled by NVRTC for sm_80 and sm_90a without spills where the built-ins
have none; a compile error that shows the user's line.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import _user_mods, reference
from cuflash.cuda import _compile, _launch, _launch_bwd, _launch_sm90
from tests import user_mods_cases as cases
from tests.accuracy import (
    EPS,
    assert_matches_reference,
    backward_eps,
    naive_attention,
    naive_attention_backward,
    naive_bias_gradient,
)
from tests.strategies import examples, make_dout, make_inputs, problems, seeds, to_bshd4


def _run(case, seed, user, xp=np):
    """cuflash's out, lse, dq, dk, dv for `case` with the user modification, and the
    references of the built-in it equals (float64, and naive in the dtype for the tolerance)."""
    q, k, v = make_inputs(case, xp, seed)
    dout = make_dout(case, xp, seed)
    opts = {"causal": case.causal, "window": case.window, "layout": case.layout}
    mods = {"score_mod": user.score_mod, "mask_mod": user.mask_mod, "aux": user.aux}
    out, lse = cuflash.attention(q, k, v, return_lse=True, **opts, **mods)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, **opts, **mods)
    q4, k4, v4, do4 = (to_bshd4(np.asarray(x, dtype=np.float64), case)
                       for x in (q, k, v, dout))
    built = {"causal": case.causal, "window": case.window, **user.builtin}
    return out, lse, grads, (q4, k4, v4, do4), built


@pytest.mark.parametrize("name", cases.NAMES)
@settings(max_examples=examples(25), deadline=None)
@given(data=st.data(), seed=seeds())
def test_user_mods_match_the_builtin_reference(name, data, seed):
    """Random shapes, GQA, layouts, causal and windows; float32 and float64 (float16 computes
    in float32): forward, lse and gradients against the built-in's float64 reference."""
    case = data.draw(problems(dtypes=("float16", "float32", "float64"), max_seqlen=70,
                              max_head_dim=48, windows=True, views=("contiguous",)))
    rng = np.random.default_rng(seed)
    batch = 1 if case.three_d else case.batch
    user = cases.make(name, batch, case.heads_q, case.seqlen_q, case.seqlen_k, rng)
    out, lse, grads, (q4, k4, v4, do4), built = _run(case, seed, user)

    scale = 1.0 / np.sqrt(case.head_dim)
    ref, ref_lse = reference.attention(q4, k4, v4, return_lse=True, **built)
    naive, naive_lse = naive_attention(q4, k4, v4, dtype=case.dtype, scale=scale, **built)
    assert_matches_reference(f"{case.id} out", to_bshd4(np.asarray(out), case), ref, naive,
                             dtype=case.dtype)
    got_lse = np.asarray(lse)[None] if case.three_d else np.asarray(lse)
    assert_matches_reference(f"{case.id} lse", got_lse, ref_lse, naive_lse, dtype="float32")
    refs = reference.attention_grads(do4, q4, k4, v4, **built)
    naives = naive_attention_backward(do4, q4, k4, v4, dtype=case.dtype, scale=scale, **built)
    eps = backward_eps(do4, q4, k4, v4, dtype=case.dtype, scale=scale, **built)
    for label, got, nv, e in zip(("dq", "dk", "dv"), grads, naives, eps, strict=True):
        assert_matches_reference(f"{case.id} {label}", to_bshd4(np.asarray(got), case),
                                 refs[label[1:]], nv, dtype=case.dtype, eps=e)


@pytest.mark.parametrize("name", cases.NAMES)
def test_reference_of_the_numpy_forms_equals_the_builtin(name):
    """The oracle run on the user's NumPy forms gives the built-in's answers (forward and every
    gradient), to float64 rounding."""
    rng = np.random.default_rng(11)
    b, sq, sk, hq, hkv, d = 2, 37, 53, 4, 2, 16
    q = rng.standard_normal((b, sq, hq, d))
    k, v = (rng.standard_normal((b, sk, hkv, d)) for _ in range(2))
    dout = rng.standard_normal((b, sq, hq, d))
    user = cases.make(name, b, hq, sq, sk, rng)
    mods = {"score_mod": user.score_mod, "mask_mod": user.mask_mod, "aux": user.aux}
    for causal in (False, True):
        got = reference.attention(q, k, v, causal=causal, return_lse=True, **mods)
        want = reference.attention(q, k, v, causal=causal, return_lse=True, **user.builtin)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
        got = reference.attention_grads(dout, q, k, v, causal=causal, **mods)
        want = reference.attention_grads(dout, q, k, v, causal=causal, **user.builtin)
        for key in ("q", "k", "v"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", cases.COMBINED)
@settings(max_examples=examples(30), deadline=None)
@given(data=st.data())
def test_user_mods_beside_the_builtins(name, data):
    """A score_mod (and a mask_mod) with ALiBi, a bias, a mask array and (CPU) a softcap: the
    built-ins first, then the score_mod, both masks hide. Every CPU dtype, GQA, causal and
    windows: out, lse, dq, dk, dv and dbias against the built-ins that equal the combination
    (`user_mods_cases.combined`)."""
    draw = data.draw
    dtype = draw(st.sampled_from(["float16", "float32", "float64"]))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 2))
    b, sq, sk = draw(st.integers(1, 2)), draw(st.integers(1, 40)), draw(st.integers(1, 40))
    d = draw(st.sampled_from([8, 16, 24]))
    mask = draw(st.sampled_from([{}, {"causal": True},
                                 {"window": (draw(st.integers(-1, 9)), draw(st.integers(-1, 9)))}]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    case = cases.combined(
        name, b, hq, sq, sk, rng,
        softcap=draw(st.sampled_from([0.0, 2.0])) if name == "double" else 0.0,
        alibi=draw(st.sampled_from([None, (hq,), (b, hq)])),
        bias_shape=draw(st.sampled_from([None, (b, hq, sq, sk), (hq, 1, sk), (sq, 1)])),
        mask_shape=draw(st.sampled_from([None, (b, 1, sq, sk), (sq, sk)])),
        documents_mask=draw(st.booleans()), dtype=dtype)
    q = rng.standard_normal((b, sq, hq, d)).astype(dtype)
    k, v = (rng.standard_normal((b, sk, hkv, d)).astype(dtype) for _ in range(2))
    dout = rng.standard_normal(q.shape).astype(dtype)
    opts = {**mask, "score_mod": case.score_mod, "mask_mod": case.mask_mod,
            "aux": case.aux or None, **case.given}
    with_dbias = case.given["bias"] is not None and case.dbias_factor is not None
    out, lse = cuflash.attention(q, k, v, return_lse=True, **opts)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, return_dbias=with_dbias, **opts)

    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, dout))
    built = {"causal": mask.get("causal", False), "window": mask.get("window"),
             "scale": case.scale_factor / np.sqrt(d), **case.builtin}
    ref, ref_lse = reference.attention(q64, k64, v64, return_lse=True, **built)
    naive, naive_lse = naive_attention(q64, k64, v64, dtype=dtype, **built)
    assert_matches_reference("out", out, ref, naive, dtype=dtype)
    assert_matches_reference("lse", lse, ref_lse, naive_lse, dtype="float32")
    refs = reference.attention_grads(do64, q64, k64, v64, **built)
    naives = naive_attention_backward(do64, q64, k64, v64, dtype=dtype, **built)
    eps = backward_eps(do64, q64, k64, v64, dtype=dtype, **built)
    for label, g, n, e in zip(("dq", "dk", "dv"), grads, naives, eps, strict=False):
        assert_matches_reference(label, g, refs[label[1:]], n, dtype=dtype, eps=e)
    if with_dbias:
        dbias = grads[-1]
        assert dbias.dtype == case.given["bias"].dtype and dbias.shape == case.given["bias"].shape
        f = case.dbias_factor
        naive_dbias = f * naive_bias_gradient(do64, q64, k64, v64, dtype=dtype, **built)
        floor = max(1.0, 2 * f * float(np.sum(np.abs(do64))) * float(np.max(np.abs(v64))))
        assert_matches_reference("dbias", dbias, f * refs["bias"], naive_dbias, dtype=dtype,
                                 eps=EPS[dtype] * floor)


def test_the_reference_applies_a_score_mod_after_the_builtins():
    """The oracle on a combination equals the oracle on its built-in equivalent: forward, lse
    and every gradient (dbias through the score_mod's derivative), to float64 rounding."""
    rng = np.random.default_rng(12)
    b, sq, sk, hq, hkv, d = 2, 19, 23, 4, 2, 8
    q = rng.standard_normal((b, sq, hq, d))
    k, v = (rng.standard_normal((b, sk, hkv, d)) for _ in range(2))
    dout = rng.standard_normal((b, sq, hq, d))
    for name in cases.COMBINED:
        case = cases.combined(name, b, hq, sq, sk, rng, softcap=1.5 if name == "double" else 0.0,
                              alibi=(b, hq), bias_shape=(hq, sq, 1), mask_shape=(sq, sk),
                              documents_mask=True, dtype=np.float64)
        mods = {"score_mod": case.score_mod, "mask_mod": case.mask_mod, "aux": case.aux,
                **case.given}
        built = {"scale": case.scale_factor / np.sqrt(d), **case.builtin}
        got = reference.attention(q, k, v, causal=True, return_lse=True, **mods)
        want = reference.attention(q, k, v, causal=True, return_lse=True, **built)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)
        got = reference.attention_grads(dout, q, k, v, causal=True, **mods)
        want = reference.attention_grads(dout, q, k, v, causal=True, **built)
        for key in ("q", "k", "v"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=1e-12)
        if case.dbias_factor is not None:
            np.testing.assert_allclose(got["bias"], case.dbias_factor * want["bias"],
                                       rtol=1e-10, atol=1e-12)


def test_torch_and_numpy_aux_on_the_cpu():
    """torch CPU tensors in, torch out; aux arrays as torch CPU tensors or NumPy."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    q, k, v = (torch.from_numpy(rng.standard_normal((1, 20, 2, 8))) for _ in range(3))
    user = cases.make("document_relbias", 1, 2, 20, 20, rng)
    aux = {name: torch.from_numpy(np.ascontiguousarray(x)) if x.dtype != np.float16 else x
           for name, x in user.aux.items()}
    out = cuflash.attention(q, k, v, score_mod=user.score_mod, mask_mod=user.mask_mod, aux=aux)
    assert isinstance(out, torch.Tensor)
    want = reference.attention(q.numpy(), k.numpy(), v.numpy(), **user.builtin)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-10, atol=1e-12)


def test_a_row_the_mask_mod_empties_gives_zeros_and_minus_inf():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 6, 1, 8)) for _ in range(3))
    keep = cuflash.MaskMod("q_idx != 2", numpy=lambda b, h, q, kv: q != 2)
    out, lse = cuflash.attention(q, k, v, mask_mod=keep, return_lse=True)
    assert np.all(out[0, 2] == 0) and np.isneginf(lse[0, 0, 2])
    assert np.isfinite(lse[0, 0, [0, 1, 3, 4, 5]]).all()


def test_sinks_go_with_a_score_mod():
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, 9, 2, 8)) for _ in range(3))
    sinks = np.array([0.5, -1.0])
    mod = cases.softcap_mod(3.0)
    got = cuflash.attention(q, k, v, score_mod=mod, sinks=sinks)
    want = reference.attention(q, k, v, softcap=3.0, sinks=sinks)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


# ---- validation ----------------------------------------------------------------------------

Q = np.zeros((1, 4, 2, 8))
ADD = cuflash.ScoreMod("score + 1.f", grad="1", numpy=lambda s, *pos, **aux: s + 1)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"score_mod": "score + 1"}, TypeError, "score_mod: expected a cuflash.ScoreMod"),
    ({"mask_mod": lambda *a: True}, TypeError, "mask_mod: expected a cuflash.MaskMod"),
    ({"score_mod": ADD, "aux": [1]}, TypeError, "aux: expected a dict"),
    ({"aux": {"t": np.ones(3)}}, ValueError, "without a score_mod or mask_mod"),
    ({"score_mod": ADD, "aux": {"score": np.ones(3)}}, ValueError, "aux: names"),
    ({"score_mod": ADD, "aux": {"cf_x": np.ones(3)}}, ValueError, "aux: names"),
    ({"score_mod": ADD, "aux": {"2x": np.ones(3)}}, ValueError, "aux: names"),
    ({"score_mod": ADD, "aux": {"t": np.ones((1,) * 5)}}, ValueError, "at most 4 axes"),
    ({"score_mod": ADD, "aux": {"t": 3}}, TypeError, "expected an array"),
    ({"score_mod": ADD, "aux": {"t": np.ones(3, np.complex64)}}, TypeError, "aux\\['t'\\]"),
    ({"score_mod": ADD, "aux": {f"a{i}": np.ones(1) for i in range(9)}}, ValueError,
     "at most 8"),
    ({"score_mod": cuflash.ScoreMod("score")}, NotImplementedError, "score_mod.numpy"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        cuflash.attention(Q, Q, Q, **kwargs)


@pytest.mark.parametrize(("make", "match"), [
    (lambda: cuflash.ScoreMod(""), "score_mod: expected C\\+\\+ source"),
    (lambda: cuflash.ScoreMod(3), "score_mod: expected C\\+\\+ source"),
    (lambda: cuflash.ScoreMod("score", grad=""), "score_mod.grad"),
    (lambda: cuflash.ScoreMod("#include <x>\nscore"), "preprocessor"),
    (lambda: cuflash.ScoreMod("score", numpy=3), "score_mod.numpy: expected a callable"),
    (lambda: cuflash.MaskMod(None), "mask_mod: expected C\\+\\+ source"),
])
def test_bad_modifications_are_refused_when_built(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


def test_the_backward_needs_the_derivative():
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 5, 1, 8)) for _ in range(3))
    no_grad = cuflash.ScoreMod("2.f * score", numpy=lambda s, *pos, **aux: 2 * s)
    out, lse = cuflash.attention(q, k, v, score_mod=no_grad, return_lse=True)
    with pytest.raises(ValueError, match="score_mod: the backward needs its derivative"):
        cuflash.attention_backward(out, q, k, v, out, lse, score_mod=no_grad)
    no_numpy_grad = cuflash.ScoreMod("2.f * score", grad="2.f",
                                     numpy=lambda s, *pos, **aux: 2 * s)
    with pytest.raises(NotImplementedError, match=r"score_mod\.numpy_grad"):
        cuflash.attention_backward(out, q, k, v, out, lse, score_mod=no_numpy_grad)


def test_a_doubled_score_equals_a_doubled_scale():
    """A multiplicative modification and its derivative (2), through the backward."""
    rng = np.random.default_rng(6)
    q, k, v, dout = (rng.standard_normal((2, 7, 2, 8)) for _ in range(4))
    mod = cuflash.ScoreMod("2.f * score", grad="2.f", numpy=lambda s, *pos, **aux: 2 * s,
                           numpy_grad=lambda o, *pos, **aux: np.full_like(o, 2.0))
    out, lse = cuflash.attention(q, k, v, score_mod=mod, causal=True, return_lse=True)
    scale = 2 / np.sqrt(8)
    np.testing.assert_allclose(out, reference.attention(q, k, v, causal=True, scale=scale),
                               rtol=1e-10, atol=1e-12)
    got = cuflash.attention_backward(dout, q, k, v, out, lse, score_mod=mod, causal=True)
    want = reference.attention_backward(dout, q, k, v, causal=True, scale=scale)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11)


def test_torch_autograd_takes_a_user_mod():
    """cuflash.attention on tensors that require grad: the eager autograd node carries the
    modification to the backward (a softcap, not additive, with a document mask)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    q, k, v = (torch.from_numpy(rng.standard_normal((2, 19, 2, 8))).requires_grad_()
               for _ in range(3))
    dout = torch.from_numpy(rng.standard_normal((2, 19, 2, 8)))
    docs = cases.documents(2, 19, rng)
    mod = cases.softcap_mod(2.0)
    out = cuflash.attention(q, k, v, causal=True, score_mod=mod, mask_mod=cases.DOCUMENTS,
                            aux={"qdoc": docs, "kdoc": docs})
    out.backward(dout)
    mask = docs[:, None, :, None] == docs[:, None, None, :]
    args = [x.detach().numpy() for x in (q, k, v)]
    want = reference.attention_grads(dout.numpy(), *args, causal=True, softcap=2.0, mask=mask)
    np.testing.assert_allclose(out.detach().numpy(),
                               reference.attention(*args, causal=True, softcap=2.0, mask=mask),
                               rtol=1e-10, atol=1e-12)
    for name, x in (("q", q), ("k", k), ("v", v)):
        np.testing.assert_allclose(x.grad.numpy(), want[name], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("entry", ["cuflash.attention", "cuflash.torch.attention"])
def test_torch_compile_traces_a_user_mod(entry):
    """torch.compile(fullgraph=True) traces the custom ops with the modification (by its
    registry key) and the aux tensors; forward and backward (AOTAutograd) equal eager."""
    torch = pytest.importorskip("torch")
    import cuflash.torch as ct

    fn = cuflash.attention if entry == "cuflash.attention" else ct.attention
    rng = np.random.default_rng(8)
    user = cases.make("document_relbias", 2, 2, 13, 13, rng)
    aux = {name: torch.from_numpy(np.array(x)) for name, x in user.aux.items()}
    mods = {"score_mod": user.score_mod, "mask_mod": user.mask_mod, "aux": aux}

    def loss(q, k, v):
        return (fn(q, k, v, causal=True, **mods) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    inputs = [torch.from_numpy(rng.standard_normal((2, 13, 2, 8))) for _ in range(3)]
    got_in = [x.clone().requires_grad_() for x in inputs]
    want_in = [x.clone().requires_grad_() for x in inputs]
    got, want = compiled(*got_in), loss(*want_in)
    got.backward()
    want.backward()
    np.testing.assert_allclose(got.item(), want.item(), rtol=1e-12)
    for a, b in zip(got_in, want_in, strict=True):
        np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_torch_autograd_and_compile_take_a_user_mod_beside_a_bias():
    """A score_mod (derivative 2) beside ALiBi, a bias that requires grad and a mask: eager
    autograd and torch.compile(fullgraph=True) give the built-in equivalent's gradients (the
    bias's through the score_mod's derivative)."""
    torch = pytest.importorskip("torch")
    import cuflash.torch as ct

    rng = np.random.default_rng(9)
    b, sq, sk, hq, d = 2, 11, 14, 4, 8
    case = cases.combined("double", b, hq, sq, sk, rng, alibi=(hq,), bias_shape=(hq, sq, sk),
                          mask_shape=(sq, sk), documents_mask=True, dtype=np.float64)
    aux = {name: torch.from_numpy(np.array(x)) for name, x in case.aux.items()}
    arrays = [rng.standard_normal(shape) for shape in ((b, sq, hq, d), (b, sk, 2, d),
                                                       (b, sk, 2, d))]
    built = {"causal": True, "scale": 2 / np.sqrt(d), **case.builtin}
    want = reference.attention_grads(np.ones((b, sq, hq, d)), *arrays, **built)

    def loss(q, k, v, bias):
        return ct.attention(q, k, v, causal=True, score_mod=case.score_mod,
                            mask_mod=case.mask_mod, aux=aux, bias=bias,
                            alibi_slopes=torch.from_numpy(case.given["alibi_slopes"]),
                            mask=torch.from_numpy(case.given["mask"])).sum()

    for run in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        tensors = [torch.tensor(x, requires_grad=True)
                   for x in (*arrays, case.given["bias"])]
        run(*tensors).backward()
        for x, name in zip(tensors, ("q", "k", "v"), strict=False):
            np.testing.assert_allclose(x.grad.numpy(), want[name], rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(tensors[3].grad.numpy(), 2 * want["bias"], rtol=1e-9,
                                   atol=1e-11)


# ---- the generated C++ ---------------------------------------------------------------------

KINDS = {
    "softcap": _user_mods.kind_of(cases.softcap_mod(30.0), None, ()),
    "alibi": _user_mods.kind_of(cases.ALIBI, None, (("slopes", "float32", 1),
                                                    ("shift", "int32", 0))),
    "document_relbias": _user_mods.kind_of(
        cases.RELBIAS, cases.DOCUMENTS, (("rel", "float16", 2), ("base", "int64", 0),
                                         ("qdoc", "int32", 2), ("kdoc", "int32", 2))),
    # beside ALiBi, a bias and a mask array (score.cuh's Mods inside the user kind)
    "double_documents_arrays": _user_mods.kind_of(
        cases.DOUBLE, cases.DOCUMENTS, (("qdoc", "int32", 2), ("kdoc", "int32", 2)),
        arrays=True),
}


def _specs(kind) -> list:
    """One instantiation of every kernel family with `kind`: sm80 and SIMT forward and
    backward, the Hopper forward and dK/dV at the widths that take it."""
    specs = [_launch.fwd_spec(dtype, 64, "causal", True, kind)
             for dtype in ("bfloat16", "float32", "float64")]
    for dtype in ("float16", "float32"):
        kernels = _launch_bwd.bwd_kernels(dtype, 64, "causal", True, None, kind)
        specs += [kernels.dkdv, kernels.dq]
    width = 128 if _launch_sm90.takes_score(kind, 128) else 64
    specs.append(_launch_sm90.fwd_sm90_spec("bfloat16", width, "window", False, kind, True))
    width = 128
    if _launch_bwd.sm90_takes_score(kind, width):
        specs.append(_launch_bwd.dkdv_sm90_spec("float16", width, "causal", kind))
    return specs


@pytest.mark.parametrize("name", sorted(KINDS))
def test_user_kinds_compile_for_every_family(name):
    """NVRTC compiles the generated specialisation into each family (sm_90a for the Hopper
    kernels, sm_80 for the others); the kernel name carries the kind's type."""
    kind = KINDS[name]
    for spec in _specs(kind):
        assert kind.cpp in spec.name
        arch = "sm_90a" if spec.min_arch == 90 else "sm_80"
        report = _compile.compile_report(spec, arch)
        assert report.registers > 0, report.log


def test_the_kind_names_its_source():
    """Different code, or different aux dtypes, is a different kind (kernel, cache key);
    the same code and arrays are the same kind."""
    a = _user_mods.kind_of(ADD, None, ())
    assert a == _user_mods.kind_of(cuflash.ScoreMod("score + 1.f", grad="1"), None, ())
    assert a.cpp != _user_mods.kind_of(cuflash.ScoreMod("score + 2.f", grad="1"), None, ()).cpp
    rel32 = _user_mods.kind_of(cases.RELBIAS, None, (("rel", "float32", 2), ("base", "int64", 0)))
    rel16 = _user_mods.kind_of(cases.RELBIAS, None, (("rel", "float16", 2), ("base", "int64", 0)))
    assert rel32.cpp != rel16.cpp


def test_a_compile_error_shows_the_users_line():
    kind = _user_mods.kind_of(cuflash.ScoreMod("score +\n  no_such(h)", grad="1"), None, ())
    spec = _launch.fwd_spec("float16", 64, "none", True, kind)
    with pytest.raises(_compile.UserCodeError) as err:
        _compile.compile_report(spec, "sm_80")
    text = str(err.value)
    assert "score_mod, line 2" in text and "no_such(h)" in text and "no_such" in text


def test_an_aux_read_with_the_wrong_rank_names_the_users_line():
    """The error is raised in cuflash's header (Aux's static_assert) while instantiating the
    user's line: the message still points at that line."""
    kind = _user_mods.kind_of(cuflash.ScoreMod("score + base()", grad="1"), None,
                              (("base", "int64", 1),))
    spec = _launch.fwd_spec("float16", 64, "none", True, kind)
    with pytest.raises(_compile.UserCodeError) as err:
        _compile.compile_report(spec, "sm_80")
    text = str(err.value)
    assert "score_mod, line 1: static assertion failed" in text
    assert "one index per axis" in text and "score + base()" in text
