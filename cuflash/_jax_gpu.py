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
"""

from __future__ import annotations

import functools
import types

import jax
import numpy as np

from cuflash import _checks, _launch, _launch_bwd, api

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


def forward(q, k, v, *sinks, problem: api.Problem):
    """``(out, lse)`` of traced q, k, v (the caller's layout), and the sinks ``(Hq,)`` in
    `accum_dtype` where given; lse in `accum_dtype`."""
    from jax.experimental.buffer_callback import buffer_callback

    _check_grid(problem)
    plans = {device: _plan_forward(problem, device, bool(sinks)) for device in _devices()}
    shapes = (jax.ShapeDtypeStruct(q.shape, q.dtype),
              jax.ShapeDtypeStruct(problem.lse_shape(), accum_dtype(problem.dtype)))
    # vmap is folded into the batch before it gets here (`_jax_trace`); "sequential" would be
    # right too: each call at the planned shapes.
    launch = buffer_callback(_ForwardLaunch(plans), shapes, vmap_method="sequential",
                             command_buffer_compatible=True)
    return launch(q, k, v, *sinks)


def backward(dout, q, k, v, out, lse, problem: api.Problem):
    """``(dq, dk, dv)`` of traced arrays; lse in `accum_dtype`, as `forward` returns it."""
    from jax.experimental.buffer_callback import buffer_callback

    _check_grid(problem)
    plans = {device: _plan_backward(problem, device) for device in _devices()}
    scratch = max((plan.scratch_bytes for plan in plans.values() if plan is not None),
                  default=0)
    shapes = (*(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)),
              jax.ShapeDtypeStruct((scratch,), np.uint8))
    launch = buffer_callback(_BackwardLaunch(plans), shapes, vmap_method="sequential",
                             command_buffer_compatible=True)
    dq, dk, dv, _ = launch(dout, q, k, v, out, lse)
    return dq, dk, dv


def _check_grid(problem: api.Problem) -> None:
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


def dense_bshd(shape: tuple[int, ...], dtype, problem: api.Problem) -> Placeholder:
    """A dense row-major buffer of the caller's `shape` (q, k, v or alike, in its layout and
    rank) seen as ``(B, S, H, D)``, as `api.to_bshd` views it."""
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


def _lse_placeholder(problem: api.Problem) -> Placeholder:
    return _dense(problem.lse_shape(), accum_dtype(problem.dtype), problem.batched)


def _q_shaped(problem: api.Problem) -> tuple[int, ...]:
    return problem.caller_shape(problem.seqlen_q, problem.heads_q)


def _k_shaped(problem: api.Problem) -> tuple[int, ...]:
    return problem.caller_shape(problem.seqlen_k, problem.heads_kv)


def _plan_forward(problem: api.Problem, device_id: int, sinks: bool = False):
    """The forward's `KernelCall` on one device (None: nothing to compute); with `sinks`, its
    launches take the sinks' address after lse's."""
    import cupy

    q, out = (dense_bshd(_q_shaped(problem), problem.dtype, problem) for _ in range(2))
    k, v = (dense_bshd(_k_shaped(problem), problem.dtype, problem) for _ in range(2))
    with cupy.cuda.Device(device_id):
        return _launch.plan_forward(q, k, v, out, variant=problem.variant, scale=problem.scale,
                                    device_id=device_id,
                                    cc=api.compute_capability(device_id), sinks=sinks)


def _plan_backward(problem: api.Problem, device_id: int):
    """The backward's `BackwardCall` on one device (None: nothing to compute); atomic dq."""
    import cupy

    q_like = [dense_bshd(_q_shaped(problem), problem.dtype, problem) for _ in range(4)]
    k_like = [dense_bshd(_k_shaped(problem), problem.dtype, problem) for _ in range(4)]
    (dout, q, out, dq), (k, v, dk, dv) = q_like, k_like
    with cupy.cuda.Device(device_id):
        return _launch_bwd.plan_backward(
            dout, q, k, v, out, _lse_placeholder(problem), dq, dk, dv,
            variant=problem.variant, scale=problem.scale, deterministic=False,
            device_id=device_id, cc=api.compute_capability(device_id))


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
    """A buffer callback's plans, one per CUDA device."""

    def __init__(self, plans: dict[int, object]):
        self.plans = plans

    def plan(self, buffer):
        """The plan for the device `buffer` lives on."""
        device = int(buffer.__dlpack_device__()[1])
        try:
            return self.plans[device]
        except KeyError:
            raise RuntimeError(f"cuflash.jax: the function runs on CUDA device {device}, but was "
                               f"planned for devices {sorted(self.plans)} only") from None


class _ForwardLaunch(_Launch):
    def __call__(self, ctx, outs, q, k, v, *sinks) -> None:
        out, lse = outs
        call = self.plan(q)
        if call is not None:
            call(pointers(q, k, v, out, lse, *sinks), ctx.stream)


class _BackwardLaunch(_Launch):
    def __call__(self, ctx, outs, dout, q, k, v, out, lse) -> None:
        dq, dk, dv, scratch = outs
        call = self.plan(q)
        if call is not None:
            (base,) = pointers(scratch)
            call(pointers(q, k, v, out, dout, lse, dq, dk, dv), ctx.stream,
                 lambda nbytes: (None, base))
