"""cuflash: exact FlashAttention for any array framework, compiled at run time.

    out = cuflash.attention(q, k, v, causal=True)          # NumPy, CuPy, torch or JAX in and out
    dq, dk, dv = cuflash.attention_backward(dout, q, k, v, out, lse)
    ref = cuflash.reference.attention(q, k, v)             # float64 NumPy reference
    cuflash.attention(q, k, v, score_mod=cuflash.ScoreMod("score + rel(h, q_idx - kv_idx)",
                      grad="1", numpy=...), aux={"rel": table})  # your own C++ in the kernels
    cuflash.warmup((2, 1024, 8, 64), (2, 1024, 2, 64), dtype="bfloat16")  # before graph capture

`cuflash.jax` (jax.custom_vjp) and `cuflash.torch` (torch.library custom op) load on first use.
"""

from __future__ import annotations

import importlib

from cuflash import reference
from cuflash._block_map import BlockMap
from cuflash._kvcache import attention_with_kvcache
from cuflash._merge import merge_attention
from cuflash._user_mods import MaskMod, ScoreMod
from cuflash._varlen import attention_varlen, attention_varlen_backward
from cuflash.api import attention, attention_backward, block_map, dropout_mask
from cuflash.cuda._warmup import warmup

__version__ = "0.1.0"
__all__ = ["BlockMap", "MaskMod", "ScoreMod", "__version__", "attention", "attention_backward",
           "attention_varlen", "attention_varlen_backward", "attention_with_kvcache", "block_map",
           "dropout_mask", "merge_attention", "reference", "warmup"]


def __getattr__(name: str):
    # Optional integrations import their framework only when asked for.
    if name in ("jax", "torch", "bench"):
        return importlib.import_module(f"cuflash.{name}")
    raise AttributeError(f"module 'cuflash' has no attribute {name!r}")
