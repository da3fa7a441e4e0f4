"""Repeated calls on the GPU: replays never reuse a stale launch, capture in CUDA graphs, make no
host synchronisation, and allocate only through the caller's framework.

Hypothesis draws call sequences whose signatures change between calls (shapes, dtypes, layouts,
causal, transposed views, slices of a packed qkv, misaligned offsets, return_lse, out=) and
repeats some of them, so that both first calls and replays are checked against the float64
reference.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gpu_support import require_gpu, to_numpy
from tests.strategies import examples

require_gpu()

import cupy  # noqa: E402

import cuflash  # noqa: E402
from cuflash import reference  # noqa: E402
from cuflash.cuda import _replay  # noqa: E402

pytestmark = pytest.mark.gpu

TOL = {"float16": 3e-3, "bfloat16": 2e-2, "float32": 1e-4}


def _torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA GPU")
    return torch


@st.composite
def calls(draw):
    """One call: (dtype, B, Sq, Sk, Hq, Hkv, D, causal, layout, view, offset, return_lse)."""
    dtype = draw(st.sampled_from(sorted(TOL)))
    hkv = draw(st.sampled_from([1, 2]))
    return dict(dtype=dtype, batch=draw(st.integers(1, 2)), sq=draw(st.sampled_from([1, 17, 64])),
                sk=draw(st.sampled_from([1, 33, 64])), hq=hkv * draw(st.sampled_from([1, 2])),
                hkv=hkv, dim=draw(st.sampled_from([32, 64, 72])), causal=draw(st.booleans()),
                layout=draw(st.sampled_from(["bshd", "bhsd"])),
                view=draw(st.sampled_from(["contiguous", "transposed", "packed"])),
                offset=draw(st.sampled_from([0, 0, 2])), return_lse=draw(st.booleans()),
                out=draw(st.booleans()))


def _inputs(xp, c, seed):
    """q, k, v in the call's layout and view, as float64 NumPy and as `xp` arrays."""
    rng = np.random.default_rng(seed)
    b, sq, sk, hq, hkv, d = c["batch"], c["sq"], c["sk"], c["hq"], c["hkv"], c["dim"]
    if c["view"] == "packed" and sq == sk and hq == hkv:
        base = rng.standard_normal((b, sq, 3, hq, d))  # a packed qkv, sliced
        host = [base[:, :, i] for i in range(3)]
    else:
        host = [rng.standard_normal((b, s, h, d)) for s, h in ((sq, hq), (sk, hkv), (sk, hkv))]
    if c["layout"] == "bhsd":
        host = [x.swapaxes(1, 2) for x in host]
    arrays = []
    for x in host:
        if c["view"] == "transposed":
            # Same shape, other strides: the (S, H) axes stored the other way round.
            stored = np.ascontiguousarray(x.swapaxes(1, 2))
            arr = xp.to_device(stored, c["dtype"], c["offset"]).swapaxes(1, 2)
        elif c["view"] == "packed" and x.base is not None and not x.flags.c_contiguous:
            arr = xp.to_device_view(x, c["dtype"], c["offset"])
        else:
            arr = xp.to_device(np.ascontiguousarray(x), c["dtype"], c["offset"])
        arrays.append(arr)
    return arrays


def _view_of_base(x):
    """A float64 NumPy view `x` as (its whole base array, contiguous; the view's start and
    strides in elements of that base), so a device copy of the base can be viewed the same way."""
    base = x.base
    while base.base is not None:
        base = base.base
    start = (x.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // 8
    return np.ascontiguousarray(base), start, tuple(s // 8 for s in x.strides)


class _Torch:
    def __init__(self):
        self.torch = _torch()

    def to_device(self, x, dtype, offset):
        torch = self.torch
        flat = torch.empty(x.size + offset, dtype=getattr(torch, dtype), device="cuda")
        view = flat[offset:].view(x.shape)
        view.copy_(torch.as_tensor(x))
        return view

    def to_device_view(self, x, dtype, offset):
        base, start, strides = _view_of_base(x)
        whole = self.to_device(base, dtype, offset)
        return whole.as_strided(x.shape, strides, whole.storage_offset() + start)

    def empty_like_out(self, q, shape):
        return self.torch.empty(shape, dtype=q.dtype, device="cuda")


class _Cupy:
    def to_device(self, x, dtype, offset):
        dt = _cupy_dtype(dtype)
        flat = cupy.empty(x.size + offset, dtype=dt)
        view = flat[offset:].reshape(x.shape)
        view[...] = cupy.asarray(x.astype(np.float32)).astype(dt)
        return view

    def to_device_view(self, x, dtype, offset):
        base, start, strides = _view_of_base(x)
        whole = self.to_device(base, dtype, offset)
        item = whole.dtype.itemsize
        return cupy.ndarray(x.shape, whole.dtype, whole.data + start * item,
                            strides=tuple(s * item for s in strides))

    def empty_like_out(self, q, shape):
        return cupy.empty(shape, dtype=q.dtype)


def _cupy_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def _check_call(xp, c, seed):
    q, k, v = _inputs(xp, c, seed)
    expected, expected_lse = reference.attention(*(to_numpy(x) for x in (q, k, v)),
                                                 causal=c["causal"], layout=c["layout"],
                                                 return_lse=True)
    out = xp.empty_like_out(q, expected.shape) if c["out"] else None
    result = cuflash.attention(q, k, v, causal=c["causal"], layout=c["layout"],
                               return_lse=c["return_lse"], out=out)
    got, lse = result if c["return_lse"] else (result, None)
    if out is not None:
        assert got is out
    tol = TOL[c["dtype"]]
    np.testing.assert_allclose(to_numpy(got), expected, atol=tol, rtol=tol, err_msg=str(c))
    if lse is not None:
        np.testing.assert_allclose(to_numpy(lse), expected_lse, atol=1e-3, rtol=1e-4,
                                   err_msg=str(c))


@pytest.mark.parametrize("framework", ["torch", "cupy"])
@settings(max_examples=examples(25), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(sequence=st.lists(calls(), min_size=2, max_size=5), repeats=st.lists(
    st.integers(0, 4), min_size=1, max_size=4), seed=st.integers(0, 2**32 - 1))
def test_call_sequences_never_replay_a_stale_launch(framework, sequence, repeats, seed):
    xp = _Torch() if framework == "torch" else _Cupy()
    order = sequence + [sequence[i % len(sequence)] for i in repeats]
    for i, c in enumerate(order):
        _check_call(xp, c, seed + i)  # fresh values every call


def test_repeated_signature_replays_and_backward_too():
    torch = _torch()
    shape = (2, 4, 77, 64)
    before = None
    for i in range(3):
        q, k, v, dout = (torch.randn(shape, device="cuda", dtype=torch.float16) for _ in range(4))
        out, lse = cuflash.attention(q, k, v, causal=True, layout="bhsd", return_lse=True)
        dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True,
                                                layout="bhsd")
        if i == 0:
            before = _replay.size()
        else:
            assert _replay.size() == before, "a repeated signature must not plan again"
        ref = reference.attention_backward(*(to_numpy(x) for x in (dout, q, k, v)),
                                           causal=True, layout="bhsd")
        for got, want in zip((dq, dk, dv), ref, strict=True):
            np.testing.assert_allclose(to_numpy(got), want, atol=2e-2, rtol=2e-2)


# The arrays beside q, k, v each case passes: ALiBi with sinks (the Alibi kind), a bias, a mask
# and per-batch slopes (the Mods kind), sinks alone.
SIDE_CASES = {"alibi+sinks": ("alibi_slopes", "sinks"),
              "bias+mask+alibi": ("bias", "mask", "alibi_slopes"), "sinks": ("sinks",)}


def _side_arrays(names, rng, b, hq, sq, sk):
    """Fresh float64 NumPy values of the named arrays: slopes (B, Hq) for the Mods case, (Hq,)
    else; sinks (Hq,); a bias (1, Hq, Sq, Sk); a mask (Sq, Sk) that keeps the diagonal."""
    found = {}
    if "alibi_slopes" in names:
        found["alibi_slopes"] = rng.uniform(0, 0.5, (b, hq) if "bias" in names else (hq,))
    if "sinks" in names:
        found["sinks"] = rng.standard_normal(hq)
    if "bias" in names:
        found["bias"] = rng.standard_normal((1, hq, sq, sk))
    if "mask" in names:
        found["mask"] = (rng.random((sq, sk)) < 0.7) | np.eye(sq, sk, dtype=bool)
    return found


@pytest.mark.parametrize("framework", ["torch", "cupy"])
@pytest.mark.parametrize("case", sorted(SIDE_CASES))
def test_replays_read_each_calls_side_arrays(framework, case):
    """Calls with slopes, sinks, a bias or a mask replay after the first (no new plan), forward
    and backward, and read each call's own values: fresh values every call match the float64
    reference. A bias of other strides plans anew."""
    rng = np.random.default_rng(7)
    b, hq, hkv, sq, sk, d = 2, 4, 2, 96, 130, 64
    torch = _torch() if framework == "torch" else None

    def device(x, dtype=None):
        if torch is not None:
            t = torch.from_numpy(np.ascontiguousarray(x)).cuda()
            return t.to(getattr(torch, dtype)) if dtype else t.float() if t.is_floating_point() \
                else t
        a = cupy.asarray(x)
        return a.astype(dtype) if dtype else a.astype(np.float32) if a.dtype.kind == "f" else a

    sizes = None
    for i in range(4):
        host = [rng.standard_normal(shape) for shape in ((b, sq, hq, d), (b, sk, hkv, d),
                                                          (b, sk, hkv, d), (b, sq, hq, d))]
        q, k, v, dout = (device(x, "float16") for x in host)
        side_host = _side_arrays(SIDE_CASES[case], rng, b, hq, sq, sk)
        side = {name: device(x) for name, x in side_host.items()}
        if i == 3 and "bias" in side:  # same values, other strides: a new signature
            side["bias"] = device(np.ascontiguousarray(side_host["bias"].swapaxes(2, 3))
                                  ).swapaxes(2, 3)
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True, **side)
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, **side)
        if i == 1:
            sizes = _replay.size()
        elif i == 2:
            assert _replay.size() == sizes, "a repeated signature must not plan again"
        elif i == 3 and "bias" in side:
            assert _replay.size() > sizes, "a bias of other strides must plan anew"
        q64, k64, v64, do64 = (to_numpy(x).astype(np.float64) for x in (q, k, v, dout))
        want, want_lse = reference.attention(q64, k64, v64, causal=True, return_lse=True,
                                             **side_host)
        np.testing.assert_allclose(to_numpy(out), want, atol=1e-2, rtol=1e-2, err_msg=f"{i}")
        np.testing.assert_allclose(to_numpy(lse), want_lse, atol=1e-2, rtol=1e-3)
        ref = reference.attention_backward(do64, q64, k64, v64, causal=True, **side_host)
        for name, got, expected in zip("qkv", grads, ref, strict=True):
            np.testing.assert_allclose(to_numpy(got), expected, atol=2e-2, rtol=2e-2,
                                       err_msg=f"d{name}, call {i}")


def test_torch_program_allocates_only_through_torch():
    """Forward, backward (atomic and deterministic) and autograd of a torch program, with sinks
    and a softcap too, take no byte from CuPy's pool, first calls included; their scratch shows
    in torch's counters."""
    torch = _torch()
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    used, total = pool.used_bytes(), pool.total_bytes()
    for dim, causal in ((64, True), (128, False), (256, True)):
        q, k, v, dout = (torch.randn(2, 300, 4, dim, device="cuda", dtype=torch.bfloat16)
                         for _ in range(4))
        out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
        for deterministic in (False, True):
            cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                       deterministic=deterministic)
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        cuflash.attention(qg, kg, vg, causal=causal).backward(dout)
        q32 = q.float()
        cuflash.attention(q32, k.float(), v.float(), causal=causal)
        sinks = torch.randn(4, device="cuda", requires_grad=True)  # sinks and their gradient
        cuflash.attention(qg, kg, vg, causal=causal, softcap=5.0, sinks=sinks).backward(dout)
    torch.cuda.synchronize()
    assert (pool.used_bytes(), pool.total_bytes()) == (used, total), "CuPy's pool was used"


def test_eager_calls_make_no_host_synchronisation():
    torch = _torch()
    q, k, v, dout = (torch.randn(1, 8, 128, 64, device="cuda", dtype=torch.float16)
                     for _ in range(4))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    cuflash.attention(qg, kg, vg, layout="bhsd", causal=True).backward(dout)  # plans
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            cuflash.attention(qg, kg, vg, layout="bhsd", causal=True).backward(dout)
            cuflash.attention(q, k, v, layout="bhsd", causal=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _graph_case(torch, dim, dtype, causal):
    q, k, v, dout = (torch.randn(2, 200, 4, dim, device="cuda", dtype=dtype) for _ in range(4))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

    def step():
        for x in (qg, kg, vg):
            x.grad = None
        out = cuflash.attention(qg, kg, vg, causal=causal)
        out.backward(dout)
        return out

    return (q, k, v, dout), (qg, kg, vg), step


@pytest.mark.parametrize("dim,dtype,causal", [(64, "float16", True), (128, "bfloat16", False),
                                              (256, "bfloat16", True), (40, "float32", True)])
def test_torch_cuda_graph_replays_equal_eager(dim, dtype, causal):
    torch = _torch()
    (q, k, v, dout), leaves, step = _graph_case(torch, dim, getattr(torch, dtype), causal)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: compiles and plans outside capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    static_grads = [x.grad for x in leaves]
    for trial in range(2):
        with torch.no_grad():  # new values into the captured inputs
            for x, src in zip((*leaves, dout), (torch.randn_like(y) for y in (q, k, v, dout)),
                              strict=True):
                x.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        replay_out = static_out.clone()
        replay_grads = [g.clone() for g in static_grads]
        eager_out = step()
        torch.cuda.synchronize()
        assert torch.equal(replay_out, eager_out), f"trial {trial}: forward differs from eager"
        for name, got, leaf in zip("qkv", replay_grads, leaves, strict=True):
            assert torch.allclose(got, leaf.grad, atol=1e-2, rtol=1e-2), f"d{name} differs"


def test_torch_compile_reduce_overhead_equals_eager():
    torch = _torch()
    q, k, v, dout = (torch.randn(2, 256, 4, 64, device="cuda", dtype=torch.float16)
                     for _ in range(4))

    def fn(q, k, v):
        return cuflash.torch.attention(q, k, v, causal=True) * 2

    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):  # warm-up, record, replays
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        out = compiled(qg, kg, vg)
        out.backward(dout)
        expected_q, expected_k, expected_v = (x.clone().requires_grad_() for x in (q, k, v))
        expected = fn(expected_q, expected_k, expected_v)
        expected.backward(dout)
        assert torch.equal(out, expected)
        for got, want in ((qg, expected_q), (kg, expected_k), (vg, expected_v)):
            assert torch.allclose(got.grad, want.grad, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_cupy_stream_capture_replays_equal_eager(dtype):
    dt = _cupy_dtype(dtype)
    rng = np.random.default_rng(3)
    q, k, v = (cupy.asarray(rng.standard_normal((2, 150, 4, 64), dtype=np.float32)).astype(dt)
               for _ in range(3))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        eager = cuflash.attention(q, k, v, causal=True)  # plans; its output frees a block
        del eager
        stream.begin_capture()
        static = cuflash.attention(q, k, v, causal=True)
        graph = stream.end_capture()
        for _ in range(2):
            q[...] = cupy.asarray(rng.standard_normal(q.shape, dtype=np.float32)).astype(dt)
            graph.launch()
            expected = cuflash.attention(q, k, v, causal=True)
            stream.synchronize()
            assert bool((static == expected).all()), "a replay differs from the eager call"


def test_first_call_during_capture_says_to_warm_up():
    torch = _torch()
    q = torch.randn(1, 8, 93, 48, device="cuda", dtype=torch.float16)  # a fresh signature
    _replay.clear()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="warmup"), torch.cuda.graph(graph):
        cuflash.attention(q, q, q, layout="bhsd")


def test_warmup_plans_what_a_capture_needs():
    torch = _torch()
    _replay.clear()
    cuflash.warmup((1, 8, 93, 48), (1, 8, 93, 48), dtype="float16", layout="bhsd",
                   backward=True)
    q = torch.randn(1, 8, 93, 48, device="cuda", dtype=torch.float16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuflash.attention(q, q, q, layout="bhsd")
    graph.replay()
    torch.cuda.synchronize()
    expected = reference.attention(*(to_numpy(q),) * 3, layout="bhsd")
    np.testing.assert_allclose(to_numpy(out), expected, atol=3e-3, rtol=3e-3)
