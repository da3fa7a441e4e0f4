"""DLPack in, the caller's own array type out, and the stream to run on.

Inputs are recognised by framework (NumPy, CuPy, torch, JAX, or any other ``__dlpack__`` producer)
and viewed without a copy as a NumPy array (CPU) or a CuPy array (CUDA). Results are allocated in
the caller's framework where it can hold them (torch: its caching allocator; NumPy/CuPy: directly)
or handed back through DLPack (JAX), so a caller always gets its own type on its own device.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np

from cuflash import _dtypes

_DLPACK_CPU = 1
_DLPACK_CUDA = 2


@dataclass(frozen=True)
class Source:
    """Where an input lives: its framework and device."""

    framework: str  # "numpy", "cupy", "torch", "jax" or "dlpack" (another producer)
    device: str  # "cpu" or "cuda"
    device_id: int  # CUDA ordinal, -1 on the CPU

    def describe(self) -> str:
        where = "CPU" if self.device == "cpu" else f"CUDA device {self.device_id}"
        return f"{self.framework} on {where}"


def source_of(x: object, name: str) -> Source:
    """Identify the framework and device of `x`, or raise TypeError naming the argument."""
    if isinstance(x, np.ndarray):
        return Source("numpy", "cpu", -1)
    top = type(x).__module__.split(".")[0]
    if top == "cupy":
        return Source("cupy", "cuda", x.device.id)
    if top == "torch":
        if x.device.type == "cuda":
            return Source("torch", "cuda", x.device.index)
        if x.device.type == "cpu":
            return Source("torch", "cpu", -1)
        raise ValueError(f"{name}: torch tensors on {x.device} are not supported; use cpu or cuda")
    if top in ("jax", "jaxlib"):
        if not hasattr(x, "__dlpack_device__"):
            raise TypeError(
                f"{name}: got a traced JAX value ({type(x).__name__}); cuflash.attention needs "
                "concrete arrays. Inside jax.jit / grad use cuflash.jax.attention"
            )
        kind, ordinal = x.__dlpack_device__()
        return Source("jax", "cuda" if int(kind) == _DLPACK_CUDA else "cpu", int(ordinal))
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        kind, ordinal = x.__dlpack_device__()
        if int(kind) == _DLPACK_CPU:
            return Source("dlpack", "cpu", -1)
        if int(kind) == _DLPACK_CUDA:
            return Source("dlpack", "cuda", int(ordinal))
        raise ValueError(f"{name}: DLPack device type {int(kind)} is not supported (CPU or CUDA)")
    raise TypeError(
        f"{name}: expected an array (NumPy, CuPy, torch, JAX or any __dlpack__ producer), "
        f"got {type(x).__module__}.{type(x).__name__}"
    )


def dtype_name(x: object) -> str:
    """Canonical dtype name of any supported array (``"bfloat16"``, ``"float32"``, ...)."""
    return _dtypes.dtype_name(x.dtype)


def stream_scope(src: Source):
    """Context in which CuPy's current stream is the caller's current stream.

    torch: torch's current stream on the tensor's device (so cuflash orders with the caller's
    work and DLPack's stream handshake is a no-op). Others: CuPy's current stream, unchanged.
    """
    if src.device != "cuda":
        return contextlib.nullcontext()
    import cupy

    scope = contextlib.ExitStack()
    scope.enter_context(cupy.cuda.Device(src.device_id))
    if src.framework == "torch":
        import torch

        handle = torch.cuda.current_stream(src.device_id).cuda_stream
        scope.enter_context(_external_stream(handle, src.device_id))
    return scope


@functools.lru_cache(maxsize=64)
def _external_stream(handle: int, device_id: int):
    """A CuPy view of a torch stream (memoised: constructing one per call showed in host time)."""
    import cupy

    return cupy.cuda.ExternalStream(handle, device_id)


def to_backend(x: object, src: Source):
    """A zero-copy NumPy (CPU) or CuPy (CUDA) view of `x`. Call inside `stream_scope`."""
    if src.framework in ("numpy", "cupy"):
        return x
    if src.framework == "torch":
        if src.device == "cuda":
            view = _cupy_view_of_torch(x)
            if view is not None:
                return view
        x = x.detach()  # torch refuses to export tensors that require grad; detach is a view
    if src.device == "cpu":
        return np.from_dlpack(x)
    import cupy

    return cupy.from_dlpack(x)


def empty(shape: tuple[int, ...], like_backend, src: Source, like: object):
    """A new array shaped `shape` with the dtype of `like_backend`: ``(native, backend)``.

    torch results come from torch's allocator (so they share its memory pool and stream
    semantics); others are allocated by the backend, and JAX results are handed over by
    `from_backend`.
    """
    if src.framework == "torch":
        import torch

        native = torch.empty(shape, dtype=like.dtype, device=like.device)
        return native, to_backend(native, src)
    return None, backend_module(src).empty(shape, dtype=like_backend.dtype)


def empty_backend(shape: tuple[int, ...], dtype: str, src: Source):
    """A backend scratch array: on the CPU a NumPy one; on CUDA a CuPy one on the current device,
    from the caller's allocator (torch's caching allocator for torch inputs, CuPy's pool
    otherwise). Call inside `stream_scope`."""
    if src.device == "cpu":
        return np.empty(shape, dtype=dtype)
    if src.framework == "torch":
        import torch

        native = torch.empty(shape, dtype=getattr(torch, dtype), device=src.device_id)
        view = _cupy_view_of_torch(native)
        if view is not None:
            return view
        import cupy

        return cupy.from_dlpack(native)
    import cupy

    return cupy.empty(shape, dtype=dtype)


def allocator(src: Source):
    """``alloc(nbytes) -> (owner, pointer)``: device memory on `src`'s device from the caller's
    allocator (torch's caching allocator for torch inputs, else CuPy's pool). The memory lives as
    long as `owner`; both allocators are stream-ordered, so dropping it once the work that uses it
    is queued on the current stream is safe."""
    if src.framework == "torch":
        return functools.partial(_torch_alloc, device=src.device_id)
    return cupy_alloc


def _torch_alloc(nbytes: int, device: int) -> tuple[object, int]:
    import torch

    owner = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return owner, owner.data_ptr()


def cupy_alloc(nbytes: int) -> tuple[object, int]:
    """Device memory from CuPy's pool on the current device: ``(owner, pointer)``."""
    import cupy

    memory = cupy.cuda.alloc(nbytes)
    return memory, memory.ptr


def current_stream(src: Source) -> int:
    """The ``cudaStream_t`` (as an int) cuflash launches on: torch's current stream for torch
    inputs, else CuPy's. Inside `stream_scope` both are the same."""
    if src.framework == "torch":
        return torch_stream(src.device_id)
    import cupy

    return cupy.cuda.get_current_stream().ptr


def torch_stream(device_id: int) -> int:
    """torch's current stream on a device, as an int (the raw query where torch has it: the
    public one builds a Python stream object per call)."""
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(device_id)
    return torch.cuda.current_stream(device_id).cuda_stream


def is_capturing(stream: int) -> bool:
    """Whether CUDA graph capture is under way on `stream`."""
    import cupy

    return cupy.cuda.runtime.streamIsCapturing(stream) != 0


def from_backend(native: object | None, backend, src: Source):
    """The result in the caller's type: `native` if one was allocated, else a DLPack handover."""
    if native is not None:
        return native
    if src.framework == "jax":
        import jax.numpy as jnp

        return jnp.from_dlpack(backend)
    return backend


def _cupy_view_of_torch(t):
    """A zero-copy CuPy view of a CUDA tensor built from its pointer and strides, or None.

    Equivalent to ``cupy.from_dlpack(t)`` when the caller's stream is torch's current stream (as in
    `stream_scope`, where the DLPack handshake has nothing to order), but torch's ``__dlpack__``
    costs ~50 us per tensor in stream and device queries: a quarter of a small call's host time.
    The view keeps `t` alive through CuPy's memory owner.
    """
    import cupy

    dtype = _TORCH_TO_NUMPY.get(str(t.dtype).removeprefix("torch."))
    if dtype is None:
        return None
    if dtype == _dtypes.BFLOAT16:
        try:
            import ml_dtypes
        except ImportError:
            return None
        dtype = ml_dtypes.bfloat16
    dtype = np.dtype(dtype)
    shape = tuple(t.shape)
    strides = tuple(s * dtype.itemsize for s in t.stride())
    if t.numel() == 0:
        return cupy.empty(shape, dtype=dtype)
    span = dtype.itemsize * (1 + sum((n - 1) * s for n, s in zip(shape, t.stride(), strict=True)))
    memory = cupy.cuda.UnownedMemory(t.data_ptr(), span, t, t.device.index)
    return cupy.ndarray(shape, dtype=dtype, memptr=cupy.cuda.MemoryPointer(memory, 0),
                        strides=strides)


_TORCH_TO_NUMPY = {"float16": "float16", "float32": "float32", "float64": "float64",
                   _dtypes.BFLOAT16: _dtypes.BFLOAT16, "bool": "bool", "int32": "int32",
                   "int64": "int64", "uint8": "uint8"}


def backend_module(src: Source):
    if src.device == "cpu":
        return np
    import cupy

    return cupy
