"""GPU: v with a head dim of its own (Dv != D), forward and backward, through CuPy and torch
(autograd too), against the float64 reference. The kernels run zero-padded to the wider head
dim (`cuflash._core.widened`).

Skipped, with the reason printed, where no CUDA GPU is usable.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.gpu_support import require_gpu, to_numpy, torch_cuda

require_gpu()

import cupy  # noqa: E402

import cuflash  # noqa: E402
from cuflash import reference  # noqa: E402
from tests.accuracy import (  # noqa: E402
    assert_matches_reference,
    backward_eps,
    naive_attention,
    naive_attention_backward,
)
from tests.strategies import Case, make_dout, make_inputs, to_bshd4  # noqa: E402

pytestmark = pytest.mark.gpu

CASES = [
    Case(2, 130, 200, 4, 2, 192, head_dim_v=128, dtype="bfloat16", causal=True),
    Case(1, 300, 300, 8, 8, 192, head_dim_v=128, dtype="float16"),
    Case(2, 65, 129, 4, 1, 64, head_dim_v=40, dtype="float16", window=(17, 3), layout="bhsd"),
    Case(1, 77, 50, 2, 2, 16, head_dim_v=256, dtype="float32", causal=True),
    Case(1, 33, 40, 6, 2, 128, head_dim_v=8, dtype="float64", softcap=3.0, three_d=True),
]


def _namespace(dtype: str):
    # CuPy for what it can hold; torch CUDA tensors for bfloat16 (and to cover torch).
    if dtype == "bfloat16":
        pytest.importorskip("torch")
        return torch_cuda()
    return cupy


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_and_backward_match_the_reference(case: Case):
    xp = _namespace(case.dtype)
    q, k, v = make_inputs(case, xp, seed=7)
    dout = make_dout(case, xp, seed=7)
    before = [to_numpy(x) for x in (q, k, v, dout)]
    out, lse = cuflash.attention(q, k, v, **case.mask, layout=case.layout, return_lse=True)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, **case.mask,
                                       layout=case.layout)
    assert tuple(out.shape) == (*q.shape[:-1], case.dim_v)
    for name, g, x in zip(("dq", "dk", "dv"), grads, (q, k, v), strict=True):
        assert tuple(g.shape) == tuple(x.shape), name
    for name, x, b in zip(("q", "k", "v", "dout"), (q, k, v, dout), before, strict=True):
        np.testing.assert_array_equal(to_numpy(x), b, err_msg=f"{case.id}: {name} was modified")

    qn, kn, vn, don = before
    q4, k4, v4, do4 = (to_bshd4(x, case) for x in before)
    opts = {**case.mask, "layout": case.layout}
    ref_out, ref_lse = reference.attention(qn, kn, vn, return_lse=True, **opts)
    ref_grads = reference.attention_backward(don, qn, kn, vn, **opts)
    naive = {**case.mask, "scale": 1.0 / np.sqrt(case.head_dim), "dtype": case.dtype}
    naive_out, naive_lse = naive_attention(q4, k4, v4, **naive)
    naive_grads = naive_attention_backward(do4, q4, k4, v4, **naive)
    eps = backward_eps(do4, q4, k4, v4, **naive)
    assert_matches_reference(f"{case.id} out", to_bshd4(to_numpy(out), case),
                             to_bshd4(ref_out, case), naive_out, dtype=case.dtype)
    got_lse, ref_lse = to_numpy(lse), ref_lse
    if case.three_d:
        got_lse, ref_lse = got_lse[None], ref_lse[None]
    assert_matches_reference(f"{case.id} lse", got_lse, ref_lse, naive_lse, dtype="float32")
    for name, got, ref, naive_g, e in zip(("dq", "dk", "dv"), grads, ref_grads, naive_grads,
                                          eps, strict=True):
        assert_matches_reference(f"{case.id} {name}", to_bshd4(to_numpy(got), case),
                                 to_bshd4(ref, case), naive_g, dtype=case.dtype, eps=e)


def test_torch_autograd_with_a_value_head_dim_of_its_own():
    torch = pytest.importorskip("torch")
    case = CASES[0]
    q, k, v = (x.requires_grad_() for x in make_inputs(case, torch_cuda(), seed=8))
    dout = make_dout(case, torch_cuda(), seed=8)
    out = cuflash.attention(q, k, v, causal=True)
    out.backward(dout)
    with torch.no_grad():
        lse = cuflash.attention(q, k, v, causal=True, return_lse=True)[1]
        want = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True)
    for name, x, g in zip(("q", "k", "v"), (q, k, v), want, strict=True):
        # dq sums by atomics in either call: equal up to the order of the additions
        torch.testing.assert_close(x.grad, g, msg=f"d{name}")


def test_jax_jit_value_and_grad_with_a_value_head_dim_of_its_own():
    """Under jax.jit on the GPU, cuflash.jax pads q, k, v to the wider head dim around the
    buffer callbacks: the forward and the gradients against the float64 reference."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from cuflash import jax as cuflash_jax

    case = Case(2, 70, 90, 4, 2, 192, head_dim_v=128, dtype="float16", causal=True)
    q, k, v = make_inputs(case, np, seed=9)
    dout = make_dout(case, np, seed=9)
    gpu = jax.devices("gpu")[0]
    args = [jax.device_put(jnp.asarray(x), gpu) for x in (q, k, v)]

    def loss(q, k, v):
        out = cuflash_jax.attention(q, k, v, causal=True)
        return (out.astype(jnp.float32) * dout).sum(), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*args)
    ref_out = reference.attention(q, k, v, causal=True)
    ref_grads = reference.attention_backward(dout, q, k, v, causal=True)
    naive = {"causal": True, "scale": 1.0 / np.sqrt(case.head_dim), "dtype": case.dtype}
    q4, k4, v4, do4 = (to_bshd4(x, case) for x in (q, k, v, dout))
    assert_matches_reference("jax out", np.asarray(out), ref_out,
                             naive_attention(q4, k4, v4, **naive)[0], dtype=case.dtype)
    eps = backward_eps(do4, q4, k4, v4, **naive)
    for name, got, ref, naive_g, e in zip(("dq", "dk", "dv"), grads, ref_grads,
                                          naive_attention_backward(do4, q4, k4, v4, **naive),
                                          eps, strict=True):
        assert_matches_reference(f"jax {name}", np.asarray(got), ref, naive_g,
                                 dtype=case.dtype, eps=e)
