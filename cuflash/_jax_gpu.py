"""The CUDA kernels inside compiled JAX code: planned while tracing, launched by buffer callbacks.

Under ``jax.jit`` on a GPU, cuflash's forward and backward are ``jax.experimental.buffer_callback``
calls. While JAX traces, each is planned like a first eager call (`_launch.plan_forward`,
`_launch_bwd.plan_backward`), on stand-ins of the buffers XLA will pass: dense row-major arrays of
the traced shapes at 16-byte aligned addresses (XLA aligns every buffer it hands a custom call;
the callbacks check). So the kernels are compiled and loaded at trace time, once for each CUDA
device of the process (the compiled function may run on any of them, e.g. under ``shard_map``).
When XLA runs the callback, it gets XLA's device buffers and stream: it reads the buffers'
addresses and launches the planned `KernelCall`s on that stream. It allocates nothing, compiles
nothing and never synchronises; the backward's scratch (delta and the dq accumulator) is one more
output of its callback, so XLA allocates it and JAX's memory accounting sees it. That also makes
the callbacks safe to record into XLA's command buffers (CUDA graphs), which they declare.

The score modifications' arrays are buffers of the callbacks too: the sinks (Accum ``(Hq,)``),
the ALiBi slopes (an Accum ``(B, Hq)`` copy made in the compiled function) and the bias and the
mask in `_jax_trace`'s canonical shapes, dense, which the plans read as ``(B, Hq, Sq, Sk)`` with
stride 0 along every axis of extent 1 (as `cuflash.attention` broadcasts them on the device).
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np

from cuflash import _checks, _core
from cuflash.cuda import _launch, _launch_bwd
from cuflash.cuda._launch_common import MOD_POINTERS, NO_MODS, Mods

_ALIGNMENT = 16  # bytes: what the plans assume of every buffer's address


@functools.cache
def unusable_reason() -> str | None:
    """Why this process cannot plan CUDA launches for JAX (None when it can)."""
    try:
        import cupy
    except ImportError as err:
        return f"CuPy is not importable ({err}); install cuflash[cuda13] or cuflash[cuda12]"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # no driver, no device: CuPy raises its own runtime errors
        return f"CuPy sees no CUDA GPU ({type(err).__name__}: {err})"
    if count == 0:
        return "CuPy sees no CUDA GPU (device count 0)"
    try:
        from jax.experimental import buffer_callback  # noqa: F401
    except ImportError:
        return (f"jax {jax.__version__} has no jax.experimental.buffer_callback (it came in "
                f"JAX 0.6.1)")
    return None


def _devices() -> range:
    import cupy

    return range(cupy.cuda.runtime.getDeviceCount())


def accum_dtype(dtype: str) -> np.dtype:
    """The kernels' softmax-statistics dtype, in which lse is kept between forward and backward:
    float64 for float64 inputs (so their backward needs no second forward), else float32."""
    return _launch_bwd.accum_dtype(dtype)


def forward(q, k, v, *side, problem: _core.Problem, names: tuple[str, ...] = ()):
    """``(out, lse)`` of traced q, k, v (the caller's layout) and the score modifications'
    arrays `side`, named by `names` (`_jax_trace.ScoreArrays` fields, canonical: the sinks
    ``(Hq,)`` in `accum_dtype`); lse in `accum_dtype`."""
    from jax.experimental.buffer_callback import buffer_callback

    if problem.head_dim_v != problem.head_dim:  # through zero-padded copies (`_wide`)
        wide = _wide(problem)
        out, lse = forward(*(_padded(x, wide.head_dim) for x in (q, k, v)), *side,
                           problem=wide, names=names)
        return out[..., :problem.head_dim_v], lse
    _check_grid(problem)
    side = _slopes_as_kernels_read(side, names, problem)
    mods = _mod_placeholders(side, names, problem)
    plans = {device: _plan_forward(problem, device, "sinks" in names, mods)
             for device in _devices()}
    shapes = (jax.ShapeDtypeStruct(q.shape, q.dtype),
              jax.ShapeDtypeStruct(problem.lse_shape(), accum_dtype(problem.dtype)))
    # vmap is folded into the batch before it gets here (`_jax_trace`); "sequential" would be
    # right too: each call at the planned shapes.
    if problem.variant.reads_arrays:  # a null sinks pointer is no sinks
        order = _order(names, ("sinks", *_MOD_NAMES), True)
    else:
        order = _order(names, ("sinks",), "sinks" in names)
    launch = buffer_callback(_ForwardLaunch(plans, order), shapes, vmap_method="sequential",
                             command_buffer_compatible=True)
    return launch(q, k, v, *side)


def backward(dout, q, k, v, out, lse, *side, problem: _core.Problem, names: tuple[str, ...] = (),
             dbias: bool = False):
    """``(dq, dk, dv)`` of traced arrays; lse in `accum_dtype`, as `forward` returns it; `side`
    the slopes, the bias and the mask named by `names`, as `forward` takes them (the sinks
    reach the backward only through lse). With `dbias`, also the kernels' dS ``(B, Hq, Sk, Sq)``
    in `accum_dtype` (`BwdParams::dbias`, zeroed in the callback), the bias's gradient before
    its broadcast axes are summed."""
    from jax.experimental.buffer_callback import buffer_callback

    if problem.head_dim_v != problem.head_dim:  # through zero-padded copies (`_wide`)
        wide = _wide(problem)
        dq, dk, dv, *rest = backward(
            *(_padded(x, wide.head_dim) for x in (dout, q, k, v, out)), lse, *side,
            problem=wide, names=names, dbias=dbias)
        return (dq[..., :problem.head_dim], dk[..., :problem.head_dim],
                dv[..., :problem.head_dim_v], *rest)
    _check_grid(problem)
    side = _slopes_as_kernels_read(side, names, problem)
    mods = _mod_placeholders(side, names, problem)
    full = (problem.batch, problem.heads_q, problem.seqlen_k, problem.seqlen_q)
    if dbias:  # the plans route by it (D 64 to sm80, whose dQ kernel writes it)
        mods = dataclasses.replace(mods, dbias=_dense(full, accum_dtype(problem.dtype), True))
    plans = {device: _plan_backward(problem, device, mods) for device in _devices()}
    scratch = max((plan.scratch_bytes for plan in plans.values() if plan is not None),
                  default=0)
    shapes = (*(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)),
              jax.ShapeDtypeStruct((scratch,), np.uint8))
    if dbias:
        shapes += (jax.ShapeDtypeStruct(full, accum_dtype(problem.dtype)),)
    # BWD_MOD_POINTERS: the slopes, the bias, the mask, then dbias (the last output, or null)
    order = _order(names, (*_MOD_NAMES, "dbias"), problem.variant.reads_arrays)
    launch = buffer_callback(_BackwardLaunch(plans, order), shapes, vmap_method="sequential",
                             command_buffer_compatible=True)
    dq, dk, dv, _, *rest = launch(dout, q, k, v, out, lse, *side)
    return (dq, dk, dv, *rest)


def _wide(problem: _core.Problem) -> _core.Problem:
    """`problem` with q, k, v and out at the wider of D and Dv (the kernels compile one width
    for both products; zero columns change neither product), in the caller's layout."""
    width = max(problem.head_dim, problem.head_dim_v)
    return dataclasses.replace(problem, head_dim=width, head_dim_v=width)


def _padded(x, width: int):
    """Traced `x` zero-padded along its last axis to `width`."""
    extra = width - x.shape[-1]
    return x if extra == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


# `_jax_trace.ScoreArrays` names of the arrays of `_launch_common.Mods`, in MOD_POINTERS order.
_MOD_NAMES = ("alibi_slopes", "bias", "mask")
assert len(_MOD_NAMES) == len(MOD_POINTERS)


def _order(names: tuple[str, ...], fields: tuple[str, ...], used: bool) -> tuple:
    """For each of the kernels' pointer `fields` after the caller's arrays, the position in
    `names` of the buffer that fills it, or None for a null pointer; no fields unless `used`."""
    if not used:
        return ()
    return tuple(names.index(field) if field in names else None for field in fields)


def _slopes_as_kernels_read(side: tuple, names: tuple[str, ...], problem: _core.Problem) -> tuple:
    """`side` with the ALiBi slopes (``(B, Hq)``, ``(Hq,)`` without a batch axis) as the kernels
    read them: a dense Accum ``(B, Hq)`` array (`_side_arrays.mods_on_device`)."""
    if "alibi_slopes" not in names:
        return side
    at = names.index("alibi_slopes")
    slopes = jnp.broadcast_to(side[at].astype(accum_dtype(problem.dtype)),
                              (problem.batch, problem.heads_q))
    return (*side[:at], slopes, *side[at + 1:])


def _mod_placeholders(side: tuple, names: tuple[str, ...], problem: _core.Problem) -> Mods:
    """The `Mods` the plans read strides from (NO_MODS for a variant without them): the
    slopes dense ``(B, Hq)``; the bias and the mask as ``(B, Hq, Sq, Sk)`` views of dense
    buffers of their canonical shapes, stride 0 along every axis of extent 1."""
    if not problem.variant.reads_arrays:
        return NO_MODS
    given = dict(zip(names, side, strict=True))
    found = {}
    if "alibi_slopes" in given:
        found["alibi"] = _dense((problem.batch, problem.heads_q), given["alibi_slopes"].dtype,
                                True)
    full = (problem.batch, problem.heads_q, problem.seqlen_q, problem.seqlen_k)
    for name in ("bias", "mask"):
        if name in given:
            x = given[name]
            dense = _dense((1,) * (4 - x.ndim) + tuple(x.shape), x.dtype, True)
            strides = tuple(0 if n == 1 else s for n, s in zip(dense.shape, dense.strides,
                                                               strict=True))
            found[name] = Placeholder(full, strides, x.dtype)
    return Mods(**found)


def _check_grid(problem: _core.Problem) -> None:
    """The CUDA limits validation checks only for CUDA inputs (traced ones validate as NumPy)."""
    _checks.check_sizes(problem.batch, problem.seqlen_q, problem.seqlen_k, problem.heads_q, True,
                     f"q {_q_shaped(problem)}, k {_k_shaped(problem)}, layout {problem.layout}")


# ---- planning on stand-ins ---------------------------------------------------------------------


class Placeholder:
    """An XLA buffer as the planners read a CuPy array: shape, byte strides, dtype and an address
    (0: aligned; the planners only test it for alignment)."""

    data = types.SimpleNamespace(ptr=0)

    def __init__(self, shape: tuple[int, ...], strides: tuple[int, ...], dtype: np.dtype):
        self.shape, self.strides, self.dtype = tuple(shape), tuple(strides), np.dtype(dtype)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize


def dense_bshd(shape: tuple[int, ...], dtype, problem: _core.Problem) -> Placeholder:
    """A dense row-major buffer of the caller's `shape` (q, k, v or alike, in its layout and
    rank) seen as ``(B, S, H, D)``, as `_core.to_bshd` views it."""
    view = _dense(shape, dtype, problem.batched)
    if problem.layout == "bhsd":
        order = (0, 2, 1, 3)
        view = Placeholder(tuple(view.shape[i] for i in order),
                           tuple(view.strides[i] for i in order), view.dtype)
    return view


def _dense(shape: tuple[int, ...], dtype, batched: bool) -> Placeholder:
    """A dense row-major buffer; without a batch axis, seen with one of extent 1 in front."""
    dtype = np.dtype(dtype)
    strides, step = [], dtype.itemsize
    for n in reversed(shape):
        strides.insert(0, step)
        step *= max(n, 1)
    if not batched:
        return Placeholder((1, *shape), (0, *strides), dtype)
    return Placeholder(shape, tuple(strides), dtype)


def _lse_placeholder(problem: _core.Problem) -> Placeholder:
    return _dense(problem.lse_shape(), accum_dtype(problem.dtype), problem.batched)


def _q_shaped(problem: _core.Problem) -> tuple[int, ...]:
    return problem.caller_shape(problem.seqlen_q, problem.heads_q)


def _k_shaped(problem: _core.Problem) -> tuple[int, ...]:
    return problem.caller_shape(problem.seqlen_k, problem.heads_kv)


def _plan_forward(problem: _core.Problem, device_id: int, sinks: bool = False,
                  mods: Mods = NO_MODS):
    """The forward's `KernelCall` on one device (None: nothing to compute); with `sinks`, its
    launches take the sinks' address after lse's, and then, for a variant that reads them,
    the addresses of the arrays of `mods` (whose strides the plan reads)."""
    import cupy

    q, out = (dense_bshd(_q_shaped(problem), problem.dtype, problem) for _ in range(2))
    k, v = (dense_bshd(_k_shaped(problem), problem.dtype, problem) for _ in range(2))
    with cupy.cuda.Device(device_id):
        return _launch.plan_forward(q, k, v, out, variant=problem.variant, scale=problem.scale,
                                    device_id=device_id,
                                    cc=_core.compute_capability(device_id), sinks=sinks,
                                    mods=mods)


def _plan_backward(problem: _core.Problem, device_id: int, mods: Mods = NO_MODS):
    """The backward's `BackwardCall` on one device (None: nothing to compute); atomic dq;
    `mods` as for `_plan_forward`."""
    import cupy

    q_like = [dense_bshd(_q_shaped(problem), problem.dtype, problem) for _ in range(4)]
    k_like = [dense_bshd(_k_shaped(problem), problem.dtype, problem) for _ in range(4)]
    (dout, q, out, dq), (k, v, dk, dv) = q_like, k_like
    with cupy.cuda.Device(device_id):
        return _launch_bwd.plan_backward(
            dout, q, k, v, out, _lse_placeholder(problem), dq, dk, dv,
            variant=problem.variant, scale=problem.scale, deterministic=False,
            device_id=device_id, cc=_core.compute_capability(device_id), mods=mods)


# ---- the callbacks -----------------------------------------------------------------------------


def pointers(*buffers) -> tuple[int, ...]:
    """Device addresses of XLA buffers, each checked against the plans' alignment."""
    found = tuple(b.__cuda_array_interface__["data"][0] for b in buffers)
    for address, buffer in zip(found, buffers, strict=True):
        if address % _ALIGNMENT:
            raise RuntimeError(
                f"cuflash.jax: XLA passed a buffer {buffer.shape} at address {address:#x}, not "
                f"{_ALIGNMENT}-byte aligned; the launch was planned for aligned buffers")
    return found


class _Launch:
    """A buffer callback's plans, one per CUDA device, and `order`: for each pointer field the
    plans take after the caller's arrays, the position among the callback's trailing buffers
    of the one that fills it, or None for a null pointer (`_order`)."""

    def __init__(self, plans: dict[int, object], order: tuple = ()):
        self.plans = plans
        self.order = order

    def side_pointers(self, side) -> tuple[int, ...]:
        """The pointers of the trailing buffers `side`, as the plans take them."""
        found = pointers(*side)
        return tuple(0 if at is None else found[at] for at in self.order)

    def plan(self, buffer):
        """The plan for the device `buffer` lives on."""
        device = int(buffer.__dlpack_device__()[1])
        try:
            return self.plans[device]
        except KeyError:
            raise RuntimeError(f"cuflash.jax: the function runs on CUDA device {device}, but was "
                               f"planned for devices {sorted(self.plans)} only") from None


class _ForwardLaunch(_Launch):
    def __call__(self, ctx, outs, q, k, v, *side) -> None:
        out, lse = outs
        call = self.plan(q)
        if call is not None:
            call((*pointers(q, k, v, out, lse), *self.side_pointers(side)), ctx.stream)


class _BackwardLaunch(_Launch):
    def __call__(self, ctx, outs, dout, q, k, v, out, lse, *side) -> None:
        dq, dk, dv, scratch, *dbias = outs
        call = self.plan(q)
        extra = self.side_pointers(side)
        if dbias:  # zeros where no query sees the key: the kernels write only what they visit
            import cupy

            (target,) = pointers(*dbias)
            nbytes = int(np.prod(dbias[0].shape)) * np.dtype(dbias[0].dtype).itemsize
            cupy.cuda.runtime.memsetAsync(target, 0, nbytes, ctx.stream)
            extra = (*extra[:-1], target)
        if call is not None:
            (base,) = pointers(scratch)
            call((*pointers(q, k, v, out, dout, lse, dq, dk, dv), *extra),
                 ctx.stream, lambda nbytes: (None, base))
