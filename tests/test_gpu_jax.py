"""cuflash.jax on a GPU: eager and, inside compiled functions, the CUDA kernels as XLA buffer
callbacks: jit, grad, value_and_grad, vmap, checkpoint, scan and shard_map against the float64
reference by the accuracy rule; jitted results equal to eager ones; donated buffers; a training
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

from cuflash import _cpu, _jax_trace, api, reference  # noqa: E402
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
    for module, name in ((api, "forward_into"), (api, "backward_into"), (_cpu, "forward"),
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
