"""cuflash.jax on traced arrays: one forward and one backward for every platform and transform.

Each is staged as ``jax.lax.platform_dependent`` over three branches, of which XLA compiles only
the one for the platform it compiles for:

- ``cpu``: a ``jax.pure_callback`` into cuflash's NumPy path (float16 and bfloat16 computed in
  float32);
- ``cuda``: the CUDA kernels as XLA buffer callbacks, planned while tracing (`_jax_gpu`);
- anything else: a stand-in that fails, naming the platform, when XLA lowers it (so before
  anything runs).

Under ``jax.vmap`` the mapped axis is folded into the batch (one launch for the whole stack; an
unmapped operand is broadcast first). Inside ``shard_map`` the results vary over the mesh axes
their operands vary over (callbacks know nothing of meshes, so their results are marked).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.extend.core import Primitive
from jax.interpreters import mlir

from cuflash import _checks, _dtypes, _jax_gpu, api

# What a traced call takes: every dtype some platform computes.
DTYPES = ("float16", "bfloat16", "float32", "float64")
# The CPU path's compute dtype for what it does not take as is (validation reads shapes alike).
_CPU_COMPUTE = {"bfloat16": np.dtype(np.float32)}


@dataclasses.dataclass(frozen=True)
class Options:
    """The static arguments of a call (hashable: custom_vjp's and jit's static arguments)."""

    causal: bool
    window: tuple[int, int]
    scale: float | None
    layout: str
    softcap: float = 0.0


def validate(q, k, v, options: Options, sinks=None) -> api.Problem:
    """Validate traced q, k, v (and sinks) while tracing, as the eager API would; raise naming
    the argument.

    The stand-ins are zero-stride NumPy views of one element: they have the shapes (and, but for
    bfloat16, the dtypes) of the traced values and cost no memory; the sinks' are zeros.
    """
    dtype = _dtypes.dtype_name(q.dtype)
    if dtype not in DTYPES:
        raise TypeError(f"q: dtype {dtype} is not supported by cuflash.jax; expected one of "
                        f"{', '.join(DTYPES)}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {dtype} (the dtype of q), "
                            f"got {_dtypes.dtype_name(x.dtype)}")
    stand_in = _CPU_COMPUTE.get(dtype, q.dtype)
    sink_stand_in = None
    if sinks is not None:
        sink_dtype = _dtypes.dtype_name(sinks.dtype)
        if sink_dtype not in ("float32", "float64"):
            raise TypeError(f"sinks: expected dtype float32 or float64, got {sink_dtype}")
        sink_stand_in = np.zeros(sinks.shape, sinks.dtype)
    problem = api.validate(*(np.broadcast_to(np.empty((), stand_in), x.shape) for x in (q, k, v)),
                           causal=options.causal, window=options.window, scale=options.scale,
                           layout=options.layout, softcap=options.softcap, sinks=sink_stand_in)
    return dataclasses.replace(problem, dtype=dtype)


def forward(q, k, v, options: Options, sinks=None):
    """``(out, lse)`` of traced q, k, v (with `sinks`, one logit per query head); lse in
    `_jax_gpu.accum_dtype` (float64 for float64)."""
    problem = validate(q, k, v, options, sinks)
    accum = _jax_gpu.accum_dtype(problem.dtype)
    result = (jax.ShapeDtypeStruct(problem.out_shape(), q.dtype),
              jax.ShapeDtypeStruct(problem.lse_shape(), accum))
    arrays = (q, k, v) if sinks is None else (q, k, v, sinks.astype(accum))

    def on_platform(*arrays):
        return jax.lax.platform_dependent(
            *arrays,
            cpu=functools.partial(_cpu_forward, options=options, out_shape=problem.out_shape(),
                                  lse_shape=problem.lse_shape()),
            cuda=functools.partial(_cuda_branch, _jax_gpu.forward, result, problem=problem),
            default=functools.partial(_refuse, result))

    axes = varying_axes(*arrays)
    outs = _folding_vmap(on_platform, _forward_jit, options, leading=3)(*arrays)
    return tuple(vary(x, axes) for x in outs)


def backward(dout, q, k, v, out, lse, options: Options, sinks=None):
    """``(dq, dk, dv)`` of traced arrays, and ``dsinks`` (in the Accum dtype) with `sinks`;
    `lse` as `forward` returns it (or float32, as the eager path does: then float64 inputs
    recompute theirs).

    The platform's backward gives the sinks' gradient per batch element (so that ``jax.vmap``
    folds it like the others); it is summed here."""
    problem = validate(q, k, v, options, sinks)
    accum = _jax_gpu.accum_dtype(problem.dtype)
    if lse.dtype != accum:
        lse = forward(q, k, v, options, sinks=sinks)[1]
    if sinks is None:
        return _kernel_backward(dout, q, k, v, out, lse, options)
    dq, dk, dv, dsinks = _kernel_backward(dout, q, k, v, out, lse, options,
                                          sinks=sinks.astype(accum))
    return dq, dk, dv, dsinks.sum(axis=0) if problem.batched else dsinks


def _kernel_backward(dout, q, k, v, out, lse, options: Options, sinks=None):
    """``(dq, dk, dv)`` and, with `sinks` (in the Accum dtype, as lse), their gradient per
    batch element ``(B, Hq)`` (``(Hq,)`` unbatched): the platform's backward."""
    problem = validate(q, k, v, options, sinks)
    result = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    arrays = (dout, q, k, v, out, lse)
    if sinks is not None:
        arrays += (sinks,)
        result += (jax.ShapeDtypeStruct(lse.shape[:-1], lse.dtype),)

    def on_platform(*arrays):
        return jax.lax.platform_dependent(
            *arrays,
            cpu=functools.partial(_cpu_backward, options=options),
            cuda=functools.partial(_cuda_branch, _gpu_backward, result, problem=problem),
            default=functools.partial(_refuse, result))

    axes = varying_axes(*arrays)
    grads = _folding_vmap(on_platform, _kernel_backward_jit, options, leading=6)(*arrays)
    return tuple(vary(g, axes) for g in grads)


def _gpu_backward(dout, q, k, v, out, lse, *sinks, problem: api.Problem):
    """The kernels' backward, which reads the sinks only through lse (Accum, exact for
    float64 too); their gradient per batch element from it and ``delta = rowsum(dout * out)``:
    ``dsinks[b, h] = -sum over rows of exp(sinks[h] - lse) * delta``."""
    grads = _jax_gpu.backward(dout, q, k, v, out, lse, problem=problem)
    if not sinks:
        return grads
    delta = jnp.sum(dout.astype(lse.dtype) * out.astype(lse.dtype), axis=-1)  # caller's layout
    if problem.layout == "bshd":
        delta = jnp.swapaxes(delta, -1, -2)  # (..., S, H) -> (..., H, S), lse's order
    return (*grads, -jnp.sum(jnp.exp(sinks[0][:, None] - lse) * delta, axis=-1))


_forward_jit = jax.jit(forward, static_argnames="options")
_kernel_backward_jit = jax.jit(_kernel_backward, static_argnames="options")


# ---- vmap: the mapped axis joins the batch -----------------------------------------------------


def _folding_vmap(body, again, options: Options, leading: int):
    """`body` as a ``custom_vmap`` whose rule folds the mapped axis into the batch and calls
    ``again(*folded, options=options)`` (which plans for the folded shapes).

    The first `leading` arrays `body` takes, and every array it returns, lead with the problem's
    batch axis, or have none (3-D q: then the mapped axis becomes the batch). Unmapped arrays are
    broadcast along the mapped axis first. An array after them is the sinks ``(Hq,)``, shared by
    the whole batch: passed on as ``sinks=``, and never mapped.
    """
    fn = custom_vmap(body)

    @fn.def_vmap
    def rule(axis_size: int, in_batched, *arrays):
        shared = {}
        if len(arrays) > leading:
            if in_batched[leading]:
                raise NotImplementedError("sinks: cuflash.jax takes one set of sinks for the "
                                          "whole batch; under jax.vmap they must not be mapped")
            shared["sinks"] = arrays[leading]
        arrays = [x if mapped else jnp.broadcast_to(x, (axis_size, *x.shape))
                  for x, mapped in zip(arrays[:leading], in_batched[:leading], strict=True)]
        batched = arrays[0].ndim == 5  # (mapped, B, ...) q or dout; else (mapped, S, H, D)
        if not batched:
            outs = tuple(again(*arrays, options=options, **shared))
            return outs, (True,) * len(outs)
        batch = arrays[0].shape[1]
        outs = again(*(x.reshape(axis_size * batch, *x.shape[2:]) for x in arrays),
                     options=options, **shared)
        outs = tuple(y.reshape(axis_size, batch, *y.shape[1:]) for y in outs)
        return outs, (True,) * len(outs)

    return fn


# ---- shard_map: results vary where their operands do --------------------------------------------


def varying_axes(*arrays) -> frozenset:
    """The mesh axes (inside ``shard_map``) any of `arrays` varies over."""
    axes: frozenset = frozenset()
    for x in arrays:
        aval = jax.typeof(x)
        mat = getattr(aval, "mat", None)  # JAX 0.10 and later; before, aval.vma
        axes |= mat.varying if mat is not None else getattr(aval, "vma", frozenset())
    return axes


def vary(x, axes: frozenset):
    """`x` marked as varying over `axes` (a no-op outside ``shard_map``)."""
    missing = tuple(sorted(axes - varying_axes(x), key=str))
    if not missing:
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, missing, to="varying")
    return jax.lax.pvary(x, missing)  # JAX < 0.8.2


# ---- the branches ------------------------------------------------------------------------------


def _cpu_forward(q, k, v, *sinks, options: Options, out_shape: tuple[int, ...],
                 lse_shape: tuple[int, ...]):
    compute = _CPU_COMPUTE.get(_dtypes.dtype_name(q.dtype), q.dtype)
    result = (jax.ShapeDtypeStruct(out_shape, compute), jax.ShapeDtypeStruct(lse_shape, np.float32))

    def forward(q, k, v, *sinks):
        return api.attention(q, k, v, causal=options.causal, window=options.window,
                             scale=options.scale, softcap=options.softcap,
                             sinks=sinks[0] if sinks else None, layout=options.layout,
                             return_lse=True)

    out, lse = _host_call(forward, result, *(x.astype(compute) for x in (q, k, v)), *sinks)
    return out.astype(q.dtype), lse.astype(_jax_gpu.accum_dtype(_dtypes.dtype_name(q.dtype)))


def _cpu_backward(dout, q, k, v, out, lse, *sinks, options: Options):
    compute = _CPU_COMPUTE.get(_dtypes.dtype_name(q.dtype), q.dtype)
    result = tuple(jax.ShapeDtypeStruct(x.shape, compute) for x in (q, k, v))
    if sinks:
        result += (jax.ShapeDtypeStruct(lse.shape[:-1], sinks[0].dtype),)
    call = functools.partial(api.attention_backward, causal=options.causal,
                             window=options.window, scale=options.scale,
                             softcap=options.softcap, layout=options.layout)

    def backward(dout, q, k, v, out, lse, *sinks):
        if not sinks:
            return call(dout, q, k, v, out, lse)
        if q.ndim == 3:  # unbatched: the sinks' gradient has no batch axis either
            return call(dout, q, k, v, out, lse, sinks=sinks[0], return_dsinks=True)
        # One call per batch element: the sinks' gradient per element (float64 exact: the CPU
        # path recomputes its statistics rather than reading the float32 lse).
        parts = [call(*(x[b:b + 1] for x in (dout, q, k, v, out, lse)), sinks=sinks[0],
                      return_dsinks=True) for b in range(q.shape[0])]
        grads = [np.concatenate([p[i] for p in parts]) for i in range(3)]
        return (*grads, np.stack([p[3] for p in parts]))

    # The CPU path recomputes the row statistics (from the sinks too) and only validates lse,
    # which it wants float32.
    arrays = (*(x.astype(compute) for x in (dout, q, k, v, out)), lse.astype(np.float32))
    grads = _host_call(backward, result, *arrays, *sinks)
    return (*(g.astype(x.dtype) for g, x in zip(grads[:3], (q, k, v), strict=True)), *grads[3:])


def _host_call(fn, result, *arrays):
    def on_host(*host_arrays):
        return fn(*(np.asarray(x) for x in host_arrays))

    return jax.pure_callback(on_host, result, *arrays, vmap_method="sequential")


def _cuda_branch(launch, result, *arrays, problem: api.Problem):
    """`launch` (a `_jax_gpu` function) where this process can plan CUDA launches; elsewhere the
    branch is never compiled (no GPU to run it), and a stand-in that says why fills it."""
    reason = _jax_gpu.unusable_reason()
    if reason is not None:
        return _refuse(result, *arrays, why=f"cannot compile for CUDA in this process: {reason}")
    why = _checks.value_head_dim_on_cuda(problem.head_dim, problem.head_dim_v)
    if why is not None:
        return _refuse(result, *arrays, why=why)
    return launch(*arrays, problem=problem)


# ---- other platforms: refused when XLA lowers the function -------------------------------------

_refusal_p = Primitive("cuflash_refusal")
_refusal_p.multiple_results = True
_refusal_p.def_abstract_eval(lambda *arrays, result_avals, why: result_avals)


def _refusal_lowering(ctx, *arrays, result_avals, why: str):
    platforms = ", ".join(ctx.module_context.platforms)
    raise NotImplementedError(f"cuflash.jax {why} (compiling for {platforms})")


mlir.register_lowering(_refusal_p, _refusal_lowering)


def _refuse(result, *arrays, why: str = "runs on the CPU and on CUDA GPUs only"):
    """Stand-in results of `result`'s shapes and dtypes whose lowering raises, saying `why`."""
    avals = tuple(jax.core.ShapedArray(r.shape, r.dtype) for r in result)
    return tuple(_refusal_p.bind(*arrays, result_avals=avals, why=why))
