"""Ring attention over torch.distributed (gloo, CPU processes): forward and backward equal
single-process attention on the gathered sequence, causal (zigzag shards) and not, GQA, both
layouts, float64 and float32, with and without a softcap."""

from __future__ import annotations

import os
import socket
import traceback

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
mp = pytest.importorskip("torch.multiprocessing")

import cuflash  # noqa: E402
from cuflash import torch as cuflash_torch  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

# (batch, seqlen, heads_q, heads_kv, head_dim) of the whole sequence
SHAPE = (2, 48, 4, 2, 16)
# float64 merges by cuflash's float32 lse (relative error ~1e-7 in the merge weights)
TOLERANCE = {torch.float64: 2e-6, torch.float32: 2e-5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(dtype, layout: str, seed: int):
    b, s, hq, hkv, d = SHAPE
    g = torch.Generator().manual_seed(seed)

    def make(h):
        x = torch.randn(b, s, h, d, generator=g, dtype=torch.float64).to(dtype)
        return x if layout == "bshd" else x.transpose(1, 2).contiguous()

    return make(hq), make(hkv), make(hkv), make(hq)  # q, k, v, dout


def _shards(x, world: int, causal: bool, dim: int):
    if causal:
        return cuflash_torch.zigzag_split(x, world, dim=dim)
    return list(x.chunk(world, dim=dim))


def _gather(parts, causal: bool, dim: int):
    return cuflash_torch.zigzag_merge(parts, dim=dim) if causal else torch.cat(parts, dim=dim)


def _worker(rank: int, world: int, port: int, cases, errors) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            for dtype, causal, layout, softcap in cases:
                _check(rank, world, dtype, causal, layout, softcap)
        finally:
            dist.destroy_process_group()
    except BaseException:  # reported to the parent, which fails the test with it
        errors.put(f"rank {rank}: {traceback.format_exc()}")


def _check(rank: int, world: int, dtype, causal: bool, layout: str, softcap: float) -> None:
    dim = 1 if layout == "bshd" else 2
    q, k, v, dout = _inputs(dtype, layout, seed=7)
    mine = [_shards(x, world, causal, dim)[rank] for x in (q, k, v, dout)]
    ql, kl, vl, dl = (x.clone().requires_grad_(i < 3) for i, x in enumerate(mine))
    out = cuflash_torch.ring_attention(ql, kl, vl, causal=causal, softcap=softcap,
                                       layout=layout)
    out.backward(dl)

    # the whole sequence in one process, the same inputs
    qa, ka, va = (x.clone().requires_grad_() for x in (q, k, v))
    want = cuflash.attention(qa, ka, va, causal=causal, softcap=softcap, layout=layout)
    want.backward(dout)
    tol = TOLERANCE[dtype]
    for name, got, full in (("out", out, want), ("dq", ql.grad, qa.grad),
                            ("dk", kl.grad, ka.grad), ("dv", vl.grad, va.grad)):
        expected = _shards(full.detach(), world, causal, dim)[rank]
        np.testing.assert_allclose(got.detach().double().numpy(), expected.double().numpy(),
                                   rtol=tol, atol=tol,
                                   err_msg=f"{name} world={world} {dtype} causal={causal} "
                                           f"{layout} softcap={softcap}")


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_equals_one_process(world):
    cases = [(dtype, causal, layout, 0.0) for dtype in (torch.float64, torch.float32)
             for causal in (False, True) for layout in ("bshd", "bhsd")]
    cases += [(torch.float64, causal, "bshd", 2.0) for causal in (False, True)]  # softcap
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, cases, errors))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    reports = []
    while not errors.empty():
        reports.append(errors.get())
    assert not alive, f"{len(alive)} rank(s) did not finish in 240 s"
    assert not reports, "\n".join(reports)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def test_zigzag_split_and_merge_round_trip():
    x = torch.arange(2 * 24 * 3).reshape(2, 24, 3)
    shards = cuflash_torch.zigzag_split(x, 3, dim=1)
    assert [s.shape[1] for s in shards] == [8, 8, 8]
    # rank 0 holds chunks 0 and 5 (of 6 chunks of 4 positions)
    assert shards[0][0, :, 0].tolist() == [x[0, i, 0].item() for i in (0, 1, 2, 3, 20, 21, 22, 23)]
    assert torch.equal(cuflash_torch.zigzag_merge(shards, dim=1), x)


def test_bad_arguments_name_themselves():
    q = torch.zeros(1, 8, 2, 4)
    with pytest.raises(ValueError, match=r"^x: the sequence axis \(dim 1\) has 8 positions, not "
                                         r"a multiple of 2 \* world = 6"):
        cuflash_torch.zigzag_split(q, 3)
    with pytest.raises(ValueError, match=r"^world: expected an int >= 1"):
        cuflash_torch.zigzag_split(q, 0)
    with pytest.raises(NotImplementedError, match=r"^window: ring_attention does not take"):
        cuflash_torch.ring_attention(q, q, q, window=(4, 0))
    with pytest.raises(ValueError, match=r"^layout: expected one of"):
        cuflash_torch.ring_attention(q, q, q, layout="sbhd")
    with pytest.raises(ValueError, match=r"^k: expected this rank's shard as long as q's"):
        cuflash_torch.ring_attention(q, q[:, :4], q[:, :4])
    with pytest.raises(ValueError, match=r"^q: with causal the shard holds two zigzag chunks"):
        cuflash_torch.ring_attention(q[:, :7], q[:, :7], q[:, :7], causal=True)
