"""One kernel launch held as host buffers, replayed for new data pointers with one driver call.

A `KernelCall` is built once per call signature (kernel, grid, parameter block, tensor maps) and
then launched for each later call of that signature: only the data-pointer fields of its
parameter block (and the tensor maps that cover them) are rewritten, and the launch is a single
``cuLaunchKernel`` through ctypes on the stream the caller names. Nothing here allocates device
memory, synchronises or compiles, so a replay is legal inside CUDA graph capture.
"""

from __future__ import annotations

import ctypes
import functools
import struct
import sys
import threading
from collections.abc import Callable, Sequence

import numpy as np

_CUDA_ERROR_INVALID_CONTEXT = 201
_KNOWN_MAPS = 16  # encoded tensor maps remembered per map argument (caching allocators recycle)


@functools.cache
def _driver_launch():
    """``cuLaunchKernel`` from the driver library, with its argument types declared."""
    lib = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    fn = lib.cuLaunchKernel
    uint = ctypes.c_uint
    fn.argtypes = [ctypes.c_void_p, uint, uint, uint, uint, uint, uint, uint, ctypes.c_void_p,
                   ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    fn.restype = ctypes.c_int
    name = lib.cuGetErrorName
    name.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    name.restype = ctypes.c_int
    return fn, name


def _error_name(code: int) -> str:
    text = ctypes.c_char_p()
    _driver_launch()[1](code, ctypes.byref(text))
    return text.value.decode() if text.value else f"CUresult {code}"


def _aligned_copy(value: np.ndarray | np.generic) -> np.ndarray:
    """A 0-d array holding `value`'s bytes at a 64-byte aligned address (TMA maps need 64)."""
    value = np.asarray(value)
    raw = np.zeros(value.dtype.itemsize + 64, dtype=np.uint8)
    start = -raw.ctypes.data % 64
    buf = raw[start:start + value.dtype.itemsize].view(value.dtype).reshape(())
    buf[...] = value
    return buf


class KernelCall:
    """A kernel launch with everything fixed but the data pointers.

    Args:
        function: the loaded ``cupy.RawKernel`` (its driver handle is read here, so build a call
            with the kernel's device current).
        device_id: that device.
        grid, threads, smem_bytes: the launch configuration.
        params: the parameter block (a 0-d structured array; copied).
        pointer_fields: the names of the block's pointer fields a replay fills, in the order
            `__call__` receives them.
        tensor_maps: ``(field, encode)`` pairs: the kernel's TMA map arguments (128 bytes each),
            each rebuilt as ``encode(pointer)`` (bytes) from the pointer given for `field`.
        args: further fixed arguments after the maps (NumPy scalars or 0-d arrays).
        keep: what the launch reads from device memory besides the pointers (a schedule table):
            held alive with the call.
    """

    def __init__(self, function, device_id: int, grid: tuple[int, int, int], threads: int,
                 smem_bytes: int, params: np.ndarray, pointer_fields: Sequence[str],
                 tensor_maps: Sequence[tuple[str, Callable[[int], bytes]]] = (),
                 args: Sequence[object] = (), keep: object = None):
        self.function = function
        self.device_id = device_id
        self.grid = grid
        self.threads = threads
        self.smem_bytes = smem_bytes
        self.pointer_fields = tuple(pointer_fields)
        self._handle = function.kernel.ptr
        self._params = _aligned_copy(params)
        offsets = [params.dtype.fields[name][1] for name in self.pointer_fields]
        if offsets != list(range(offsets[0], offsets[0] + 8 * len(offsets), 8)):
            raise ValueError(f"pointer fields {self.pointer_fields} are not consecutive uint64s "
                             f"of the parameter block in that order")
        # One pack writes every pointer: the fields are consecutive in the block.
        self._pack = functools.partial(struct.Struct(f"<{len(offsets)}Q").pack_into,
                                       memoryview(self._params.reshape(1).view(np.uint8)),
                                       offsets[0])
        index = {name: i for i, name in enumerate(self.pointer_fields)}
        maps = [(index[name], encode, _aligned_copy(np.zeros((), dtype="V128")))
                for name, encode in tensor_maps]
        # Per map: pointer -> encoded bytes, so that a replay on known buffers encodes nothing.
        self._maps = tuple((i, encode, buf.ctypes.data, {}) for i, encode, buf in maps)
        buffers = (self._params, *(buf for _, _, buf in maps), *map(_aligned_copy, args))
        self._buffers = buffers  # the argument values cuLaunchKernel reads
        self._argv = (ctypes.c_void_p * len(buffers))(*(b.ctypes.data for b in buffers))
        self._keep = keep
        self._lock = threading.Lock()
        # cuLaunchKernel's fixed arguments as ctypes values of its declared types: ctypes then
        # passes them without converting Python ints on every launch.
        uint = ctypes.c_uint
        self._fixed = (ctypes.c_void_p(self._handle), *(uint(n) for n in grid), uint(threads),
                       uint(1), uint(1), uint(smem_bytes))

    @property
    def name(self) -> str:
        return self.function.name

    def __call__(self, pointers: Sequence[int], stream: int) -> None:
        """Launch on `stream` (a ``cudaStream_t`` as an int) with `pointers` in the order of
        `pointer_fields`."""
        launch = _driver_launch()[0]
        with self._lock:
            self._pack(*pointers)
            for i, encode, address, known in self._maps:
                ptr = pointers[i]
                encoded = known.get(ptr)
                if encoded is None:
                    if len(known) >= _KNOWN_MAPS:
                        known.clear()
                    encoded = known[ptr] = encode(ptr)
                ctypes.memmove(address, encoded, 128)
            code = launch(*self._fixed, stream, self._argv, None)
            if code == _CUDA_ERROR_INVALID_CONTEXT:
                # A thread that has not used CUDA yet has no current context: make the kernel's
                # device (its primary context) current and try once more.
                import cupy

                cupy.cuda.runtime.setDevice(self.device_id)
                code = launch(*self._fixed, stream, self._argv, None)
        if code:
            raise RuntimeError(f"cuLaunchKernel failed for {self.name}: {_error_name(code)} "
                               f"(grid {self.grid}, {self.threads} threads, {self.smem_bytes} "
                               f"bytes of shared memory)")
