"""cuflash on torch tensors: the ``cuflash::attention_fwd`` / ``attention_bwd`` custom ops.

Forward and ``loss.backward()`` gradients against the float64 reference (the accuracy rule of
docs/api.md), gradcheck, torch.compile(fullgraph=True) and ``torch.library.opcheck`` on the CPU;
the same on CUDA (marked gpu, skipped with the reason printed where torch sees no GPU), plus a test
that cuflash runs on the caller's side stream.
"""

from __future__ import annotations

import math
import shutil
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings

torch = pytest.importorskip("torch", reason="torch is not installed: cuflash.torch is untested")

import cuflash  # noqa: E402
from cuflash import _core, reference  # noqa: E402
from cuflash import torch as cuflash_torch  # noqa: E402
from tests.accuracy import (  # noqa: E402
    LSE_DTYPE,
    assert_matches_reference,
    backward_eps,
    naive_attention,
    naive_attention_backward,
)
from tests.strategies import Case, make_dout, make_inputs, problems, seeds, to_bshd4  # noqa: E402

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16,
                "float32": torch.float32, "float64": torch.float64}

# Small problems that still cover GQA, causal with Sq < Sk and Sq > Sk (rows that see no key),
# both layouts, 3-D input, strided views, awkward sizes and every CPU dtype.
CPU_CASES = [
    Case(2, 13, 31, 4, 2, 16, dtype="float64", causal=True),
    Case(2, 31, 13, 4, 2, 16, dtype="float64", causal=True),
    Case(1, 17, 17, 3, 3, 8, dtype="float32", layout="bhsd"),
    Case(1, 9, 20, 6, 2, 12, dtype="float32", causal=True, three_d=True),
    Case(2, 5, 9, 4, 4, 8, dtype="float64", layout="bhsd", view="transposed"),
    Case(2, 7, 11, 2, 1, 8, dtype="float16", causal=True),
    # v with a head dim of its own (Dv != D); out and dout have it
    Case(2, 13, 31, 4, 2, 192, head_dim_v=128, dtype="float32", causal=True),
    Case(1, 9, 20, 6, 2, 16, head_dim_v=40, dtype="float64", causal=True, layout="bhsd",
         three_d=True),
    Case(2, 7, 11, 2, 1, 64, head_dim_v=1, dtype="float16", layout="bhsd", view="transposed"),
]


def _skip(reason: str) -> None:
    print(f"skipping: {reason}")
    pytest.skip(reason)


@pytest.fixture
def cuda():
    """The CUDA device, or a skip (with the reason printed) where torch sees none."""
    if not torch.cuda.is_available():
        _skip("torch.cuda.is_available() is False: no CUDA GPU for the torch GPU tests")
    return torch.device("cuda")


def _compile_skip_reason(device: str) -> str | None:
    """Why torch.compile's default backend cannot run here, or None."""
    if device == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "torch.compile on the CPU needs a C++ compiler (g++, c++ or clang++) on PATH"
    return None


def _leaves(case: Case, seed: int, device: str = "cpu"):
    """q, k, v (requiring grad, the case's layout and strides) and a contiguous dout."""
    q, k, v = make_inputs(case, torch, seed)
    dout = make_dout(case, torch, seed)
    q, k, v, dout = (x.to(device) for x in (q, k, v, dout))
    for x in (q, k, v):
        x.requires_grad_()
    return q, k, v, dout


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().double().numpy()


def _check(case: Case, q, k, v, dout, out, lse, grads, scale: float | None = None) -> None:
    """out, lse and (dq, dk, dv) of one problem against the reference, by the accuracy rule."""
    qn, kn, vn, don = (_numpy(x) for x in (q, k, v, dout))
    q4, k4, v4, do4 = (to_bshd4(x, case) for x in (qn, kn, vn, don))
    default_scale = 1 / math.sqrt(case.head_dim)
    opts = {"causal": case.causal, "scale": default_scale if scale is None else scale}
    ref_opts = {"causal": case.causal, "scale": scale, "layout": case.layout}
    ref_out, ref_lse = reference.attention(qn, kn, vn, return_lse=True, **ref_opts)
    naive_out, naive_lse = naive_attention(q4, k4, v4, dtype=case.dtype, **opts)
    assert out.dtype == q.dtype and out.shape == case.out_shape and out.device == q.device
    assert_matches_reference("out", to_bshd4(_numpy(out), case), to_bshd4(ref_out, case),
                             naive_out, dtype=case.dtype)
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.device == q.device
        lse, ref_lse = (x[None] if case.three_d else x for x in (_numpy(lse), ref_lse))
        assert_matches_reference("lse", lse, ref_lse, naive_lse, dtype=LSE_DTYPE)

    ref_grads = reference.attention_backward(don, qn, kn, vn, **ref_opts)
    naive_grads = naive_attention_backward(do4, q4, k4, v4, dtype=case.dtype, **opts)
    eps = backward_eps(do4, q4, k4, v4, dtype=case.dtype, **opts)
    for name, got, x, ref, naive, e in zip(("dq", "dk", "dv"), grads, (q, k, v), ref_grads,
                                           naive_grads, eps, strict=True):
        assert got.dtype == x.dtype and got.shape == x.shape and got.device == x.device, name
        assert_matches_reference(name, to_bshd4(_numpy(got), case), to_bshd4(ref, case), naive,
                                 dtype=case.dtype, eps=e)


def _forward_backward(case: Case, q, k, v, dout, **kwargs):
    """cuflash.attention with return_lse, then loss.backward(): (out, lse, (dq, dk, dv))."""
    out, lse = cuflash.attention(q, k, v, causal=case.causal, layout=case.layout,
                                 return_lse=True, **kwargs)
    (out * dout).sum().backward()
    return out, lse, (q.grad, k.grad, v.grad)


# ---- CPU -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_autograd_matches_reference(case: Case):
    q, k, v, dout = _leaves(case, seed=3)
    before = [x.detach().clone() for x in (q, k, v)]
    out, lse, grads = _forward_backward(case, q, k, v, dout)
    assert out.grad_fn is not None
    _check(case, q, k, v, dout, out, lse, grads)
    for name, x, b in zip("qkv", (q, k, v), before, strict=True):
        assert torch.equal(x.detach(), b), f"{name} was modified"


@settings(deadline=None, max_examples=12, suppress_health_check=[HealthCheck.too_slow])
@given(case=problems(dtypes=("float32", "float64"), max_batch=2, max_heads_kv=2, max_group=3,
                     max_seqlen=40, max_head_dim=40),
       seed=seeds())
def test_autograd_matches_reference_drawn(case: Case, seed: int):
    note(case.id)
    if case.view == "qkv_packed":
        q, k, v = make_inputs(case, torch, seed)  # views of one packed tensor: leaf them apart
        q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
        dout = make_dout(case, torch, seed)
    else:
        q, k, v, dout = _leaves(case, seed)
    out, lse, grads = _forward_backward(case, q, k, v, dout, scale=0.3)
    _check(case, q, k, v, dout, out, lse, grads, scale=0.3)


def test_packed_qkv_gradient_reaches_the_packed_tensor():
    # q, k, v sliced out of one (B, S, 3, H, D) projection, as a fused qkv layer writes them.
    case = Case(2, 11, 11, 3, 3, 8, dtype="float64", causal=True)
    packed = torch.randn(2, 11, 3, 3, 8, dtype=torch.float64, requires_grad=True)
    q, k, v = packed.unbind(2)
    dout = torch.randn(2, 11, 3, 8, dtype=torch.float64)
    out = cuflash.attention(q, k, v, causal=True)
    (out * dout).sum().backward()
    _check(case, q, k, v, dout, out, None, packed.grad.unbind(2))


def test_gradcheck_float64():
    # GQA, causal with Sq < Sk, and an explicit scale, on a tiny problem.
    q = torch.randn(1, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 6, 2, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 6, 2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: cuflash.attention(q, k, v, causal=True, scale=0.7), (q, k, v))


def test_gradcheck_value_head_dim_of_its_own():
    # v's head dim (7) differs from q's and k's (5): GQA, causal with Sq < Sk, 3-D "bhsd".
    q = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 6, 7, dtype=torch.float64, requires_grad=True)
    assert cuflash.attention(q, k, v, layout="bhsd").shape == (4, 3, 7)
    assert torch.autograd.gradcheck(
        lambda q, k, v: cuflash.attention(q, k, v, causal=True, scale=0.7, layout="bhsd"),
        (q, k, v))


def test_no_grad_gives_the_same_result_without_a_graph():
    case = CPU_CASES[0]
    q, k, v, _ = _leaves(case, seed=4)
    with_grad = cuflash.attention(q, k, v, causal=True)
    with torch.no_grad():
        plain = cuflash.attention(q, k, v, causal=True)
    assert plain.grad_fn is None and not plain.requires_grad
    assert torch.equal(plain, with_grad.detach())


def test_lse_is_returned_but_not_differentiable():
    q, k, v, _ = _leaves(CPU_CASES[2], seed=5)
    out, lse = cuflash_torch.attention(q, k, v, layout="bhsd", return_lse=True)
    assert out.requires_grad and not lse.requires_grad
    assert lse.shape == (1, 3, 17) and lse.dtype == torch.float32


def test_deterministic_algorithms_ask_for_a_deterministic_backward():
    q, k, v, dout = _leaves(CPU_CASES[0], seed=6)
    out = cuflash.attention(q, k, v, causal=True)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with mock.patch.object(_core, "attention_backward", wraps=_core.attention_backward) as bwd:
            out.backward(dout)
    finally:
        torch.use_deterministic_algorithms(was)
    assert bwd.call_args.kwargs["deterministic"] is True


def test_errors_name_the_argument():
    q = torch.randn(2, 5, 4, 8, requires_grad=True)
    k = torch.randn(2, 7, 2, 6)
    with pytest.raises(ValueError, match="k: head dim 6 differs"):
        cuflash_torch.attention(q, k, k)
    with pytest.raises(ValueError, match="layout"):
        cuflash_torch.attention(q, q, q, layout="sbhd")
    with pytest.raises(TypeError, match="causal"):
        cuflash_torch.attention(q, q, q, causal=1)
    with pytest.raises(TypeError, match="v: expected dtype float32"):
        cuflash.attention(q, q, q.double())


@pytest.mark.parametrize(
    "shapes, causal, scale, layout",
    [
        (((2, 5, 4, 8), (2, 7, 2, 8), (2, 7, 2, 8)), True, None, "bshd"),
        (((2, 4, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8)), False, 0.3, "bhsd"),
        (((5, 2, 8), (7, 2, 8), (7, 2, 8)), True, None, "bshd"),
        (((2, 5, 4, 8), (2, 7, 2, 8), (2, 7, 2, 12)), True, None, "bshd"),
        (((4, 5, 8), (2, 7, 8), (2, 7, 3)), False, 0.3, "bhsd"),
    ],
    ids=["bshd-causal-gqa", "bhsd-scale", "3d", "bshd-dv12", "3d-bhsd-dv3"],
)
def test_opcheck(shapes, causal, scale, layout):
    q_shape, k_shape, v_shape = shapes
    q, k, v = (torch.randn(shape, dtype=torch.float64, requires_grad=True)
               for shape in (q_shape, k_shape, v_shape))
    torch.library.opcheck(torch.ops.cuflash.attention_fwd.default,
                          (q, k, v, causal, scale, layout))
    out, lse = cuflash_torch.attention(q, k, v, causal=causal, scale=scale, layout=layout,
                                       return_lse=True)
    plain = [x.detach() for x in (q, k, v, out)]
    torch.library.opcheck(torch.ops.cuflash.attention_bwd.default,
                          (torch.randn_like(out), *plain, lse, causal, scale, layout, False))


def test_opcheck_with_score_modifications():
    """The ops' schema, fake kernels and autograd with every score modification passed (CPU):
    softcap, ALiBi, sinks and bias that require grad, a mask."""
    q = torch.randn((2, 5, 4, 8), dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn((2, 7, 2, 8), dtype=torch.float64, requires_grad=True) for _ in range(2))
    slopes = torch.rand(4, dtype=torch.float64)
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn((4, 1, 7), dtype=torch.float64, requires_grad=True)
    mask = torch.rand((5, 7)) < 0.8
    mods = (-1, 0, 2.5, slopes, sinks, bias, mask)
    torch.library.opcheck(torch.ops.cuflash.attention_fwd.default,
                          (q, k, v, True, None, "bshd", *mods))
    out, lse = torch.ops.cuflash.attention_fwd(q, k, v, True, None, "bshd", *mods)
    plain = [x.detach() for x in (q, k, v, out)]
    plain_mods = [x.detach() if isinstance(x, torch.Tensor) else x for x in mods]
    torch.library.opcheck(torch.ops.cuflash.attention_bwd.default,
                          (torch.randn_like(out), *plain, lse, True, None, "bshd", False,
                           *plain_mods))


class _Block(torch.nn.Module):
    """A projection then cuflash: what a compiled model would contain."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim, dtype=torch.float64)

    def forward(self, q, k, v):
        return cuflash.attention(self.proj(q), k, v, causal=True)


def _compiled_matches_eager(device: str) -> None:
    torch.manual_seed(0)
    block = _Block(8).to(device)
    q = torch.randn(2, 9, 4, 8, dtype=torch.float64, device=device, requires_grad=True)
    k, v = (torch.randn(2, 12, 2, 8, dtype=torch.float64, device=device, requires_grad=True)
            for _ in range(2))
    eager_out = block(q, k, v)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), (q, k, v))
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    torch.testing.assert_close(out, eager_out, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# Inductor imports torch.jit internals that warn about their own deprecation.
TORCH_JIT_DEPRECATION = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@TORCH_JIT_DEPRECATION
def test_torch_compile_fullgraph_cpu():
    reason = _compile_skip_reason("cpu")
    if reason:
        _skip(reason)
    _compiled_matches_eager("cpu")


def test_torch_compile_inference_through_cuflash_torch_attention():
    # Without grad, cuflash.torch.attention is the op (traceable); dynamic shapes, one graph.
    counter = torch._dynamo.testing.CompileCounter()
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: cuflash_torch.attention(q, k, v, causal=True),
                       backend=counter, fullgraph=True, dynamic=True)
    k, v = torch.randn(2, 12, 2, 8), torch.randn(2, 12, 2, 8)
    with torch.no_grad():
        for seqlen in (5, 9, 17):
            q = torch.randn(2, seqlen, 4, 8)
            torch.testing.assert_close(fn(q, k, v), cuflash.attention(q, k, v, causal=True))
    assert counter.frame_count == 1


def test_torch_compile_with_a_value_head_dim_of_its_own():
    # The fake kernels give out v's head dim: forward and AOTAutograd's backward trace as one
    # graph and agree with eager.
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: cuflash_torch.attention(q, k, v, causal=True),
                       backend="aot_eager", fullgraph=True)
    q = torch.randn(2, 9, 4, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 12, 2, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 12, 2, 24, dtype=torch.float64, requires_grad=True)
    out = fn(q, k, v)
    eager = cuflash_torch.attention(q, k, v, causal=True)
    assert out.shape == eager.shape == (2, 9, 4, 24)
    torch.testing.assert_close(out, eager, rtol=1e-12, atol=1e-12)
    dout = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), dout),
                         torch.autograd.grad(eager, (q, k, v), dout), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_torch_compile_public_function_without_grad():
    """Under torch.compile the public function routes to the custom op (DLPack is untraceable)."""
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: cuflash.attention(q, k, v), backend="eager",
                       fullgraph=True)
    q = torch.randn(1, 4, 2, 8)
    with torch.no_grad():
        fn(q, q, q)


# ---- CUDA ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case",
    [
        Case(2, 70, 129, 4, 2, 64, dtype="float16", causal=True),
        Case(2, 129, 70, 4, 1, 128, dtype="bfloat16", causal=True, layout="bhsd"),
        Case(1, 65, 65, 2, 2, 96, dtype="float32", view="qkv_packed"),
        Case(1, 33, 17, 2, 2, 40, dtype="float64", three_d=True),
    ],
    ids=lambda c: c.id,
)
def test_cuda_autograd_matches_reference(cuda, case: Case):
    if case.view == "qkv_packed":
        q, k, v = make_inputs(case, torch, seed=7)
        q, k, v = (x.to(cuda).requires_grad_() for x in (q, k, v))
        dout = make_dout(case, torch, seed=7).to(cuda)
    else:
        q, k, v, dout = _leaves(case, seed=7, device=cuda)
    out, lse, grads = _forward_backward(case, q, k, v, dout)
    _check(case, q, k, v, dout, out, lse, grads)


@pytest.mark.gpu
def test_cuda_gradcheck_float64(cuda):
    q = torch.randn(1, 3, 4, 5, dtype=torch.float64, device=cuda, requires_grad=True)
    k = torch.randn(1, 6, 2, 5, dtype=torch.float64, device=cuda, requires_grad=True)
    v = torch.randn(1, 6, 2, 5, dtype=torch.float64, device=cuda, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: cuflash.attention(q, k, v, causal=True, scale=0.7), (q, k, v))


@pytest.mark.gpu
@TORCH_JIT_DEPRECATION
def test_cuda_torch_compile_fullgraph(cuda):
    _compiled_matches_eager("cuda")


@pytest.mark.gpu
def test_cuda_opcheck(cuda):
    q = torch.randn(2, 5, 4, 64, dtype=torch.float16, device=cuda, requires_grad=True)
    k, v = (torch.randn(2, 7, 2, 64, dtype=torch.float16, device=cuda, requires_grad=True)
            for _ in range(2))
    # The float16 kernels and torch's reference differ by more than opcheck's default rtol.
    torch.library.opcheck(torch.ops.cuflash.attention_fwd.default, (q, k, v, True, None, "bshd"),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


@pytest.mark.gpu
def test_cuda_runs_on_the_callers_side_stream(cuda):
    # q, k, v are written at the end of a long matmul chain queued on a side stream. If cuflash
    # launched on another stream (or read its inputs early) it would see the zeros or a partial
    # chain; under torch.cuda.stream(side) it must order after the chain, forward and backward.
    case = Case(2, 256, 256, 4, 2, 64, dtype="float16", causal=True)
    q0, k0, v0 = (x.to(cuda) for x in make_inputs(case, torch, seed=8))
    dout = make_dout(case, torch, seed=8).to(cuda)
    side = torch.cuda.Stream(cuda)
    side.wait_stream(torch.cuda.current_stream(cuda))
    with torch.cuda.stream(side):
        q, k, v = (torch.zeros_like(x, requires_grad=True) for x in (q0, k0, v0))
        a = torch.randn(4096, 4096, device=cuda) / 64
        x = torch.eye(4096, device=cuda)
        for _ in range(40):
            x = x @ a
        with torch.no_grad():  # add (x - x) = 0 so each input depends on the whole chain
            zero = (x - x).sum().half()
            for dst, src in ((q, q0), (k, k0), (v, v0)):
                dst.copy_(src + zero)
        out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
        (out * dout).sum().backward()
    side.synchronize()
    _check(case, q, k, v, dout, out, lse, (q.grad, k.grad, v.grad))
