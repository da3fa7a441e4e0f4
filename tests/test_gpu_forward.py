"""GPU forward: every kernel against the float64 reference, through CuPy, torch and JAX.

Skipped, with the reason printed, where no CUDA GPU is usable.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gpu_support import require_gpu, to_numpy, torch_cuda

require_gpu()

import cupy  # noqa: E402

import cuflash  # noqa: E402
from cuflash import reference  # noqa: E402
from cuflash.cuda import _compile, _launch  # noqa: E402
from tests.accuracy import assert_matches_reference, naive_attention  # noqa: E402
from tests.strategies import (  # noqa: E402
    MASK_IDS,
    MASKS,
    examples,
    make_inputs,
    problems,
    seeds,
    to_bshd4,
)

pytestmark = pytest.mark.gpu

# kernel_path sets an environment variable once per test, the same for every example.
GPU_SETTINGS = settings(max_examples=examples(120), deadline=None,
                        suppress_health_check=[HealthCheck.function_scoped_fixture])


def _namespace(dtype: str):
    # CuPy for what it can hold; torch CUDA tensors for bfloat16 (and to cover torch).
    if dtype == "bfloat16":
        pytest.importorskip("torch")
        return torch_cuda()
    return cupy


def _poisoned_like(x):
    """An output buffer of x's shape/dtype/framework filled with NaN."""
    top = type(x).__module__.split(".")[0]
    if top == "torch":
        import torch

        return torch.full_like(x, float("nan"), memory_format=torch.contiguous_format)
    return cupy.full(x.shape, cupy.nan, dtype=x.dtype)


def _check_case(case, seed):
    xp = _namespace(case.dtype)
    q, k, v = make_inputs(case, xp, seed)
    before = [to_numpy(x) for x in (q, k, v)]
    out = _poisoned_like(q)
    result, lse = cuflash.attention(q, k, v, **case.mask, layout=case.layout,
                                    return_lse=True, out=out)
    assert result is out, "out= must be written in place and returned"
    got = to_numpy(result)
    assert not np.isnan(got).any(), f"{case.id}: unwritten (NaN-poisoned) output elements"
    for name, x, b in zip("qkv", (q, k, v), before, strict=False):
        np.testing.assert_array_equal(to_numpy(x), b, err_msg=f"{case.id}: {name} was modified")

    q4, k4, v4 = (to_bshd4(x, case) for x in before)
    ref, ref_lse = reference.attention(q4, k4, v4, **case.mask, return_lse=True)
    scale = 1.0 / np.sqrt(case.head_dim)
    naive, naive_lse = naive_attention(q4, k4, v4, dtype=case.dtype, **case.mask, scale=scale)
    assert_matches_reference(f"{case.id} out", to_bshd4(got, case), ref, naive, dtype=case.dtype)
    got_lse = to_numpy(lse)
    if case.three_d:
        got_lse = got_lse[None]
    assert_matches_reference(f"{case.id} lse", got_lse, ref_lse, naive_lse, dtype="float32")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@GPU_SETTINGS
@given(data=st.data(), seed=seeds())
def test_forward_matches_reference(dtype, kernel_path, data, seed):
    if kernel_path == "sm80" and dtype in ("float32", "float64"):
        pytest.skip("fp32/fp64 have one kernel family")
    case = data.draw(problems(dtypes=(dtype,), max_seqlen=300, windows=True, softcaps=True))
    _check_case(case, seed)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
def test_tile_edges(dtype, head_dim, mask, kernel_path):
    """Lengths one either side of every tile size, Sq != Sk, GQA: each kernel instantiation."""
    from tests.strategies import Case

    for sq, sk in ((127, 129), (129, 64), (65, 257), (1, 200), (200, 1), (300, 520)):
        case = Case(batch=2, seqlen_q=sq, seqlen_k=sk, heads_q=4, heads_kv=2, head_dim=head_dim,
                    dtype=dtype, **mask)
        _check_case(case, seed=sq * 1000 + sk)


def test_fully_masked_rows_are_zero():
    """Bottom-right causal with Sq > Sk: the first Sq - Sk rows see no key."""
    rng = np.random.default_rng(0)
    q = cupy.asarray(rng.standard_normal((1, 50, 2, 64)), dtype=cupy.float16)
    k = cupy.asarray(rng.standard_normal((1, 20, 2, 64)), dtype=cupy.float16)
    out, lse = cuflash.attention(q, k, k, causal=True, return_lse=True)
    out, lse = cupy.asnumpy(out), cupy.asnumpy(lse)
    assert np.all(out[:, :30] == 0) and np.all(np.isneginf(lse[:, :, :30]))
    assert np.all(np.isfinite(out[:, 30:])) and np.any(out[:, 30:] != 0)


def test_frameworks_get_their_own_type_back():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 33, 4, 64)).astype(np.float32)
    expected = reference.attention(x, x, x)
    t = torch.asarray(x, device="cuda")
    got_t = cuflash.attention(t, t, t)
    assert isinstance(got_t, torch.Tensor) and got_t.device.type == "cuda"
    c = cupy.asarray(x)
    got_c = cuflash.attention(c, c, c)
    assert isinstance(got_c, cupy.ndarray)
    for got in (got_t, got_c):
        np.testing.assert_allclose(to_numpy(got), expected, rtol=1e-5, atol=1e-5)


def test_jax_gpu_arrays():
    jax = pytest.importorskip("jax")
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("JAX has no GPU backend here")
    import jax.numpy as jnp

    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 40, 2, 32)).astype(np.float32)
    got = cuflash.attention(jnp.asarray(x), jnp.asarray(x), jnp.asarray(x), causal=True)
    assert isinstance(got, jax.Array)
    np.testing.assert_allclose(np.asarray(got), reference.attention(x, x, x, causal=True),
                               rtol=1e-5, atol=1e-5)


def test_torch_side_stream():
    """Inputs produced by long work on a side stream are read after that work, not before."""
    torch = pytest.importorskip("torch")
    stream = torch.cuda.Stream()
    big = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        acc = big
        for _ in range(20):  # tens of milliseconds of work queued ahead of q's final value
            acc = acc @ big / 64.0
        q = (torch.tanh(acc[:256, :128]).reshape(1, 256, 2, 64)
             + torch.randn(1, 256, 2, 64, device="cuda")).half()
        k = torch.randn(1, 256, 2, 64, device="cuda", dtype=torch.float16)
        out = cuflash.attention(q, k, k)
    torch.cuda.synchronize()
    expected = reference.attention(to_numpy(q), to_numpy(k), to_numpy(k))
    np.testing.assert_allclose(to_numpy(out), expected, atol=2e-3, rtol=2e-3)


def test_first_compile_is_thread_safe(monkeypatch):
    """Two threads asking for one uncompiled kernel get one compile and correct results."""
    spec = _launch.fwd_spec("float32", 64, "causal", True)
    for key in [key for key in _compile._functions if key[1] == spec]:
        del _compile._functions[key]
    calls = []
    real_load = _compile._load

    def counting_load(s, cc):
        calls.append(s)
        return real_load(s, cc)

    monkeypatch.setattr(_compile, "_load", counting_load)
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, 70, 2, 64)).astype(np.float32) for _ in range(2)]
    results = [None, None]

    def work(i):
        with cupy.cuda.Device(0):
            x = cupy.asarray(xs[i])
            results[i] = cupy.asnumpy(cuflash.attention(x, x, x, causal=True))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [s.name for s in calls] == [spec.name]
    for i in range(2):
        np.testing.assert_allclose(results[i], reference.attention(xs[i], xs[i], xs[i],
                                                                   causal=True), atol=1e-5)


def test_long_sequence_memory_is_linear():
    """S = 131072 (B=1, H=16, D=128, bf16, causal) runs; the extra memory is O(S), not O(S^2)."""
    torch = pytest.importorskip("torch")
    seqlen, heads, dim = 131072, 16, 128
    q, k, v = (torch.randn(1, seqlen, heads, dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    out = torch.empty_like(q)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    pool = cupy.get_default_memory_pool()
    pool_before = pool.total_bytes()
    cuflash.attention(q, k, v, causal=True, out=out)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base + pool.total_bytes() - pool_before
    assert extra <= 64 * 2**20, f"{extra / 2**20:.1f} MiB beyond inputs and output"
    # Spot-check a few rows against the reference (the full reference is S^2).
    rows = [0, 1, 4097, seqlen - 1]
    for row in rows:
        qr = q[:, row:row + 1].float().cpu().numpy()
        kr = k[:, :row + 1].float().cpu().numpy()
        vr = v[:, :row + 1].float().cpu().numpy()
        expected = reference.attention(qr, kr, vr)
        np.testing.assert_allclose(out[:, row:row + 1].float().cpu().numpy(), expected,
                                   atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_repeated_torch_calls_replay_correctly(dtype):
    """The second call of a signature replays the first's launch: it must still read the new
    tensors, write a fresh output, and a differently aligned view must not reuse the launch."""
    torch = pytest.importorskip("torch")
    from cuflash.cuda import _replay

    dt = getattr(torch, dtype)
    shape = (2, 77, 4, 64)
    results = []  # kept alive so each output is a distinct allocation
    for i in range(3):
        q, k, v = (torch.randn(shape, device="cuda", dtype=dt) for _ in range(3))
        before = _replay.size()
        out, lse = cuflash.attention(q, k, v, causal=True, layout="bhsd", return_lse=True)
        if i > 0:
            assert _replay.size() == before, "a repeated signature must not add a plan"
        results.append((out, lse))
        expected, expected_lse = reference.attention(*(to_numpy(x) for x in (q, k, v)),
                                                     causal=True, layout="bhsd", return_lse=True)
        tol = 2e-2 if dtype == "bfloat16" else 3e-3
        np.testing.assert_allclose(to_numpy(out), expected, atol=tol, rtol=tol)
        np.testing.assert_allclose(to_numpy(lse), expected_lse, atol=1e-3, rtol=1e-4)
    assert results[0][0].data_ptr() != results[1][0].data_ptr(), "outputs must be fresh tensors"
    # A view starting 2 elements in (not 16-byte aligned) has another signature.
    base = torch.randn(2 * 77 * 4 * 64 + 2, device="cuda", dtype=dt)
    q = base[2:].view(shape)
    out = cuflash.attention(q, q, q, causal=True, layout="bhsd")
    expected = reference.attention(*(to_numpy(q),) * 3, causal=True, layout="bhsd")
    tol = 2e-2 if dtype == "bfloat16" else 3e-3
    np.testing.assert_allclose(to_numpy(out), expected, atol=tol, rtol=tol)


def test_check_options_are_rawmodule_options(monkeypatch):
    """The CPU-side checks (compile_report, tests/sass.py) compile with _compile.check_options:
    what cuflash passes plus what CuPy's RawModule adds (RAWMODULE_OPTIONS). RawModule must
    still add those, or the spill and SASS checks would look at other code than runs."""
    import uuid

    from cupy.cuda import compiler

    from cuflash._core import compute_capability

    seen = []
    compile_program = compiler._NVRTCProgram.compile

    def recording(self, options=(), *args, **kwargs):
        seen.append(tuple(options))
        return compile_program(self, options, *args, **kwargs)

    monkeypatch.setattr(compiler._NVRTCProgram, "compile", recording)
    arch = _compile.arch_flag(compute_capability(0))
    # A fresh source each run: a cached module would not reach NVRTC.
    code = f'// {uuid.uuid4()}\nextern "C" __global__ void probe() {{}}\n'
    cupy.RawModule(code=code, options=_compile.nvrtc_options(arch)).get_function("probe")
    assert seen, "RawModule did not compile through NVRTC"
    passed = set(seen[-1])
    assert set(_compile.check_options(arch)) <= passed, (
        f"RawModule passed {sorted(passed)}; check_options adds {_compile.RAWMODULE_OPTIONS}")
