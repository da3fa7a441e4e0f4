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

The arrays beside q, k, v (ALiBi slopes, sinks, bias, mask) join the signature by their type,
shape, strides, dtype and device, never their values: a replay reads them again at each call
(the bias and the mask in place, the slopes and sinks copied as the first call did, by the
`side` function the full path recorded). Such arrays of another framework or device than q's
(NumPy slopes beside CUDA q, say) take the full path.
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

    def key(self, arrays) -> tuple | None:
        """The arrays' part of a signature; None where autograd would need the op (which
        `cuflash.api` routes to `cuflash.torch` before the core), or under torch.compile."""
        torch = self.torch
        if torch.compiler.is_compiling():
            return None
        grad = torch.is_grad_enabled()
        parts = []
        for t in arrays:
            if type(t) not in self.plain or not t.is_cuda:
                return None
            if grad and t.requires_grad:
                return None
            strides = t.stride()
            if len(strides) not in (2, 3, 4) or (strides[-1] != 1 and t.shape[-1] > 1):
                return None
            parts.append((t.shape, strides, t.dtype, t.device, t.data_ptr() & 15))
        device = arrays[0].device.index
        if device != torch.cuda.current_device():
            return None
        return "torch", device, *parts

    def side(self, x) -> tuple | None:
        """An array beside q, k, v: its part of a signature, or None (not a CUDA tensor)."""
        if type(x) not in self.plain or not x.is_cuda:
            return None
        return x.shape, x.stride(), x.dtype, x.device

    def accum_copy(self, x, shape, float64: bool):
        """`x` broadcast to `shape` as a new contiguous float32 (float64) tensor."""
        torch = self.torch
        buffer = torch.empty(shape, dtype=torch.float64 if float64 else torch.float32,
                             device=x.device)
        buffer.copy_(x)
        return buffer

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

    def key(self, arrays) -> tuple | None:
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

    def side(self, x) -> tuple | None:
        if type(x) is not self.cupy.ndarray:
            return None
        return x.shape, x.strides, x.dtype, x.data.device_id

    def accum_copy(self, x, shape, float64: bool):
        buffer = self.cupy.empty(shape, dtype="float64" if float64 else "float32")
        buffer[...] = x
        return buffer

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


def _side_key(framework, side) -> tuple | None:
    """The side arrays' part of a signature (None entries stay None), or None when one is not
    of q's framework."""
    parts = []
    for x in side:
        if x is None:
            parts.append(None)
            continue
        part = framework.side(x)
        if part is None:
            return None
        parts.append(part)
    return tuple(parts)


def forward_key(q, k, v, out, options: tuple, side: tuple = ()) -> tuple | None:
    """The signature of a forward call, or None where it is never replayed. `side`: the
    arrays beside q, k, v (any of them None), or () for a call without any."""
    framework = _framework(q)
    if framework is None:
        return None
    arrays = (q, k, v) if out is None else (q, k, v, out)
    key = framework.key(arrays)
    if key is None:
        return None
    if side:
        sides = _side_key(framework, side)
        if sides is None:
            return None
        return ("forward", out is None, *key, *options, sides)
    return ("forward", out is None, *key, *options)


def backward_key(arrays, options: tuple, side: tuple = ()) -> tuple | None:
    """The signature of a backward call (dout, q, k, v, out, lse), or None. lse must be
    contiguous: the full path copies it otherwise. `side` as for `forward_key`."""
    framework = _framework(arrays[1])
    if framework is None:
        return None
    key = framework.key(arrays)
    if key is None or not framework.contiguous(arrays[5]):
        return None
    if side:
        sides = _side_key(framework, side)
        if sides is None:
            return None
        return ("backward", *key, *options, sides)
    return ("backward", *key, *options)


def user_key(like, score_mod, mask_mod, aux, block_map) -> tuple | None:
    """The part of a signature for a call's own modifications, or None where the call is never
    replayed: their identities (each `ScoreMod` and `MaskMod` lives as long as the process),
    each aux array's name, layout and address (the parameter block holds the addresses, so a
    replay reads the same buffers, as they are then), and the block map's identity and
    address. A call with a mask_mod and no map of the caller's builds its map anew from the
    aux arrays' values: never replayed. `like`: q."""
    if mask_mod is not None and (block_map is None or getattr(block_map, "per_call", True)):
        return None
    framework = _framework(like)
    if framework is None or (aux is not None and not isinstance(aux, dict)):
        return None
    parts = [id(score_mod), id(mask_mod)]
    for name, x in (aux or {}).items():
        side = framework.side(x)
        if side is None or not isinstance(name, str):
            return None
        parts.append((name, side, framework.pointer(x)))
    if block_map is not None:
        pointer = getattr(getattr(getattr(block_map, "data", None), "data", None), "ptr", None)
        if pointer is None:
            return None  # not a device map: the full path names it
        parts.append((id(block_map), pointer, block_map.signature))
    return ("user", *parts)


# ---- replays ---------------------------------------------------------------------------------


class SidePointers:
    """The pointer fields a replay passes for the arrays beside q, k, v, in the kernels' order
    (`_launch_common.fwd_pointer_fields`, `backward_pointers`): the sinks (`sinks`), then the
    ALiBi slopes, the bias and the mask (`mods`), each 0 where absent, and for a backward
    (`backward`) a null dbias (a call that asks for dbias is not replayed). The sinks and slopes are
    copied to new contiguous Accum arrays of `sinks_shape` / `slopes_shape` on the call's stream,
    as the full path copies them; the bias and the mask are read in place (the full path
    recorded the replay only where it reads them so)."""

    def __init__(self, framework, *, sinks: bool, mods: bool, sinks_shape: tuple[int, ...],
                 slopes_shape: tuple[int, ...], float64: bool, backward: bool = False):
        self.framework = framework
        self.sinks, self.mods, self.backward = sinks, mods, backward
        self.sinks_shape, self.slopes_shape = sinks_shape, slopes_shape
        self.float64 = float64

    def __call__(self, side) -> tuple[tuple[int, ...], list]:
        """``(pointers, keep)`` for side = (alibi_slopes, sinks, bias, mask); `keep` holds the
        copies until the launch is queued."""
        fw = self.framework
        alibi, sinks, bias, mask = side
        keep = []

        def copied(x, shape) -> int:
            if x is None:
                return 0
            keep.append(fw.accum_copy(x, shape, self.float64))
            return fw.pointer(keep[-1])

        found = (copied(sinks, self.sinks_shape),) if self.sinks else ()
        if self.mods:
            found += (copied(alibi, self.slopes_shape), 0 if bias is None else fw.pointer(bias),
                      0 if mask is None else fw.pointer(mask))
            if self.backward:
                found += (0,)
        return found, keep


class ForwardReplay:
    """A planned forward: results allocated like the first call's, the launch replayed.
    `side`: the `SidePointers` of a call with arrays beside q, k, v, else None."""

    def __init__(self, call, out_shape: tuple[int, ...], lse_shape: tuple[int, ...] | None,
                 framework, side: SidePointers | None = None):
        self.call = call  # None: the problem is empty, nothing to launch
        self.out_shape = out_shape
        self.lse_shape = lse_shape
        self.framework = framework
        self.side = side

    def __call__(self, q, k, v, out=None, side=None):
        fw = self.framework
        if out is None:
            out = fw.empty(self.out_shape, q)
        lse = None if self.lse_shape is None else fw.empty_float32(self.lse_shape, q)
        if self.call is not None:
            pointer = fw.pointer
            extra, keep = self.side(side) if self.side is not None else ((), None)
            self.call((pointer(q), pointer(k), pointer(v), pointer(out),
                       0 if lse is None else pointer(lse), *extra), fw.stream(q))
            del keep  # the copies go back to the stream-ordered pool after the launch
        return out if lse is None else (out, lse)


class BackwardReplay:
    """A planned backward: dq, dk, dv and the scratch allocated like the first call's.
    `side` as for `ForwardReplay`."""

    def __init__(self, call, framework, side: SidePointers | None = None):
        self.call = call  # a _launch_bwd.BackwardCall, or None when there is nothing to launch
        self.framework = framework
        self.side = side

    def __call__(self, dout, q, k, v, out, lse, side=None):
        fw = self.framework
        grads = (fw.empty(q.shape, q), fw.empty(k.shape, k), fw.empty(v.shape, v))
        if self.call is not None:
            pointer = fw.pointer
            dq, dk, dv = grads
            extra, keep = self.side(side) if self.side is not None else ((), None)
            self.call((pointer(q), pointer(k), pointer(v), pointer(out), pointer(dout),
                       pointer(lse), pointer(dq), pointer(dk), pointer(dv), *extra),
                      fw.stream(q), fw.alloc(q))
            del keep
        return grads


def framework_of(x):
    """The replay helper for `x` (for the full path to record a replay with)."""
    return _framework(x)
