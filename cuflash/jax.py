"""JAX integration: :func:`attention` with a ``jax.custom_vjp`` backed by cuflash's own backward.

Where it runs:

- **Eager** (concrete arrays, including inside an eager ``jax.grad`` / ``jax.vjp``): q, k, v go
  through DLPack to the CUDA kernels (GPU arrays) or the NumPy path (CPU arrays), without a copy,
  and the results come back as JAX arrays on the same device.
- **Under jax.jit (or vmap, scan, ...) on the CPU backend**: works. The forward and the backward
  are ``jax.pure_callback`` calls into the CPU path; XLA hands them the host buffers. Shape and
  dtype errors are raised while tracing.
- **Under jax.jit on a GPU (or any non-CPU backend)**: a clear error when the compiled function
  runs (a ``JaxRuntimeError`` whose message starts with "cuflash.jax.attention cannot run inside
  jax.jit on a GPU"). XLA can call back into Python only on the host, so the only way to run there
  would be to copy q, k, v to the host and compute attention with NumPy, orders of magnitude slower
  than the kernel; cuflash refuses rather than hide that cliff. Call it outside ``jax.jit`` (eager
  arrays, eager ``jax.grad``) to use the CUDA kernels. The backend is chosen per compiled function
  with ``jax.lax.platform_dependent``, so a function jitted onto the CPU of a GPU machine works.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cuflash import _dtypes, _interop, _variant, api

__all__ = ["attention"]

_GPU_JIT_ERROR = (
    "cuflash.jax.attention cannot run inside jax.jit on a GPU (nor in other traced code such "
    "as vmap or scan, nor on any non-CPU backend): XLA can call back into Python only on the "
    "host, which would copy q, k, v to the CPU and compute attention there. Call "
    "cuflash.jax.attention outside jax.jit (eager arrays and eager jax.grad use the CUDA "
    "kernels), or jit the function onto the CPU."
)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
              window: tuple[int, int] | None = None, scale: float | None = None,
              layout: str = "bshd") -> jax.Array:
    """Exact attention for JAX arrays, differentiable with respect to q, k and v.

    Args:
        q: queries, ``(B, Sq, Hq, D)`` for layout ``"bshd"`` or ``(B, Hq, Sq, D)`` for ``"bhsd"``;
            a 3-D array (no batch axis) is accepted in either layout.
        k: keys, ``(B, Sk, Hkv, D)`` (``"bhsd"``: ``(B, Hkv, Sk, D)``), ``Hq % Hkv == 0``.
        v: values, shaped like `k`.
        causal: bottom-right aligned causal mask (query i sees key j iff ``j <= i + Sk - Sq``).
        window: sliding window ``(left, right)``, -1 unbounded, as for :func:`cuflash.attention`.
        scale: softmax scale, a Python number > 0; defaults to ``1 / sqrt(D)``.
        layout: ``"bshd"`` or ``"bhsd"``.

    `causal`, `window`, `scale` and `layout` are static (not differentiated, not traced).

    Returns:
        the attention output, shaped like q, same dtype and device.

    dtypes: eager on a GPU float16, bfloat16, float32, float64; on the CPU (eager, or under
    ``jax.jit``) float16 (computed in float32), float32, float64 (with ``jax_enable_x64``).
    Under ``jax.jit`` this runs on the CPU backend only; on a GPU it raises when the compiled
    function runs: see the module docstring.

    See also: `cuflash.attention` (any framework, no autodiff), `cuflash.attention_backward`.
    """
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    window = _variant.check_window(window)  # a hashable pair: custom_vjp's static arguments
    return _attention(q, k, v, causal, window, scale, layout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _attention(q, k, v, causal, window, scale, layout):
    return _forward(q, k, v, causal, window, scale, layout)[0]


def _attention_fwd(q, k, v, causal, window, scale, layout):
    out, lse = _forward(q, k, v, causal, window, scale, layout)
    return out, (q, k, v, out, lse)


def _attention_bwd(causal, window, scale, layout, residuals, dout):
    q, k, v, out, lse = residuals
    backward = functools.partial(api.attention_backward, causal=causal, window=window,
                                 scale=scale, layout=layout)
    if _concrete(dout, *residuals):
        return _eager_backward(backward, dout, q, k, v, out, lse)
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    return _host_call(backward, shapes, dout, q, k, v, out, lse)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _forward(q, k, v, causal, window, scale, layout):
    """``(out, lse)``: the core on concrete arrays, else a host callback into the CPU path."""
    forward = functools.partial(api.attention, causal=causal, window=window, scale=scale,
                                layout=layout, return_lse=True)
    if _concrete(q, k, v):
        return forward(q, k, v)
    problem = _validate_traced(q, k, v, causal, window, scale, layout)
    shapes = (jax.ShapeDtypeStruct(q.shape, q.dtype),
              jax.ShapeDtypeStruct(problem.lse_shape(), np.float32))
    return _host_call(forward, shapes, q, k, v)


def _eager_backward(backward, *arrays):
    """`backward` on the NumPy / CuPy views of concrete JAX arrays; JAX gradients back.

    api.attention_backward rejects JAX arrays: it validates the forward output it is handed with
    the check meant for ``attention(out=...)``, which refuses JAX arrays as immutable. So the
    arrays go in as the backend views the core would make of them anyway; once that check is
    limited to ``out=``, this can call `backward` on the JAX arrays directly.
    """
    src = _interop.source_of(arrays[1], "q")
    with _interop.stream_scope(src):
        views = [_interop.to_backend(x, src) for x in arrays]
        return tuple(_interop.from_backend(None, g, src) for g in backward(*views))


def _concrete(*arrays) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in arrays)


def _validate_traced(q, k, v, causal, window, scale, layout) -> api.Problem:
    """Validate traced q, k, v at trace time, as the CPU path will see them in the callback.

    The stand-ins are zero-stride NumPy views of one element: they have the shapes and dtypes of
    the traced values and cost no memory.
    """
    dtype = _dtypes.dtype_name(q.dtype)
    if dtype not in _dtypes.CPU_DTYPES:
        raise TypeError(f"q: dtype {dtype} is not supported by cuflash.jax.attention under jax.jit "
                        f"(it runs the CPU path there); expected one of "
                        f"{', '.join(_dtypes.CPU_DTYPES)}. On a GPU call it outside jax.jit")
    stand_ins = (np.broadcast_to(np.empty((), dtype=x.dtype), x.shape) for x in (q, k, v))
    return api.validate(*stand_ins, causal=causal, window=window, scale=scale, layout=layout)


def _host_call(fn, result_shapes, *arrays):
    """``fn(*arrays)`` under a trace: a host callback on the CPU backend, an error on others."""

    def on_host(*host_arrays):
        return fn(*(np.asarray(x) for x in host_arrays))

    def cpu(*xs):
        return jax.pure_callback(on_host, result_shapes, *xs, vmap_method="sequential")

    def other(*xs):
        return jax.pure_callback(_refuse, result_shapes, *xs, vmap_method="sequential")

    return jax.lax.platform_dependent(*arrays, cpu=cpu, default=other)


def _refuse(*_):
    raise NotImplementedError(_GPU_JIT_ERROR)
