"""cuflash.jax on a GPU: eager and, inside compiled functions, the CUDA kernels as XLA buffer
callbacks: jit, grad, value_and_grad, vmap, checkpoint, scan and shard_map against the float64
reference by the accuracy rule, with sinks, ALiBi slopes, a bias and a mask too (and the
bias's gradient from the kernels); jitted results equal to eager ones; donated buffers; a training
step recorded into XLA command buffers (CUDA graphs) equal to eager; new shapes planned again;
no call into the host path while a compiled function runs. Skipped, with the reason printed,
where CuPy or JAX sees no GPU.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from tests.gpu_support import require_gpu
from tests.strategies import Case

require_gpu()
jax = pytest.importorskip("jax", reason="jax is not installed: cuflash.jax is untested")
try:
    GPU = jax.devices("gpu")[0]
except RuntimeError as err:
    print(f"skipping GPU tests of cuflash.jax: JAX sees no GPU ({err})")
    pytest.skip(f"JAX sees no GPU ({err})", allow_module_level=True)

import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from cuflash import _core, _cpu, _jax_trace, reference  # noqa: E402
from cuflash import jax as cuflash_jax  # noqa: E402
from tests.jax_support import (  # noqa: E402
    attention_of,
    check_case,
    check_grads,
    check_out,
    close,
    f64,
    inputs,
    loss_of,
    x64,
)

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parent.parent
CALLBACK = "xla_buffer_python_gpu_callback_cmd_buffer"  # the buffer callbacks' custom call


@pytest.fixture(autouse=True)
def _on_the_gpu():
    with jax.default_device(GPU):
        yield


CASES = [
    Case(2, 70, 129, 4, 2, 64, dtype="float16", causal=True),
    Case(1, 129, 70, 4, 1, 128, dtype="bfloat16", causal=True, layout="bhsd"),
    Case(2, 200, 200, 2, 2, 128, dtype="bfloat16", window=(37, 5)),
    Case(1, 65, 65, 2, 2, 96, dtype="float32"),
    Case(1, 33, 47, 2, 1, 64, dtype="float64", causal=True, three_d=True),
    Case(2, 61, 61, 2, 2, 60, dtype="bfloat16", causal=True),  # rows of 120 bytes: no TMA
    Case(1, 130, 257, 2, 1, 256, dtype="bfloat16"),
    Case(2, 100, 150, 4, 2, 64, dtype="bfloat16", causal=True, softcap=2.0),
    Case(1, 97, 97, 2, 2, 128, dtype="float32", window=(20, 3), softcap=0.5),
]


def _host_path_refused() -> contextlib.ExitStack:
    """While this is active nothing may run cuflash's eager core or its NumPy path, as a host
    callback (the CPU branch) would."""
    error = AssertionError("a compiled GPU function called back into the host path")
    stack = contextlib.ExitStack()
    for module, name in ((_core, "forward_into"), (_core, "backward_into"), (_cpu, "forward"),
                         (_cpu, "backward")):
        stack.enter_context(mock.patch.object(module, name, side_effect=error))
    return stack


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_eager_forward_and_grad_match_reference(case: Case):
    check_case(case, jit=False, device=GPU)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_jit_forward_and_grad_match_reference(case: Case):
    check_case(case, jit=True, device=GPU)


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: c.id)
def test_jit_runs_the_kernels_inside_the_compiled_function(case: Case):
    with x64(case):
        arrays, (q, k, v, dout) = inputs(case, seed=1, device=GPU)
        step = jax.jit(jax.value_and_grad(loss_of(attention_of(case), dout), argnums=(0, 1, 2)))
        text = step.lower(q, k, v).as_text()
        assert text.count(CALLBACK) == 2, "forward and backward as GPU buffer callbacks"
        step(q, k, v)  # compile (and plan) outside the check below
        with _host_path_refused():
            _, grads = jax.block_until_ready(step(q, k, v))
        check_grads(case, arrays, grads)
        assert all(g.devices() == {GPU} for g in grads)


@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: c.id)
def test_jitted_results_equal_eager_ones(case: Case):
    """The same kernels with the same plans: out, dk and dv equal bit for bit; dq (summed with
    atomics in any order) by the accuracy rule."""
    with x64(case):
        arrays, (q, k, v, dout) = inputs(case, seed=2, device=GPU)
        fn = attention_of(case)
        grad = jax.grad(loss_of(fn, dout), argnums=(0, 1, 2))
        eager_out, eager_grads = fn(q, k, v), grad(q, k, v)
        jit_out, jit_grads = jax.jit(fn)(q, k, v), jax.jit(grad)(q, k, v)
        np.testing.assert_array_equal(f64(jit_out), f64(eager_out))
        for name, got, want in zip(("dk", "dv"), jit_grads[1:], eager_grads[1:], strict=True):
            np.testing.assert_array_equal(f64(got), f64(want), err_msg=name)
        check_grads(case, arrays, jit_grads)


@pytest.mark.parametrize("case", [CASES[4], CASES[1]], ids=lambda c: c.id)
def test_vjp_across_eager_and_jit(case: Case):
    """Residuals of an eager forward reach a jitted backward and a jitted forward's an eager
    backward (float64: the traced forward keeps float64 statistics, the eager one float32)."""
    with x64(case):
        arrays, (q, k, v, dout) = inputs(case, seed=12, device=GPU)
        fn = attention_of(case)
        _, eager_vjp = jax.vjp(fn, q, k, v)
        check_grads(case, arrays, jax.jit(eager_vjp)(dout))
        _, traced_vjp = jax.jit(lambda q, k, v: jax.vjp(fn, q, k, v))(q, k, v)
        check_grads(case, arrays, traced_vjp(dout))


def test_value_and_grad_vmap_and_checkpoint():
    case = Case(2, 77, 90, 4, 2, 64, dtype="bfloat16", causal=True)
    arrays, (q, k, v, dout) = inputs(case, seed=3, device=GPU)
    fn, loss = attention_of(case), loss_of(attention_of(case), dout)
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    close(value, loss(q, k, v), rtol=2e-2, atol=2e-2)
    check_grads(case, arrays, grads)
    check_grads(case, arrays, jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(q, k, v))

    stacked = [jnp.stack([x, -x, 0.5 * x]) for x in (q, k, v)]
    batched = jax.jit(jax.vmap(fn))(*stacked)
    lowered = jax.jit(jax.vmap(fn)).lower(*stacked).as_text()
    assert lowered.count(CALLBACK) == 1, "one launch for the whole stack"
    for i in range(3):
        np.testing.assert_array_equal(f64(batched[i]), f64(fn(*(x[i] for x in stacked))))
    per_problem = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=(0, None, None)))(
        stacked[0], k, v)
    for i in range(3):
        for got, want in zip(per_problem, jax.grad(loss, argnums=(0, 1, 2))(stacked[0][i], k, v),
                             strict=True):
            close(got[i], want, rtol=2e-2, atol=2e-2)


def test_scan_over_layers():
    case = Case(2, 64, 64, 4, 4, 64, dtype="bfloat16", causal=True)
    _, (q, k, v, _) = inputs(case, seed=4, device=GPU)
    fn = attention_of(case)
    weights = jnp.stack([jnp.eye(64, dtype=jnp.bfloat16) * s for s in (1.0, 0.5, 2.0)])

    def layers(x):
        def layer(x, w):
            return fn(x @ w, k, v), None
        return jax.lax.scan(layer, x, weights)[0]

    want = q
    for w in weights:
        want = fn(want @ w, k, v)
    close(jax.jit(layers)(q), want, rtol=2e-2, atol=2e-2)
    grads = jax.jit(jax.grad(lambda x: layers(x).astype(jnp.float32).sum()))(q)
    assert bool(jnp.all(jnp.isfinite(grads)))


def test_shard_map_on_a_one_device_mesh():
    case = Case(2, 50, 70, 4, 2, 64, dtype="float16", causal=True)
    arrays, (q, k, v, dout) = inputs(case, seed=5, device=GPU)
    try:
        shard_map = jax.shard_map
    except AttributeError:  # JAX < 0.7
        from jax.experimental.shard_map import shard_map
    mesh = Mesh(np.array([GPU]), ("x",))
    sharded = shard_map(attention_of(case), mesh=mesh, in_specs=P("x"), out_specs=P("x"))
    check_out(case, arrays, jax.jit(sharded)(q, k, v))
    check_grads(case, arrays, jax.jit(jax.grad(loss_of(sharded, dout), argnums=(0, 1, 2)))(
        q, k, v))


def test_donated_buffers_in_a_training_step():
    case = Case(2, 96, 96, 4, 2, 64, dtype="bfloat16", causal=True)
    _, (q, k, v, dout) = inputs(case, seed=6, device=GPU)
    loss = loss_of(attention_of(case), dout)
    grad = jax.grad(loss, argnums=(0, 1, 2))

    def step(q, k, v):
        return tuple(x - 0.1 * g for x, g in zip((q, k, v), grad(q, k, v), strict=True))

    jitted = jax.jit(step, donate_argnums=(0, 1, 2))
    eager = (q, k, v)
    donated = tuple(jnp.copy(x) for x in eager)
    for _ in range(3):
        eager = step(*eager)
        donated = jitted(*donated)
    for got, want in zip(donated, eager, strict=True):
        close(got, want, rtol=3e-2, atol=3e-2)


def test_new_shapes_are_planned_again():
    fn = jax.jit(lambda q, k, v: cuflash_jax.attention(q, k, v, causal=True))
    rng = np.random.default_rng(7)
    shapes = [((2, 100, 4, 64), (2, 130, 2, 64)), ((1, 257, 2, 128), (1, 31, 1, 128)),
              ((2, 100, 4, 64), (2, 130, 2, 64))]
    with mock.patch.object(_jax_trace, "validate", wraps=_jax_trace.validate) as traced:
        for q_shape, k_shape in shapes:
            host = [rng.standard_normal(s).astype(np.float32) for s in (q_shape, k_shape, k_shape)]
            out = fn(*(jnp.asarray(x, jnp.bfloat16) for x in host))
            rounded = [f64(jnp.asarray(x, jnp.bfloat16)) for x in host]
            close(out, reference.attention(*rounded, causal=True), rtol=3e-2, atol=3e-2)
    assert traced.call_count == 2, "the repeated shape reuses its compiled function"


@pytest.mark.parametrize("dtype, causal, jit", [("bfloat16", True, True), ("float16", False, True),
                                                ("float32", True, False), ("float64", False, True)])
def test_sinks_forward_and_gradients(dtype, causal, jit):
    """Sinks through the kernels inside a compiled function (and eagerly): out and the
    gradients of q, k, v and the sinks against the float64 reference by the accuracy rule."""
    from tests.accuracy import (
        EPS,
        assert_matches_reference,
        backward_eps,
        naive_attention,
        naive_attention_backward,
        naive_sinks_gradient,
    )

    rng = np.random.default_rng(21)
    b, s, hq, hkv, d = 2, 150, 4, 2, 64
    q64, do64 = (rng.standard_normal((b, s, hq, d)) for _ in range(2))
    k64, v64 = (rng.standard_normal((b, s + 30, hkv, d)) for _ in range(2))
    sinks = (rng.standard_normal(hq) * 3).astype(np.float32)
    cast = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32,
            "float64": jnp.float64}[dtype]
    with jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext():
        q, k, v, dout = (jnp.asarray(x, cast) for x in (q64, k64, v64, do64))
        q64, k64, v64, do64 = (f64(x) for x in (q, k, v, dout))  # the values the call sees

        def loss(q, k, v, s):
            return jnp.sum(cuflash_jax.attention(q, k, v, causal=causal, sinks=s) * dout)

        run = jax.jit if jit else (lambda f: f)
        out = run(lambda *a: cuflash_jax.attention(*a[:3], causal=causal, sinks=a[3]))(
            q, k, v, jnp.asarray(sinks))
        grads = run(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, jnp.asarray(sinks))
    used = sinks.astype(np.float64)
    opts = {"causal": causal, "sinks": used, "scale": 1 / np.sqrt(d)}
    ref = reference.attention(q64, k64, v64, causal=causal, sinks=used)
    naive, _ = naive_attention(q64, k64, v64, dtype=dtype, **opts)
    assert_matches_reference("out", f64(out), ref, naive, dtype=dtype)
    refs = reference.attention_grads(do64, q64, k64, v64, causal=causal, sinks=used)
    naives = naive_attention_backward(do64, q64, k64, v64, dtype=dtype, **opts)
    eps = backward_eps(do64, q64, k64, v64, dtype=dtype, **opts)
    for name, got, nv, e in zip(("dq", "dk", "dv"), grads, naives, eps, strict=False):
        assert_matches_reference(name, f64(got), refs[name[1:]], nv, dtype=dtype, eps=e)
    assert grads[3].dtype == jnp.float32 and grads[3].shape == (hq,)
    floor = max(1.0, float(np.sum(np.abs(do64)) * np.max(np.abs(ref))))
    rule = "float32" if dtype == "float64" else dtype
    assert_matches_reference("dsinks", f64(grads[3]), refs["sinks"],
                             naive_sinks_gradient(do64, q64, k64, v64, dtype=dtype, **opts),
                             dtype=rule, eps=EPS[rule] * floor)


# (dtype, layout, causal, jit, slopes shape, bias shape and dtype, mask shape); B 2, Sq 150,
# Sk 180, Hq 4, Hkv 2, D 64; bias and mask shapes (B, Hq, Sq, Sk) in both layouts.
SCORE_ARRAY_CASES = [
    ("bfloat16", "bshd", True, True, (4,), ((4, 150, 180), "float32"), (2, 1, 150, 180)),
    ("float16", "bhsd", False, True, (2, 4), None, (150, 180)),
    ("bfloat16", "bhsd", True, True, None, ((2, 1, 1, 180), "float16"), None),
    ("float32", "bshd", True, False, None, ((2, 4, 150, 180), "float32"), (4, 1, 180)),
    ("float64", "bshd", False, True, (4,), ((1, 1, 150, 180), "float64"), (2, 4, 150, 180)),
]


@pytest.mark.parametrize("dtype, layout, causal, jit, slopes, bias, mask", SCORE_ARRAY_CASES,
                         ids=lambda x: str(x).replace(" ", ""))
def test_score_arrays_forward_and_gradients(dtype, layout, causal, jit, slopes, bias, mask):
    """ALiBi slopes, a bias and a mask through the kernels inside a compiled function (and
    eagerly): out and the gradients of q, k, v against the float64 reference by the accuracy
    rule, the bias not differentiated (the kernels do not form its gradient); jitted, nothing
    runs on the host."""
    from tests.accuracy import (
        assert_matches_reference,
        backward_eps,
        naive_attention,
        naive_attention_backward,
    )

    rng = np.random.default_rng(22)
    b, s, sk, hq, hkv, d = 2, 150, 180, 4, 2, 64
    q64, do64 = (rng.standard_normal((b, s, hq, d)) for _ in range(2))
    k64, v64 = (rng.standard_normal((b, sk, hkv, d)) for _ in range(2))
    mods64 = {}
    if slopes is not None:
        mods64["alibi_slopes"] = rng.random(slopes).astype(np.float32).astype(np.float64)
    if bias is not None:
        shape, bias_dtype = bias
        mods64["bias"] = rng.standard_normal(shape).astype(bias_dtype).astype(np.float64)
    if mask is not None:
        mods64["mask"] = rng.random(mask) < 0.8
    cast = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32,
            "float64": jnp.float64}[dtype]

    def caller(x):  # (B, S, H, D) in the caller's layout
        return x if layout == "bshd" else jnp.swapaxes(x, 1, 2)

    with jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext():
        q, k, v, dout = (jnp.asarray(x, cast) for x in (q64, k64, v64, do64))
        q64, k64, v64, do64 = (f64(x) for x in (q, k, v, dout))  # the values the call sees
        mods = {"alibi_slopes": None if slopes is None
                else jnp.asarray(mods64["alibi_slopes"], jnp.float32),
                "bias": None if bias is None else jnp.asarray(mods64["bias"], bias[1]),
                "mask": None if mask is None else jnp.asarray(mods64["mask"])}

        def fn(q, k, v):
            return cuflash_jax.attention(caller(q), caller(k), caller(v), causal=causal,
                                         layout=layout, **mods)

        def loss(q, k, v):
            return jnp.sum(caller(fn(q, k, v)) * dout)

        run = jax.jit if jit else (lambda f: f)
        forward, grad = run(fn), run(jax.grad(loss, argnums=(0, 1, 2)))
        if jit:
            forward(q, k, v), grad(q, k, v)  # compile (and plan) outside the check below
        with _host_path_refused() if jit else contextlib.nullcontext():
            out = caller(jax.block_until_ready(forward(q, k, v)))
            grads = jax.block_until_ready(grad(q, k, v))
        if jit:
            text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).as_text()
            assert text.count(CALLBACK) == 2, "forward and backward as GPU buffer callbacks"
    opts = {"causal": causal, **mods64}
    ref = reference.attention(q64, k64, v64, **opts)
    naive, _ = naive_attention(q64, k64, v64, dtype=dtype, scale=1 / np.sqrt(d), **opts)
    assert_matches_reference("out", f64(out), ref, naive, dtype=dtype)
    refs = reference.attention_grads(do64, q64, k64, v64, **opts)
    naives = naive_attention_backward(do64, q64, k64, v64, dtype=dtype, scale=1 / np.sqrt(d),
                                      **opts)
    eps = backward_eps(do64, q64, k64, v64, dtype=dtype, scale=1 / np.sqrt(d), **opts)
    for name, got, nv, e in zip(("dq", "dk", "dv"), grads, naives, eps, strict=True):
        assert got.dtype == cast and got.devices() == {GPU}, name
        assert_matches_reference(name, f64(got), refs[name[1:]], nv, dtype=dtype, eps=e)


def test_score_arrays_under_vmap_and_their_refusals():
    """vmap over a stack with the bias and the mask mapped: one launch for the whole stack,
    each problem as it is on its own; a differentiated bias gets its gradient from the kernels
    (jitted, and under vmap), equal to the reference and to the CPU's; a softcap with a bias
    raises NotImplementedError naming both."""
    rng = np.random.default_rng(23)
    q, k, v = (jnp.asarray(rng.standard_normal((3, 2, 96, 4, 64)), jnp.bfloat16)
               for _ in range(3))
    bias = jnp.asarray(rng.standard_normal((3, 4, 96, 96)), jnp.float32)
    mask = jnp.asarray(rng.random((3, 2, 1, 96, 96)) < 0.8)

    def fn(q, k, v, b, m):
        return cuflash_jax.attention(q, k, v, causal=True, bias=b, mask=m)

    batched = jax.jit(jax.vmap(fn))(q, k, v, bias, mask)
    assert jax.jit(jax.vmap(fn)).lower(q, k, v, bias, mask).as_text().count(CALLBACK) == 1
    for i in range(3):
        np.testing.assert_array_equal(f64(batched[i]),
                                      f64(jax.jit(fn)(q[i], k[i], v[i], bias[i], mask[i])))

    def loss(q, b):
        return fn(q, k[0], v[0], b, mask[0]).astype(jnp.float32).sum()

    on_gpu = jax.jit(jax.grad(loss, argnums=1))(q[0], bias[0])
    stacked = jax.jit(jax.vmap(jax.grad(
        lambda q, k, v, b, m: fn(q, k, v, b, m).astype(jnp.float32).sum(), argnums=3)))(
        q, k, v, bias, mask)
    assert on_gpu.devices() == {GPU} and on_gpu.dtype == jnp.float32
    with pytest.raises(NotImplementedError, match=r"softcap: the CUDA kernels do not combine a "
                                                  r"softcap with bias yet"):
        jax.jit(lambda q: cuflash_jax.attention(q, q, q, softcap=2.0, bias=bias[0]))(q[0])
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        on_cpu = [jax.device_put(x, cpu) for x in (q[0], k[0], v[0], bias[0], mask[0])]
        dbias = jax.jit(jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=3))(
            *on_cpu)
    refs = reference.attention_grads(np.ones((2, 96, 4, 64)), *(f64(x) for x in on_cpu[:3]),
                                     causal=True, bias=f64(on_cpu[3]), mask=np.asarray(mask[0]))
    close(dbias, refs["bias"], rtol=2e-2, atol=2e-2)
    close(on_gpu, refs["bias"], rtol=2e-2, atol=2e-2)
    close(stacked[0], refs["bias"], rtol=2e-2, atol=2e-2)
    for i in (1, 2):
        ref_i = reference.attention_grads(np.ones((2, 96, 4, 64)), f64(q[i]), f64(k[i]),
                                          f64(v[i]), causal=True, bias=f64(bias[i]),
                                          mask=np.asarray(mask[i]))
        close(stacked[i], ref_i["bias"], rtol=2e-2, atol=2e-2)


def test_dot_product_attention_matches_jax_nn():
    rng = np.random.default_rng(8)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 256, 8, 64)), jnp.bfloat16) for _ in range(3))
    options = {"is_causal": True, "local_window_size": (64, 0)}
    ours = jax.jit(lambda *a: cuflash_jax.dot_product_attention(*a, **options))(q, k, v)
    theirs = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)),
                                          implementation="xla", **options)
    close(ours, theirs, rtol=3e-2, atol=3e-2)


def test_a_gpu_machine_can_still_jit_onto_the_cpu():
    case = Case(2, 13, 31, 4, 2, 16, dtype="float32", causal=True)
    with jax.default_device(jax.devices("cpu")[0]):
        check_case(case, jit=True, device=jax.devices("cpu")[0])


# ---- XLA command buffers: a fresh process, whose XLA_FLAGS apply from the start -------------

_COMMAND_BUFFER_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np
from cuflash import jax as cuflash_jax

rng = np.random.default_rng(0)
shape_q, shape_k = (2, 256, 8, 64), (2, 256, 2, 64)

def attention(q, k, v):
    return cuflash_jax.attention(q, k, v, causal=True)

def loss(q, k, v, w):
    return jnp.sum(attention(jnp.tanh(q @ w), k, v).astype(jnp.float32) ** 2)

step = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
jitted = jax.jit(step)

def fresh():
    arrays = [rng.standard_normal(s).astype(np.float32) for s in (shape_q, shape_k, shape_k)]
    return [jnp.asarray(x, jnp.bfloat16) for x in arrays] + [jnp.eye(64, dtype=jnp.bfloat16)]

inputs = [fresh() for _ in range(3)]
worst = 0.0
for args in inputs + inputs:  # new buffers, then the same again
    (value, grads), (want, want_grads) = jitted(*args), step(*args)
    for got, ref in zip((value, *grads), (want, *want_grads)):
        got, ref = (np.asarray(x, np.float64) for x in (got, ref))
        worst = max(worst, float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max())))
text = jitted.lower(*inputs[0]).compile().as_text()
print("callback in the program:", "xla_buffer_python_gpu_callback_cmd_buffer" in text)
print("command buffer in the program:", "command_buffer" in text)
print("worst relative error", worst)
assert worst < 3e-2, worst
print("command buffers ok")
"""


def test_a_training_step_under_command_buffers_matches_eager():
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL "
                        "--xla_gpu_graph_min_graph_size=1"}
    run = subprocess.run([sys.executable, "-c", _COMMAND_BUFFER_SCRIPT], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=600)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "command buffers ok" in run.stdout
    assert "callback in the program: True" in run.stdout
