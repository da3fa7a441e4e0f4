"""Shared pieces of the GPU tests: device detection with a printed reason, array namespaces."""

from __future__ import annotations

import types

import numpy as np
import pytest


def gpu_skip_reason() -> str | None:
    """None when a CUDA GPU is usable through CuPy, else why not."""
    try:
        import cupy
    except ImportError as err:
        return f"cupy is not importable ({err})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # no driver, no device: CuPy raises its own runtime errors
        return f"no CUDA GPU ({type(err).__name__}: {err})"
    if count == 0:
        return "no CUDA GPU (device count 0)"
    return None


def require_gpu() -> None:
    reason = gpu_skip_reason()
    if reason is not None:
        print(f"skipping GPU tests: {reason}")
        pytest.skip(reason, allow_module_level=True)


def require_hopper(what: str) -> int:
    """Device 0's compute capability; skips the calling module, saying why, unless it is 9.0 (the
    sm_90a kernels run nowhere else). Call after require_gpu()."""
    from cuflash._core import compute_capability

    cc = compute_capability(0)
    if cc != 90:
        print(f"skipping {what}: compute capability {cc}, not 9.0")
        pytest.skip(f"compute capability {cc}, not 9.0", allow_module_level=True)
    return cc


def torch_cuda() -> types.SimpleNamespace:
    """An array namespace (for tests.strategies.make_inputs) that builds torch CUDA tensors."""
    import torch

    def asarray(x, dtype=None):
        return torch.asarray(np.ascontiguousarray(x), dtype=dtype, device="cuda")

    return types.SimpleNamespace(__name__="torch_cuda", asarray=asarray, moveaxis=torch.moveaxis,
                                 bfloat16=torch.bfloat16)


def side_array(values: np.ndarray, xp, where: str):
    """`values` as a caller passes an array beside q, k, v (sinks, slopes, a bias, a mask):
    NumPy where `where` is "numpy", else on q's device through the namespace `xp` (cupy, or
    torch_cuda()), in values' dtype."""
    return values if where == "numpy" else xp.asarray(values)


def to_numpy(x) -> np.ndarray:
    """float64 NumPy copy of a CuPy / torch / JAX / NumPy array (bfloat16 included)."""
    top = type(x).__module__.split(".")[0]
    if top == "torch":
        return x.detach().double().cpu().numpy()
    if top == "cupy":
        import cupy

        return cupy.asnumpy(x).astype(np.float64)
    return np.asarray(x).astype(np.float64)
