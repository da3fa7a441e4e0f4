"""GPU: the Hopper backward (bwd_dkdv_sm90) takes the problems it should and matches the reference.

tests/test_gpu_backward.py already runs every backward case through the dispatcher, which on an
H100 sends TMA-legal fp16/bf16 problems here; this module pins that down
(each case below is asserted to qualify), adds long multi-tile problems (pipeline slots wrap
many times, GQA groups, causal with Sq != Sk) and checks the SASS. Skipped, with the reason
printed, without a CUDA GPU of compute capability 9.0.
"""

from __future__ import annotations

import pytest

from tests.gpu_support import require_gpu, require_hopper

require_gpu()

import cupy  # noqa: E402

from cuflash._variant import Variant  # noqa: E402
from cuflash.cuda import _launch_bwd  # noqa: E402
from cuflash.cuda._launch import is_aligned  # noqa: E402
from tests.strategies import MASK_IDS, MASKS, Case  # noqa: E402
from tests.test_gpu_backward import _check_case  # noqa: E402

CC = require_hopper("sm90 backward GPU tests")

pytestmark = pytest.mark.gpu


def _qualifies(case: Case) -> str | None:
    """_sm90_reason for contiguous bshd arrays of `case` (None: the Hopper kernel takes it)."""
    dtype = "float16" if case.dtype == "bfloat16" else case.dtype  # same item size and strides
    q = cupy.empty((case.batch, case.seqlen_q, case.heads_q, case.head_dim), dtype)
    k = cupy.empty((case.batch, case.seqlen_k, case.heads_kv, case.head_dim), dtype)
    arrays = (("q", q), ("k", k), ("v", k), ("dout", q))
    return _launch_bwd._sm90_reason(case.dtype, case.head_dim,
                                    is_aligned([a for _, a in arrays], case.head_dim), CC, arrays,
                                    Variant.of(**case.mask).score)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 192, 256])
@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("lengths", [(700, 700), (400, 900), (900, 400)])
def test_long_problems(dtype, head_dim, mask, lengths):
    sq, sk = lengths
    case = Case(batch=2, seqlen_q=sq, seqlen_k=sk, heads_q=6, heads_kv=2, head_dim=head_dim,
                dtype=dtype, **mask)
    reason = _qualifies(case)
    if case.softcap and head_dim <= 64:  # these widths' Hopper dK/dV kernel takes no modification
        assert "spills" in reason, reason
    else:
        assert reason is None, reason
    _check_case(case, seed=sq + sk + head_dim)
    _check_case(case, seed=sq + sk + head_dim, deterministic=True)


def test_unaligned_rows_and_fp32_fall_back():
    odd = Case(batch=1, seqlen_q=64, seqlen_k=64, heads_q=1, heads_kv=1, head_dim=36,
               dtype="bfloat16", causal=False)
    assert "aligned" in _qualifies(odd)  # 72-byte rows: no 16-byte vectors, no TMA
    fp32 = Case(batch=1, seqlen_q=64, seqlen_k=64, heads_q=1, heads_kv=1, head_dim=64,
                dtype="float32", causal=False)
    assert "float32" in _qualifies(fp32)
