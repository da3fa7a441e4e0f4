"""`warmup`: compile and plan the calls a program will make, before it captures CUDA graphs."""

from __future__ import annotations

import numpy as np

from cuflash import _dtypes, api

FRAMEWORKS = ("torch", "cupy")


def warmup(q_shape: tuple[int, ...], k_shape: tuple[int, ...], *, dtype: str,
           causal: bool = False, window: tuple[int, int] | None = None,
           scale: float | None = None, layout: str = "bshd",
           return_lse: bool = False, backward: bool = False, framework: str = "torch",
           device: int = 0) -> None:
    """Compile the kernels of one call signature and plan its launches, so that later calls of
    it do no host work but the launch (and may be captured in a CUDA graph).

    Runs `cuflash.attention` (and, with `backward`, `cuflash.attention_backward`) once on fresh
    contiguous random arrays of the given shapes in `framework` on CUDA device `device`, and
    waits for it. Calls with arrays of these shapes, the same options and contiguous (or
    identically strided) 16-byte aligned memory then replay the plan; the first call of any
    other signature plans it then.

    Args:
        q_shape: q's shape in `layout` (3-D or 4-D), as `cuflash.attention` takes it.
        k_shape: k's (and v's) shape.
        dtype: ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"float64"``.
        causal, window, scale, layout, return_lse: as `cuflash.attention` takes them (a
            later call must pass `window` as the same type, e.g. a tuple, to replay).
        backward: also plan `cuflash.attention_backward` (and, for torch, autograd).
        framework: ``"torch"`` or ``"cupy"``: whose arrays the program passes.
        device: the CUDA device.

    See also: `cuflash.attention`.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework: expected one of {FRAMEWORKS}, got {framework!r}")
    if dtype not in _dtypes.GPU_DTYPES:
        raise ValueError(f"dtype: expected one of {_dtypes.GPU_DTYPES}, got {dtype!r}")
    rng = np.random.default_rng(0)

    def sample(shape):
        return rng.standard_normal(tuple(shape), dtype=np.float32)

    if framework == "torch":
        import torch

        def make(shape):
            return torch.as_tensor(sample(shape), device=f"cuda:{device}").to(
                getattr(torch, dtype))

        sync = torch.cuda.synchronize
    else:
        import cupy

        def make(shape):
            with cupy.cuda.Device(device):
                return cupy.asarray(sample(shape)).astype(_cupy_dtype(dtype))

        def sync():
            cupy.cuda.Device(device).synchronize()

    q, k, v = make(q_shape), make(k_shape), make(k_shape)
    options = {"causal": causal, "window": window, "scale": scale, "layout": layout}
    out, lse = api.attention(q, k, v, return_lse=True, **options)
    if not return_lse:
        api.attention(q, k, v, **options)
    if backward:
        api.attention_backward(make(out.shape), q, k, v, out, lse, **options)
        if framework == "torch":
            q, k, v = (x.requires_grad_() for x in (q, k, v))
            api.attention(q, k, v, **options).backward(make(out.shape))
    sync()


def _cupy_dtype(name: str):
    if name == _dtypes.BFLOAT16:
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)
