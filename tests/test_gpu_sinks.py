"""GPU: attention sinks through the CUDA kernels (attention/sink.cuh), forward and backward.

Each row's softmax denominator gains exp(sinks[h]); rows that see no key get zeros and
lse = sinks[h]. Every GPU path (the dispatcher's choice: Hopper on an H100; forced sm80; SIMT for
fp32/fp64), masks, softcaps and GQA against the float64 reference by the accuracy rule, the
sinks' gradient (computed on the device from the backward's delta) included. Skipped, with the
reason printed, where no CUDA GPU is usable.
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
    EPS,
    assert_matches_reference,
    backward_eps,
    naive_attention,
    naive_attention_backward,
    naive_sinks_gradient,
)
from tests.strategies import Case, examples, make_dout, make_inputs, problems, seeds, to_bshd4  # noqa: E402
from tests.test_gpu_backward import DTYPES, _namespace, _skip_single_family  # noqa: E402

pytestmark = pytest.mark.gpu


def check_sinks_case(case: Case, seed: int, sinks64: np.ndarray, *, where: str = "device",
                     sink_dtype=np.float32, deterministic: bool = False) -> None:
    """out, lse, dq, dk, dv and dsinks of `case` with the sinks `sinks64` against the reference."""
    xp = _namespace(case.dtype)
    q, k, v = make_inputs(case, xp, seed)
    dout = make_dout(case, xp, seed)
    sinks = side_array(sinks64.astype(sink_dtype), xp, where)
    opts = {**case.mask, "layout": case.layout, "sinks": sinks}
    out, lse = cuflash.attention(q, k, v, return_lse=True, **opts)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, return_dsinks=True,
                                       deterministic=deterministic, **opts)
    dsinks = grads[3]
    assert type(dsinks) is type(sinks) and dsinks.shape == (case.heads_q,)
    assert str(dsinks.dtype).endswith(np.dtype(sink_dtype).name), dsinks.dtype

    q4, k4, v4, do4 = (to_bshd4(to_numpy(x), case) for x in (q, k, v, dout))
    used = sinks64.astype(sink_dtype).astype(np.float64)  # the values the call was given
    scale = 1.0 / np.sqrt(case.head_dim)
    mods = {**case.mask, "sinks": used}
    naive_mods = {**mods, "scale": scale}
    ref, ref_lse = reference.attention(q4, k4, v4, return_lse=True, **mods)
    naive, naive_lse = naive_attention(q4, k4, v4, dtype=case.dtype, **naive_mods)
    assert_matches_reference(f"{case.id} out", to_bshd4(to_numpy(out), case), ref, naive,
                             dtype=case.dtype)
    got_lse = to_numpy(lse)[None] if case.three_d else to_numpy(lse)
    assert_matches_reference(f"{case.id} lse", got_lse, ref_lse, naive_lse, dtype="float32")

    refs = reference.attention_grads(do4, q4, k4, v4, **mods)
    naives = naive_attention_backward(do4, q4, k4, v4, dtype=case.dtype, **naive_mods)
    eps = backward_eps(do4, q4, k4, v4, dtype=case.dtype, **naive_mods)
    for name, got, nv, e in zip(("dq", "dk", "dv"), grads, naives, eps, strict=False):
        assert_matches_reference(f"{case.id} {name}", to_bshd4(to_numpy(got), case),
                                 refs[name[1:]], nv, dtype=case.dtype, eps=e)
    naive_ds = naive_sinks_gradient(do4, q4, k4, v4, dtype=case.dtype, **naive_mods)
    # |dsinks_h| <= sum over rows of p_sink * |delta|: the rule's floor scales with that sum.
    floor = max(1.0, float(np.sum(np.abs(do4)) * np.max(np.abs(ref), initial=0.0)))
    rule = "float32" if case.dtype == "float64" and sink_dtype == np.float32 else case.dtype
    assert_matches_reference(f"{case.id} dsinks", to_numpy(dsinks), refs["sinks"], naive_ds,
                             dtype=rule, eps=EPS[rule] * floor)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=examples(60), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), seed=seeds())
def test_sinks_match_reference(dtype, kernel_path, data, seed):
    """Random shapes, masks (rows that see nothing included), softcaps, GQA, both layouts;
    sinks from well below to well above the scores, on the device or in NumPy."""
    _skip_single_family(dtype, kernel_path)
    case = data.draw(problems(dtypes=(dtype,), max_seqlen=260, windows=True, softcaps=True))
    spread = data.draw(st.sampled_from([0.5, 3.0, 20.0]))
    sinks64 = np.random.default_rng(seed).standard_normal(case.heads_q) * spread
    where = data.draw(st.sampled_from(["device", "device", "numpy"]))
    sink_dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    check_sinks_case(case, seed, sinks64, where=where, sink_dtype=sink_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("mask", [{"causal": False}, {"causal": True},
                                  {"causal": False, "window": (100, 20), "softcap": 2.0}],
                         ids=["none", "causal", "w100:20-cap2"])
def test_sinks_on_long_tiles(dtype, head_dim, mask, kernel_path):
    """Multi-tile rows (each kernel's pipeline wraps), Sq != Sk both ways, GQA; deterministic
    dq too."""
    _skip_single_family(dtype, kernel_path)
    for sq, sk in ((300, 520), (520, 129), (1, 300)):
        case = Case(batch=2, seqlen_q=sq, seqlen_k=sk, heads_q=4, heads_kv=2,
                    head_dim=head_dim, dtype=dtype, **mask)
        sinks64 = np.array([-2.0, 0.5, 3.0, 8.0])
        check_sinks_case(case, sq + sk, sinks64, deterministic=sq == 1)


def test_very_negative_sinks_change_nothing():
    """A sink far below every score adds exp(-1e4 - m) = 0 in float32: the output and lse are
    the sink-free ones (to the last bit but for the instantiation's own rounding)."""
    case = Case(batch=1, seqlen_q=200, seqlen_k=300, heads_q=2, heads_kv=1, head_dim=64,
                dtype="float16", causal=True)
    q, k, v = make_inputs(case, cupy, 3)
    plain, plain_lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    sunk, sunk_lse = cuflash.attention(q, k, v, causal=True, return_lse=True,
                                       sinks=cupy.full(2, -1e4, cupy.float32))
    np.testing.assert_allclose(cupy.asnumpy(sunk).astype(np.float32),
                               cupy.asnumpy(plain).astype(np.float32), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(cupy.asnumpy(sunk_lse), cupy.asnumpy(plain_lse), rtol=1e-6)


def test_torch_autograd_gives_the_sinks_their_gradient():
    torch = pytest.importorskip("torch")
    import cuflash.torch as ct

    case = Case(batch=2, seqlen_q=150, seqlen_k=150, heads_q=4, heads_kv=2, head_dim=128,
                dtype="bfloat16", causal=True)
    q, k, v = (x.requires_grad_() for x in make_inputs(case, torch_cuda(), 11))
    sinks = torch.tensor([0.0, 1.0, -1.0, 2.0], device="cuda", requires_grad=True)
    out = ct.attention(q, k, v, causal=True, sinks=sinks)
    dout = make_dout(case, torch_cuda(), 11)
    out.backward(dout)
    assert sinks.grad is not None and sinks.grad.device == sinks.device
    q4, k4, v4, do4 = (to_numpy(x.detach()) for x in (q, k, v, dout))
    refs = reference.attention_grads(do4, q4, k4, v4, causal=True,
                                     sinks=sinks.detach().cpu().numpy().astype(np.float64))
    scale = 1.0 / np.sqrt(case.head_dim)
    naive = naive_sinks_gradient(do4, q4, k4, v4, dtype="bfloat16", causal=True, scale=scale,
                                 sinks=sinks.detach().cpu().numpy().astype(np.float64))
    floor = max(1.0, float(np.sum(np.abs(do4))))
    assert_matches_reference("dsinks", sinks.grad.cpu().numpy(), refs["sinks"], naive,
                             dtype="bfloat16", eps=EPS["bfloat16"] * floor)


def test_sinks_on_another_device_are_refused():
    torch = pytest.importorskip("torch")
    case = Case(batch=1, seqlen_q=8, seqlen_k=8, heads_q=2, heads_kv=2, head_dim=16,
                dtype="float16")
    q, k, v = make_inputs(case, torch_cuda(), 0)
    with pytest.raises(TypeError, match=r"^sinks: expected a NumPy array or an array of q's"):
        cuflash.attention(q, k, v, sinks=torch.zeros(2))
    with pytest.raises(ValueError, match=r"^sinks: expected shape \(2,\)"):
        cuflash.attention(q, k, v, sinks=torch.zeros(3, device="cuda"))
