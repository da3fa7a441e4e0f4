"""cuflash.jax.attention: eager, jax.grad, jax.jit (forward and grad) and vmap against the float64
reference, by the accuracy rule of docs/api.md; GPU variants marked gpu and skipped, with the reason
printed, where JAX sees no GPU.

Under jax.jit the CPU backend runs the CPU path through a host callback; on a GPU it refuses with
a clear error (see cuflash/jax.py), which the GPU tests check.
"""

from __future__ import annotations

import contextlib
import math
from unittest import mock

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax is not installed: cuflash.jax is untested")

import jax.numpy as jnp  # noqa: E402

from cuflash import jax as cuflash_jax  # noqa: E402
from cuflash import reference  # noqa: E402
from tests.accuracy import (  # noqa: E402
    assert_matches_reference,
    backward_eps,
    naive_attention,
    naive_attention_backward,
)
from tests.strategies import Case, make_dout, make_inputs, to_bshd4  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu_default_device(request):
    """Tests not marked gpu run on JAX's CPU backend, also on a machine whose default is a GPU."""
    if request.node.get_closest_marker("gpu"):
        yield
        return
    with jax.default_device(jax.devices("cpu")[0]):
        yield

CPU_CASES = [
    Case(2, 13, 31, 4, 2, 16, dtype="float32", causal=True),
    Case(2, 31, 13, 4, 2, 16, dtype="float64", causal=True),
    Case(1, 17, 17, 3, 3, 8, dtype="float32", layout="bhsd"),
    Case(1, 9, 20, 6, 2, 12, dtype="float64", causal=True, three_d=True),
    Case(2, 7, 11, 2, 1, 8, dtype="float16", causal=True),
]


def _x64(case: Case):
    """float64 JAX arrays exist only with jax_enable_x64; scope it to the test."""
    return jax.enable_x64(True) if case.dtype == "float64" else contextlib.nullcontext()


def _inputs(case: Case, seed: int, device=None):
    """q, k, v, dout as NumPy arrays (the exact values) and as JAX arrays on `device`."""
    arrays = (*make_inputs(case, np, seed), make_dout(case, np, seed))
    return arrays, tuple(jax.device_put(jnp.asarray(x), device) for x in arrays)


def _loss_and_fn(case: Case, dout):
    def fn(q, k, v):
        return cuflash_jax.attention(q, k, v, causal=case.causal, layout=case.layout)

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v) * dout)

    return fn, loss


def _check_out(case: Case, arrays, out) -> None:
    q, k, v, _ = arrays
    opts = {"causal": case.causal, "scale": 1 / math.sqrt(case.head_dim)}
    ref = reference.attention(q, k, v, causal=case.causal, layout=case.layout)
    q4, k4, v4 = (to_bshd4(x, case) for x in (q, k, v))
    naive, _ = naive_attention(q4, k4, v4, dtype=case.dtype, **opts)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_matches_reference("out", to_bshd4(np.asarray(out, dtype=np.float64), case),
                             to_bshd4(ref, case), naive, dtype=case.dtype)


def _check_grads(case: Case, arrays, grads) -> None:
    q, k, v, dout = arrays
    opts = {"causal": case.causal, "scale": 1 / math.sqrt(case.head_dim)}
    refs = reference.attention_backward(dout, q, k, v, causal=case.causal, layout=case.layout)
    q4, k4, v4, do4 = (to_bshd4(x, case) for x in arrays)
    naives = naive_attention_backward(do4, q4, k4, v4, dtype=case.dtype, **opts)
    eps = backward_eps(do4, q4, k4, v4, dtype=case.dtype, **opts)
    for name, got, x, ref, naive, e in zip(("dq", "dk", "dv"), grads, (q, k, v), refs, naives,
                                           eps, strict=True):
        assert got.dtype == x.dtype and got.shape == x.shape, name
        assert_matches_reference(name, to_bshd4(np.asarray(got, dtype=np.float64), case),
                                 to_bshd4(ref, case), naive, dtype=case.dtype, eps=e)


def _check_case(case: Case, jit: bool, device=None) -> None:
    """Forward and jax.grad of one case; eager ones must not go through the host callback."""
    eager_only = mock.patch.object(cuflash_jax, "_host_call",
                                   side_effect=AssertionError("eager call used the callback"))
    with _x64(case), contextlib.nullcontext() if jit else eager_only:
        arrays, (q, k, v, dout) = _inputs(case, seed=9, device=device)
        fn, loss = _loss_and_fn(case, dout)
        grad = jax.grad(loss, argnums=(0, 1, 2))
        if jit:
            fn, grad = jax.jit(fn), jax.jit(grad)
        _check_out(case, arrays, fn(q, k, v))
        _check_grads(case, arrays, grad(q, k, v))


# ---- CPU -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_eager_forward_and_grad_match_reference(case: Case):
    _check_case(case, jit=False)


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_jit_forward_and_grad_match_reference(case: Case):
    _check_case(case, jit=True)


def test_eager_result_is_a_jax_array():
    case = CPU_CASES[0]
    _, (q, k, v, _) = _inputs(case, seed=1)
    out = cuflash_jax.attention(q, k, v, causal=True)
    assert isinstance(out, jax.Array) and out.devices() == q.devices()


def test_jit_value_and_grad_and_vmap():
    case = CPU_CASES[2]
    arrays, (q, k, v, dout) = _inputs(case, seed=2)
    fn, loss = _loss_and_fn(case, dout)
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(value, loss(q, k, v), rtol=1e-6)
    _check_grads(case, arrays, grads)
    # vmap over a stack of problems equals one call per problem.
    stacked = [jnp.stack([x, 2 * x]) for x in (q, k, v)]
    batched = jax.jit(jax.vmap(fn))(*stacked)
    for i in range(2):
        np.testing.assert_allclose(batched[i], fn(*(x[i] for x in stacked)), rtol=1e-6,
                                   atol=1e-6)


def test_static_options_are_not_traced():
    case = CPU_CASES[0]
    _, (q, k, v, _) = _inputs(case, seed=3)
    causal = jax.jit(lambda q, k, v: cuflash_jax.attention(q, k, v, causal=True, scale=0.5))
    full = jax.jit(lambda q, k, v: cuflash_jax.attention(q, k, v, scale=0.5))
    ref = reference.attention(q, k, v, causal=True, scale=0.5)
    np.testing.assert_allclose(causal(q, k, v), ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(full(q, k, v), ref, rtol=1e-3, atol=1e-3)


def test_errors_are_raised_eagerly_and_while_tracing():
    q = jnp.ones((2, 5, 4, 8))
    k = jnp.ones((2, 7, 2, 6))
    with pytest.raises(ValueError, match="k: head dim 6 differs"):
        cuflash_jax.attention(q, k, k)
    with pytest.raises(ValueError, match="k: head dim 6 differs"):
        jax.jit(cuflash_jax.attention).trace(q, k, k)
    with pytest.raises(ValueError, match="layout"):
        jax.jit(lambda q: cuflash_jax.attention(q, q, q, layout="sbhd")).trace(q)
    bf16 = q.astype(jnp.bfloat16)
    with pytest.raises(TypeError, match=r"bfloat16 is not supported .* under jax\.jit"):
        jax.jit(cuflash_jax.attention).trace(bf16, bf16, bf16)


def test_the_non_cpu_branch_refuses_with_the_documented_message():
    # What a GPU runs under jax.jit (the GPU tests below check it end to end).
    with pytest.raises(NotImplementedError, match=r"cannot run inside jax\.jit on a GPU"):
        cuflash_jax._refuse(np.ones(1))


# ---- GPU -------------------------------------------------------------------------------------


@pytest.fixture
def gpu():
    """JAX's first GPU, or a skip (with the reason printed) where JAX has none."""
    try:
        return jax.devices("gpu")[0]
    except RuntimeError as err:
        reason = f"JAX sees no GPU ({err})"
        print(f"skipping: {reason}")
        pytest.skip(reason)


GPU_CASES = [
    Case(2, 70, 129, 4, 2, 64, dtype="float16", causal=True),
    Case(1, 129, 70, 4, 1, 128, dtype="bfloat16", causal=True, layout="bhsd"),
    Case(1, 65, 65, 2, 2, 96, dtype="float32"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_gpu_eager_forward_and_grad_match_reference(gpu, case: Case):
    _check_case(case, jit=False, device=gpu)


@pytest.mark.gpu
def test_gpu_jit_raises_a_clear_error(gpu):
    case = GPU_CASES[0]
    _, (q, k, v, _) = _inputs(case, seed=4, device=gpu)
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"cannot run inside jax\.jit on a GPU"):
        jax.jit(lambda q, k, v: cuflash_jax.attention(q, k, v))(q, k, v).block_until_ready()


@pytest.mark.gpu
def test_gpu_machine_can_still_jit_onto_the_cpu(gpu):
    case = CPU_CASES[0]
    _check_case(case, jit=True, device=jax.devices("cpu")[0])
