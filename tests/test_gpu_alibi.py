"""GPU: ALiBi through the CUDA kernels (attention/score.cuh, the Mods kind), forward and backward.

`-slope * |i + Sk - Sq - j|` is added to each scaled score. Every GPU path (the dispatcher's
choice: Hopper on an H100; forced sm80; SIMT for fp32/fp64), masks, GQA,
slopes `(Hq,)` or `(B, Hq)`, on the device or in NumPy, against the float64 reference by the
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


def alibi_slopes(heads: int) -> np.ndarray:
    """BLOOM's slopes for `heads` heads: 2^(-8 h / H), h = 1..H (the power-of-two formula)."""
    return 2.0 ** (-8.0 * np.arange(1, heads + 1) / heads)


def check_alibi_case(case: Case, seed: int, slopes64: np.ndarray, *, where: str = "device",
                     slope_dtype=np.float32, deterministic: bool = False) -> None:
    """out, lse, dq, dk, dv of `case` with the slopes `slopes64` against the reference."""
    xp = _namespace(case.dtype)
    q, k, v = make_inputs(case, xp, seed)
    dout = make_dout(case, xp, seed)
    slopes = side_array(slopes64.astype(slope_dtype), xp, where)
    opts = {**case.mask, "layout": case.layout, "alibi_slopes": slopes}
    out, lse = cuflash.attention(q, k, v, return_lse=True, **opts)
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic,
                                       **opts)

    q4, k4, v4, do4 = (to_bshd4(to_numpy(x), case) for x in (q, k, v, dout))
    used = slopes64.astype(slope_dtype).astype(np.float64)  # the values the call was given
    scale = 1.0 / np.sqrt(case.head_dim)
    mods = {**case.mask, "alibi_slopes": used}
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
    for name, got, nv, e in zip(("dq", "dk", "dv"), grads, naives, eps, strict=True):
        assert_matches_reference(f"{case.id} {name}", to_bshd4(to_numpy(got), case),
                                 refs[name[1:]], nv, dtype=case.dtype, eps=e)


@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=examples(60), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), seed=seeds())
def test_alibi_matches_reference(dtype, kernel_path, data, seed):
    """Random shapes, masks (rows that see nothing included), GQA, both layouts;
    BLOOM's slopes or random ones up to 1 (a bias that dwarfs the scores), per head or per batch
    and head, on the device or in NumPy, float32 or float64."""
    _skip_single_family(dtype, kernel_path)
    case = data.draw(problems(dtypes=(dtype,), max_seqlen=260, windows=True))
    rng = np.random.default_rng(seed)
    per_batch = data.draw(st.booleans()) and not case.three_d
    shape = (case.batch, case.heads_q) if per_batch else (case.heads_q,)
    slopes64 = data.draw(st.sampled_from([
        np.broadcast_to(alibi_slopes(case.heads_q), shape).copy(),
        rng.uniform(0.0, 1.0, shape),
    ]))
    where = data.draw(st.sampled_from(["device", "device", "numpy"]))
    slope_dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    check_alibi_case(case, seed, slopes64, where=where, slope_dtype=slope_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("mask", [{"causal": False}, {"causal": True},
                                  {"causal": False, "window": (100, 20)}],
                         ids=["none", "causal", "w100:20"])
def test_alibi_on_long_tiles(dtype, head_dim, mask, kernel_path):
    """Multi-tile rows (each kernel's pipeline wraps, the Hopper forward's persistent tiles
    change heads), Sq != Sk both ways, GQA, slopes per batch and head; deterministic dq too."""
    _skip_single_family(dtype, kernel_path)
    for sq, sk in ((300, 520), (520, 129), (1, 300)):
        case = Case(batch=2, seqlen_q=sq, seqlen_k=sk, heads_q=4, heads_kv=2,
                    head_dim=head_dim, dtype=dtype, **mask)
        slopes64 = np.stack([alibi_slopes(4), alibi_slopes(4)[::-1] * 0.5])
        check_alibi_case(case, sq + sk, slopes64, deterministic=sq == 1)


def test_zero_slopes_change_nothing():
    """Slopes of 0 add nothing: the output and lse are ALiBi-free (to the instantiation's
    rounding: another kernel)."""
    case = Case(batch=2, seqlen_q=200, seqlen_k=300, heads_q=2, heads_kv=1, head_dim=64,
                dtype="float16", causal=True)
    q, k, v = make_inputs(case, cupy, 3)
    plain, plain_lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    biased, biased_lse = cuflash.attention(q, k, v, causal=True, return_lse=True,
                                           alibi_slopes=cupy.zeros(2, cupy.float32))
    np.testing.assert_allclose(cupy.asnumpy(biased).astype(np.float32),
                               cupy.asnumpy(plain).astype(np.float32), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(cupy.asnumpy(biased_lse), cupy.asnumpy(plain_lse), rtol=1e-6)


def test_torch_autograd_with_alibi():
    torch = pytest.importorskip("torch")
    import cuflash.torch as ct

    case = Case(batch=2, seqlen_q=150, seqlen_k=190, heads_q=4, heads_kv=2, head_dim=128,
                dtype="bfloat16", causal=True)
    q, k, v = (x.requires_grad_() for x in make_inputs(case, torch_cuda(), 11))
    slopes = torch.tensor(alibi_slopes(4), device="cuda", dtype=torch.float32)
    out = ct.attention(q, k, v, causal=True, alibi_slopes=slopes)
    dout = make_dout(case, torch_cuda(), 11)
    out.backward(dout)
    q4, k4, v4, do4 = (to_numpy(x.detach()) for x in (q, k, v, dout))
    used = slopes.cpu().numpy().astype(np.float64)
    scale = 1.0 / np.sqrt(case.head_dim)
    ref = reference.attention(q4, k4, v4, causal=True, alibi_slopes=used)
    naive, _ = naive_attention(q4, k4, v4, dtype="bfloat16", causal=True, scale=scale,
                               alibi_slopes=used)
    assert_matches_reference("out", to_numpy(out.detach()), ref, naive, dtype="bfloat16")
    refs = reference.attention_grads(do4, q4, k4, v4, causal=True, alibi_slopes=used)
    naives = naive_attention_backward(do4, q4, k4, v4, dtype="bfloat16", causal=True,
                                      scale=scale, alibi_slopes=used)
    eps = backward_eps(do4, q4, k4, v4, dtype="bfloat16", causal=True, scale=scale,
                       alibi_slopes=used)
    for name, x, nv, e in zip(("q", "k", "v"), (q, k, v), naives, eps, strict=True):
        assert_matches_reference(f"d{name}", to_numpy(x.grad), refs[name], nv, dtype="bfloat16",
                                 eps=e)


def test_kvcache_decoding_with_alibi():
    """The KV cache's per-sequence calls take row b of (B, Hq) slopes on the device."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    b, s_cache, hq, hkv, d = 3, 70, 4, 2, 64
    k_cache = torch.from_numpy(rng.standard_normal((b, s_cache, hkv, d))).half().cuda()
    v_cache = torch.from_numpy(rng.standard_normal((b, s_cache, hkv, d))).half().cuda()
    q = torch.from_numpy(rng.standard_normal((b, 1, hq, d))).half().cuda()
    lengths = np.array([70, 33, 1], np.int32)
    slopes = np.stack([alibi_slopes(hq) * (i + 1) for i in range(b)])
    out = cuflash.attention_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=torch.from_numpy(lengths).cuda(),
        alibi_slopes=torch.from_numpy(slopes).float().cuda())
    for i in range(b):
        n = int(lengths[i])
        k4, v4 = (to_numpy(x[i:i + 1, :n]) for x in (k_cache, v_cache))
        q4 = to_numpy(q[i:i + 1])
        used = slopes[i:i + 1].astype(np.float32).astype(np.float64)
        ref = reference.attention(q4, k4, v4, causal=True, alibi_slopes=used)
        naive, _ = naive_attention(q4, k4, v4, dtype="float16", causal=True,
                                   scale=1.0 / np.sqrt(d), alibi_slopes=used)
        assert_matches_reference(f"sequence {i}", to_numpy(out[i:i + 1]), ref, naive,
                                 dtype="float16")


def test_slopes_on_another_device_are_refused():
    torch = pytest.importorskip("torch")
    case = Case(batch=1, seqlen_q=8, seqlen_k=8, heads_q=2, heads_kv=2, head_dim=16,
                dtype="float16")
    q, k, v = make_inputs(case, torch_cuda(), 0)
    with pytest.raises(TypeError, match=r"^alibi_slopes: expected a NumPy array or an array of"):
        cuflash.attention(q, k, v, alibi_slopes=torch.zeros(2))
    with pytest.raises(ValueError, match=r"^alibi_slopes: expected shape \(2,\) or \(1, 2\)"):
        cuflash.attention(q, k, v, alibi_slopes=torch.zeros(3, device="cuda"))
