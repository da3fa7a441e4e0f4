"""The caller's array type comes back, and inputs go in without a copy where the producer allows.

NumPy always; torch (CPU) and JAX (CPU) where installed: their tests skip, with the reason shown
by ``-ra``, when the framework is missing. Zero-copy is checked by comparing buffer addresses of
the caller's array and the backend (NumPy) view cuflash computes on.
"""

from __future__ import annotations

import numpy as np
import pytest

import cuflash
from cuflash import _core, _interop, reference

B, SQ, SK, HQ, HKV, D = 2, 5, 6, 4, 2, 8


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng((seed, *shape)).standard_normal(shape)


def host_qkv(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return rand(B, SQ, HQ, D, seed=seed), rand(B, SK, HKV, D, seed=seed), rand(B, SK, HKV, D,
                                                                               seed=seed + 1)


def address(x: np.ndarray) -> int:
    return x.__array_interface__["data"][0]


def backend_view(x, name: str = "q") -> np.ndarray:
    """The array cuflash computes on for input `x` (after its one-copy rule)."""
    return _core._backend(x, _interop.source_of(x, name), name)


# ---- NumPy -----------------------------------------------------------------------------------


def test_numpy_in_numpy_out_without_copies():
    q, k, v = (x.astype(np.float32) for x in host_qkv())
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    assert type(out) is np.ndarray and type(lse) is np.ndarray
    assert _interop.to_backend(q, _interop.source_of(q, "q")) is q
    assert backend_view(q) is q


def test_numpy_source_description():
    src = _interop.source_of(np.zeros(1), "q")
    assert (src.framework, src.device, src.describe()) == ("numpy", "cpu", "numpy on CPU")


# ---- torch -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="torch is not installed")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_torch_in_torch_out(torch, dtype):
    q, k, v = (torch.from_numpy(x.astype(dtype)) for x in host_qkv(1))
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    assert isinstance(out, torch.Tensor) and isinstance(lse, torch.Tensor)
    assert out.dtype == getattr(torch, dtype) and out.device.type == "cpu"
    assert tuple(out.shape) == tuple(q.shape)
    assert lse.dtype == torch.float32 and tuple(lse.shape) == (B, HQ, SQ)
    if dtype == "float64":
        ref = reference.attention(q.numpy(), k.numpy(), v.numpy(), causal=True)
        np.testing.assert_allclose(out.numpy(), ref, atol=1e-12)


def test_torch_backward_returns_torch(torch):
    q, k, v = (torch.from_numpy(x) for x in host_qkv(2))
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    dout = torch.from_numpy(rand(*q.shape, seed=3))
    grads = cuflash.attention_backward(dout, q, k, v, out, lse)
    for g, x in zip(grads, (q, k, v), strict=True):
        assert isinstance(g, torch.Tensor) and g.dtype == x.dtype and g.shape == x.shape


def test_torch_input_is_viewed_without_a_copy(torch):
    q = torch.from_numpy(rand(B, SQ, HQ, D))
    view = _interop.to_backend(q, _interop.source_of(q, "q"))
    assert address(view) == q.data_ptr()
    assert address(backend_view(q)) == q.data_ptr()


def test_torch_strided_and_packed_views_are_not_copied(torch):
    packed = torch.from_numpy(rand(B, SQ, 3, HQ, D, seed=4))
    q, k, v = (packed[:, :, i] for i in range(3))
    bhsd = q.transpose(1, 2)  # PyTorch SDPA order, a view
    for x in (q, k, v, bhsd):
        view = backend_view(x)
        assert address(view) == x.data_ptr()
        assert view.strides == tuple(s * x.element_size() for s in x.stride())
    out = cuflash.attention(q, k, v, causal=True)
    np.testing.assert_allclose(out.numpy(), reference.attention(q.numpy(), k.numpy(), v.numpy(),
                                                                causal=True), atol=1e-12)


def test_torch_tensor_that_requires_grad_is_viewed_without_a_copy(torch):
    q = torch.from_numpy(rand(B, SQ, HQ, D)).requires_grad_()
    assert address(_interop.to_backend(q, _interop.source_of(q, "q"))) == q.data_ptr()


def test_torch_out_is_written_in_place(torch):
    q, k, v = (torch.from_numpy(x.astype(np.float32)) for x in host_qkv(5))
    out = torch.full(tuple(q.shape), float("nan"))
    assert cuflash.attention(q, k, v, out=out) is out
    assert not out.isnan().any()
    torch.testing.assert_close(out, cuflash.attention(q, k, v), rtol=0, atol=0)


def test_torch_bfloat16_is_refused_on_the_cpu(torch):
    q, k, v = (torch.from_numpy(x).to(torch.bfloat16) for x in host_qkv())
    with pytest.raises(TypeError, match="q: dtype bfloat16 is not supported on the CPU"):
        cuflash.attention(q, k, v)


# ---- JAX -------------------------------------------------------------------------------------


@pytest.fixture
def jax():
    """JAX with its CPU backend as the default device: these tests are about host arrays, also on
    a machine whose JAX defaults to a GPU (where jnp.asarray would land on the GPU)."""
    jax = pytest.importorskip("jax", reason="jax is not installed")
    with jax.default_device(jax.devices("cpu")[0]):
        yield jax


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_jax_in_jax_out(jax, dtype):
    jnp = jax.numpy
    q, k, v = (jnp.asarray(x.astype(dtype)) for x in host_qkv(6))
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    assert isinstance(out, jax.Array) and isinstance(lse, jax.Array)
    assert out.dtype == jnp.dtype(dtype) and out.shape == q.shape
    assert lse.dtype == jnp.float32 and lse.shape == (B, HQ, SQ)
    assert {d.platform for d in out.devices()} == {"cpu"}
    ref = reference.attention(np.asarray(q), np.asarray(k), np.asarray(v), causal=True)
    np.testing.assert_allclose(np.asarray(out, dtype=np.float64), ref,
                               atol=1e-5 if dtype == "float32" else 5e-3)


def test_jax_backward_returns_jax(jax):
    jnp = jax.numpy
    q, k, v = (jnp.asarray(x.astype(np.float32)) for x in host_qkv(7))
    out, lse = cuflash.attention(q, k, v, return_lse=True)
    dout = jnp.asarray(rand(*q.shape, seed=8).astype(np.float32))
    grads = cuflash.attention_backward(dout, q, k, v, out, lse)
    for g, x in zip(grads, (q, k, v), strict=True):
        assert isinstance(g, jax.Array) and g.dtype == x.dtype and g.shape == x.shape


def test_jax_input_is_viewed_without_a_copy(jax):
    q = jax.numpy.asarray(rand(B, SQ, HQ, D).astype(np.float32))
    view = _interop.to_backend(q, _interop.source_of(q, "q"))
    assert address(view) == q.unsafe_buffer_pointer()
    assert not view.flags.writeable  # a view of an immutable buffer, and cuflash never writes it


def test_jax_refuses_out(jax):
    q, k, v = (jax.numpy.asarray(x.astype(np.float32)) for x in host_qkv())
    with pytest.raises(TypeError, match="out: JAX arrays are immutable"):
        cuflash.attention(q, k, v, out=q)


def test_jax_mixed_with_numpy_is_refused(jax):
    q, k, v = host_qkv()
    with pytest.raises(TypeError, match=r"k: expected the same framework and device as q "
                                        r"\(numpy on CPU\), got jax on CPU"):
        cuflash.attention(q, jax.numpy.asarray(k), v)


def test_torch_mixed_with_jax_is_refused(torch, jax):
    q, k, v = host_qkv()
    with pytest.raises(TypeError, match=r"v: .*\(torch on CPU\), got jax on CPU"):
        cuflash.attention(torch.from_numpy(q), torch.from_numpy(k), jax.numpy.asarray(v))


# ---- any other DLPack producer ---------------------------------------------------------------


class _Producer:
    """A minimal foreign array: only the DLPack protocol, shape and dtype."""

    def __init__(self, array: np.ndarray):
        self._array = array
        self.shape, self.dtype = array.shape, array.dtype

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


def test_other_dlpack_producer_is_viewed_and_answered_with_numpy():
    q, k, v = (x.astype(np.float32) for x in host_qkv(9))
    wrapped = [_Producer(x) for x in (q, k, v)]
    src = _interop.source_of(wrapped[0], "q")
    assert (src.framework, src.device) == ("dlpack", "cpu")
    assert address(_interop.to_backend(wrapped[0], src)) == address(q)
    out = cuflash.attention(*wrapped)
    assert type(out) is np.ndarray
    np.testing.assert_array_equal(out, cuflash.attention(q, k, v))
