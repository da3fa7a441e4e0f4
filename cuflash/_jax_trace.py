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

The score modifications' arrays (`ScoreArrays`: sinks, ALiBi slopes, a bias, a mask, a user
modification's aux arrays) travel beside q, k, v, traced like them, in a canonical form
(`_canonical`): the slopes ``(B, Hq)`` (``(Hq,)`` without a batch axis), the bias and the mask
4-D ``(1 or B, ...)`` (3-D without a batch axis), so that ``jax.vmap`` can fold them into the
batch as well; the aux arrays as they are (never mapped). The user's `cuflash.ScoreMod` and
`cuflash.MaskMod` are static: `Options.user` names them by their registry key.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap
from jax.extend.core import Primitive
from jax.interpreters import mlir

from cuflash import _checks, _core, _dtypes, _jax_gpu, _user_mods

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
    # a score_mod / mask_mod and its aux arrays' names: `_user_mods.register`'s key ("": none)
    user: str = ""
    dropout_p: float = 0.0  # its stream travels as `ScoreArrays.rng`

    def user_mods(self, aux: tuple = ()) -> dict:
        """``score_mod``, ``mask_mod`` and ``aux`` (a dict of `aux`, the arrays in the key's
        order) as `cuflash.attention` takes them; empty without a modification."""
        return _user_mods.registered(self.user, aux) if self.user else {}

    @property
    def reads_batch(self) -> bool:
        """Whether the result depends on the batch index ``b`` beyond the batch's own data (the
        user's C++ may read it; dropout's mask is drawn by it): folding a mapped axis into the
        batch, or splitting the batch, would change it."""
        if self.dropout_p:
            return True
        if not self.user:
            return False
        score_mod, mask_mod = _user_mods.mods_of(self.user)
        sources = (getattr(score_mod, "cuda", None), getattr(score_mod, "grad", None),
                   getattr(mask_mod, "cuda", None))
        return any(_user_mods.reads_index(text, "b") for text in sources if text)


# The arrays beside q, k, v that `cuflash.attention` takes by these names.
_SIDE = ("sinks", "alibi_slopes", "bias", "mask")


class ScoreArrays(NamedTuple):
    """The arrays of the score modifications a call takes beside q, k, v, each a JAX array or
    None (a pytree: None fields are no leaves). Field names are `cuflash.attention`'s keywords;
    `aux` is a tuple of a user modification's aux arrays, in `Options.user`'s order; `rng` is
    dropout's stream as uint32 words ``(seed_lo, seed_hi, offset_lo, offset_hi)``."""

    sinks: Any = None
    alibi_slopes: Any = None
    bias: Any = None
    mask: Any = None
    rng: Any = None
    aux: Any = None

    def given(self) -> tuple[str, ...]:
        """The names of the arrays given, in field order: each aux array as ``"aux:<i>"``."""
        names = [name for name in (*_SIDE, "rng") if getattr(self, name) is not None]
        return (*names, *(f"aux:{i}" for i in range(len(self.aux or ()))))

    def core_kwargs(self, options: Options, convert=lambda x: x) -> dict:
        """The arrays (each through `convert`), the user's modifications and dropout as
        `cuflash.attention`'s keywords (the stream's words read on the host)."""
        found = {name: convert(getattr(self, name)) for name in _SIDE
                 if getattr(self, name) is not None}
        if options.dropout_p:
            found |= {"dropout_p": options.dropout_p, "rng": stream_of(self.rng)}
        return found | options.user_mods(tuple(convert(x) for x in self.aux or ()))


def stream_of(words) -> tuple[int, int]:
    """``(seed, offset)`` of dropout's uint32 words (concrete)."""
    w = [int(x) for x in np.asarray(words, dtype=np.uint32)]
    return w[0] | w[1] << 32, w[2] | w[3] << 32


def _arrays(names: tuple[str, ...], arrays) -> ScoreArrays:
    """The `ScoreArrays` of flat `arrays` named as `ScoreArrays.given` names them."""
    given = dict(zip(names, arrays, strict=True))
    aux = tuple(given.pop(name) for name in names if name.startswith("aux:"))
    return ScoreArrays(**given, aux=aux or None)


NO_ARRAYS = ScoreArrays()


def validate(q, k, v, options: Options, mods: ScoreArrays = NO_ARRAYS) -> _core.Problem:
    """Validate traced q, k, v (and the score modifications' arrays) while tracing, as the eager
    API would; raise naming the argument.

    The stand-ins are zero-stride NumPy views of one element: they have the shapes (and, but for
    bfloat16, the dtypes) of the traced values and cost no memory; the sinks' and the slopes'
    are zeros (the core reads their values: finite), the mask's False.
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
    side = {}
    for name in mods.given():
        if name.startswith("aux:") or name == "rng":
            continue
        x = getattr(mods, name)
        if name in ("sinks", "alibi_slopes"):
            given = _dtypes.dtype_name(x.dtype)
            if given not in ("float32", "float64"):
                raise TypeError(f"{name}: expected dtype float32 or float64, got {given}")
            side[name] = np.zeros(x.shape, x.dtype)
        else:  # bias, mask: the core checks their dtypes on the stand-ins
            side[name] = np.broadcast_to(np.zeros((), x.dtype), x.shape)
    aux = tuple(np.broadcast_to(np.zeros((), x.dtype), x.shape) for x in mods.aux or ())
    problem = _core.validate(*(np.broadcast_to(np.empty((), stand_in), x.shape) for x in (q, k, v)),
                           causal=options.causal, window=options.window, scale=options.scale,
                           layout=options.layout, softcap=options.softcap, **side,
                           **options.user_mods(aux), dropout_p=options.dropout_p,
                           rng=(0, 0) if options.dropout_p else None)
    return dataclasses.replace(problem, dtype=dtype)


def _canonical(mods: ScoreArrays, problem: _core.Problem) -> ScoreArrays:
    """`mods` as the platforms and `_folding_vmap` take them: the sinks in the Accum dtype; the
    slopes ``(B, Hq)`` (``(Hq,)`` for a problem without a batch axis), in their dtype; the bias
    and the mask 4-D (leading axes of size 1 added), the first axis 1 or B (3-D, without it, for
    a problem without a batch axis). Idempotent."""
    found = {}
    if mods.sinks is not None:
        found["sinks"] = mods.sinks.astype(_jax_gpu.accum_dtype(problem.dtype))
    if mods.alibi_slopes is not None:
        slopes = mods.alibi_slopes
        found["alibi_slopes"] = (jnp.broadcast_to(slopes, (problem.batch, problem.heads_q))
                                 if problem.batched else slopes.reshape(problem.heads_q))
    for name in ("bias", "mask"):
        x = getattr(mods, name)
        if x is not None:
            x = x.reshape((1,) * (4 - x.ndim) + x.shape)
            found[name] = x if problem.batched else x[0]
    return ScoreArrays(**found, rng=mods.rng, aux=mods.aux)


def _flat(mods: ScoreArrays) -> tuple[tuple[str, ...], tuple]:
    """The names of the arrays `mods` gives and the arrays, in field order (`_arrays` undoes
    it)."""
    names = mods.given()
    return names, (*(getattr(mods, name) for name in names if not name.startswith("aux:")),
                   *(mods.aux or ()))


def _float_dtype(dtype) -> np.dtype:
    """A bias's dtype as the CPU path forms its gradient: float16 in float32, else its own."""
    return np.promote_types(dtype, np.float32)


def forward(q, k, v, options: Options, mods: ScoreArrays = NO_ARRAYS):
    """``(out, lse)`` of traced q, k, v (with the score modifications' arrays `mods`); lse in
    `_jax_gpu.accum_dtype` (float64 for float64)."""
    problem = validate(q, k, v, options, mods)
    accum = _jax_gpu.accum_dtype(problem.dtype)
    result = (jax.ShapeDtypeStruct(problem.out_shape(), q.dtype),
              jax.ShapeDtypeStruct(problem.lse_shape(), accum))
    names, side = _flat(_canonical(mods, problem))
    arrays = (q, k, v, *side)

    def on_platform(*arrays):
        return jax.lax.platform_dependent(
            *arrays,
            cpu=functools.partial(_cpu_forward, options=options, names=names,
                                  out_shape=problem.out_shape(), lse_shape=problem.lse_shape()),
            cuda=functools.partial(_cuda_branch, functools.partial(_jax_gpu.forward, names=names),
                                   result, problem=problem),
            default=functools.partial(_refuse, result))

    axes = varying_axes(*arrays)
    again = functools.partial(_forward_jit, options=options)
    outs = _folding_vmap(on_platform, again, leading=3, names=names,
                         reads_batch=options.reads_batch)(*arrays)
    return tuple(vary(x, axes) for x in outs)


def backward(dout, q, k, v, out, lse, options: Options, mods: ScoreArrays = NO_ARRAYS,
             dbias: bool = False):
    """``(dq, dk, dv)`` of traced arrays, then ``dsinks`` (in the Accum dtype) where `mods` has
    sinks, then with `dbias` the bias's gradient (shaped and typed like the bias); `lse` as
    `forward` returns it (or float32, as the eager path does: then float64 inputs recompute
    theirs). The slopes and the mask get no gradient.

    The platform's backward gives the sinks' and the bias's gradients per batch element (so that
    ``jax.vmap`` folds them like the others); they are summed here."""
    problem = validate(q, k, v, options, mods)
    accum = _jax_gpu.accum_dtype(problem.dtype)
    if lse.dtype != accum:
        lse = forward(q, k, v, options, mods)[1]
    dq, dk, dv, *rest = _kernel_backward(dout, q, k, v, out, lse, options, mods, dbias=dbias)
    grads = [dq, dk, dv]
    if mods.sinks is not None:
        dsinks = rest.pop(0)
        grads.append(dsinks.sum(axis=0) if problem.batched else dsinks)
    if dbias:
        per_element = rest.pop(0)
        if problem.batched and _canonical(mods, problem).bias.shape[0] == 1:
            per_element = per_element.sum(axis=0, keepdims=True)
        grads.append(per_element.reshape(mods.bias.shape).astype(mods.bias.dtype))
    return tuple(grads)


def _kernel_backward(dout, q, k, v, out, lse, options: Options, mods: ScoreArrays = NO_ARRAYS,
                     dbias: bool = False):
    """``(dq, dk, dv)``, then, with sinks (in the Accum dtype, as lse), their gradient per
    batch element ``(B, Hq)`` (``(Hq,)`` unbatched), then with `dbias` the bias's gradient per
    batch element (the canonical bias's shape with B first; as it is unbatched), float32
    (float64 for a float64 bias): the platform's backward."""
    problem = validate(q, k, v, options, mods)
    if dbias and mods.bias is None:
        raise ValueError("dbias: True needs a bias (the gradient of which bias?)")
    canonical = _canonical(mods, problem)
    names, side = _flat(canonical)
    result = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    if canonical.sinks is not None:
        result += (jax.ShapeDtypeStruct(lse.shape[:-1], lse.dtype),)
    if dbias:
        shape = canonical.bias.shape
        result += (jax.ShapeDtypeStruct((problem.batch, *shape[1:]) if problem.batched else shape,
                                        _float_dtype(canonical.bias.dtype)),)
    arrays = (dout, q, k, v, out, lse, *side)

    def on_platform(*arrays):
        return jax.lax.platform_dependent(
            *arrays,
            cpu=functools.partial(_cpu_backward, options=options, names=names, dbias=dbias),
            cuda=functools.partial(_cuda_branch, functools.partial(
                _gpu_backward, names=names, dbias=dbias, result=result), result,
                problem=problem),
            default=functools.partial(_refuse, result))

    axes = varying_axes(*arrays)
    again = functools.partial(_kernel_backward_jit, options=options, dbias=dbias)
    grads = _folding_vmap(on_platform, again, leading=6, names=names,
                          reads_batch=options.reads_batch)(*arrays)
    return tuple(vary(g, axes) for g in grads)


def _gpu_backward(dout, q, k, v, out, lse, *side, problem: _core.Problem,
                  names: tuple[str, ...], dbias: bool = False, result: tuple = ()):
    """The kernels' backward, which reads the sinks only through lse (Accum, exact for
    float64 too); their gradient per batch element from it and ``delta = rowsum(dout * out)``:
    ``dsinks[b, h] = -sum over rows of exp(sinks[h] - lse) * delta``. The slopes, the bias and
    the mask go to the kernels; with `dbias` they also write dS ``(B, Hq, Sk, Sq)``, summed here
    over the bias's broadcast axes but the batch (`result`'s last entry: its shape and dtype)."""
    given = dict(zip(names, side, strict=True))
    sinks = given.pop("sinks", None)
    dq, dk, dv, *full = _jax_gpu.backward(dout, q, k, v, out, lse, *given.values(),
                                          problem=problem, names=tuple(given), dbias=dbias)
    grads = (dq, dk, dv)
    if sinks is not None:
        delta = jnp.sum(dout.astype(lse.dtype) * out.astype(lse.dtype), axis=-1)  # caller's
        if problem.layout == "bshd":
            delta = jnp.swapaxes(delta, -1, -2)  # (..., S, H) -> (..., H, S), lse's order
        grads += (-jnp.sum(jnp.exp(sinks[:, None] - lse) * delta, axis=-1),)
    if dbias:
        per_element = jnp.swapaxes(full[0], -1, -2)  # (B, Hq, Sq, Sk)
        if not problem.batched:
            per_element = per_element[0]
        target = result[-1]
        axes = tuple(a for a in range(1 if problem.batched else 0, per_element.ndim)
                     if target.shape[a] == 1 and per_element.shape[a] != 1)
        if axes:
            per_element = jnp.sum(per_element, axis=axes, keepdims=True)
        grads += (per_element.astype(target.dtype),)
    return grads


_forward_jit = jax.jit(forward, static_argnames="options")
_kernel_backward_jit = jax.jit(_kernel_backward, static_argnames=("options", "dbias"))


# ---- vmap: the mapped axis joins the batch -----------------------------------------------------


def _folding_vmap(body, again, leading: int, names: tuple[str, ...], reads_batch: bool = False):
    """`body` as a ``custom_vmap`` whose rule folds the mapped axis into the batch and calls
    ``again(*folded, mods=ScoreArrays(...))`` (which plans for the folded shapes).

    The first `leading` arrays `body` takes, and every array it returns, lead with the problem's
    batch axis, or have none (3-D q: then the mapped axis becomes the batch). Unmapped arrays are
    broadcast along the mapped axis first. After them come the score modifications' arrays
    named by `names`, in `_canonical` form: the slopes lead with the batch axis as q does; the
    bias and the mask lead with 1 or B (a mapped one is broadcast over the batch, an unmapped
    one of B repeated over the mapped axis, one of 1 left as it is); the sinks, one set for the
    whole batch, are never mapped; nor are a user modification's aux arrays, and one whose C++
    reads the batch index ``b`` (`reads_batch`) is not folded at all.
    """
    fn = custom_vmap(body)

    @fn.def_vmap
    def rule(axis_size: int, in_batched, *arrays):
        side = dict(zip(names, arrays[leading:], strict=True))
        mapped = dict(zip(names, in_batched[leading:], strict=True))
        if mapped.get("sinks"):
            raise NotImplementedError("sinks: cuflash.jax takes one set of sinks for the "
                                      "whole batch; under jax.vmap they must not be mapped")
        if mapped.get("rng"):
            raise NotImplementedError("rng: cuflash.jax takes one dropout stream for the whole "
                                      "batch; under jax.vmap it must not be mapped")
        if any(is_mapped for name, is_mapped in mapped.items() if name.startswith("aux:")):
            raise NotImplementedError("aux: a score_mod's / mask_mod's aux arrays must not be "
                                      "mapped by jax.vmap (the modification indexes them itself)")
        if reads_batch:
            raise NotImplementedError(
                "score_mod / mask_mod / dropout_p: under jax.vmap the mapped axis would join "
                "the batch and change the batch index b that your C++ reads or that dropout's "
                "mask is drawn by; fold the axis into the batch yourself")

        def spread(x, is_mapped):  # an unmapped array broadcast along the mapped axis
            return x if is_mapped else jnp.broadcast_to(x, (axis_size, *x.shape))

        core = [spread(x, m) for x, m in zip(arrays[:leading], in_batched[:leading],
                                              strict=True)]
        if "alibi_slopes" in side:
            side["alibi_slopes"] = spread(side["alibi_slopes"], mapped["alibi_slopes"])
        batched = core[0].ndim == 5  # (mapped, B, ...) q or dout; else (mapped, S, H, D)
        if not batched:
            # The mapped axis becomes the batch: mapped arrays lead with it; unmapped 3-D bias
            # and mask broadcast over it as they are.
            outs = tuple(again(*core, mods=_arrays(tuple(side), tuple(side.values()))))
            return outs, (True,) * len(outs)
        batch = core[0].shape[1]

        def fold(x):  # (mapped, B, ...) -> (mapped * B, ...)
            return x.reshape(axis_size * batch, *x.shape[2:])

        if "alibi_slopes" in side:
            side["alibi_slopes"] = fold(side["alibi_slopes"])
        for name in ("bias", "mask"):
            x = side.get(name)
            if x is None:
                continue
            if mapped[name]:
                side[name] = fold(jnp.broadcast_to(x, (axis_size, batch, *x.shape[2:])))
            elif x.shape[0] != 1:
                side[name] = fold(jnp.broadcast_to(x, (axis_size, *x.shape)))
        outs = again(*(fold(x) for x in core), mods=_arrays(tuple(side), tuple(side.values())))
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


def _cpu_forward(q, k, v, *side, options: Options, names: tuple[str, ...],
                 out_shape: tuple[int, ...], lse_shape: tuple[int, ...]):
    compute = _CPU_COMPUTE.get(_dtypes.dtype_name(q.dtype), q.dtype)
    result = (jax.ShapeDtypeStruct(out_shape, compute), jax.ShapeDtypeStruct(lse_shape, np.float32))

    def forward(q, k, v, *side):
        return _core.attention(q, k, v, causal=options.causal, window=options.window,
                             scale=options.scale, softcap=options.softcap, layout=options.layout,
                             return_lse=True, **_arrays(names, side).core_kwargs(options))

    out, lse = _host_call(forward, result, *(x.astype(compute) for x in (q, k, v)), *side)
    return out.astype(q.dtype), lse.astype(_jax_gpu.accum_dtype(_dtypes.dtype_name(q.dtype)))


def _cpu_backward(dout, q, k, v, out, lse, *side, options: Options, names: tuple[str, ...],
                  dbias: bool):
    compute = _CPU_COMPUTE.get(_dtypes.dtype_name(q.dtype), q.dtype)
    given = dict(zip(names, side, strict=True))
    result = tuple(jax.ShapeDtypeStruct(x.shape, compute) for x in (q, k, v))
    if "sinks" in given:
        result += (jax.ShapeDtypeStruct(lse.shape[:-1], given["sinks"].dtype),)
    if dbias:
        # float16 biases give a float32 gradient (cast back once summed, in `backward`)
        given["bias"] = given["bias"].astype(_float_dtype(given["bias"].dtype))
        shape = given["bias"].shape
        result += (jax.ShapeDtypeStruct((q.shape[0], *shape[1:]) if q.ndim == 4 else shape,
                                        given["bias"].dtype),)
    names = tuple(given)
    call = functools.partial(_core.attention_backward, causal=options.causal,
                             window=options.window, scale=options.scale,
                             softcap=options.softcap, layout=options.layout)
    wants = {"return_dsinks": "sinks" in given, "return_dbias": dbias}

    def backward(dout, q, k, v, out, lse, *side):
        mods = dict(zip(names, side, strict=True))
        whole = _arrays(names, side).core_kwargs(options)
        if not any(wants.values()):
            return call(dout, q, k, v, out, lse, **whole)
        if q.ndim == 3:  # unbatched: the gradients have no batch axis either
            return call(dout, q, k, v, out, lse, **whole, **wants)
        if options.reads_batch:
            # The user's C++ reads b, or dropout draws by it: one call, its totals put on batch
            # element 0 (the caller sums them over the batch; no vmap folds such a call).
            return _on_element_zero(call(dout, q, k, v, out, lse, **whole, **wants), result)
        # One call per batch element: the sinks' and the bias's gradients per element (float64
        # exact: the CPU path recomputes its statistics rather than reading the float32 lse).
        parts = [call(*(x[b:b + 1] for x in (dout, q, k, v, out, lse)),
                      **_arrays(names, [_batch_element(name, x, b) for name, x in mods.items()])
                      .core_kwargs(options), **wants)
                 for b in range(q.shape[0])]
        grads = [np.concatenate([p[i] for p in parts]) for i in range(3)]
        if wants["return_dsinks"]:
            grads.append(np.stack([p[3] for p in parts]))
        if dbias:
            grads.append(np.concatenate([p[-1] for p in parts]))
        return tuple(grads)

    # The CPU path recomputes the row statistics (from the sinks too) and only validates lse,
    # which it wants float32.
    arrays = (*(x.astype(compute) for x in (dout, q, k, v, out)), lse.astype(np.float32))
    grads = _host_call(backward, result, *arrays, *given.values())
    return (*(g.astype(x.dtype) for g, x in zip(grads[:3], (q, k, v), strict=True)), *grads[3:])


def _batch_element(name: str, x: np.ndarray, b: int) -> np.ndarray:
    """What batch element `b` of a batched call takes of the (canonical) array `name`."""
    if name in ("sinks", "rng") or name.startswith("aux:") or (
            name in ("bias", "mask") and x.shape[0] == 1):
        return x  # one for the whole batch
    return x[b:b + 1]


def _on_element_zero(grads: tuple, result: tuple) -> tuple:
    """A batched backward's dq, dk, dv as they are, then the sinks' and the bias's gradients
    (`result`'s shapes: per batch element) as their totals on element 0 and zeros elsewhere,
    where the whole batch's gradient came summed (a bias of one batch element: ``(1, ...)``)."""
    found = list(grads[:3])
    for grad, want in zip(grads[3:], result[3:], strict=True):
        if grad.shape == want.shape:
            found.append(grad)
            continue
        spread = np.zeros(want.shape, want.dtype)
        spread[0] = np.reshape(grad, want.shape[1:])
        found.append(spread)
    return tuple(found)


def _host_call(fn, result, *arrays):
    def on_host(*host_arrays):
        return fn(*(np.asarray(x) for x in host_arrays))

    return jax.pure_callback(on_host, result, *arrays, vmap_method="sequential")


def _cuda_branch(launch, result, *arrays, problem: _core.Problem, why: str | None = None):
    """`launch` (a `_jax_gpu` function) where this process can plan CUDA launches and the
    kernels compute the problem; elsewhere the branch is never compiled (no GPU to run it, or
    no kernel for it: `why`, or a softcap with ALiBi, a bias or a mask),
    and a stand-in that says why fills it, raising when XLA lowers it for CUDA."""
    reason = _jax_gpu.unusable_reason()
    if reason is not None:
        return _refuse(result, *arrays, why=f"cannot compile for CUDA in this process: {reason}")
    why = (why or _capped_mods_on_cuda(problem) or _user_mods_on_cuda(problem)
           or _dropout_on_cuda(problem))
    if why is not None:
        return _refuse(result, *arrays, why=why)
    return launch(*arrays, problem=problem)


def _capped_mods_on_cuda(problem: _core.Problem) -> str | None:
    """Why the kernels do not compute `problem`'s score modifications together (None: they
    do), as `cuflash.attention` says it for CUDA inputs."""
    variant = problem.variant
    try:
        _checks.refuse_capped_mods_on_cuda(variant.softcap, variant.alibi, variant.bias,
                                           variant.mask_array, "inputs compiled for CUDA")
    except NotImplementedError as err:
        return str(err)
    return None


def _dropout_on_cuda(problem: _core.Problem) -> str | None:
    """Why a call with dropout is not compiled for CUDA (None without dropout)."""
    if not problem.dropout_p:
        return None
    return "dropout_p: the CUDA kernels do not apply dropout yet (the CPU backend does)"


def _user_mods_on_cuda(problem: _core.Problem) -> str | None:
    """Why a call with a score_mod / mask_mod is not compiled for CUDA under jit (None without
    one)."""
    if problem.variant.user is None:
        return None
    return ("score_mod / mask_mod: not compiled into jitted CUDA code yet (the kernels take them "
            "eagerly: call cuflash.jax.attention outside jax.jit, or jit for the CPU)")


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
