"""`cuflash.jax.ring_attention` inside ``jax.shard_map`` on JAX's CPU backend with 1, 2 and 4 host
devices: forward and backward (jax.grad under jax.jit) equal one-device attention on the whole
sequence (float64 and float32; causal in the zigzag order and not; GQA; both layouts; a softcap);
the zigzag order round trip; bad arguments named. The multi-device runs need a fresh
interpreter (XLA's host device count is fixed at start-up)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax is not installed: cuflash.jax is untested")

import jax.numpy as jnp  # noqa: E402

from cuflash import jax as cuflash_jax  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

_RING_SCRIPT = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
from jax.sharding import Mesh, PartitionSpec as P
from cuflash import jax as cuflash_jax, reference

world = int(sys.argv[1])
assert len(jax.devices()) == 4, jax.devices()
mesh = Mesh(np.array(jax.devices()[:world]), ("seq",))
rng = np.random.default_rng(world)
# float64 merges by cuflash's float32 lse (relative error ~1e-7 in the merge weights)
tolerance = {"float64": 2e-6, "float32": 2e-5}
B, S, HQ, HKV, D = 2, 48, 4, 2, 16
cases = [(dtype, causal, layout, 0.0) for dtype in ("float64", "float32")
         for causal in (False, True) for layout in ("bshd", "bhsd")]
cases += [("float64", causal, "bshd", 2.0) for causal in (False, True)]  # softcap
for dtype, causal, layout, softcap in cases:
    axis = 1 if layout == "bshd" else 2
    shape = lambda h: (B, S, h, D) if layout == "bshd" else (B, h, S, D)
    q, k, v, dout = (rng.standard_normal(shape(h)).astype(dtype)
                     for h in (HQ, HKV, HKV, HQ))
    if causal:
        order = lambda x: cuflash_jax.zigzag_order(x, world, axis=axis)
        unorder = lambda x: cuflash_jax.zigzag_unorder(x, world, axis=axis)
    else:
        order = unorder = lambda x: jnp.asarray(x)
    spec = P(None, "seq") if layout == "bshd" else P(None, None, "seq")
    ring = jax.shard_map(
        lambda q, k, v: cuflash_jax.ring_attention(q, k, v, axis_name="seq",
                                                   causal=causal, softcap=softcap,
                                                   layout=layout),
        mesh=mesh, in_specs=spec, out_specs=spec)
    args = [order(x) for x in (q, k, v)]
    out = unorder(jax.jit(ring)(*args))
    loss = lambda q, k, v: jnp.sum(ring(q, k, v) * order(dout))
    grads = [unorder(g) for g in jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)]
    opts = {"causal": causal, "softcap": softcap, "layout": layout}
    want = [reference.attention(q, k, v, **opts),
            *reference.attention_backward(dout, q, k, v, **opts)]
    for name, got, ref in zip(("out", "dq", "dk", "dv"), [out, *grads], want):
        err = float(np.abs(np.asarray(got, np.float64) - ref).max())
        assert err < tolerance[dtype], (name, world, dtype, causal, layout, softcap, err)
print("ring ok")
"""


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ring_attention_equals_one_device(world):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    run = subprocess.run([sys.executable, "-c", _RING_SCRIPT, str(world)], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ring ok" in run.stdout


def test_zigzag_order_and_unorder_round_trip():
    x = jnp.arange(2 * 24 * 3).reshape(2, 24, 3)
    ordered = cuflash_jax.zigzag_order(x, 3, axis=1)
    # shard 0 (the first 8 positions) holds chunks 0 and 5 of 6 chunks of 4 positions
    assert np.asarray(ordered[0, :8, 0]).tolist() == [int(x[0, i, 0]) for i in
                                                      (0, 1, 2, 3, 20, 21, 22, 23)]
    # shard 1 holds chunks 1 and 4
    assert np.asarray(ordered[0, 8:16, 0]).tolist() == [int(x[0, i, 0]) for i in
                                                        (4, 5, 6, 7, 16, 17, 18, 19)]
    np.testing.assert_array_equal(cuflash_jax.zigzag_unorder(ordered, 3, axis=1), x)


def test_bad_arguments_name_themselves():
    q = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match=r"^x: the sequence axis \(1\) has 8 positions, not a "
                                         r"multiple of 2 \* world = 6"):
        cuflash_jax.zigzag_order(q, 3)
    with pytest.raises(ValueError, match=r"^world: expected an int >= 1"):
        cuflash_jax.zigzag_order(q, 0)
    with pytest.raises(ValueError, match=r"^axis: expected an int in \[-4, 4\)"):
        cuflash_jax.zigzag_unorder(q, 1, axis=4)
    with pytest.raises(NotImplementedError, match=r"^window: ring_attention does not take"):
        cuflash_jax.ring_attention(q, q, q, axis_name="seq", window=(4, 0))
    with pytest.raises(ValueError, match=r"^layout: expected one of"):
        cuflash_jax.ring_attention(q, q, q, axis_name="seq", layout="sbhd")
    with pytest.raises(ValueError, match=r"^q: expected a 4-D array"):
        cuflash_jax.ring_attention(q[0], q, q, axis_name="seq")
    with pytest.raises(ValueError, match=r"^k: expected this device's shard as long as q's"):
        cuflash_jax.ring_attention(q, q[:, :4], q[:, :4], axis_name="seq")
    with pytest.raises(ValueError, match=r"^q: with causal the shard holds two zigzag chunks"):
        cuflash_jax.ring_attention(q[:, :7], q[:, :7], q[:, :7], axis_name="seq", causal=True)
    with pytest.raises(ValueError, match=r"^axis_name: 'seq' is not a mesh axis bound here"):
        cuflash_jax.ring_attention(q, q, q, axis_name="seq")
