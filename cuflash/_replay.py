"""Repeated calls: a call's signature -> the launches its first call planned, replayed.

A signature is everything validation and dispatch read: for each array its type, shape, strides,
dtype, device and address modulo 16 (alignment picks the kernel), plus every option and the
current device. A call whose signature was seen skips validation, the backend views, dispatch and
planning: it allocates its results from the caller's framework, reads the data pointers and the
current stream, and launches the recorded `KernelCall`s. Nothing on that path synchronises,
compiles or allocates outside the framework's allocator, so it can be captured in a CUDA graph.

Served: torch CUDA tensors (when autograd does not need the op and torch.compile is not tracing)
and CuPy arrays. Everything else, and arrays whose last axis is not unit-stride (the full path
copies those), go through the full path every time.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable

from cuflash import _interop

# Signature -> replay. Bounded: real programs have few signatures; a program that makes
# unboundedly many (fresh strides every call) starts over rather than grows.
_PLANS: dict[Hashable, object] = {}
_LIMIT = 4096


def lookup(key: Hashable | None):
    """The replay recorded for `key`, or None."""
    if key is None:
        return None
    try:
        return _PLANS.get(key)
    except TypeError:  # an unhashable option (the full path names it)
        return None


def record(key: Hashable | None, replay: object) -> None:
    if key is None:
        return
    if len(_PLANS) >= _LIMIT:
        _PLANS.clear()
    _PLANS[key] = replay


def clear() -> None:
    """Forget every recorded signature (the next call of each plans again)."""
    _PLANS.clear()


def size() -> int:
    return len(_PLANS)


# ---- signatures ------------------------------------------------------------------------------


def window_key(window) -> Hashable:
    """The `window` option's part of a signature: hashable whatever the caller passed (a list,
    a NumPy pair), and telling 1 from 1.0 and True apart as validation does."""
    if window is None:
        return None
    try:
        return tuple((type(x), x) for x in window)
    except TypeError:  # not iterable: validation names it
        return (type(window), window)


class _Torch:
    """torch CUDA tensors: results from torch's caching allocator, torch's current stream."""

    name = "torch"

    def __init__(self):
        import torch

        self.torch = torch
        self.plain = (torch.Tensor, torch.nn.Parameter)
        self.allocators: dict[int, Callable[[int], tuple[object, int]]] = {}

    def key(self, arrays, allow_grad: bool = False) -> tuple | None:
        """The arrays' part of a signature; None where autograd would need the op and
        `allow_grad` is False, or under torch.compile."""
        torch = self.torch
        if torch.compiler.is_compiling():
            return None
        grad = torch.is_grad_enabled()
        needs_grad = False
        parts = []
        for t in arrays:
            if type(t) not in self.plain or not t.is_cuda:
                return None
            if grad and t.requires_grad:
                if not allow_grad:
                    return None
                needs_grad = True
            strides = t.stride()
            if len(strides) not in (2, 3, 4) or (strides[-1] != 1 and t.shape[-1] > 1):
                return None
            parts.append((t.shape, strides, t.dtype, t.device, t.data_ptr() & 15))
        device = arrays[0].device.index
        if device != torch.cuda.current_device():
            return None
        return "torch", device, needs_grad, *parts

    def empty(self, shape, like):
        return self.torch.empty(shape, dtype=like.dtype, device=like.device)

    def empty_float32(self, shape, like):
        return self.torch.empty(shape, dtype=self.torch.float32, device=like.device)

    @staticmethod
    def pointer(t) -> int:
        return t.data_ptr()

    @staticmethod
    def contiguous(t) -> bool:
        return t.is_contiguous()

    @staticmethod
    def stream(like) -> int:
        return _interop.torch_stream(like.device.index)

    def alloc(self, like) -> Callable[[int], tuple[object, int]]:
        device = like.device.index
        try:
            return self.allocators[device]
        except KeyError:
            alloc = _interop.allocator(_interop.Source("torch", "cuda", device))
            self.allocators[device] = alloc
            return alloc


class _Cupy:
    """CuPy arrays: results from CuPy's pool, CuPy's current stream."""

    name = "cupy"

    def __init__(self):
        import cupy

        self.cupy = cupy

    def key(self, arrays, allow_grad: bool = False) -> tuple | None:
        parts = []
        for x in arrays:
            if type(x) is not self.cupy.ndarray:
                return None
            strides = x.strides
            if len(strides) not in (2, 3, 4) or (strides[-1] != x.itemsize and x.shape[-1] > 1):
                return None
            memory = x.data
            parts.append((x.shape, strides, x.dtype, memory.device_id, memory.ptr & 15))
        device = arrays[0].data.device_id
        if device != self.cupy.cuda.runtime.getDevice():
            return None
        return "cupy", device, *parts

    def empty(self, shape, like):
        return self.cupy.empty(shape, dtype=like.dtype)

    def empty_float32(self, shape, like):
        return self.cupy.empty(shape, dtype="float32")

    @staticmethod
    def pointer(x) -> int:
        return x.data.ptr

    @staticmethod
    def contiguous(x) -> bool:
        return x.flags.c_contiguous

    def stream(self, like) -> int:
        return self.cupy.cuda.get_current_stream().ptr

    @staticmethod
    def alloc(like) -> Callable[[int], tuple[object, int]]:
        return _interop.cupy_alloc


_FRAMEWORKS: dict[type, object | None] = {}


def _framework(x):
    """The replay helper for `x`'s type (None: never replayed). Decided once per type."""
    kind = type(x)
    try:
        return _FRAMEWORKS[kind]
    except KeyError:
        pass
    top = kind.__module__.split(".")[0]
    helper = None
    if top == "torch" and "torch" in sys.modules:
        helper = _Torch()
    elif top == "cupy":
        helper = _Cupy()
    _FRAMEWORKS[kind] = helper
    return helper


def forward_key(q, k, v, out, options: tuple) -> tuple | None:
    """The signature of a forward call, or None where it is never replayed."""
    framework = _framework(q)
    if framework is None:
        return None
    arrays = (q, k, v) if out is None else (q, k, v, out)
    key = framework.key(arrays, allow_grad=out is None)
    return None if key is None else ("forward", out is None, *key, *options)


def backward_key(arrays, options: tuple) -> tuple | None:
    """The signature of a backward call (dout, q, k, v, out, lse), or None. lse must be
    contiguous: the full path copies it otherwise."""
    framework = _framework(arrays[1])
    if framework is None:
        return None
    key = framework.key(arrays)
    if key is None or not framework.contiguous(arrays[5]):
        return None
    return ("backward", *key, *options)


# ---- replays ---------------------------------------------------------------------------------


class ForwardReplay:
    """A planned forward: results allocated like the first call's, the launch replayed."""

    def __init__(self, call, out_shape: tuple[int, ...], lse_shape: tuple[int, ...] | None,
                 framework):
        self.call = call  # None: the problem is empty, nothing to launch
        self.out_shape = out_shape
        self.lse_shape = lse_shape
        self.framework = framework

    def __call__(self, q, k, v, out=None):
        fw = self.framework
        if out is None:
            out = fw.empty(self.out_shape, q)
        lse = None if self.lse_shape is None else fw.empty_float32(self.lse_shape, q)
        if self.call is not None:
            pointer = fw.pointer
            self.call((pointer(q), pointer(k), pointer(v), pointer(out),
                       0 if lse is None else pointer(lse)), fw.stream(q))
        return out if lse is None else (out, lse)


class AutogradReplay:
    """A validated torch forward that autograd differentiates: straight to cuflash.torch's
    autograd node, whose own calls of the core replay."""

    def __init__(self, variant, scale: float, layout: str, return_lse: bool,
                 alibi_slopes=None, sinks=None, bias=None, mask=None):
        from cuflash import torch as cuflash_torch

        self.attention = cuflash_torch.attention
        # A variant's window, (-1, 0) for causal, names it to cuflash.torch in full.
        self.options = {"window": variant.window, "scale": scale, "softcap": variant.softcap,
                        "alibi_slopes": alibi_slopes, "sinks": sinks, "bias": bias,
                        "mask": mask, "layout": layout,
                        "return_lse": return_lse}

    def __call__(self, q, k, v, out=None):
        return self.attention(q, k, v, **self.options)


class BackwardReplay:
    """A planned backward: dq, dk, dv and the scratch allocated like the first call's."""

    def __init__(self, call, framework):
        self.call = call  # a _launch_bwd.BackwardCall, or None when there is nothing to launch
        self.framework = framework

    def __call__(self, dout, q, k, v, out, lse):
        fw = self.framework
        grads = (fw.empty(q.shape, q), fw.empty(k.shape, k), fw.empty(v.shape, v))
        if self.call is not None:
            pointer = fw.pointer
            dq, dk, dv = grads
            self.call((pointer(q), pointer(k), pointer(v), pointer(out), pointer(dout),
                       pointer(lse), pointer(dq), pointer(dk), pointer(dv)),
                      fw.stream(q), fw.alloc(q))
        return grads


def framework_of(x):
    """The replay helper for `x` (for the full path to record a replay with)."""
    return _framework(x)
