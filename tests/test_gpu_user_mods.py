"""GPU: your own score and mask modifications (`cuflash.ScoreMod`, `cuflash.MaskMod`, ``aux=``)
compiled into the CUDA kernels, forward and backward, each written to equal a built-in (a softcap,
whose derivative the kernels read from the modified score; ALiBi from aux slopes; a
relative-position bias table with a document mask) and held to the built-in's float64 reference
by the accuracy rule. Every kernel family: the Hopper forward and dK/dV kernels (D 64 and 128),
sm80 (forced, and at D 256 where the Hopper forward does not take a user kind), SIMT for
fp32/fp64. Aux arrays on q's device and as NumPy. Skipped, with the reason printed, where no
CUDA GPU is usable.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.gpu_support import require_gpu, to_numpy

require_gpu()

import cuflash  # noqa: E402
from cuflash import reference  # noqa: E402
from tests import user_mods_cases as cases  # noqa: E402
from tests.accuracy import (  # noqa: E402
    EPS,
    assert_matches_reference,
    backward_eps,
    naive_attention,
    naive_attention_backward,
    naive_bias_gradient,
)
from tests.strategies import Case, make_dout, make_inputs, to_bshd4  # noqa: E402
from tests.test_gpu_backward import _namespace, _skip_single_family  # noqa: E402

pytestmark = pytest.mark.gpu

# (name, dtype, head dim): the half types at the Hopper widths (and 256, which sm80 runs), fp32
# and fp64 on SIMT. Kept few: each cell compiles its own kernels.
CELLS = [("softcap", "bfloat16", 64), ("softcap", "float16", 128), ("softcap", "float32", 64),
         ("document_relbias", "bfloat16", 128), ("document_relbias", "float16", 64),
         ("document_relbias", "bfloat16", 256), ("document_relbias", "float64", 32),
         ("alibi", "bfloat16", 128)]


def _on_device(x: np.ndarray, xp):
    """`x` on the GPU in `xp`'s framework, its rank kept (0-d included)."""
    if xp.__name__ == "torch_cuda":
        import torch

        return torch.as_tensor(np.array(x), device="cuda")
    return xp.asarray(x)


def check(case: Case, seed: int, name: str, where: str) -> None:
    rng = np.random.default_rng(seed)
    user = cases.make(name, case.batch, case.heads_q, case.seqlen_q, case.seqlen_k, rng)
    xp = _namespace(case.dtype)
    q, k, v = make_inputs(case, xp, seed)
    dout = make_dout(case, xp, seed)
    aux = user.aux if where == "numpy" else {key: _on_device(x, xp) for key, x in user.aux.items()}
    opts = {"causal": case.causal, "window": case.window, "layout": case.layout,
            "score_mod": user.score_mod, "mask_mod": user.mask_mod, "aux": aux}
    out, lse = cuflash.attention(q, k, v, return_lse=True, **opts)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, **opts)

    q4, k4, v4, do4 = (to_bshd4(to_numpy(x), case) for x in (q, k, v, dout))
    built = {"causal": case.causal, "window": case.window, **user.builtin}
    scale = 1.0 / np.sqrt(case.head_dim)
    ref, ref_lse = reference.attention(q4, k4, v4, return_lse=True, **built)
    naive, naive_lse = naive_attention(q4, k4, v4, dtype=case.dtype, scale=scale, **built)
    assert_matches_reference(f"{name} {case.id} out", to_bshd4(to_numpy(out), case), ref,
                             naive, dtype=case.dtype)
    assert_matches_reference(f"{name} {case.id} lse", to_numpy(lse), ref_lse, naive_lse,
                             dtype="float32")
    refs = reference.attention_grads(do4, q4, k4, v4, **built)
    naives = naive_attention_backward(do4, q4, k4, v4, dtype=case.dtype, scale=scale, **built)
    eps = backward_eps(do4, q4, k4, v4, dtype=case.dtype, scale=scale, **built)
    for label, got, nv, e in zip(("dq", "dk", "dv"), grads, naives, eps, strict=True):
        assert_matches_reference(f"{name} {case.id} {label}", to_bshd4(to_numpy(got), case),
                                 refs[label[1:]], nv, dtype=case.dtype, eps=e)


@pytest.mark.parametrize(("name", "dtype", "head_dim"), CELLS)
def test_user_mods_on_cuda_match_the_builtin_reference(name, dtype, head_dim, kernel_path):
    """Multi-tile rows, Sq != Sk both ways (causal rows that see no key), one query row, GQA,
    causal and a window, aux on the device and as NumPy."""
    _skip_single_family(dtype, kernel_path)
    shapes = ((130, 200, True, None), (200, 130, True, None), (1, 150, False, (40, 7)))
    for i, (sq, sk, causal, window) in enumerate(shapes):
        case = Case(batch=2, seqlen_q=sq, seqlen_k=sk, heads_q=4, heads_kv=2,
                    head_dim=head_dim, dtype=dtype, causal=causal, window=window)
        check(case, 100 * i + head_dim, name, "numpy" if i == 1 else "device")


# (case, dtype, head dim): user kinds that also read ALiBi, a bias and a mask array. The Hopper
# forward takes them at D 64 (sm80 at 128); dbias through the score_mod's derivative goes to
# the sm80 kernels.
COMBINED_CELLS = [("double", "bfloat16", 64), ("double", "float16", 128),
                  ("relbias", "bfloat16", 64), ("relbias", "bfloat16", 128),
                  ("double", "float32", 32)]


@pytest.mark.parametrize(("name", "dtype", "head_dim"), COMBINED_CELLS)
def test_user_mods_beside_the_builtins_on_cuda(name, dtype, head_dim, kernel_path):
    """A score_mod and the documents mask_mod with ALiBi, a broadcast bias and a mask array:
    out, lse, dq, dk, dv (and dbias for "double") against the built-ins they equal."""
    _skip_single_family(dtype, kernel_path)
    rng = np.random.default_rng(head_dim)
    xp = _namespace(dtype)
    b, sq, sk, hq, hkv = 2, 150, 190, 4, 2
    case = cases.combined(name, b, hq, sq, sk, rng, alibi=(hq,), bias_shape=(hq, sq, sk),
                          mask_shape=(sq, sk), documents_mask=True, dtype=np.float32)
    host = [rng.standard_normal((b, n, h, head_dim)) for n, h in ((sq, hq), (sk, hkv), (sk, hkv),
                                                                 (sq, hq))]
    q, k, v, dout = (xp.asarray(x.astype(dtype)) for x in host)
    device = {key: None if x is None else (x if key == "softcap" else _on_device(x, xp))
              for key, x in case.given.items()}
    aux = {key: _on_device(x, xp) for key, x in case.aux.items()}
    opts = {"causal": True, "score_mod": case.score_mod, "mask_mod": case.mask_mod, "aux": aux,
            **device}
    with_dbias = case.dbias_factor is not None
    out, lse = cuflash.attention(q, k, v, return_lse=True, **opts)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, return_dbias=with_dbias, **opts)

    q4, k4, v4, do4 = (to_numpy(x).astype(np.float64) for x in (q, k, v, dout))
    built = {"causal": True, "scale": case.scale_factor / np.sqrt(head_dim), **case.builtin}
    ref, ref_lse = reference.attention(q4, k4, v4, return_lse=True, **built)
    naive, naive_lse = naive_attention(q4, k4, v4, dtype=dtype, **built)
    assert_matches_reference(f"{name} out", to_numpy(out), ref, naive, dtype=dtype)
    assert_matches_reference(f"{name} lse", to_numpy(lse), ref_lse, naive_lse, dtype="float32")
    refs = reference.attention_grads(do4, q4, k4, v4, **built)
    naives = naive_attention_backward(do4, q4, k4, v4, dtype=dtype, **built)
    eps = backward_eps(do4, q4, k4, v4, dtype=dtype, **built)
    for label, got, nv, e in zip(("dq", "dk", "dv"), grads, naives, eps, strict=False):
        assert_matches_reference(f"{name} {label}", to_numpy(got), refs[label[1:]], nv,
                                 dtype=dtype, eps=e)
    if with_dbias:
        f = case.dbias_factor
        naive_dbias = f * naive_bias_gradient(do4, q4, k4, v4, dtype=dtype, **built)
        floor = max(1.0, 2 * f * float(np.sum(np.abs(do4))) * float(np.max(np.abs(v4))))
        assert_matches_reference(f"{name} dbias", to_numpy(grads[-1]), f * refs["bias"],
                                 naive_dbias, dtype=dtype, eps=EPS[dtype] * floor)


def test_torch_autograd_takes_a_user_mod_on_cuda():
    """bf16 CUDA tensors that require grad: the eager autograd node runs the user kind's
    forward and backward kernels."""
    torch = pytest.importorskip("torch")
    case = Case(batch=2, seqlen_q=130, seqlen_k=200, heads_q=4, heads_kv=2, head_dim=128,
                dtype="bfloat16", causal=True)
    rng = np.random.default_rng(9)
    user = cases.make("document_relbias", 2, 4, 130, 200, rng)
    q, k, v = (x.requires_grad_() for x in make_inputs(case, _namespace(case.dtype), 9))
    dout = make_dout(case, _namespace(case.dtype), 9)
    aux = {key: torch.as_tensor(np.array(x), device="cuda")
           for key, x in user.aux.items()}
    out = cuflash.attention(q, k, v, causal=True, score_mod=user.score_mod,
                            mask_mod=user.mask_mod, aux=aux)
    out.backward(dout)
    q4, k4, v4, do4 = (to_numpy(x) for x in (q, k, v, dout))
    built = {"causal": True, **user.builtin}
    scale = 1.0 / np.sqrt(case.head_dim)
    ref = reference.attention(q4, k4, v4, **built)
    naive, _ = naive_attention(q4, k4, v4, dtype=case.dtype, scale=scale, **built)
    assert_matches_reference("autograd out", to_numpy(out), ref, naive, dtype=case.dtype)
    refs = reference.attention_grads(do4, q4, k4, v4, **built)
    naives = naive_attention_backward(do4, q4, k4, v4, dtype=case.dtype, scale=scale, **built)
    eps = backward_eps(do4, q4, k4, v4, dtype=case.dtype, scale=scale, **built)
    for name, x, nv, e in zip("qkv", (q, k, v), naives, eps, strict=True):
        assert_matches_reference(f"autograd d{name}", to_numpy(x.grad), refs[name], nv,
                                 dtype=case.dtype, eps=e)


def test_torch_compile_runs_a_user_mod_on_cuda():
    """torch.compile(fullgraph=True) of a loss through cuflash with a mask_mod and aux tensors:
    the custom ops carry them; forward and gradients equal eager autograd's."""
    torch = pytest.importorskip("torch")
    import cuflash.torch as ct

    rng = np.random.default_rng(10)
    user = cases.make("document_relbias", 2, 4, 130, 130, rng)
    aux = {key: torch.as_tensor(np.array(x), device="cuda") for key, x in user.aux.items()}
    mods = {"score_mod": user.score_mod, "mask_mod": user.mask_mod, "aux": aux}

    def loss(q, k, v):
        return ct.attention(q, k, v, causal=True, **mods).float().square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    base = [torch.randn(2, 130, h, 64, device="cuda", dtype=torch.float16) for h in (4, 2, 2)]
    got_in = [x.clone().requires_grad_() for x in base]
    want_in = [x.clone().requires_grad_() for x in base]
    got, want = compiled(*got_in), loss(*want_in)
    got.backward()
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-2)
    for a, b in zip(got_in, want_in, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-2, atol=1e-2)


def test_a_hidden_nan_does_not_leak_through_a_mask_mod():
    """A NaN in v at keys a mask_mod hides from every row changes nothing (the kernels' repair
    asks the user kind which keys it hides)."""
    import cupy

    case = Case(batch=1, seqlen_q=130, seqlen_k=200, heads_q=2, heads_kv=1, head_dim=64,
                dtype="float16")
    q, k, v = make_inputs(case, cupy, 4)
    hole = cuflash.MaskMod("kv_idx < 50 || kv_idx >= 60",
                           numpy=lambda b, h, q, kv, **aux: (kv < 50) | (kv >= 60))
    clean = cuflash.attention(q, k, v, mask_mod=hole)
    v[:, 50:60] = cupy.nan
    dirty = cuflash.attention(q, k, v, mask_mod=hole)
    assert not bool(cupy.isnan(dirty).any())
    np.testing.assert_allclose(cupy.asnumpy(dirty).astype(np.float32),
                               cupy.asnumpy(clean).astype(np.float32), rtol=2e-3, atol=2e-3)


def test_a_compile_error_names_the_users_line_on_the_gpu():
    import cupy

    q = cupy.zeros((1, 8, 1, 64), cupy.float16)
    bad = cuflash.ScoreMod("score + undefined_thing", grad="1")
    with pytest.raises(ValueError, match=r"score_mod, line 1: .*undefined_thing"):
        cuflash.attention(q, q, q, score_mod=bad)
