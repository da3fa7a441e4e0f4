"""The arrays beside q, k, v (sinks, ALiBi slopes, a bias, a mask) as the CUDA kernels read
them, and the gradients the backward forms for the sinks and the bias. Every `problem` here is
an `_core.Problem`; the arrays for CUDA inputs live on their device, allocated by its framework.
"""

from __future__ import annotations

import numpy as np

from cuflash import _interop


def sinks_on_device(problem):
    """The sinks as the kernels read them (None without sinks): a contiguous ``(Hq,)`` device
    array in the Accum dtype (float64 for float64 inputs, else float32)."""
    return on_device(problem.sinks, (problem.heads_q,), problem)


def mods_on_device(problem):
    """The arrays of the run-time modifications as the kernels read them
    (`_launch_common.Mods`), or None for a variant without them: the ALiBi slopes as a
    contiguous ``(B, Hq)`` Accum copy (``(Hq,)`` slopes repeated for every batch); the bias
    and the mask as ``(B, Hq, Sq, Sk)`` views of the caller's device arrays, broadcast with
    stride 0 (a NumPy one is copied to the device first, in its own shape), None where the
    call has none; for a user kind its aux arrays (a NumPy one copied to the device first)
    and, with a mask_mod, its block map (the call's, or one built here on the current stream;
    from the mask_mod alone)."""
    from cuflash.cuda._launch_common import Mods

    found = {}
    if problem.variant.user is not None:
        from cuflash import _block_map
        from cuflash._checks import aux_view

        views = (aux_view(x, where) for _, x, where in problem.aux)
        found["aux"] = tuple(device_view(x, x.shape, problem) for x in views)
        found["block_map"] = problem.block_map
        if problem.block_map is None and problem.variant.user.hides:  # a mask_mod: its map
            found["block_map"] = _block_map.build(problem, found["aux"])
    if problem.variant.reads_arrays:
        full = (problem.batch, problem.heads_q, problem.seqlen_q, problem.seqlen_k)
        found |= {"alibi": on_device(problem.alibi_slopes, (problem.batch, problem.heads_q),
                                     problem),
                  "bias": device_view(problem.bias, full, problem),
                  "mask": device_view(problem.mask, full, problem)}
    return Mods(**found) if found else None


def device_view(values, full: tuple[int, ...], problem):
    """`values` (a CuPy view, or NumPy: copied to the device in its shape and dtype) broadcast
    to `full`, without copying on the device; None for None."""
    if values is None:
        return None
    import cupy

    if isinstance(values, np.ndarray):
        device = _interop.empty_backend(values.shape, values.dtype.name, problem.source)
        device.set(np.ascontiguousarray(values).reshape(values.shape))  # 0-d stays 0-d
        values = device
    return cupy.broadcast_to(values, full)


def on_device(values, shape: tuple[int, ...], problem):
    """`values` (float64 NumPy, or a device array that broadcasts to `shape`) as a new
    contiguous device array of `shape` in the Accum dtype, from the caller's allocator; None
    for None. Copied on the device: a device array's values are never read on the host. Lives
    until the launch that reads it is queued (stream-ordered pools)."""
    if values is None:
        return None
    accum = "float64" if problem.dtype == "float64" else "float32"
    buffer = _interop.empty_backend(shape, accum, problem.source)
    if isinstance(values, np.ndarray):
        buffer.set(np.ascontiguousarray(np.broadcast_to(values, shape), dtype=accum))
    else:
        buffer[...] = values
    return buffer


def bias_shape4(problem) -> tuple[int, ...]:
    """The bias's shape with the leading axes it leaves out as 1: 4-D."""
    return (1,) * (4 - problem.bias.ndim) + problem.bias.shape


def bias_gradient(problem, full):
    """The bias's gradient in its shape from the kernels' `full` dS (B, Hq, Sk, Sq), summed over
    the axes the bias was broadcast along; by the caller's framework (torch for torch inputs,
    so that its temporaries come from torch's allocator; CuPy otherwise), on the current
    stream."""
    grad = full.swapaxes(2, 3)
    target = bias_shape4(problem)
    axes = tuple(a for a in range(4) if target[a] == 1 and grad.shape[a] != 1)
    if problem.source.framework == "torch":
        import torch

        grad = torch.as_tensor(grad, device=torch.device("cuda", problem.source.device_id))
        if axes:
            grad = grad.sum(dim=axes, keepdim=True)
        return grad.reshape(problem.bias.shape)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(problem.bias.shape)


def sinks_gradient(problem, lse3, scratch):
    """d loss / d sink[h] = -sum over batch and rows of exp(sink[h] - lse) * delta, on the
    device, from the backward's delta (the start of its `scratch`: (owner, pointer, bytes)) and
    the lse it read (B, Hq, Sq) in the Accum dtype. Zeros when there was nothing to launch.

    Computed by the caller's framework (torch ops for torch inputs, so that its temporaries come
    from torch's allocator; CuPy otherwise), on the current stream: a torch tensor or a CuPy
    array in the Accum dtype."""
    import cupy

    sinks = sinks_on_device(problem)
    delta = None
    if scratch and problem.seqlen_q:
        owner, pointer, nbytes = scratch[0]
        memory = cupy.cuda.UnownedMemory(pointer, nbytes, owner)
        delta = cupy.ndarray(lse3.shape, dtype=lse3.dtype,
                             memptr=cupy.cuda.MemoryPointer(memory, 0))
    if problem.source.framework == "torch":
        import torch

        device = torch.device("cuda", problem.source.device_id)
        sinks_t = torch.as_tensor(sinks, device=device)
        if delta is None:
            return torch.zeros_like(sinks_t)
        lse_t, delta_t = (torch.as_tensor(x, device=device) for x in (lse3, delta))
        return -(torch.exp(sinks_t[None, :, None] - lse_t) * delta_t).sum(dim=(0, 2))
    if delta is None:
        return cupy.zeros_like(sinks)
    return -(cupy.exp(sinks[None, :, None] - lse3) * delta).sum(axis=(0, 2))
