"""GPU: an additive bias and a boolean mask array through the CUDA kernels (attention/score.cuh,
the Mods kind), forward and backward (dq, dk, dv; the bias's gradient is the CPU path's).

Bias and mask broadcast to (B, Hq, Sq, Sk) from any of their shapes, read in place with stride 0
along broadcast axes; float16/32/64 biases; NumPy or on q's device; with the causal and window
masks, ALiBi and GQA; rows the mask array leaves empty give zeros and lse = -inf. Every GPU path
(the dispatcher's choice; forced sm80; SIMT for fp32/fp64) against the float64 reference by the
accuracy rule. Skipped, with the reason printed, where no CUDA GPU is usable.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gpu_support import require_gpu, side_array, to_numpy, torch_cuda

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
from tests.strategies import Case, examples, make_dout, make_inputs, problems, seeds, to_bshd4  # noqa: E402
from tests.test_gpu_backward import DTYPES, _namespace, _skip_single_family  # noqa: E402

pytestmark = pytest.mark.gpu


def side_shape(case: Case, keep: tuple[bool, bool, bool, bool], rank: int) -> tuple[int, ...]:
    """A shape broadcastable to (B, Hq, Sq, Sk): the axes `keep` says, 1 elsewhere, the last
    `rank` of them."""
    full = (case.batch, case.heads_q, case.seqlen_q, case.seqlen_k)
    return tuple(n if kept else 1 for n, kept in zip(full, keep, strict=True))[4 - rank:]


def check_case(case: Case, seed: int, *, bias64=None, mask=None, slopes=None,
               where: str = "device", bias_dtype=np.float32,
               deterministic: bool = False) -> None:
    """out, lse, dq, dk, dv of `case` with the given bias (float64 values, passed as
    `bias_dtype`), mask and ALiBi slopes against the reference."""
    xp = _namespace(case.dtype)
    q, k, v = make_inputs(case, xp, seed)
    dout = make_dout(case, xp, seed)
    opts = {**case.mask, "layout": case.layout}
    mods = dict(case.mask)
    if bias64 is not None:
        opts["bias"] = side_array(bias64.astype(bias_dtype), xp, where)
        mods["bias"] = bias64.astype(bias_dtype).astype(np.float64)
    if mask is not None:
        opts["mask"] = side_array(mask, xp, where)
        mods["mask"] = mask
    if slopes is not None:
        opts["alibi_slopes"] = side_array(slopes.astype(np.float32), xp, where)
        mods["alibi_slopes"] = slopes.astype(np.float32).astype(np.float64)
    out, lse = cuflash.attention(q, k, v, return_lse=True, **opts)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic,
                                       **opts)

    q4, k4, v4, do4 = (to_bshd4(to_numpy(x), case) for x in (q, k, v, dout))
    naive_mods = {**mods, "scale": 1.0 / np.sqrt(case.head_dim)}
    ref, ref_lse = reference.attention(q4, k4, v4, return_lse=True, **mods)
    naive, naive_lse = naive_attention(q4, k4, v4, dtype=case.dtype, **naive_mods)
    assert_matches_reference(f"{case.id} out", to_bshd4(to_numpy(out), case), ref, naive,
                             dtype=case.dtype)
    got_lse = to_numpy(lse)[None] if case.three_d else to_numpy(lse)
    assert_matches_reference(f"{case.id} lse", got_lse, ref_lse, naive_lse, dtype="float32")

    refs = reference.attention_grads(do4, q4, k4, v4, **mods)
    naives = naive_attention_backward(do4, q4, k4, v4, dtype=case.dtype, **naive_mods)
    eps = backward_eps(do4, q4, k4, v4, dtype=case.dtype, **naive_mods)
    for name, got, nv, e in zip(("dq", "dk", "dv"), grads, naives, eps, strict=True):
        assert_matches_reference(f"{case.id} {name}", to_bshd4(to_numpy(got), case),
                                 refs[name[1:]], nv, dtype=case.dtype, eps=e)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=examples(60), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), seed=seeds())
def test_bias_and_mask_match_reference(dtype, kernel_path, data, seed):
    """Random shapes, masks, GQA, layouts; a bias, a mask array or both, of random broadcast
    shapes (rows the mask array empties included), sometimes with ALiBi."""
    _skip_single_family(dtype, kernel_path)
    case = data.draw(problems(dtypes=(dtype,), max_seqlen=200, windows=True))
    rng = np.random.default_rng(seed)
    which = data.draw(st.sampled_from(["bias", "mask", "both"]))
    bias64 = mask = slopes = None
    if which != "mask":
        keep = tuple(data.draw(st.booleans()) for _ in range(4))
        rank = data.draw(st.integers(2, 4))
        spread = data.draw(st.sampled_from([0.5, 4.0]))
        bias64 = rng.standard_normal(side_shape(case, keep, rank)) * spread
    if which != "bias":
        keep = tuple(data.draw(st.booleans()) for _ in range(4))
        rank = data.draw(st.integers(2, 4))
        density = data.draw(st.sampled_from([0.1, 0.5, 0.95]))
        mask = rng.random(side_shape(case, keep, rank)) < density
    if data.draw(st.booleans()):
        slopes = rng.uniform(0.0, 0.5, case.heads_q)
    where = data.draw(st.sampled_from(["device", "device", "numpy"]))
    bias_dtype = data.draw(st.sampled_from([np.float16, np.float32, np.float64]))
    check_case(case, seed, bias64=bias64, mask=mask, slopes=slopes, where=where,
               bias_dtype=bias_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["none", "causal"])
def test_bias_and_mask_on_long_tiles(dtype, head_dim, causal, kernel_path):
    """Multi-tile rows (each kernel's pipeline wraps, the Hopper forward's persistent tiles change
    heads), Sq != Sk both ways, GQA, a full (B, Hq, Sq, Sk) bias and a per-head mask; the first
    query rows of the mask see nothing; deterministic dq too."""
    _skip_single_family(dtype, kernel_path)
    for sq, sk in ((300, 520), (520, 129), (1, 300)):
        case = Case(batch=2, seqlen_q=sq, seqlen_k=sk, heads_q=4, heads_kv=2,
                    head_dim=head_dim, dtype=dtype, causal=causal)
        rng = np.random.default_rng(sq + sk)
        bias64 = rng.standard_normal((2, 4, sq, sk))
        mask = rng.random((4, sq, sk)) < 0.7
        mask[:, : min(3, sq)] = False
        check_case(case, sq + sk, bias64=bias64, mask=mask, deterministic=sq == 1)


def test_hidden_nan_values_do_not_leak():
    """A NaN in v at keys the mask array hides from every row changes nothing: the kernels'
    repair (nonfinite.cuh) recomputes the rows it reached."""
    case = Case(batch=1, seqlen_q=130, seqlen_k=200, heads_q=2, heads_kv=1, head_dim=64,
                dtype="float16")
    q, k, v = make_inputs(case, cupy, 4)
    mask = cupy.ones((case.seqlen_q, case.seqlen_k), bool)
    mask[:, 50:60] = False
    clean = cuflash.attention(q, k, v, mask=mask)
    v[:, 50:60] = cupy.nan
    dirty = cuflash.attention(q, k, v, mask=mask)
    assert not bool(cupy.isnan(dirty).any())
    np.testing.assert_allclose(cupy.asnumpy(dirty).astype(np.float32),
                               cupy.asnumpy(clean).astype(np.float32), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("bias_shape", [(2, 4, 70, 90), (4, 1, 90), (70, 90)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bias_gradient_on_cuda_matches_reference(bias_shape, dtype, head_dim, kernel_path):
    """dbias from the CUDA kernels (where it is asked for, they write dS): through torch
    autograd and `attention_backward(return_dbias=True)`, summed over the broadcast axes,
    against the float64 reference; with a mask and causal, GQA. bf16 at D 64 takes the sm80
    dQ kernel's store, at D 128 (dispatch) the Hopper dK/dV kernel's; fp32 SIMT's."""
    torch = pytest.importorskip("torch")
    import cuflash.torch as ct

    case = Case(batch=2, seqlen_q=70, seqlen_k=90, heads_q=4, heads_kv=2, head_dim=head_dim,
                dtype=dtype, causal=True)
    rng = np.random.default_rng(3)
    q, k, v = (x.requires_grad_() for x in make_inputs(case, torch_cuda(), 5))
    dout = make_dout(case, torch_cuda(), 5)
    bias64 = rng.standard_normal(bias_shape)
    mask64 = rng.random((70, 90)) < 0.8
    bias = torch.tensor(bias64, device="cuda", dtype=torch.float32, requires_grad=True)
    mask = torch.tensor(mask64, device="cuda")
    out = ct.attention(q, k, v, causal=True, bias=bias, mask=mask)
    out.backward(dout)
    q4, k4, v4, do4 = (to_numpy(x.detach()).astype(np.float64) for x in (q, k, v, dout))
    used = to_numpy(bias.detach()).astype(np.float64)
    refs = reference.attention_grads(do4, q4, k4, v4, causal=True, bias=used, mask=mask64)
    tol = 2e-2 if dtype == "bfloat16" else 1e-4
    scale = np.abs(refs["bias"]).max()
    np.testing.assert_allclose(to_numpy(bias.grad), refs["bias"], atol=tol * scale, rtol=tol)
    for name, x in (("q", q), ("k", k), ("v", v)):
        np.testing.assert_allclose(to_numpy(x.grad), refs[name], atol=tol * 5, rtol=tol * 5,
                                   err_msg=f"d{name}")
    o, lse = cuflash.attention(q.detach(), k.detach(), v.detach(), causal=True,
                               bias=bias.detach(), mask=mask, return_lse=True)
    *_, dbias = cuflash.attention_backward(dout, q.detach(), k.detach(), v.detach(), o, lse,
                                           causal=True, bias=bias.detach(), mask=mask,
                                           return_dbias=True)
    assert tuple(dbias.shape) == bias_shape and dbias.dtype == torch.float32
    np.testing.assert_allclose(to_numpy(dbias), refs["bias"], atol=tol * scale, rtol=tol)


def test_torch_compile_traces_bias_and_mask():
    """The custom op path (torch.compile): a CUDA bias and mask that need no gradient, forward
    and backward, match the eager autograd node's results."""
    torch = pytest.importorskip("torch")
    import cuflash.torch as ct

    case = Case(batch=2, seqlen_q=64, seqlen_k=96, heads_q=4, heads_kv=2, head_dim=64,
                dtype="float16", causal=True)
    rng = np.random.default_rng(8)
    bias = torch.from_numpy(rng.standard_normal((4, 64, 96))).float().cuda()
    mask = torch.from_numpy(rng.random((64, 96)) < 0.8).cuda()

    def step(q, k, v):
        out = ct.attention(q, k, v, causal=True, bias=bias, mask=mask)
        out.float().square().sum().backward()
        return out

    results = []
    for fn in (step, torch.compile(step, fullgraph=False)):
        q, k, v = (x.requires_grad_() for x in make_inputs(case, torch_cuda(), 2))
        out = fn(q, k, v)
        results.append([out.detach(), q.grad, k.grad, v.grad])
    for eager, compiled in zip(*results, strict=True):  # dq's atomics may order sums apart
        torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)
