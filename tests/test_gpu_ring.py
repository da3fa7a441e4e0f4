"""Ring attention's GPU code paths on one GPU, held to the accuracy rule (docs/api.md) against the
float64 reference: `cuflash.torch.ring_attention` over an NCCL group of one, and
`cuflash.jax.ring_attention` inside ``shard_map`` over a one-device mesh (bfloat16 and float16,
causal and not, GQA). Several GPUs: the multi-GPU run in docs/performance.md."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

from cuflash import reference
from tests.accuracy import (
    assert_matches_reference,
    backward_eps,
    naive_attention,
    naive_attention_backward,
    round_to,
)
from tests.gpu_support import require_gpu, to_numpy

require_gpu()

# (batch, seqlen, heads_q, heads_kv, head_dim)
SHAPES = [(2, 1024, 4, 2, 64), (1, 768, 8, 8, 128)]
CASES = [(dtype, causal, shape) for dtype in ("bfloat16", "float16") for causal in (False, True)
         for shape in SHAPES]


def _inputs(dtype: str, shape, seed: int):
    b, s, hq, hkv, d = shape
    rng = np.random.default_rng(seed)
    return tuple(round_to(rng.standard_normal((b, s, h, d)), dtype).astype(np.float64)
                 for h in (hq, hkv, hkv, hq))  # q, k, v, dout


def _check(dtype: str, causal: bool, arrays, out, grads) -> None:
    q, k, v, dout = arrays
    scale = q.shape[-1] ** -0.5
    want = reference.attention(q, k, v, causal=causal)
    naive, _ = naive_attention(q, k, v, dtype=dtype, causal=causal, scale=scale)
    assert_matches_reference("out", to_numpy(out), want, naive, dtype=dtype)
    refs = reference.attention_backward(dout, q, k, v, causal=causal)
    naives = naive_attention_backward(dout, q, k, v, dtype=dtype, causal=causal, scale=scale)
    epss = backward_eps(dout, q, k, v, dtype=dtype, causal=causal, scale=scale)
    for name, got, ref, nv, eps in zip(("dq", "dk", "dv"), grads, refs, naives, epss,
                                       strict=True):
        assert_matches_reference(name, to_numpy(got), ref, nv, dtype=dtype, eps=eps)


# ---- torch.distributed: an NCCL group of one -----------------------------------------------------


@pytest.fixture(scope="module")
def nccl_group():
    torch = pytest.importorskip("torch")
    dist = pytest.importorskip("torch.distributed")
    if not torch.cuda.is_available() or not dist.is_nccl_available():
        pytest.skip("torch without CUDA or NCCL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("nccl", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize(("dtype", "causal", "shape"), CASES)
def test_torch_ring_on_one_gpu(nccl_group, dtype, causal, shape):
    import torch

    from cuflash import torch as cuflash_torch

    arrays = _inputs(dtype, shape, seed=3)
    tdtype = getattr(torch, dtype)
    q, k, v, dout = (torch.asarray(x, device="cuda").to(tdtype) for x in arrays)
    # A group of one holds the whole sequence, in the zigzag order of one rank: unchanged.
    q, k, v = (cuflash_torch.zigzag_split(x, 1)[0].requires_grad_() for x in (q, k, v))
    out = cuflash_torch.ring_attention(q, k, v, group=nccl_group, causal=causal)
    out.backward(dout)
    _check(dtype, causal, arrays, out, (q.grad, k.grad, v.grad))


# ---- JAX: shard_map over a one-device mesh -------------------------------------------------------


@pytest.mark.parametrize(("dtype", "causal", "shape"), CASES)
def test_jax_ring_on_one_gpu(dtype, causal, shape):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from cuflash import jax as cuflash_jax

    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        pytest.skip("JAX sees no GPU")
    arrays = _inputs(dtype, shape, seed=4)
    q, k, v, dout = (jax.device_put(jnp.asarray(x, dtype), gpus[0]) for x in arrays)
    mesh = Mesh(np.array(gpus[:1]), ("seq",))
    ring = jax.shard_map(
        lambda q, k, v: cuflash_jax.ring_attention(q, k, v, axis_name="seq", causal=causal),
        mesh=mesh, in_specs=P(None, "seq"), out_specs=P(None, "seq"))
    out = jax.jit(ring)(q, k, v)
    def loss(q, k, v):
        return jnp.sum(ring(q, k, v).astype(jnp.float32) * dout.astype(jnp.float32))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    _check(dtype, causal, arrays, out, grads)
