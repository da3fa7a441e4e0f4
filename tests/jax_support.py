"""Shared pieces of the JAX tests (tests/test_jax.py on the CPU, tests/test_gpu_jax.py on a GPU):
inputs as NumPy and JAX arrays, the function and loss of a case, and its checks against the
float64 reference by the accuracy rule."""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from cuflash import _jax_trace, reference
from cuflash import jax as cuflash_jax
from tests.accuracy import (
    assert_matches_reference,
    backward_eps,
    naive_attention,
    naive_attention_backward,
)
from tests.strategies import Case, make_dout, make_inputs, to_bshd4


def x64(case: Case):
    """float64 JAX arrays exist only with jax_enable_x64; scope it to the test."""
    return jax.enable_x64(True) if case.dtype == "float64" else contextlib.nullcontext()


def inputs(case: Case, seed: int, device=None):
    """q, k, v, dout as NumPy arrays (the exact values) and as JAX arrays on `device`."""
    arrays = (*make_inputs(case, np, seed), make_dout(case, np, seed))
    return arrays, tuple(jax.device_put(jnp.asarray(x), device) for x in arrays)


def attention_of(case: Case):
    """``fn(q, k, v)``: cuflash.jax.attention with the case's options."""

    def fn(q, k, v):
        return cuflash_jax.attention(q, k, v, causal=case.causal, window=case.window,
                                     softcap=case.softcap, layout=case.layout)

    return fn


def loss_of(fn, dout):
    """``loss(q, k, v) = sum(fn(q, k, v) * dout)``: its gradient is fn's vjp of dout."""

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v) * dout)

    return loss


def f64(x) -> np.ndarray:
    """A float64 NumPy copy of a JAX or NumPy array (bfloat16 included)."""
    return np.asarray(jnp.asarray(x, jnp.float32) if x.dtype == jnp.bfloat16 else x,
                      dtype=np.float64)


def close(got, want, rtol=1e-6, atol=1e-6) -> None:
    np.testing.assert_allclose(f64(got), f64(want), rtol=rtol, atol=atol)


def _options(case: Case) -> dict:
    return {**case.mask, "scale": 1 / math.sqrt(case.head_dim)}


def check_out(case: Case, arrays, out) -> None:
    """`out` against the float64 reference of the NumPy `arrays` (q, k, v, dout)."""
    q, k, v, _ = arrays
    ref = reference.attention(q, k, v, **case.mask, layout=case.layout)
    q4, k4, v4 = (to_bshd4(x, case) for x in (q, k, v))
    naive, _ = naive_attention(q4, k4, v4, dtype=case.dtype, **_options(case))
    assert out.dtype == q.dtype and out.shape == case.out_shape
    assert_matches_reference("out", to_bshd4(f64(out), case), to_bshd4(ref, case), naive,
                             dtype=case.dtype)


def check_grads(case: Case, arrays, grads) -> None:
    """dq, dk, dv against the float64 reference's of the NumPy `arrays` (q, k, v, dout)."""
    q, k, v, dout = arrays
    refs = reference.attention_backward(dout, q, k, v, **case.mask, layout=case.layout)
    q4, k4, v4, do4 = (to_bshd4(x, case) for x in arrays)
    naives = naive_attention_backward(do4, q4, k4, v4, dtype=case.dtype, **_options(case))
    eps = backward_eps(do4, q4, k4, v4, dtype=case.dtype, **_options(case))
    for name, got, x, ref, naive, e in zip(("dq", "dk", "dv"), grads, (q, k, v), refs, naives,
                                           eps, strict=True):
        assert got.dtype == x.dtype and got.shape == x.shape, name
        assert_matches_reference(name, to_bshd4(f64(got), case), to_bshd4(ref, case), naive,
                                 dtype=case.dtype, eps=e)


def check_case(case: Case, jit: bool, device=None) -> None:
    """Forward and jax.grad of one case, jitted or eager. Eager calls on the CPU must not be
    staged; on a GPU an eager call runs the jitted program of its options
    (cuflash.jax's `_compiled`), so there staging is the design."""
    staged = AssertionError("an eager call was staged")
    eager_only = contextlib.ExitStack()
    with x64(case), eager_only:
        arrays, (q, k, v, dout) = inputs(case, seed=9, device=device)
        if not jit and next(iter(q.devices())).platform != "gpu":
            for name in ("forward", "backward"):
                eager_only.enter_context(mock.patch.object(_jax_trace, name, side_effect=staged))
        fn = attention_of(case)
        grad = jax.grad(loss_of(fn, dout), argnums=(0, 1, 2))
        if jit:
            fn, grad = jax.jit(fn), jax.jit(grad)
        check_out(case, arrays, fn(q, k, v))
        check_grads(case, arrays, grad(q, k, v))
