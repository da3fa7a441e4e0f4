"""GPU backward: dq, dk, dv against the float64 reference; deterministic mode is bit-exact.

Skipped, with the reason printed, where no CUDA GPU is usable.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.gpu_support import require_gpu, to_numpy, torch_cuda

require_gpu()

import cupy  # noqa: E402

import cuflash  # noqa: E402
from cuflash import reference  # noqa: E402
from cuflash.cuda import _compile  # noqa: E402
from tests.accuracy import (  # noqa: E402
    assert_matches_reference,
    backward_eps,
    naive_attention_backward,
)
from tests.strategies import (  # noqa: E402
    MASK_IDS,
    MASKS,
    Case,
    examples,
    make_dout,
    make_inputs,
    problems,
    seeds,
    to_bshd4,
)

pytestmark = pytest.mark.gpu

DTYPES = ["float16", "bfloat16", "float32", "float64"]


def _namespace(dtype: str):
    if dtype == "bfloat16":
        pytest.importorskip("torch")
        return torch_cuda()
    return cupy


def _grads(case: Case, seed: int, *, deterministic: bool = False):
    xp = _namespace(case.dtype)
    q, k, v = make_inputs(case, xp, seed)
    dout = make_dout(case, xp, seed)
    out, lse = cuflash.attention(q, k, v, **case.mask, layout=case.layout, return_lse=True)
    before = [to_numpy(x) for x in (q, k, v, dout, out, lse)]
    grads = cuflash.attention_backward(dout, q, k, v, out, lse, **case.mask,
                                       layout=case.layout, deterministic=deterministic)
    for x, b in zip((q, k, v, dout, out, lse), before, strict=False):
        np.testing.assert_array_equal(to_numpy(x), b, err_msg=f"{case.id}: an input changed")
    return (q, k, v, dout), grads


def _check_case(case: Case, seed: int, *, deterministic: bool = False) -> None:
    (q, k, v, dout), grads = _grads(case, seed, deterministic=deterministic)
    q4, k4, v4, do4 = (to_bshd4(to_numpy(x), case) for x in (q, k, v, dout))
    scale = 1.0 / np.sqrt(case.head_dim)
    refs = reference.attention_backward(do4, q4, k4, v4, **case.mask)
    naive = naive_attention_backward(do4, q4, k4, v4, dtype=case.dtype, **case.mask,
                                     scale=scale)
    eps = backward_eps(do4, q4, k4, v4, dtype=case.dtype, **case.mask, scale=scale)
    for name, got, ref, nv, e in zip(("dq", "dk", "dv"), grads, refs, naive, eps, strict=False):
        assert_matches_reference(f"{case.id} {name}", to_bshd4(to_numpy(got), case), ref, nv,
                                 dtype=case.dtype, eps=e)


def _skip_single_family(dtype: str, kernel_path: str) -> None:
    if kernel_path == "sm80" and dtype in ("float32", "float64"):
        pytest.skip("fp32/fp64 have one kernel family")


# kernel_path (tests/conftest.py) sets an environment variable once per test, the same for every
# example.
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=examples(80), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), seed=seeds())
def test_backward_matches_reference(dtype, kernel_path, data, seed):
    _skip_single_family(dtype, kernel_path)
    case = data.draw(problems(dtypes=(dtype,), max_seqlen=260, windows=True, softcaps=True))
    _check_case(case, seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
def test_backward_tile_edges(dtype, head_dim, mask, kernel_path):
    _skip_single_family(dtype, kernel_path)
    # Lengths either side of the query (64/128) and key (128) tiles, Sq != Sk both ways, GQA.
    for sq, sk in ((127, 129), (129, 64), (1, 200), (200, 1), (64, 257), (300, 128), (300, 520)):
        case = Case(batch=2, seqlen_q=sq, seqlen_k=sk, heads_q=4, heads_kv=2, head_dim=head_dim,
                    dtype=dtype, **mask)
        _check_case(case, seed=sq * 1000 + sk)
        _check_case(case, seed=sq * 1000 + sk, deterministic=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_is_bitwise_repeatable(dtype, kernel_path):
    _skip_single_family(dtype, kernel_path)
    case = Case(batch=2, seqlen_q=300, seqlen_k=517, heads_q=6, heads_kv=2, head_dim=128,
                dtype=dtype, causal=True)
    runs = [[to_numpy(g) for g in _grads(case, 7, deterministic=True)[1]] for _ in range(3)]
    for later in runs[1:]:
        for first, again in zip(runs[0], later, strict=False):
            np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("dtype", DTYPES)
def test_equal_masks_give_equal_bits(dtype, kernel_path):
    """window=(-1, -1) is no mask and window=(-1, 0) is causal=True, forward and (deterministic)
    backward, bit for bit."""
    _skip_single_family(dtype, kernel_path)
    for plain, windowed in (({"causal": False}, {"window": (-1, -1)}),
                            ({"causal": True}, {"window": (-1, 0)})):
        results = []
        for mask in (plain, windowed):
            case = Case(batch=2, seqlen_q=300, seqlen_k=517, heads_q=6, heads_kv=2,
                        head_dim=128, dtype=dtype, **mask)
            (q, k, v, _), grads = _grads(case, 5, deterministic=True)
            out, lse = cuflash.attention(q, k, v, **mask, return_lse=True)
            results.append([to_numpy(x) for x in (out, lse, *grads)])
        for a, b in zip(*results, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_small_shared_memory_tiles(dtype, head_dim, causal, monkeypatch):
    """The sm80 tiles for GPUs with 99 KB of shared memory per block (cc 8.6 / 8.9 / 12.0),
    taken here by making this GPU report 99 KB."""
    monkeypatch.setenv("CUFLASH_FORCE_SM80", "1")
    monkeypatch.setattr(_compile, "smem_limit", lambda device_id: 99 * 1024)
    for sq, sk in ((127, 129), (200, 1), (64, 257), (300, 300)):
        case = Case(batch=2, seqlen_q=sq, seqlen_k=sk, heads_q=4, heads_kv=2, head_dim=head_dim,
                    dtype=dtype, causal=causal)
        _check_case(case, seed=sq * 1000 + sk)
        _check_case(case, seed=sq * 1000 + sk, deterministic=True)
