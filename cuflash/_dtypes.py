"""The one table from NumPy dtypes to the C++ storage types of kernels_cu/core/common.cuh."""

from __future__ import annotations

# numpy has no bfloat16; ml_dtypes (pulled in by JAX) and torch/cupy name it "bfloat16".
BFLOAT16 = "bfloat16"

# dtype name -> (C++ storage type, element size in bytes, uses tensor cores)
_TABLE: dict[str, tuple[str, int, bool]] = {
    "float16": ("cuflash::f16", 2, True),
    BFLOAT16: ("cuflash::bf16", 2, True),
    "float32": ("float", 4, False),
    "float64": ("double", 8, False),
}

GPU_DTYPES = tuple(_TABLE)
CPU_DTYPES = ("float16", "float32", "float64")


def dtype_name(dtype: object) -> str:
    """Canonical name of a NumPy / CuPy / torch / JAX dtype, e.g. ``"bfloat16"``."""
    name = str(dtype)
    return name.removeprefix("torch.")


def cpp_type(name: str) -> str:
    return _TABLE[name][0]


def itemsize(name: str) -> int:
    return _TABLE[name][1]


def uses_tensor_cores(name: str) -> bool:
    return _TABLE[name][2]
