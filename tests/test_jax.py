"""cuflash.jax on JAX's CPU backend: eager, jax.jit, grad, value_and_grad, vmap, checkpoint and
shard_map against the float64 reference by the accuracy rule of docs/api.md; dot_product_attention
against jax.nn.dot_product_attention in float64; errors while tracing; the refusal of other
platforms when XLA lowers; and the GPU path's trace-time planning and buffer callbacks, run on
stand-ins of the GPU (planners and launches recorded, nothing executed). The GPU runs are in
tests/test_gpu_jax.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax is not installed: cuflash.jax is untested")

import jax.numpy as jnp  # noqa: E402

from cuflash import _core, _jax_gpu, _jax_trace, reference  # noqa: E402
from cuflash import jax as cuflash_jax  # noqa: E402
from cuflash.cuda import _kernel_call, _launch  # noqa: E402
from tests.jax_support import (  # noqa: E402
    attention_of,
    check_case,
    check_grads,
    close,
    inputs,
    loss_of,
    x64,
)
from tests.strategies import Case  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _cpu_default_device():
    """Every test here runs on JAX's CPU backend, also on a machine whose default is a GPU."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


CPU_CASES = [
    Case(2, 13, 31, 4, 2, 16, dtype="float32", causal=True),
    Case(2, 31, 13, 4, 2, 16, dtype="float64", causal=True),
    Case(1, 17, 17, 3, 3, 8, dtype="float32", layout="bhsd"),
    Case(1, 9, 20, 6, 2, 12, dtype="float64", causal=True, three_d=True),
    Case(2, 7, 11, 2, 1, 8, dtype="float16", causal=True),
    Case(2, 19, 23, 4, 2, 16, dtype="bfloat16", window=(5, 2), layout="bhsd"),
    # v with a head dim of its own (Dv != D); out and dout have it
    Case(2, 13, 31, 4, 2, 192, head_dim_v=128, dtype="float32", causal=True),
    Case(1, 9, 20, 6, 2, 16, head_dim_v=40, dtype="float64", window=(3, 2), layout="bhsd",
         three_d=True),
    Case(2, 7, 11, 2, 1, 64, head_dim_v=1, dtype="bfloat16", causal=True),
]


# ---- eager and jit -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_eager_forward_and_grad_match_reference(case: Case):
    check_case(case, jit=False)


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_jit_forward_and_grad_match_reference(case: Case):
    check_case(case, jit=True)


def test_eager_result_is_a_jax_array():
    case = CPU_CASES[0]
    _, (q, k, v, _) = inputs(case, seed=1)
    out = cuflash_jax.attention(q, k, v, causal=True)
    assert isinstance(out, jax.Array) and out.devices() == q.devices()


def test_jit_value_and_grad_matches_eager():
    case = CPU_CASES[2]
    arrays, (q, k, v, dout) = inputs(case, seed=2)
    loss = loss_of(attention_of(case), dout)
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    close(value, loss(q, k, v), rtol=1e-6)
    check_grads(case, arrays, grads)


def test_vjp_across_eager_and_jit():
    """Residuals of an eager forward reach a jitted backward, and a jitted forward's an eager
    backward (float64: the traced forward keeps float64 statistics, the eager one float32)."""
    case = CPU_CASES[1]
    with x64(case):
        arrays, (q, k, v, dout) = inputs(case, seed=11)
        fn = attention_of(case)
        _, eager_vjp = jax.vjp(fn, q, k, v)
        check_grads(case, arrays, jax.jit(eager_vjp)(dout))
        _, traced_vjp = jax.jit(lambda q, k, v: jax.vjp(fn, q, k, v))(q, k, v)
        check_grads(case, arrays, traced_vjp(dout))


def test_checkpoint_recomputes_the_forward_and_matches():
    case = CPU_CASES[0]
    arrays, (q, k, v, dout) = inputs(case, seed=3)
    loss = loss_of(attention_of(case), dout)
    for policy in (None, jax.checkpoint_policies.everything_saveable):
        grads = jax.jit(jax.grad(jax.checkpoint(loss, policy=policy), argnums=(0, 1, 2)))(q, k, v)
        check_grads(case, arrays, grads)


def test_static_options_are_not_traced():
    case = CPU_CASES[0]
    _, (q, k, v, _) = inputs(case, seed=3)
    causal = jax.jit(lambda q, k, v: cuflash_jax.attention(q, k, v, causal=True, scale=0.5))
    full = jax.jit(lambda q, k, v: cuflash_jax.attention(q, k, v, scale=0.5))
    ref = reference.attention(q, k, v, causal=True, scale=0.5)
    close(causal(q, k, v), ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(full(q, k, v), ref, rtol=1e-3, atol=1e-3)


def test_new_shapes_trace_again_and_known_ones_do_not():
    fn = jax.jit(lambda q, k, v: cuflash_jax.attention(q, k, v, causal=True))
    shapes = [((2, 9, 4, 8), (2, 12, 2, 8)), ((1, 33, 2, 16), (1, 5, 1, 16)),
              ((2, 9, 4, 8), (2, 12, 2, 8))]
    rng = np.random.default_rng(0)
    with mock.patch.object(_jax_trace, "validate", wraps=_jax_trace.validate) as traced:
        for q_shape, k_shape in shapes:
            q, k, v = (rng.standard_normal(s, dtype=np.float32) for s in (q_shape, k_shape,
                                                                           k_shape))
            close(fn(q, k, v), reference.attention(q, k, v, causal=True), rtol=1e-5, atol=1e-5)
    assert traced.call_count == 2, "the repeated shape must reuse its compiled function"


# ---- vmap: the mapped axis joins the batch -----------------------------------------------------


def _callbacks(jaxpr) -> list:
    """The host callbacks' equations anywhere in a jaxpr (closed or not), sub-jaxprs included."""
    found = []
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        if eqn.primitive.name == "pure_callback":
            found.append(eqn)
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(item, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
                    found += _callbacks(item)
    return found


@pytest.mark.parametrize("in_axes", [(0, 0, 0), (0, None, None), (1, 0, None)],
                         ids=["all", "q-only", "moved"])
def test_vmap_folds_the_mapped_axis_into_one_call(in_axes):
    case = Case(2, 9, 14, 4, 2, 8, causal=True)
    _, (q, k, v, _) = inputs(case, seed=4)

    def stack(x, axis):
        return x if axis is None else jnp.stack([x, 2 * x, -x], axis=axis)

    args = [stack(x, a) for x, a in zip((q, k, v), in_axes, strict=True)]
    fn = attention_of(case)
    batched = jax.jit(jax.vmap(fn, in_axes=in_axes))(*args)
    for i in range(3):
        one = [x if a is None else jnp.take(x, i, axis=a)
               for x, a in zip(args, in_axes, strict=True)]
        close(batched[i], fn(*one))
    (eqn,) = _callbacks(jax.make_jaxpr(jax.vmap(fn, in_axes=in_axes))(*args))
    assert eqn.outvars[0].aval.shape == (3 * 2, 9, 4, 8), "one call over the folded batch"


def test_vmap_with_a_value_head_dim_of_its_own():
    case = Case(2, 9, 14, 4, 2, 8, head_dim_v=12, causal=True, layout="bhsd")
    _, (q, k, v, _) = inputs(case, seed=4)
    fn = attention_of(case)
    args = [jnp.stack([x, 2 * x, -x]) for x in (q, k, v)]
    batched = jax.jit(jax.vmap(fn))(*args)
    assert batched.shape == (3, *case.out_shape)
    for i in range(3):
        close(batched[i], fn(*(x[i] for x in args)))
    (eqn,) = _callbacks(jax.make_jaxpr(jax.vmap(fn))(*args))
    assert eqn.outvars[0].aval.shape == (3 * 2, 4, 9, 12), "one call over the folded batch"


def test_vmap_of_3d_inputs_and_nested_vmaps():
    case = Case(1, 11, 7, 2, 2, 8, causal=True, three_d=True, layout="bhsd")
    _, (q, k, v, _) = inputs(case, seed=5)
    fn = attention_of(case)
    stacked = [jnp.stack([jnp.stack([x, 0.5 * x]), jnp.stack([-x, 3 * x])]) for x in (q, k, v)]
    nested = jax.jit(jax.vmap(jax.vmap(fn)))(*stacked)
    for i in range(2):
        for j in range(2):
            close(nested[i, j], fn(*(x[i, j] for x in stacked)))
    (eqn,) = _callbacks(jax.make_jaxpr(jax.vmap(jax.vmap(fn)))(*stacked))
    assert eqn.outvars[0].aval.shape == (4, 2, 11, 8)


def test_vmap_of_grad_and_grad_of_vmap():
    case = Case(2, 8, 10, 2, 1, 8, window=(3, 1))
    arrays, (q, k, v, dout) = inputs(case, seed=6)
    loss = loss_of(attention_of(case), dout)
    qs = jnp.stack([q, 0.5 * q])
    per_problem = [jax.grad(loss, argnums=(0, 1, 2))(x, k, v) for x in qs]
    vmapped = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=(0, None, None)))(
        qs, k, v)
    summed = jax.jit(jax.grad(lambda qs, k, v: jax.vmap(loss, in_axes=(0, None, None))(
        qs, k, v).sum(), argnums=(0, 1, 2)))(qs, k, v)
    for i in range(2):
        for got, want in zip(vmapped, per_problem[i], strict=True):
            close(got[i], want, rtol=1e-5, atol=1e-5)
        close(summed[0][i], per_problem[i][0], rtol=1e-5, atol=1e-5)
    close(summed[1], per_problem[0][1] + per_problem[1][1], rtol=1e-5, atol=1e-5)
    check_grads(case, arrays, per_problem[0])


# ---- shard_map: four CPU devices in a fresh interpreter ---------------------------------------

_SHARD_MAP_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from cuflash import jax as cuflash_jax, reference

try:
    shard_map = jax.shard_map
except AttributeError:  # JAX < 0.7
    from jax.experimental.shard_map import shard_map
assert len(jax.devices()) == 4, jax.devices()
mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
rng = np.random.default_rng(0)
q = rng.standard_normal((4, 16, 4, 8), dtype=np.float32)
k, v = (rng.standard_normal((4, 24, 2, 8), dtype=np.float32) for _ in range(2))
dout = rng.standard_normal(q.shape, dtype=np.float32)

def check(name, got, want):
    err = float(np.abs(np.asarray(got, np.float64) - want).max())
    assert err < 2e-5, (name, err)

# Batch sharded: every operand varies over the mesh axis.
fn = lambda q, k, v: cuflash_jax.attention(q, k, v, causal=True)
sharded = jax.jit(shard_map(fn, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
check("out", sharded(q, k, v), reference.attention(q, k, v, causal=True))
loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * dout)
grads = jax.jit(jax.grad(loss(shard_map(fn, mesh=mesh, in_specs=P("x"), out_specs=P("x"))),
                         argnums=(0, 1, 2)))(q, k, v)
refs = reference.attention_backward(dout, q, k, v, causal=True)
for name, g, r in zip(("dq", "dk", "dv"), grads, refs):
    check(name, g, r)

# Queries sharded along the sequence, keys and values replicated: dk and dv are summed over the
# shards (the replicated operands are marked varying, whose transpose is a psum).
full = lambda q, k, v: cuflash_jax.attention(q, k, v)
seq = shard_map(full, mesh=mesh, in_specs=(P(None, "x"), P(), P()), out_specs=P(None, "x"))
check("out (seq)", jax.jit(seq)(q, k, v), reference.attention(q, k, v))
grads = jax.jit(jax.grad(loss(seq), argnums=(0, 1, 2)))(q, k, v)
for name, g, r in zip(("dq", "dk", "dv"), grads, reference.attention_backward(dout, q, k, v)):
    check(name + " (seq)", g, r)

# A two-axis mesh: batch over "data", heads over "model" (query heads 4 and kv heads 2 split in
# two: each shard keeps whole GQA groups).
mesh2 = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
spec = P("data", None, "model")
two = shard_map(fn, mesh=mesh2, in_specs=spec, out_specs=spec)
check("out (2-axis)", jax.jit(two)(q, k, v), reference.attention(q, k, v, causal=True))
grads = jax.jit(jax.grad(loss(two), argnums=(0, 1, 2)))(q, k, v)
for name, g, r in zip(("dq", "dk", "dv"), grads, refs):
    check(name + " (2-axis)", g, r)

# A bias replicated over the batch shards (its gradient is summed over them), a mask sharded.
bias = rng.standard_normal((4, 16, 24), dtype=np.float32)
mask = rng.random((4, 1, 16, 24)) < 0.8
mods = lambda q, k, v, b, m: cuflash_jax.attention(q, k, v, causal=True, bias=b, mask=m)
mod_map = shard_map(mods, mesh=mesh, in_specs=(P("x"),) * 3 + (P(), P("x")), out_specs=P("x"))
check("out (bias, mask)", jax.jit(mod_map)(q, k, v, bias, mask),
      reference.attention(q, k, v, causal=True, bias=bias, mask=mask))
grads = jax.jit(jax.grad(lambda q, k, v, b: jnp.sum(mod_map(q, k, v, b, mask) * dout),
                         argnums=(0, 1, 2, 3)))(q, k, v, bias)
refs = reference.attention_grads(dout, q, k, v, causal=True, bias=bias, mask=mask)
for name, g in zip(("q", "k", "v", "bias"), grads):
    check("d" + name + " (bias, mask)", g, refs[name])
print("shard_map ok")
"""


def test_shard_map_on_one_and_two_axis_cpu_meshes():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    run = subprocess.run([sys.executable, "-c", _SHARD_MAP_SCRIPT], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "shard_map ok" in run.stdout


# ---- dot_product_attention ---------------------------------------------------------------------

# (query shape, key shape, is_causal, local_window_size): Sq = Sk, Sq < Sk (keys cut off),
# Sq > Sk, windows on either side, GQA, 3-D.
DPA_CASES = [
    ((2, 16, 4, 8), (2, 16, 2, 8), True, None),
    ((2, 9, 4, 8), (2, 23, 4, 8), True, None),
    ((1, 23, 2, 16), (1, 9, 1, 16), True, None),
    ((2, 17, 4, 8), (2, 17, 4, 8), False, (3, 2)),
    ((2, 11, 2, 8), (2, 30, 2, 8), False, (4, 6)),
    ((2, 20, 2, 8), (2, 12, 2, 8), False, (10, 0)),
    ((13, 4, 8), (19, 2, 8), True, 5),
    ((2, 12, 2, 8), (2, 12, 2, 8), False, None),
]


def _top_left_attention(q, k, v, *, is_causal, local_window_size, scale, bias=None, mask=None):
    """jax.nn.dot_product_attention's masks (and bias) spelled out in float64 (its own
    implementation runs the softmax in float32): the oracle of the tests below. Every row must
    see some key."""
    seqlen_q, seqlen_k = q.shape[-3], k.shape[-3]
    i, j = jnp.arange(seqlen_q)[:, None], jnp.arange(seqlen_k)[None, :]
    visible = jnp.ones((seqlen_q, seqlen_k), bool)
    if is_causal:
        visible &= j <= i
    if local_window_size is not None:
        left, right = ((local_window_size,) * 2 if isinstance(local_window_size, int)
                       else local_window_size)
        visible &= (i - left <= j) & (j <= i + right)
    group = q.shape[-2] // k.shape[-2]
    k, v = (jnp.repeat(x, group, axis=-2) for x in (k, v))
    logits = jnp.einsum("...tnh,...snh->...nts", q, k) * scale
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        visible = visible & mask
    probabilities = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
    return jnp.einsum("...nts,...snh->...tnh", probabilities, v)


@pytest.mark.parametrize("shapes", DPA_CASES,
                         ids=lambda c: f"q{c[0]}-k{c[1]}-causal{c[2]}-window{c[3]}")
def test_dot_product_attention_matches_jax_nn(shapes):
    q_shape, k_shape, is_causal, window = shapes
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(rng.standard_normal(s)) for s in (q_shape, k_shape, k_shape))
        dout = jnp.asarray(rng.standard_normal(q_shape))
        options = {"is_causal": is_causal, "local_window_size": window, "scale": 0.3}

        def ours(q, k, v):
            return cuflash_jax.dot_product_attention(q, k, v, **options)

        def oracle(q, k, v):
            return _top_left_attention(q, k, v, **options)

        out = jax.jit(ours)(q, k, v)
        close(out, oracle(q, k, v), rtol=1e-10, atol=1e-10)
        # JAX's own (float32 softmax) agrees to float32 precision: the same masks.
        close(out, jax.nn.dot_product_attention(q, k, v, implementation="xla", **options),
               rtol=1e-5, atol=1e-5)
        grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * dout), argnums=(0, 1, 2)))(
            q, k, v) for f in (ours, oracle)]
        for got, want in zip(*grads, strict=True):
            close(got, want, rtol=1e-9, atol=1e-10)


# (query shape, key shape, is_causal, local_window_size, bias shape, mask shape), shapes in
# JAX's (B, N, T, S) convention: broadcast axes, fewer than 4 axes, keys cut off (their columns
# with them), GQA, a 3-D query.
DPA_MOD_CASES = [
    ((2, 16, 4, 8), (2, 16, 2, 8), True, None, (1, 4, 16, 16), (2, 1, 16, 16)),
    ((2, 9, 4, 8), (2, 23, 4, 8), True, None, (2, 4, 9, 23), (9, 23)),
    ((2, 20, 2, 8), (2, 12, 2, 8), False, (10, 0), (2, 1, 1, 12), (1, 2, 20, 12)),
    ((2, 11, 2, 8), (2, 30, 2, 8), False, (4, 6), None, (2, 2, 11, 30)),
    ((2, 12, 4, 8), (2, 12, 1, 8), False, None, (12, 12), None),
    ((13, 4, 8), (19, 2, 8), True, 5, (4, 13, 19), (1, 13, 19)),
]


def _mask_with_visible_keys(rng, shape, seqlen_q, seqlen_k):
    """A random mask of `shape` (its last two axes (T, S)) that leaves key min(i, S - 1) visible
    to every query i: with JAX's top-left masks above no row is left without a key, where JAX
    and cuflash differ (JAX: the mean of the values; cuflash: zeros)."""
    mask = rng.random(shape) < 0.6
    rows = np.arange(seqlen_q)
    mask[..., rows, np.minimum(rows, seqlen_k - 1)] = True
    return mask


@pytest.mark.parametrize("shapes", DPA_MOD_CASES,
                         ids=lambda c: f"q{c[0]}-k{c[1]}-causal{c[2]}-window{c[3]}-bias{c[4]}-"
                                       f"mask{c[5]}")
def test_dot_product_attention_with_bias_and_mask_matches_jax_nn(shapes):
    """bias and mask in JAX's (B, N, T, S) shapes: out against jax.nn.dot_product_attention
    (implementation="xla") and out and the gradients of query, key, value and bias against the
    float64 oracle, jitted."""
    q_shape, k_shape, is_causal, window, bias_shape, mask_shape = shapes
    rng = np.random.default_rng(17)
    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(rng.standard_normal(s)) for s in (q_shape, k_shape, k_shape))
        dout = jnp.asarray(rng.standard_normal(q_shape))
        bias = None if bias_shape is None else jnp.asarray(rng.standard_normal(bias_shape))
        mask = None if mask_shape is None else jnp.asarray(
            _mask_with_visible_keys(rng, mask_shape, q_shape[-3], k_shape[-3]))
        options = {"is_causal": is_causal, "local_window_size": window, "scale": 0.3}

        def ours(q, k, v, bias):
            return cuflash_jax.dot_product_attention(q, k, v, bias, mask, **options)

        def oracle(q, k, v, bias):
            return _top_left_attention(q, k, v, bias=bias, mask=mask, **options)

        out = jax.jit(ours)(q, k, v, bias)
        close(out, oracle(q, k, v, bias), rtol=1e-10, atol=1e-10)
        close(out, jax.nn.dot_product_attention(q, k, v, bias, mask, implementation="xla",
                                                **options), rtol=1e-5, atol=1e-5)
        argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
        grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * dout), argnums=argnums))(
            q, k, v, bias) for f in (ours, oracle)]
        for got, want in zip(*grads, strict=True):
            assert got.shape == want.shape
            close(got, want, rtol=1e-9, atol=1e-10)


def test_dot_product_attention_takes_a_bfloat16_bias():
    """JAX takes a bias of any float dtype; a bfloat16 one goes to cuflash as float32 (exact),
    and its gradient comes back in bfloat16."""
    rng = np.random.default_rng(18)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 12, 2, 16)), jnp.bfloat16) for _ in range(3))
    bias = jnp.asarray(rng.standard_normal((1, 2, 12, 12)), jnp.bfloat16)
    got = jax.jit(lambda *a: cuflash_jax.dot_product_attention(*a, is_causal=True))(q, k, v, bias)
    want = jax.nn.dot_product_attention(q, k, v, bias, is_causal=True, implementation="xla")
    close(got, want, rtol=2e-2, atol=2e-2)
    dbias = jax.grad(lambda b: cuflash_jax.dot_product_attention(q, k, v, b).astype(
        jnp.float32).sum())(bias)
    assert dbias.dtype == jnp.bfloat16 and dbias.shape == bias.shape


def test_dot_product_attention_in_float32_and_bfloat16():
    rng = np.random.default_rng(8)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 33, 4, 16), dtype=np.float32))
               for _ in range(3))
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        args = [x.astype(dtype) for x in (q, k, v)]
        got = jax.jit(lambda *a: cuflash_jax.dot_product_attention(*a, is_causal=True))(*args)
        want = jax.nn.dot_product_attention(*args, is_causal=True)
        assert got.dtype == dtype
        close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"bias": np.zeros((1, 3, 8, 8))}, ValueError,
     r"^bias: expected a shape broadcastable to \(B, Hq, Sq, Sk\) = \(2, 2, 8, 8\), got "
     r"\(1, 3, 8, 8\)"),
    ({"bias": np.zeros((8, 8), np.int32)}, TypeError,
     "^bias: expected dtype float16 or float32 or float64, got int32"),
    ({"mask": np.ones((1, 1, 8, 8))}, TypeError, "^mask: expected dtype bool, got float32"),
    ({"query_seq_lengths": np.ones(2, np.int32)}, NotImplementedError, "query_seq_lengths"),
    ({"key_value_seq_lengths": np.ones(2, np.int32)}, NotImplementedError,
     "key_value_seq_lengths"),
    ({"implementation": "cudnn"}, ValueError, "implementation: expected None"),
    ({"return_residual": True}, NotImplementedError, "return_residual"),
    ({"local_window_size": (2, -1)}, ValueError, "local_window_size: expected"),
    ({"local_window_size": 1.5}, ValueError, "local_window_size: expected"),
    ({"is_causal": 1}, TypeError, "is_causal: expected True or False"),
])
def test_dot_product_attention_refuses_what_it_does_not_support(kwargs, error, match):
    q = jnp.ones((2, 8, 2, 4))
    with pytest.raises(error, match=match):
        cuflash_jax.dot_product_attention(q, q, q, **kwargs)


def test_dot_product_attention_refuses_rows_that_would_see_no_key():
    q, k = jnp.ones((1, 20, 2, 4)), jnp.ones((1, 8, 2, 4))
    with pytest.raises(ValueError, match=r"queries 10 and later with no key"):
        jax.jit(lambda q, k: cuflash_jax.dot_product_attention(
            q, k, k, local_window_size=(2, 0))).trace(q, k)
    with pytest.raises(ValueError, match=r"query: expected \(B, T, N, H\)"):
        cuflash_jax.dot_product_attention(q[0, 0], k, k)


# ---- errors while tracing; other platforms -----------------------------------------------------


@pytest.mark.parametrize(("q", "k", "kwargs", "error", "match"), [
    ((2, 5, 4, 8), (2, 7, 2, 6), {}, ValueError, "k: head dim 6 differs"),
    ((2, 5, 4, 8), (2, 7, 3, 8), {}, ValueError, r"k: query heads \(4\) must be"),
    ((2, 5, 4, 8), (2, 7, 2, 8), {"layout": "sbhd"}, ValueError, "layout: expected"),
    ((2, 5, 4, 8), (2, 7, 2, 8), {"scale": -1.0}, ValueError, "scale: expected a finite"),
    ((2, 5, 4, 8), (2, 7, 2, 8), {"causal": 1}, TypeError, "causal: expected True or False"),
    ((2, 5, 4, 8), (2, 7, 2, 8), {"window": (1, -2)}, ValueError, "window: right must be"),
    ((5, 8), (7, 8), {}, ValueError, "q: expected 3 or 4 dimensions"),
])
def test_bad_input_raises_eagerly_and_while_tracing(q, k, kwargs, error, match):
    q, k = jnp.ones(q), jnp.ones(k)

    def fn(q, k):
        return cuflash_jax.attention(q, k, k, **kwargs)

    with pytest.raises(error, match=match):
        fn(q, k)
    with pytest.raises(error, match=match):
        jax.jit(fn).trace(q, k)


def test_bad_dtypes_raise_while_tracing():
    q = jnp.ones((2, 5, 4, 8))
    with pytest.raises(TypeError, match=r"q: dtype int32 is not supported by cuflash\.jax"):
        jax.jit(cuflash_jax.attention).trace(*(q.astype(jnp.int32),) * 3)
    with pytest.raises(TypeError, match=r"k: expected dtype float32 .* got float16"):
        jax.jit(cuflash_jax.attention).trace(q, q.astype(jnp.float16), q)
    with pytest.raises(TypeError, match=r"v: expected dtype bfloat16 .* got float32"):
        jax.jit(cuflash_jax.attention).trace(q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), q)


def test_other_platforms_are_refused_when_lowered():
    q = jnp.ones((2, 5, 4, 8))
    traced = jax.jit(lambda q: cuflash_jax.attention(q, q, q)).trace(q)
    with pytest.raises(NotImplementedError,
                       match=r"runs on the CPU and on CUDA GPUs only \(compiling for tpu\)"):
        traced.lower(lowering_platforms=("tpu",))


# ---- the GPU path on stand-ins: planned while tracing, launched by its callbacks -------------


@pytest.fixture
def fake_gpu(monkeypatch):
    """One CUDA device of compute capability 8.0 as far as planning goes: kernels are named but
    not compiled, and every launch is recorded (its parameter block and stream), not run."""
    cupy = pytest.importorskip("cupy", reason="cupy is not installed: the planners import it")

    monkeypatch.setattr(_jax_gpu, "unusable_reason", lambda: None)
    monkeypatch.setattr(_jax_gpu, "_devices", lambda: range(1))
    monkeypatch.setattr(_core, "compute_capability", lambda device: 80)
    monkeypatch.setattr(cupy.cuda, "Device", lambda device: contextlib.nullcontext())
    from cuflash.cuda import _compile

    monkeypatch.setattr(_compile, "smem_limit", lambda device: 163 * 1024)
    monkeypatch.setattr(_compile, "get_function", lambda spec, device, cc: types.SimpleNamespace(
        kernel=types.SimpleNamespace(ptr=0xF00), name=spec.name))
    launches = []

    def launch(handle, gx, gy, gz, bx, by, bz, smem, stream, argv, extra):
        launches.append((argv[0], getattr(stream, "value", stream)))
        return 0

    monkeypatch.setattr(_kernel_call, "_driver_launch", lambda: (launch, None))
    return launches


class _Buffer:
    """What XLA hands a buffer callback on a GPU, as far as the callbacks look."""

    def __init__(self, shape, address: int, device: int = 0):
        self.shape, self.address, self.device = tuple(shape), address, device

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "data": (self.address, False), "version": 2}

    def __dlpack_device__(self):
        return 2, self.device


def _params(argv0, dtype) -> np.ndarray:
    import ctypes

    return np.frombuffer(ctypes.string_at(argv0, dtype.itemsize), dtype=dtype)[0]


def _stand_in_problem(case: Case) -> _core.Problem:
    """The problem the traced path validates for `case` (its arrays' shapes and dtype)."""
    q, k = (jnp.ones(s, case.dtype) for s in (case.q_shape, case.kv_shape))
    return _jax_trace.validate(q, k, k, _jax_trace.Options(case.causal, (-1, -1), None,
                                                           case.layout))


@pytest.mark.parametrize("case", [Case(2, 70, 129, 4, 2, 64, dtype="bfloat16", causal=True),
                                  Case(1, 33, 17, 2, 1, 40, dtype="float16", layout="bhsd",
                                       three_d=True),
                                  Case(2, 9, 12, 2, 2, 32, dtype="float32", layout="bhsd")],
                         ids=lambda c: c.id)
def test_gpu_callbacks_launch_their_plans_on_xla_buffers(fake_gpu, case: Case):
    problem = _stand_in_problem(case)
    forward = _jax_gpu._ForwardLaunch({0: _jax_gpu._plan_forward(problem, 0)})
    q, out = (_Buffer(case.q_shape, a) for a in (0x1000, 0x4000))
    k, v = (_Buffer(case.kv_shape, a) for a in (0x2000, 0x3000))
    lse = _Buffer(problem.lse_shape(), 0x5000)
    forward(types.SimpleNamespace(stream=77), (out, lse), q, k, v)
    ((argv0, stream),) = fake_gpu
    params = _params(argv0, _launch.FWD_PARAMS)
    assert stream == 77
    assert [int(params[f]) for f in _launch.FWD_POINTERS] == [0x1000, 0x2000, 0x3000, 0x4000,
                                                              0x5000]
    # The strides are those of dense arrays of the caller's shapes, as the eager path sees them.
    views = [_core.to_bshd(np.empty(s, np.float32), problem)
             for s in (case.q_shape, case.kv_shape, case.kv_shape, case.q_shape)]
    expected = _launch.fwd_params(*views, variant=problem.variant, scale=problem.scale)
    for field in _launch.FWD_PARAMS.names:
        if field not in _launch.FWD_POINTERS:
            assert np.array_equal(params[field], expected[field]), field

    fake_gpu.clear()
    plan = _jax_gpu._plan_backward(problem, 0)
    backward = _jax_gpu._BackwardLaunch({0: plan})
    grads = [_Buffer(s, a) for s, a in ((case.q_shape, 0x6000), (case.kv_shape, 0x7000),
                                        (case.kv_shape, 0x8000))]
    scratch = _Buffer((plan.scratch_bytes,), 0x10000)
    dout = _Buffer(case.q_shape, 0x9000)
    backward(types.SimpleNamespace(stream=78), (*grads, scratch), dout, q, k, v, out, lse)
    assert len(fake_gpu) == 3, "preprocess, dK/dV, convert"
    for argv0, stream in fake_gpu:
        params = _params(argv0, _launch.BWD_PARAMS)
        assert stream == 78
        assert [int(params[f]) for f in ("q", "k", "v", "o", "dout", "lse", "dq", "dk", "dv",
                                         "delta")] == [0x1000, 0x2000, 0x3000, 0x4000, 0x9000,
                                                       0x5000, 0x6000, 0x7000, 0x8000, 0x10000]
        assert int(params["dq_accum"]) == 0x10000 + plan.dq_accum_offset > 0x10000


def test_gpu_callbacks_check_the_device_and_the_alignment(fake_gpu):
    case = Case(1, 8, 8, 2, 2, 32)
    problem = _stand_in_problem(case)
    forward = _jax_gpu._ForwardLaunch({0: _jax_gpu._plan_forward(problem, 0)})
    ctx = types.SimpleNamespace(stream=1)
    out, lse = _Buffer(case.q_shape, 0x400), _Buffer(problem.lse_shape(), 0x500)
    with pytest.raises(RuntimeError, match=r"runs on CUDA device 1, but was planned for "
                                           r"devices \[0\]"):
        forward(ctx, (out, lse), *(_Buffer(case.q_shape, 0x100, device=1),) * 3)
    with pytest.raises(RuntimeError, match="not 16-byte aligned"):
        forward(ctx, (out, lse), _Buffer(case.q_shape, 0x108), _Buffer(case.q_shape, 0x200),
                _Buffer(case.q_shape, 0x300))
    assert not fake_gpu


def test_gpu_branch_is_planned_while_tracing_and_lowered_as_buffer_callbacks(fake_gpu):
    case = Case(2, 24, 40, 4, 2, 64, dtype="bfloat16", causal=True)
    _, (q, k, v, dout) = inputs(case, seed=10)
    loss = loss_of(attention_of(case), dout)
    with mock.patch.object(_jax_gpu, "_plan_backward", wraps=_jax_gpu._plan_backward) as plans:
        traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(q, k, v)
        assert plans.call_count == 1, "the backward is planned while tracing"
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla_buffer_python_gpu_callback_cmd_buffer") == 2, "forward, backward"
    assert "xla_ffi_python_cpu_callback" not in text
    scratch = _jax_gpu._plan_backward(_stand_in_problem(case), 0).scratch_bytes
    assert f"tensor<{scratch}xui8>" in text, "the scratch is an output XLA allocates"
    assert not fake_gpu, "nothing is launched while tracing or lowering"


def test_softcap_on_the_cpu_backend_eager_and_jitted():
    """softcap through the custom_vjp: eager, jitted and its grad, against the float64 oracle."""
    rng = np.random.default_rng(9)
    q = rng.standard_normal((2, 6, 4, 8)).astype(np.float32) * 3
    k, v = (rng.standard_normal((2, 9, 2, 8)).astype(np.float32) for _ in range(2))
    dout = rng.standard_normal(q.shape).astype(np.float32)
    want = reference.attention(q, k, v, causal=True, softcap=1.5)
    refs = reference.attention_backward(dout, q, k, v, causal=True, softcap=1.5)

    def fn(q, k, v):
        return cuflash_jax.attention(q, k, v, causal=True, softcap=1.5)

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v) * dout)

    for run in (fn, jax.jit(fn)):
        np.testing.assert_allclose(np.asarray(run(q, k, v)), want, rtol=2e-5, atol=2e-6)
    for grad in (jax.grad(loss, argnums=(0, 1, 2)), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))):
        for got, ref in zip(grad(q, k, v), refs, strict=True):
            np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("layout, three_d", [("bshd", False), ("bhsd", False), ("bshd", True)])
def test_sinks_on_the_cpu_backend_eager_jitted_and_vmapped(layout, three_d):
    """sinks through the custom_vjp: eager and jitted forward and grad (q, k, v and the sinks),
    float64 exact; vmap over the batch with the sinks shared, against the oracle per example."""
    rng = np.random.default_rng(12)
    shape_q, shape_kv = ((7, 4, 8), (9, 2, 8)) if layout == "bshd" else ((4, 7, 8), (2, 9, 8))
    lead = () if three_d else (2,)
    q, dout = (rng.standard_normal((*lead, *shape_q)) for _ in range(2))
    k, v = (rng.standard_normal((*lead, *shape_kv)) for _ in range(2))
    sinks = rng.standard_normal(4) * 2
    opts = {"causal": True, "layout": layout}
    want = reference.attention(q, k, v, sinks=sinks, **opts)
    refs = reference.attention_grads(dout, q, k, v, sinks=sinks, **opts)

    def fn(q, k, v, s):
        return cuflash_jax.attention(q, k, v, sinks=s, **opts)

    def loss(q, k, v, s):
        return jnp.sum(fn(q, k, v, s) * dout)

    with jax.enable_x64(True):
        for run in (fn, jax.jit(fn)):
            np.testing.assert_allclose(np.asarray(run(q, k, v, sinks)), want, rtol=1e-12,
                                       atol=1e-12)
        grad = jax.grad(loss, argnums=(0, 1, 2, 3))
        for run in (grad, jax.jit(grad)):
            got = run(q, k, v, sinks)
            for g, name in zip(got, ("q", "k", "v", "sinks"), strict=True):
                np.testing.assert_allclose(np.asarray(g), refs[name], rtol=1e-10, atol=1e-10,
                                           err_msg=name)
        if three_d:
            return
        # vmap: a stack of 3 problems sharing the sinks, each checked on its own.
        stack = [rng.standard_normal((3, *x.shape)) for x in (q, k, v, dout)]

        def per_example(q, k, v, dout, s):
            return jax.grad(lambda q, s: jnp.sum(fn(q, k, v, s) * dout), argnums=(0, 1))(q, s)

        dq, dsinks = jax.jit(jax.vmap(per_example, in_axes=(0, 0, 0, 0, None)))(*stack, sinks)
    for i in range(3):
        one = reference.attention_grads(*(x[i] for x in (stack[3], *stack[:3])), sinks=sinks,
                                        **opts)
        np.testing.assert_allclose(np.asarray(dq[i]), one["q"], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(np.asarray(dsinks[i]), one["sinks"], rtol=1e-10, atol=1e-10)


def test_eager_calls_on_a_gpu_take_the_compiled_path(monkeypatch):
    """Concrete GPU arrays run cuflash.jax's staged forward and backward jitted once per options
    (`jax._compiled`). Seen here on the CPU backend, with arrays taken for GPU ones: the same
    results as the eager core, with and without sinks, and one jitted function per pass and
    options (the sinks are traced, not options)."""
    from cuflash import jax as module

    rng = np.random.default_rng(13)
    q, dout = (rng.standard_normal((2, 7, 4, 8)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((2, 9, 2, 8)).astype(np.float32) for _ in range(2))
    sinks = rng.standard_normal(4).astype(np.float32)

    def grads(**extra):
        loss = lambda q, k, v: jnp.sum(cuflash_jax.attention(q, k, v, causal=True, **extra)  # noqa: E731
                                       * dout)
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    eager = [grads(), grads(sinks=jnp.asarray(sinks))]
    module._compiled.cache_clear()
    monkeypatch.setattr(module, "_on_gpu", lambda x: True)
    staged = [grads(), grads(sinks=jnp.asarray(sinks))]
    info = module._compiled.cache_info()  # forward and backward, for both calls (same options)
    assert (info.currsize, info.hits) == (2, 2), info
    for (value, got), (want_value, want) in zip(staged, eager, strict=True):
        np.testing.assert_allclose(np.asarray(value), np.asarray(want_value), rtol=1e-5)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_sinks_are_checked_and_not_mapped_by_vmap():
    q = jnp.ones((2, 5, 4, 8))
    with pytest.raises(ValueError, match=r"^sinks: expected shape \(4,\)"):
        cuflash_jax.attention(q, q, q, sinks=jnp.zeros(3))
    with pytest.raises(TypeError, match=r"^sinks: expected dtype float32 or float64"):
        jax.jit(lambda q, s: cuflash_jax.attention(q, q, q, sinks=s))(q, jnp.zeros(4, jnp.int32))
    with pytest.raises(NotImplementedError, match=r"^sinks: cuflash.jax takes one set"):
        jax.vmap(lambda q, s: cuflash_jax.attention(q, q, q, sinks=s))(q, jnp.zeros((2, 4)))


def test_value_head_dim_of_its_own_lowers_for_cuda_through_padded_buffers(fake_gpu):
    """The CUDA kernels compile one width for q k^T and P v: with Dv != D the CUDA lowering
    pads q, k, v (and dout, out) to the wider head dim and slices the results, forward and
    backward; the same function lowers for the CPU, which computes Dv itself."""
    q, k, v = jnp.ones((2, 5, 4, 192)), jnp.ones((2, 7, 2, 192)), jnp.ones((2, 7, 2, 128))
    traced = jax.jit(cuflash_jax.attention).trace(q, k, v)
    assert traced.out_info.shape == (2, 5, 4, 128)
    traced.lower(lowering_platforms=("cpu",))
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla_buffer_python_gpu_callback_cmd_buffer") == 1
    assert "tensor<2x7x2x192xf32>" in text, "v padded to D"
    grad = jax.grad(lambda q, k, v: cuflash_jax.attention(q, k, v).sum(), argnums=(0, 1, 2))
    traced = jax.jit(grad).trace(q, k, v)
    assert [x.shape for x in traced.out_info] == [q.shape, k.shape, v.shape]
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla_buffer_python_gpu_callback_cmd_buffer") == 2, "forward, backward"
    assert not fake_gpu, "nothing is launched while tracing or lowering"


def test_gpu_branch_without_a_gpu_says_why_when_lowered(monkeypatch):
    monkeypatch.setattr(_jax_gpu, "unusable_reason", lambda: "CuPy sees no CUDA GPU (test)")
    q = jnp.ones((2, 5, 4, 8))
    traced = jax.jit(lambda q: cuflash_jax.attention(q, q, q)).trace(q)
    with pytest.raises(NotImplementedError, match=r"cannot compile for CUDA in this process: "
                                                  r"CuPy sees no CUDA GPU \(test\)"):
        traced.lower(lowering_platforms=("cuda",))


def test_placeholders_have_the_strides_of_the_eager_views():
    for case in (Case(2, 5, 7, 4, 2, 8), Case(2, 5, 7, 4, 2, 8, layout="bhsd"),
                 Case(1, 5, 7, 4, 2, 8, three_d=True), Case(1, 5, 7, 4, 2, 8, three_d=True,
                                                             layout="bhsd")):
        problem = _stand_in_problem(case)
        for shape in (case.q_shape, case.kv_shape):
            view = _core.to_bshd(np.empty(shape, np.float32), problem)
            stand_in = _jax_gpu.dense_bshd(shape, np.float32, problem)
            assert (stand_in.shape, stand_in.strides) == (view.shape, view.strides), case.id


# ---- ALiBi, a bias and a mask ------------------------------------------------------------------

# (layout, three_d, options, shapes of the slopes, bias, mask; sinks or not): broadcast shapes
# of every rank, in both layouts and without a batch axis, with the masks, a softcap and sinks.
# Sizes: B 2, Sq 7, Sk 9, Hq 4, Hkv 2, D 8.
MOD_CASES = [
    ("bshd", False, {"causal": True}, (4,), (7, 9), (2, 1, 7, 9), False),
    ("bhsd", False, {"window": (3, 2)}, (2, 4), (2, 4, 7, 9), None, False),
    ("bshd", False, {"softcap": 1.5}, None, (1, 4, 1, 9), (7, 9), True),
    ("bhsd", False, {"causal": True}, (4,), None, (4, 1, 9), True),
    ("bshd", True, {"causal": True}, (1, 4), (4, 7, 9), (1, 7, 9), False),
    ("bhsd", True, {}, (4,), (1, 1, 1, 9), (9,), True),
]


def _mod_inputs(rng, layout: str, three_d: bool, slopes, bias, mask, sinks: bool):
    """float64 q, k, v, dout (B 2, Sq 7, Sk 9, Hq 4, Hkv 2, D 8 in `layout`) and the score
    modifications' arrays of the given shapes (None: none), by cuflash.attention's names."""
    shape_q, shape_kv = ((7, 4, 8), (9, 2, 8)) if layout == "bshd" else ((4, 7, 8), (2, 9, 8))
    lead = () if three_d else (2,)
    q, dout = (rng.standard_normal((*lead, *shape_q)) for _ in range(2))
    k, v = (rng.standard_normal((*lead, *shape_kv)) for _ in range(2))
    mods = {"alibi_slopes": None if slopes is None else rng.random(slopes),
            "bias": None if bias is None else rng.standard_normal(bias),
            "mask": None if mask is None else rng.random(mask) < 0.7,
            "sinks": rng.standard_normal(4) if sinks else None}
    return (q, k, v, dout), {name: x for name, x in mods.items() if x is not None}


@pytest.mark.parametrize("layout, three_d, options, slopes, bias, mask, sinks", MOD_CASES,
                         ids=lambda x: str(x).replace(" ", ""))
def test_score_mods_on_the_cpu_backend_eager_and_jitted(layout, three_d, options, slopes, bias,
                                                         mask, sinks):
    """alibi_slopes, bias and mask (and the sinks) through the custom_vjp: eager and jitted
    forward and grad of q, k, v, the bias and the sinks against the float64 reference, exact
    to float64 rounding; the bias's gradient in its own (broadcast) shape."""
    rng = np.random.default_rng(31)
    (q, k, v, dout), mods = _mod_inputs(rng, layout, three_d, slopes, bias, mask, sinks)
    opts = {**options, "layout": layout}
    want = reference.attention(q, k, v, **opts, **mods)
    refs = reference.attention_grads(dout, q, k, v, **opts, **mods)
    diff = [name for name in ("bias", "sinks") if name in mods]  # differentiated beside q, k, v

    def fn(q, k, v, *wrt):
        given = {**mods, **dict(zip(diff, wrt, strict=True))}
        return cuflash_jax.attention(q, k, v, **opts, **given)

    def loss(*args):
        return jnp.sum(fn(*args) * dout)

    args = (q, k, v, *(mods[name] for name in diff))
    with jax.enable_x64(True):
        for run in (fn, jax.jit(fn)):
            close(run(*args), want, rtol=1e-12, atol=1e-12)
        grad = jax.grad(loss, argnums=tuple(range(len(args))))
        for run in (grad, jax.jit(grad), jax.jit(jax.grad(jax.checkpoint(loss),
                                                          argnums=tuple(range(len(args)))))):
            got = run(*args)
            for g, name in zip(got, ("q", "k", "v", *diff), strict=True):
                assert g.shape == np.shape(refs[name]), name
                np.testing.assert_allclose(np.asarray(g), refs[name], rtol=1e-10, atol=1e-10,
                                           err_msg=name)


def test_score_mods_in_float32_with_a_float16_bias():
    """A float16 bias with float32 q, k, v: out and gradients against the reference of the
    values the call sees; the bias's gradient is formed in float32 and returned in float16."""
    rng = np.random.default_rng(32)
    q, dout = (rng.standard_normal((2, 7, 4, 8)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((2, 9, 2, 8)).astype(np.float32) for _ in range(2))
    bias = rng.standard_normal((4, 7, 9)).astype(np.float16)
    slopes = rng.random(4).astype(np.float32)
    mods = {"bias": bias, "alibi_slopes": slopes, "causal": True}
    want = reference.attention(q, k, v, **mods)
    refs = reference.attention_grads(dout, q, k, v, **mods)

    def loss(q, k, v, bias):
        out = cuflash_jax.attention(q, k, v, causal=True, bias=bias, alibi_slopes=slopes)
        return jnp.sum(out * dout)

    close(jax.jit(lambda *a: cuflash_jax.attention(*a, causal=True, bias=bias,
                                                   alibi_slopes=slopes))(q, k, v),
          want, rtol=2e-5, atol=2e-6)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
    for g, name in zip(grads, ("q", "k", "v", "bias"), strict=True):
        tol = 2e-3 if name == "bias" else 2e-5  # float16's rounding of the gradient
        np.testing.assert_allclose(np.asarray(g, np.float64), refs[name], rtol=tol, atol=tol,
                                   err_msg=name)
    assert grads[3].dtype == jnp.float16 and grads[3].shape == bias.shape


# (in_axes of q, k, v, slopes, bias, mask, dout): everything mapped; q alone (k, v and the
# score arrays shared); the score arrays alone; a batch-wide bias mapped.
MOD_VMAP_AXES = [(0, 0, 0, 0, 0, 0, 0), (0, None, None, None, None, None, 0),
                 (None, None, None, 0, 0, 0, 0), (0, 0, 0, None, 0, None, 0)]


@pytest.mark.parametrize("in_axes", MOD_VMAP_AXES, ids=["all", "q-only", "mods-only",
                                                        "bias-and-qkv"])
@pytest.mark.parametrize("three_d", [False, True], ids=["4d", "3d"])
def test_vmap_folds_the_score_arrays_into_the_batch(in_axes, three_d):
    """Under jax.vmap the slopes, the bias and the mask, mapped or not, join the folded batch:
    one host call for the whole stack, forward and grad (q, k, v and the bias) equal to each
    problem's own against the reference."""
    rng = np.random.default_rng(33)
    stack = 3
    lead = () if three_d else (2,)
    q, dout = (rng.standard_normal((stack, *lead, 7, 4, 8)) for _ in range(2))
    k, v = (rng.standard_normal((stack, *lead, 9, 2, 8)) for _ in range(2))
    slopes = rng.random((stack, 4))
    bias = rng.standard_normal((stack, 4, 7, 9))  # (Hq, Sq, Sk): broadcast over the batch
    mask = rng.random((stack, *lead, 1, 7, 9)) < 0.7
    args = [x if axis is not None else x[0]
            for x, axis in zip((q, k, v, slopes, bias, mask, dout), in_axes, strict=True)]

    def fn(q, k, v, a, b, m):
        return cuflash_jax.attention(q, k, v, alibi_slopes=a, bias=b, mask=m, causal=True)

    def grads(q, k, v, a, b, m, do):
        return jax.grad(lambda q, k, v, b: jnp.sum(fn(q, k, v, a, b, m) * do),
                        argnums=(0, 1, 2, 3))(q, k, v, b)

    with jax.enable_x64(True):
        out = jax.jit(jax.vmap(fn, in_axes=in_axes[:6]))(*args[:6])
        got = jax.jit(jax.vmap(grads, in_axes=in_axes))(*args)
        (eqn,) = _callbacks(jax.make_jaxpr(jax.vmap(fn, in_axes=in_axes[:6]))(*args[:6]))
    assert eqn.outvars[0].aval.shape == (stack * (2 if lead else 1), 7, 4, 8), "one call"
    for i in range(stack):
        one = [x[i] if axis is not None else x for x, axis in zip(args, in_axes, strict=True)]
        mods = dict(zip(("alibi_slopes", "bias", "mask"), one[3:6], strict=True))
        close(out[i], reference.attention(*one[:3], causal=True, **mods), rtol=1e-12,
              atol=1e-12)
        refs = reference.attention_grads(one[6], *one[:3], causal=True, **mods)
        for g, name in zip(got, ("q", "k", "v", "bias"), strict=True):
            np.testing.assert_allclose(np.asarray(g[i]), refs[name], rtol=1e-10, atol=1e-10,
                                       err_msg=name)


def test_nested_vmaps_over_score_arrays():
    rng = np.random.default_rng(34)
    q = rng.standard_normal((2, 3, 7, 4, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 3, 9, 2, 8)).astype(np.float32) for _ in range(2))
    bias = rng.standard_normal((3, 4, 7, 9)).astype(np.float32)  # mapped by the inner vmap only
    mask = rng.random((2, 1, 9)) < 0.7  # mapped by the outer vmap only

    def fn(q, k, v, b, m):
        return cuflash_jax.attention(q, k, v, bias=b, mask=m, causal=True)

    nested = jax.jit(jax.vmap(jax.vmap(fn, in_axes=(0, 0, 0, 0, None)),
                              in_axes=(0, 0, 0, None, 0)))(q, k, v, bias, mask)
    for i in range(2):
        for j in range(3):
            close(nested[i, j], reference.attention(q[i, j], k[i, j], v[i, j], bias=bias[j],
                                                    mask=mask[i], causal=True),
                  rtol=1e-5, atol=1e-5)


def test_a_bias_not_differentiated_gets_no_gradient_formed():
    """With symbolic zeros, a bias the caller does not differentiate costs no gradient: the
    backward's host call returns dq, dk, dv only; the slopes get a zero cotangent; a bias
    under stop_gradient gets zeros."""
    rng = np.random.default_rng(35)
    q = rng.standard_normal((2, 7, 4, 8)).astype(np.float32)
    k, v = (rng.standard_normal((2, 9, 2, 8)).astype(np.float32) for _ in range(2))
    bias = rng.standard_normal((4, 7, 9)).astype(np.float32)
    slopes = rng.random(4).astype(np.float32)

    def loss(q, b, a):
        return cuflash_jax.attention(q, k, v, bias=b, alibi_slopes=a, causal=True).sum()

    def outputs_of_backward(argnums):
        calls = _callbacks(jax.make_jaxpr(jax.grad(loss, argnums=argnums))(q, bias, slopes))
        return [len(eqn.outvars) for eqn in calls][1:]  # after the forward's

    assert outputs_of_backward((0,)) == [3], "dq, dk, dv only"
    assert outputs_of_backward((0, 1)) == [4], "and dbias"
    dq, dslopes = jax.jit(jax.grad(loss, argnums=(0, 2)))(q, bias, slopes)
    np.testing.assert_array_equal(np.asarray(dslopes), np.zeros(4, np.float32))
    refs = reference.attention_grads(np.ones((2, 7, 4, 8)), q, k, v, bias=bias,
                                     alibi_slopes=slopes, causal=True)
    close(dq, refs["q"], rtol=2e-5, atol=2e-5)
    stopped = jax.grad(lambda b: loss(q, jax.lax.stop_gradient(b), slopes))(bias)
    np.testing.assert_array_equal(np.asarray(stopped), np.zeros_like(bias))


def test_a_mask_that_hides_a_row_gives_zeros_and_lse_minus_inf():
    rng = np.random.default_rng(36)
    with jax.enable_x64(True):
        q, dout = (rng.standard_normal((2, 7, 4, 8)) for _ in range(2))
        k, v = (rng.standard_normal((2, 9, 2, 8)) for _ in range(2))
        mask = rng.random((2, 4, 7, 9)) < 0.7
        mask[1, 2, 3] = False  # batch 1, head 2, query 3 sees no key
        mask[:, :, 5] = False  # query 5 sees no key in any batch or head
        options = _jax_trace.Options(True, (-1, -1), None, "bshd")
        mods = _jax_trace.ScoreArrays(mask=jnp.asarray(mask))
        out, lse = jax.jit(_jax_trace.forward, static_argnames="options")(q, k, v, options,
                                                                          mods=mods)
        ref_out, ref_lse = reference.attention(q, k, v, causal=True, mask=mask, return_lse=True)
        assert np.isneginf(np.asarray(lse)[1, 2, 3]) and np.all(np.isneginf(lse[:, :, 5]))
        np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
        finite = np.isfinite(ref_lse)  # the CPU path's lse is float32
        close(np.asarray(lse)[finite], ref_lse[finite], rtol=1e-6, atol=1e-6)
        close(out, ref_out, rtol=1e-12, atol=1e-12)
        got = cuflash_jax.attention(q, k, v, causal=True, mask=mask)
        np.testing.assert_array_equal(np.asarray(got)[1, 3, 2], np.zeros(8))
        np.testing.assert_array_equal(np.asarray(got)[:, 5], np.zeros((2, 4, 8)))
        grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(cuflash_jax.attention(
            q, k, v, causal=True, mask=mask) * dout), argnums=(0, 1, 2)))(q, k, v)
        refs = reference.attention_grads(dout, q, k, v, causal=True, mask=mask)
        for g, name in zip(grads, "qkv", strict=True):
            np.testing.assert_allclose(np.asarray(g), refs[name], rtol=1e-10, atol=1e-10)
        np.testing.assert_array_equal(np.asarray(grads[0])[:, 5], np.zeros((2, 4, 8)))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"bias": np.zeros((3, 5, 7))}, ValueError,
     r"^bias: expected a shape broadcastable to \(B, Hq, Sq, Sk\) = \(2, 4, 5, 7\), got "
     r"\(3, 5, 7\)"),
    ({"bias": np.zeros((1, 2, 4, 5, 7), np.float32)}, ValueError, "^bias: expected a shape"),
    ({"bias": np.zeros((5, 7), np.int32)}, TypeError,
     "^bias: expected dtype float16 or float32 or float64, got int32"),
    ({"mask": np.ones((5, 7), np.float32)}, TypeError, "^mask: expected dtype bool, got float32"),
    ({"mask": np.ones((5, 8), bool)}, ValueError, "^mask: expected a shape broadcastable"),
    ({"alibi_slopes": np.ones(3, np.float32)}, ValueError,
     r"^alibi_slopes: expected shape \(4,\) or \(2, 4\) \(Hq, or B and Hq\), got \(3,\)"),
    ({"alibi_slopes": np.ones(4, np.float16)}, TypeError,
     "^alibi_slopes: expected dtype float32 or float64, got float16"),
])
def test_score_arrays_are_checked_eagerly_and_while_tracing(kwargs, error, match):
    q, k = jnp.ones((2, 5, 4, 8)), jnp.ones((2, 7, 2, 8))
    (name, value), = kwargs.items()

    def fn(q, k, x):
        return cuflash_jax.attention(q, k, k, **{name: x})

    with pytest.raises(error, match=match):
        fn(q, k, value)
    with pytest.raises(error, match=match):
        jax.jit(fn).trace(q, k, jnp.asarray(value))


def test_a_bias_lowers_for_cuda_differentiated_or_not(fake_gpu):
    """A gradient of the bias (the kernels write dS into a buffer the backward callback
    returns, summed by XLA), a bias that is not differentiated (an argument or a constant, or
    under stop_gradient), the slopes and the mask all lower for CUDA as buffer callbacks,
    planned while tracing; the same functions lower for the CPU."""
    case = Case(2, 24, 40, 4, 2, 64, dtype="bfloat16", causal=True)
    _, (q, k, v, dout) = inputs(case, seed=37)
    bias = jnp.ones((4, 24, 40), jnp.float32)
    mask = jnp.ones((2, 1, 24, 40), bool)
    slopes = jnp.ones(4, jnp.float32)

    def loss(q, k, v, b):
        return jnp.sum(cuflash_jax.attention(q, k, v, causal=True, bias=b, mask=mask,
                                             alibi_slopes=slopes) * dout)

    for step in (jax.grad(loss, argnums=(0, 3)), jax.grad(loss, argnums=(0, 1, 2)),
                 jax.grad(lambda q, k, v, b: loss(q, k, v, jax.lax.stop_gradient(b)),
                          argnums=(0, 1, 2, 3)),
                 lambda q, k, v, b: jax.grad(loss, argnums=(0, 1, 2))(q, k, v, bias)):
        traced = jax.jit(step).trace(q, k, v, bias)
        traced.lower(lowering_platforms=("cpu",))
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("xla_buffer_python_gpu_callback_cmd_buffer") == 2, "forward, backward"
    assert not fake_gpu, "nothing is launched while tracing or lowering"


@pytest.mark.parametrize(("mods", "named"), [
    ({"bias": np.zeros((5, 7), np.float32)}, "bias"),
    ({"alibi_slopes": np.ones(4, np.float32), "mask": np.ones((5, 7), bool)},
     "alibi_slopes, mask"),
])
def test_softcap_with_score_arrays_is_refused_when_lowered_for_cuda(monkeypatch, mods, named):
    """The kernels do not combine a softcap with ALiBi, a bias or a mask: the CUDA lowering
    says so, naming them; the same function lowers (and runs) on the CPU."""
    monkeypatch.setattr(_jax_gpu, "unusable_reason", lambda: None)
    q, k = jnp.ones((2, 5, 4, 8)), jnp.ones((2, 7, 2, 8))

    def fn(q, k):
        return cuflash_jax.attention(q, k, k, softcap=2.0, **mods)

    traced = jax.jit(fn).trace(q, k)
    traced.lower(lowering_platforms=("cpu",))
    with pytest.raises(NotImplementedError, match=rf"^cuflash\.jax softcap: the CUDA kernels do "
                                                  rf"not combine a softcap with {named} yet"):
        traced.lower(lowering_platforms=("cuda",))
    close(jax.jit(fn)(q, k), reference.attention(q, k, k, softcap=2.0, **mods))


def test_gpu_callbacks_pass_the_score_arrays(fake_gpu, monkeypatch):
    """The buffer callbacks of a traced call with sinks, slopes, a bias and a mask launch their
    plans with the arrays' XLA buffers in the kernels' pointer fields, and the bias's and the
    mask's strides as (B, Hq, Sq, Sk) views of their dense buffers (0 where broadcast)."""
    from jax.experimental import buffer_callback as module

    made = []

    def recording(callback, *args, **kwargs):
        made.append(callback)
        return original(callback, *args, **kwargs)

    original = module.buffer_callback
    monkeypatch.setattr(module, "buffer_callback", recording)
    b, sq, sk, hq, hkv, d = 2, 33, 40, 4, 2, 64
    q, dout = jnp.ones((b, sq, hq, d), jnp.bfloat16), jnp.ones((b, sq, hq, d), jnp.bfloat16)
    k = jnp.ones((b, sk, hkv, d), jnp.bfloat16)
    sinks, slopes = jnp.ones(hq, jnp.float32), jnp.ones(hq, jnp.float32)
    bias, mask = jnp.ones((hq, sq, sk), jnp.float16), jnp.ones((b, 1, 1, sk), bool)

    def loss(q):
        return jnp.sum(cuflash_jax.attention(q, k, k, sinks=sinks, alibi_slopes=slopes,
                                             bias=bias, mask=mask) * dout)

    jax.jit(jax.grad(loss)).trace(q).lower(lowering_platforms=("cuda",))
    forward, backward = made
    ctx = types.SimpleNamespace(stream=5)
    out, lse = _Buffer(q.shape, 0x4000), _Buffer((b, hq, sq), 0x5000)
    qkv = [_Buffer(q.shape, 0x1000), _Buffer(k.shape, 0x2000), _Buffer(k.shape, 0x3000)]
    side = [_Buffer((hq,), 0x6000), _Buffer((b, hq), 0x7000), _Buffer((1, hq, sq, sk), 0x8000),
            _Buffer((b, 1, 1, sk), 0x9000)]  # sinks, slopes (B, Hq), bias, mask: canonical
    forward(ctx, (out, lse), *qkv, *side)
    ((argv0, _),) = fake_gpu
    params = _params(argv0, _launch.FWD_PARAMS)
    assert [int(params[f]) for f in ("sinks", "alibi", "bias", "mask")] == [
        0x6000, 0x7000, 0x8000, 0x9000]
    assert int(params["bias_dtype"]) == 2
    assert [int(params[f"bias_{a}_stride"]) for a in ("batch", "head", "row", "col")] == [
        0, sq * sk, sk, 1]
    assert [int(params[f"mask_{a}_stride"]) for a in ("batch", "head", "row", "col")] == [
        sk, 0, 0, 1]

    fake_gpu.clear()
    grads = [_Buffer(x.shape, a) for x, a in ((q, 0xA000), (k, 0xB000), (k, 0xC000))]
    scratch = _Buffer((1 << 20,), 0x100000)
    backward(ctx, (*grads, scratch), _Buffer(q.shape, 0xD000), *qkv, out, lse, *side[1:])
    assert fake_gpu
    for argv0, _ in fake_gpu:
        params = _params(argv0, _launch.BWD_PARAMS)
        assert [int(params[f]) for f in ("alibi", "bias", "mask")] == [0x7000, 0x8000, 0x9000]
        assert [int(params[f"mask_{a}_stride"]) for a in ("batch", "head", "row", "col")] == [
            sk, 0, 0, 1]


def test_eager_calls_on_a_gpu_take_the_compiled_path_with_score_arrays(monkeypatch):
    """Concrete GPU arrays with slopes, a bias and a mask run the staged forward and backward
    jitted once per options (and per whether the bias is differentiated); seen on the CPU
    backend, with arrays taken for GPU ones, the same results as the eager core."""
    from cuflash import jax as module

    rng = np.random.default_rng(38)
    q, dout = (rng.standard_normal((2, 7, 4, 8)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((2, 9, 2, 8)).astype(np.float32) for _ in range(2))
    bias = jnp.asarray(rng.standard_normal((4, 7, 9)).astype(np.float32))
    mods = {"mask": jnp.asarray(rng.random((7, 9)) < 0.8),
            "alibi_slopes": jnp.asarray(rng.random(4).astype(np.float32))}

    def grads(argnums):
        loss = lambda q, k, v, b: jnp.sum(cuflash_jax.attention(  # noqa: E731
            q, k, v, causal=True, bias=b, **mods) * dout)
        return jax.value_and_grad(loss, argnums=argnums)(q, k, v, bias)

    eager = [grads((0, 1, 2)), grads((0, 1, 2, 3))]
    module._compiled.cache_clear()
    monkeypatch.setattr(module, "_on_gpu", lambda x: True)
    staged = [grads((0, 1, 2)), grads((0, 1, 2, 3))]
    info = module._compiled.cache_info()  # one forward; a backward with and one without dbias
    assert (info.currsize, info.hits) == (3, 1), info
    for (value, got), (want_value, want) in zip(staged, eager, strict=True):
        np.testing.assert_allclose(np.asarray(value), np.asarray(want_value), rtol=1e-5)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_eager_gpu_calls_reuse_one_jitted_function_per_options():
    """cuflash.jax's eager GPU path runs `_compiled(staged, options)`: equal options give the
    same jitted callable, so repeated calls of one shape trace once (a new callable each call
    retraced every time: hundreds of microseconds a call)."""
    traced = []

    def staged(x, *, options):
        traced.append(options)
        return x + 1

    first = cuflash_jax._compiled(staged, _jax_trace.Options(False, (-1, -1), None, "bshd"))
    again = cuflash_jax._compiled(staged, _jax_trace.Options(False, (-1, -1), None, "bshd"))
    assert first is again
    for f in (first, again, first):
        np.testing.assert_array_equal(np.asarray(f(jnp.ones(3))), 2.0)
    assert len(traced) == 1
    causal = _jax_trace.Options(True, (-1, 0), None, "bshd")
    assert cuflash_jax._compiled(staged, causal) is not first


def test_cuflash_attention_hands_jax_gpu_arrays_to_cuflash_jax(monkeypatch):
    """cuflash.attention with concrete JAX arrays on a GPU (here: as the check reports it) runs
    cuflash.jax.attention's memoised compiled call, not the core's DLPack path; with
    return_lse or mixed frameworks it stays on the core."""
    from cuflash import api

    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 9, 2, 8)).astype(np.float32))
               for _ in range(3))
    want = api.attention(q, k, v, causal=True)
    monkeypatch.setattr(api, "_jax_on_gpu", lambda *arrays: all(
        isinstance(x, jax.Array) for x in arrays))
    with mock.patch.object(cuflash_jax, "attention", wraps=cuflash_jax.attention) as routed:
        got = api.attention(q, k, v, causal=True)
        assert routed.call_count == 1
        api.attention(q, k, v, causal=True, return_lse=True)
        with pytest.raises(TypeError, match="k: expected the same framework"):
            api.attention(q, np.asarray(k), np.asarray(v), causal=True)
        assert routed.call_count == 1
    assert isinstance(got, jax.Array)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_jax_cpu_arrays_are_not_taken_for_gpu_ones():
    from cuflash import api

    q = jnp.ones((1, 4, 2, 8))
    assert not api._jax_on_gpu(q, q, q)
    assert not api._jax_on_gpu(np.ones((1, 4, 2, 8)), q, q)


def test_concrete_calls_skip_the_custom_vjp_and_transformed_ones_take_it():
    """Concrete arrays mean no transformation is running: the forward runs without the
    custom_vjp's per-call bookkeeping. Under jax.grad (tracers) the custom_vjp runs, and the
    gradient still matches the reference."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 7, 2, 8)).astype(np.float32) for _ in range(3))
    with mock.patch.object(cuflash_jax, "_attention", wraps=cuflash_jax._attention) as node:
        out = cuflash_jax.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=True)
        assert node.call_count == 0
        grads = jax.grad(lambda q: cuflash_jax.attention(q, k, v, causal=True).sum())(q)
        assert node.call_count == 1
    np.testing.assert_allclose(np.asarray(out), reference.attention(q, k, v, causal=True),
                               rtol=2e-5, atol=2e-6)
    want = reference.attention_backward(np.ones_like(q), q, k, v, causal=True)[0]
    np.testing.assert_allclose(np.asarray(grads), want, rtol=2e-5, atol=2e-5)


# ---- your own modifications (cuflash.ScoreMod / MaskMod) --------------------------------------


def _combined_case(rng, name="double", documents_mask=True):
    from tests import user_mods_cases as cases

    b, sq, sk, hq, hkv, d = 2, 13, 17, 4, 2, 8
    q, dout = (rng.standard_normal((b, sq, hq, d)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((b, sk, hkv, d)).astype(np.float32) for _ in range(2))
    case = cases.combined(name, b, hq, sq, sk, rng, alibi=(hq,), bias_shape=(hq, sq, sk),
                          mask_shape=(sq, sk), documents_mask=documents_mask)
    return (q, k, v, dout), case, d


@pytest.mark.parametrize("jit", [False, True])
def test_user_mods_on_the_cpu_backend_eager_and_jitted(jit):
    """A score_mod and a mask_mod (reading the batch index) with ALiBi, a bias, a mask and
    sinks: out, and the gradients of q, k, v, the bias and the sinks by jax.grad, against the
    built-ins the combination equals (`user_mods_cases.combined`)."""
    rng = np.random.default_rng(21)
    (q, k, v, dout), case, d = _combined_case(rng)
    sinks = rng.standard_normal(4).astype(np.float32)
    aux = {name: jnp.asarray(x) for name, x in case.aux.items()}

    def loss(q, k, v, bias, sinks, aux):
        out = cuflash_jax.attention(q, k, v, causal=True, score_mod=case.score_mod,
                                    mask_mod=case.mask_mod, aux=aux, bias=bias, sinks=sinks,
                                    alibi_slopes=case.given["alibi_slopes"],
                                    mask=case.given["mask"])
        return jnp.sum(out * dout), out

    step = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
    if jit:
        step = jax.jit(step)
    (_, out), grads = step(q, k, v, jnp.asarray(case.given["bias"]), jnp.asarray(sinks), aux)
    built = {"causal": True, "scale": case.scale_factor / np.sqrt(d), "sinks": sinks,
             **case.builtin}
    args = [x.astype(np.float64) for x in (q, k, v)]
    close(out, reference.attention(*args, **built), rtol=1e-4, atol=1e-5)
    want = reference.attention_grads(dout.astype(np.float64), *args, **built)
    for got, name in zip(grads, ("q", "k", "v"), strict=False):
        close(got, want[name], rtol=1e-4, atol=1e-4)
    close(grads[3], case.dbias_factor * want["bias"], rtol=1e-4, atol=1e-4)
    close(grads[4], want["sinks"], rtol=1e-4, atol=1e-4)
    assert [g.shape for g in grads[3:]] == [case.given["bias"].shape, sinks.shape]


def test_vmap_folds_a_user_mod_that_does_not_read_the_batch():
    """A score_mod of h, q_idx, kv_idx and unmapped aux arrays: vmap folds the mapped axis into
    the batch and equals one call per element; a mod that reads b, or a mapped aux array, is
    refused naming it."""
    from tests import user_mods_cases as cases

    rng = np.random.default_rng(22)
    (q, k, v, _), case, _ = _combined_case(rng, "relbias", documents_mask=False)
    aux = {name: jnp.asarray(x) for name, x in case.aux.items()}
    stack = jnp.stack([q, 2 * q, -q])
    got = jax.vmap(lambda q: cuflash_jax.attention(q, k, v, score_mod=case.score_mod,
                                                   aux=aux))(stack)
    rel = case.builtin["bias"] - case.given["bias"]  # the table's bias alone
    for i in range(3):
        close(got[i], reference.attention(np.asarray(stack[i], np.float64), k, v, bias=rel),
              rtol=1e-4, atol=1e-5)
    docs = {"qdoc": jnp.asarray(cases.documents(2, 13, rng)),
            "kdoc": jnp.asarray(cases.documents(2, 17, rng))}
    with pytest.raises(NotImplementedError,
                       match=r"^score_mod / mask_mod / dropout_p: under jax.vmap"):
        jax.vmap(lambda q: cuflash_jax.attention(q, k, v, mask_mod=cases.DOCUMENTS,
                                                 aux=docs))(stack)
    with pytest.raises(NotImplementedError, match=r"^aux: a score_mod's / mask_mod's aux"):
        jax.vmap(lambda rel: cuflash_jax.attention(
            q, k, v, score_mod=case.score_mod, aux={"rel": rel, "base": aux["base"]}))(
                jnp.stack([aux["rel"]] * 2))


def test_user_mods_are_refused_when_lowered_for_cuda_and_checked_while_tracing(monkeypatch):
    """Under jit the CUDA lowering of a user modification says it is not compiled there (the
    CPU lowering runs); a wrong argument raises while tracing, naming it."""
    from tests import user_mods_cases as cases

    monkeypatch.setattr(_jax_gpu, "unusable_reason", lambda: None)
    q, k = jnp.ones((2, 5, 4, 8)), jnp.ones((2, 7, 2, 8))

    def fn(q, k):
        return cuflash_jax.attention(q, k, k, score_mod=cases.DOUBLE)

    traced = jax.jit(fn).trace(q, k)
    traced.lower(lowering_platforms=("cpu",))
    with pytest.raises(NotImplementedError, match=r"^cuflash\.jax score_mod / mask_mod: not "
                                                  r"compiled into jitted CUDA code yet"):
        traced.lower(lowering_platforms=("cuda",))
    close(jax.jit(fn)(q, k), reference.attention(q, k, k, scale=2 / np.sqrt(8)))
    with pytest.raises(TypeError, match=r"^score_mod: expected a cuflash.ScoreMod"):
        jax.jit(lambda q: cuflash_jax.attention(q, q, q, score_mod="2 * score"))(q)
    with pytest.raises(TypeError, match=r"^aux\['t'\]: expected dtype .* got complex64"):
        jax.jit(lambda q, t: cuflash_jax.attention(q, q, q, score_mod=cases.DOUBLE,
                                                   aux={"t": t}))(q, jnp.ones(3, jnp.complex64))


def test_eager_gpu_calls_with_a_user_mod_run_the_core(monkeypatch):
    """Concrete GPU arrays with a user modification skip the jitted path (which does not
    compile one for CUDA) and run the core eagerly, forward and backward. Seen on the CPU
    backend, with arrays taken for GPU ones: the results of the plain eager path."""
    from cuflash import jax as module

    rng = np.random.default_rng(23)
    (q, k, v, dout), case, _ = _combined_case(rng)
    aux = {name: jnp.asarray(x) for name, x in case.aux.items()}

    def grads():
        def loss(q, k, v):
            return jnp.sum(cuflash_jax.attention(q, k, v, causal=True, score_mod=case.score_mod,
                                                 mask_mod=case.mask_mod, aux=aux) * dout)
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    want = grads()
    called = []
    monkeypatch.setattr(module, "_on_gpu", lambda x: True)
    monkeypatch.setattr(module, "_compiled", lambda *a, **kw: called.append(a))
    got = grads()
    assert not called, "the jitted path was taken"
    close(got[0], want[0], rtol=1e-6)
    for g, w in zip(got[1], want[1], strict=True):
        close(g, w, rtol=1e-6)


# ---- dropout ------------------------------------------------------------------------------------


def test_dropout_on_the_cpu_backend_eager_and_jitted():
    """A JAX PRNG key (its two words the seed, offset 0) or (seed, offset) ints: out and the
    gradients of q, k, v, the sinks and a bias against the reference of the same stream, eager
    and under jit; a new key is a new mask without a new trace."""
    rng = np.random.default_rng(31)
    q, dout = (rng.standard_normal((2, 7, 4, 8)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((2, 9, 2, 8)).astype(np.float32) for _ in range(2))
    sinks = rng.standard_normal(4).astype(np.float32)
    bias = rng.standard_normal((4, 7, 9)).astype(np.float32)
    key = jax.random.key(42)
    words = [int(x) for x in jax.random.key_data(key)]
    stream = (words[0] | words[1] << 32, 0)

    def loss(q, k, v, bias, sinks, rng):
        out = cuflash_jax.attention(q, k, v, causal=True, dropout_p=0.3, rng=rng, bias=bias,
                                    sinks=sinks)
        return jnp.sum(out * dout), out

    args = [x.astype(np.float64) for x in (q, k, v)]
    want_out = reference.attention(*args, causal=True, dropout_p=0.3, rng=stream, bias=bias,
                                   sinks=sinks)
    want = reference.attention_grads(dout, *args, causal=True, dropout_p=0.3, rng=stream,
                                     bias=bias, sinks=sinks)
    step = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
    traces = []
    jitted = jax.jit(lambda *a: (traces.append(1), step(*a))[1])
    for run, given in ((step, key), (step, stream), (jitted, key)):
        (_, out), grads = run(q, k, v, bias, sinks, given)
        close(out, want_out, rtol=1e-5, atol=1e-5)
        for got, name in zip(grads, ("q", "k", "v", "bias", "sinks"), strict=True):
            close(got, want[name], rtol=1e-4, atol=1e-5)
    (_, other), _ = jitted(q, k, v, bias, sinks, jax.random.key(43))
    assert len(traces) == 1, "a new key is a traced value, not a new trace"
    assert float(jnp.max(jnp.abs(other - out))) > 1e-3


def test_dropout_is_refused_under_vmap_when_lowered_for_cuda_and_when_wrong(monkeypatch):
    monkeypatch.setattr(_jax_gpu, "unusable_reason", lambda: None)
    q = jnp.ones((2, 5, 4, 8))
    key = jax.random.key(0)
    with pytest.raises(NotImplementedError, match=r"dropout_p: under jax.vmap"):
        jax.vmap(lambda q: cuflash_jax.attention(q, q, q, dropout_p=0.1, rng=key))(q[None])
    traced = jax.jit(lambda q, key: cuflash_jax.attention(q, q, q, dropout_p=0.1,
                                                          rng=key)).trace(q, key)
    traced.lower(lowering_platforms=("cpu",))
    with pytest.raises(NotImplementedError, match=r"^cuflash\.jax dropout_p: the CUDA kernels"):
        traced.lower(lowering_platforms=("cuda",))
    with pytest.raises(ValueError, match=r"^rng: dropout_p > 0 needs rng"):
        cuflash_jax.attention(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match=r"^dropout_p: expected a number in \[0, 1\)"):
        cuflash_jax.attention(q, q, q, dropout_p=1.5, rng=key)
    with pytest.raises(TypeError, match=r"^rng: expected a JAX PRNG key"):
        cuflash_jax.attention(q, q, q, dropout_p=0.1, rng=jnp.zeros(3, jnp.uint32))
