"""Tensors of more than 2^31 elements: forward and backward of every kernel family, checked
against the float64 reference on sampled rows (issue 25, "huge inputs").

Each case holds q, k, v, dout, out, dq, dk, dv of 2^31 + 2,048,000 elements apiece (the ragged
tail past 2^20 rows is not a multiple of any tile), so element and byte offsets of the rows at
the end exceed 2^31 (and 2^32 bytes): any size product a kernel or launch holds in 32 bits wraps
there. A sliding window of ~128 keys keeps the work at well under a second of GPU time per call,
and lets each sampled row be checked exactly: with a band mask, query i sees only keys
[i - left, i + right] and key j is seen only by queries [j - right, j + left], so the float64
reference of a block of rows needs only a slice of a few hundred rows around it
(`band_slices`). Checked, per block, by the accuracy rule (docs/api.md, `tests/accuracy.py`):
out and lse of the block's query rows, dq of its query rows and dk, dv of its key rows, every
head and batch. Blocks: the first rows, the middle, the last rows (the last two included), and
the rows at which the byte offset of q (or k, v, out, dout, dq, dk, dv, all of q's or k's shape)
and of the backward's float32 dq accumulator crosses 2^31, 2^32 and 2^33 bytes. The outputs
(out=, lse, dq, dk, dv and every scratch buffer) start as NaN bytes, and must be finite
everywhere afterwards; the inputs must come back bit-identical (checksums over all of them).

Cases (GPU memory at the peak, atomic dQ; deterministic mode has no accumulator):

| case | kernels | dtype, shape | peak |
| --- | --- | --- | --- |
| dispatch | Hopper wgmma + TMA on cc 9.0 (else sm80) | bf16, B=1, S=1,049,576, H=16 | 40.2 GiB |
| sm80 | `mma.sync`, forced (CUFLASH_FORCE_SM80) | bf16, as above | 40.2 GiB |
| simt | the CUDA-core kernels | fp32, as above | 72.2 GiB |
| batch2 | dispatch; only B*H*S*D is large | bf16, B=2, S=524,788, H=16, bhsd | 40.2 GiB |

All with D=128 (bshd unless said). A case skips, saying why, when the GPU has less free memory
than it needs. Selected with ``-m huge`` (deselected with ``-m "not huge"``); the GPU work is
about a second per case, plus the kernels' first compiles and the host-side checks. Skipped,
with the reason printed, where no CUDA GPU is usable; the tests of the sampling itself
(`band_slices`, `sampled_blocks`) run on the CPU everywhere.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from cuflash import reference
from cuflash._variant import Variant
from tests.accuracy import (
    LSE_DTYPE,
    backward_eps,
    compare,
    naive_attention,
    naive_attention_backward,
)
from tests.gpu_support import gpu_skip_reason, require_gpu, to_numpy

GIB = 2**30
BLOCK = 32  # rows per sampled block
THRESHOLDS = (2**31, 2**32, 2**33)  # bytes; 2^31 elements is 2^32 (bf16) or 2^33 (fp32) bytes
ACCUM_WIDTH = 128  # the dq accumulator's padded head dim for D = 128
MARGIN = GIB  # free memory kept beyond the estimate (CUDA context, check temporaries)


@dataclass(frozen=True)
class Huge:
    """One huge problem. `path`: "dispatch" (the dispatcher's choice) or "sm80" (forced)."""

    id: str
    dtype: str
    batch: int
    seqlen: int
    heads: int
    head_dim: int
    layout: str
    causal: bool
    window: tuple[int, int]
    path: str = "dispatch"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        inner = (self.seqlen, self.heads) if self.layout == "bshd" else (self.heads, self.seqlen)
        return (self.batch, *inner, self.head_dim)

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return {"bfloat16": 2, "float16": 2, "float32": 4}[self.dtype]

    @property
    def band(self) -> tuple[int, int]:
        """(left, right) of the mask after normalisation (causal clips right to 0)."""
        variant = Variant.of(causal=self.causal, window=self.window)
        assert variant.left >= 0 and variant.right >= 0, "the sampling needs a bounded band"
        return variant.left, variant.right

    def bytes_needed(self, deterministic: bool = False) -> int:
        """Peak GPU memory: q, k, v, dout, out, dq, dk, dv; lse and delta (float32 per row);
        the float32 dq accumulator (atomic mode)."""
        rows = self.batch * self.heads * self.seqlen
        accum = 0 if deterministic else rows * ACCUM_WIDTH * 4
        return 8 * self.elements * self.itemsize + 2 * rows * 4 + accum


TAIL = 1000  # rows past 2^20: a ragged tail, not a multiple of any tile
CASES = [
    Huge("dispatch", "bfloat16", 1, 2**20 + TAIL, 16, 128, "bshd", True, (127, 0)),
    Huge("sm80", "bfloat16", 1, 2**20 + TAIL, 16, 128, "bshd", False, (96, 31), path="sm80"),
    Huge("simt", "float32", 1, 2**20 + TAIL, 16, 128, "bshd", False, (127, 0)),
    Huge("batch2", "bfloat16", 2, 2**19 + TAIL // 2, 16, 128, "bhsd", False, (64, 64)),
]


# ---- the sampling (pure index arithmetic; tested on the CPU below) ----------------------------


def band_slices(r0: int, r1: int, seqlen: int, left: int, right: int):
    """For rows [r0, r1) of a band-masked problem with Sq == Sk == seqlen: the query slice
    [qa, qb) and key slice [ka, kb) whose float64 reference gives the exact out, lse and dq of
    query rows [r0, r1) and dk, dv of key rows [r0, r1), and the window (left', right') that
    reproduces the global mask on the slices (bottom-right aligned, as cuflash.reference aligns
    it).

    Key j is seen by queries [j - right, j + left], so the query slice covers those for every
    key of the block; each of those queries sees keys [i - left, i + right], so the key slice
    covers them. Globally query i sees key j iff i - left <= j <= i + right; on the slices, with
    shift' = (kb - ka) - (qb - qa), the reference's rule a + shift' - left' <= b <=
    a + shift' + right' matches it for left' = left + (kb - qb), right' = right - (kb - qb),
    both >= 0 since 0 <= kb - qb <= right.
    """
    qa, qb = max(0, r0 - right), min(seqlen, r1 + left)
    ka, kb = max(0, qa - left), min(seqlen, qb + right)
    extra = kb - qb
    return (qa, qb), (ka, kb), (left + extra, right - extra)


def crossing_rows(memory_shape: tuple[int, ...], seq_axis: int, itemsize: int) -> list[int]:
    """The rows (along `seq_axis`) holding the element at which the byte offset of a contiguous
    tensor of `memory_shape` reaches each of THRESHOLDS."""
    size = math.prod(memory_shape)
    rows = []
    for threshold in THRESHOLDS:
        element = threshold // itemsize
        if element < size:
            rows.append(int(np.unravel_index(element, memory_shape)[seq_axis]))
    return rows


def sampled_blocks(case: Huge, accumulator: bool) -> list[tuple[int, int]]:
    """Blocks [r0, r1) of BLOCK rows: the first, the middle, the last, and one centred on every
    row where an offset crosses a threshold; merged where they overlap."""
    s = case.seqlen
    seq_axis = 1 if case.layout == "bshd" else 2
    centres = [s // 2, *crossing_rows(case.shape, seq_axis, case.itemsize)]
    if accumulator:  # (B, Hq, Sq, width) float32
        centres += crossing_rows((case.batch, case.heads, s, ACCUM_WIDTH), 2, 4)
    blocks = [(0, BLOCK), (s - BLOCK, s)]
    blocks += [(max(0, c - BLOCK // 2), min(s, c + BLOCK // 2)) for c in centres]
    merged: list[list[int]] = []
    for r0, r1 in sorted(blocks):
        if merged and r0 <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], r1)
        else:
            merged.append([r0, r1])
    return [(r0, r1) for r0, r1 in merged]


def _host(x) -> np.ndarray:
    """An exact float64 NumPy copy of a CuPy array; bfloat16 travels as its bits (a copy of a
    strided slice then needs no bfloat16 kernel in CuPy)."""
    if str(x.dtype) != "bfloat16":
        return to_numpy(x)
    import cupy
    import ml_dtypes

    return cupy.asnumpy(x.view(cupy.uint16)).view(ml_dtypes.bfloat16).astype(np.float64)


def _rows(x, layout: str, begin: int, end: int) -> np.ndarray:
    """Rows [begin, end) of a (B, S, H, D) / (B, H, S, D) array, as (B, S, H, D) float64
    NumPy."""
    if layout == "bshd":
        return _host(x[:, begin:end])
    return _host(x[:, :, begin:end]).swapaxes(1, 2)


class BlockCheck:
    """The float64 reference, the naive same-dtype result and the eps of one sampled block, and
    the comparisons of cuflash's results against them."""

    def __init__(self, case: Huge, block: tuple[int, int], q, k, v, dout):
        self.case, (self.r0, self.r1) = case, block
        left, right = case.band
        (qa, qb), (ka, kb), window = band_slices(*block, case.seqlen, left, right)
        self.qa, self.ka = qa, ka
        qs, dos = (_rows(x, case.layout, qa, qb) for x in (q, dout))
        ks, vs = (_rows(x, case.layout, ka, kb) for x in (k, v))
        scale = 1.0 / math.sqrt(case.head_dim)
        mask = {"causal": False, "window": window}
        self.out, self.lse = reference.attention(qs, ks, vs, **mask, return_lse=True)
        self.naive_out, self.naive_lse = naive_attention(qs, ks, vs, dtype=case.dtype,
                                                         scale=scale, **mask)
        self.grads = reference.attention_backward(dos, qs, ks, vs, **mask)
        self.naive_grads = naive_attention_backward(dos, qs, ks, vs, dtype=case.dtype,
                                                    scale=scale, **mask)
        self.eps = backward_eps(dos, qs, ks, vs, dtype=case.dtype, scale=scale, **mask)

    @property
    def name(self) -> str:
        return f"{self.case.id} rows [{self.r0}, {self.r1})"

    def forward(self, out, lse) -> list[str]:
        q_rows = slice(self.r0 - self.qa, self.r1 - self.qa)
        got = _rows(out, self.case.layout, self.r0, self.r1)
        got_lse = _host(lse[:, :, self.r0:self.r1])
        results = [
            compare(f"{self.name} out", got, self.out[:, q_rows], self.naive_out[:, q_rows],
                    dtype=self.case.dtype),
            compare(f"{self.name} lse", got_lse, self.lse[..., q_rows],
                    self.naive_lse[..., q_rows], dtype=LSE_DTYPE),
        ]
        return [r.failure for r in results if not r.ok]

    def backward(self, grads, mode: str) -> list[str]:
        rows = (slice(self.r0 - self.qa, self.r1 - self.qa),
                slice(self.r0 - self.ka, self.r1 - self.ka),
                slice(self.r0 - self.ka, self.r1 - self.ka))
        failures = []
        for name, got, ref, naive, eps, sl in zip(("dq", "dk", "dv"), grads, self.grads,
                                                   self.naive_grads, self.eps, rows, strict=True):
            result = compare(f"{self.name} {name} ({mode})",
                             _rows(got, self.case.layout, self.r0, self.r1), ref[:, sl],
                             naive[:, sl], dtype=self.case.dtype, eps=eps)
            if not result.ok:
                failures.append(result.failure)
        return failures


def test_band_slices_reproduce_the_full_reference():
    """The sampling: on problems small enough for the whole reference, the slices' reference
    gives the same out, lse, dq (block's queries) and dk, dv (block's keys) to rounding."""
    rng = np.random.default_rng(0)
    for seqlen, left, right in ((300, 20, 0), (300, 13, 7), (97, 0, 5), (64, 100, 100)):
        b, h, d = 2, 3, 8
        q, k, v, dout = (rng.standard_normal((b, seqlen, h, d)) for _ in range(4))
        full_out, full_lse = reference.attention(q, k, v, window=(left, right), return_lse=True)
        full = reference.attention_backward(dout, q, k, v, window=(left, right))
        for r0, r1 in ((0, 10), (40, 57), (seqlen - 9, seqlen), (0, seqlen)):
            (qa, qb), (ka, kb), window = band_slices(r0, r1, seqlen, left, right)
            assert 0 <= window[0] and 0 <= window[1], window
            out, lse = reference.attention(q[:, qa:qb], k[:, ka:kb], v[:, ka:kb], window=window,
                                           return_lse=True)
            dq, dk, dv = reference.attention_backward(dout[:, qa:qb], q[:, qa:qb], k[:, ka:kb],
                                                      v[:, ka:kb], window=window)
            qr, kr = slice(r0 - qa, r1 - qa), slice(r0 - ka, r1 - ka)
            np.testing.assert_allclose(out[:, qr], full_out[:, r0:r1], rtol=0, atol=1e-12)
            np.testing.assert_allclose(lse[..., qr], full_lse[..., r0:r1], rtol=0, atol=1e-12)
            np.testing.assert_allclose(dq[:, qr], full[0][:, r0:r1], rtol=0, atol=1e-12)
            np.testing.assert_allclose(dk[:, kr], full[1][:, r0:r1], rtol=0, atol=1e-12)
            np.testing.assert_allclose(dv[:, kr], full[2][:, r0:r1], rtol=0, atol=1e-12)


def test_sampled_blocks_reach_past_every_threshold():
    """The blocks of the bf16 B=1 case: the start, the middle, the last two rows, and rows on
    both sides of 2^31 bytes (row 524,288) and 2^31 elements (row 1,048,576) of q."""
    case = CASES[0]
    blocks = sampled_blocks(case, accumulator=True)
    covered = {r for r0, r1 in blocks for r in range(r0, r1)}
    per_row = case.heads * case.head_dim
    for row in (0, case.seqlen // 2, case.seqlen - 2, case.seqlen - 1, 2**31 // 2 // per_row,
                2**31 // 2 // per_row - 1, 2**31 // per_row, 2**31 // per_row - 1):
        assert row in covered, (row, blocks)
    assert case.elements > 2**31 and case.seqlen % 128
    assert all(c.elements > 2**31 for c in CASES)
    assert CASES[3].seqlen * CASES[3].heads * CASES[3].head_dim < 2**31  # only B * that is big


# ---- the GPU side --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cupy():
    require_gpu()
    import cupy

    return cupy


def _uint(cupy, itemsize: int):
    return {2: cupy.uint16, 4: cupy.uint32}[itemsize]


def _flat_bits(cupy, x):
    assert x.flags.c_contiguous
    return x.view(_uint(cupy, x.dtype.itemsize)).reshape(-1)


CHUNK = 1 << 26  # elements per step of the whole-tensor scans (small temporaries)


def _random(cupy, rng, shape, dtype: str):
    """Standard-normal values in `dtype`, generated on the GPU a chunk at a time (no float32
    copy of the whole tensor, no host memory); bfloat16 rounded to nearest even."""
    if dtype == "bfloat16":
        import ml_dtypes

        x = cupy.empty(shape, dtype=cupy.uint16)
        flat = x.reshape(-1)
        for begin in range(0, flat.size, CHUNK):
            part = rng.standard_normal(min(CHUNK, flat.size - begin), dtype=cupy.float32)
            bits = part.view(cupy.uint32)
            flat[begin:begin + part.size] = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(
                cupy.uint16)
        return x.view(ml_dtypes.bfloat16)
    x = cupy.empty(shape, dtype=dtype)
    flat = x.reshape(-1)
    for begin in range(0, flat.size, CHUNK):
        flat[begin:begin + CHUNK] = rng.standard_normal(min(CHUNK, flat.size - begin),
                                                        dtype=np.dtype(dtype))
    return x


def _checksum(cupy, x) -> int:
    flat = _flat_bits(cupy, x)
    return sum(int(flat[b:b + CHUNK].sum(dtype=cupy.uint64)) for b in range(0, flat.size, CHUNK))


def _nonfinite(cupy, x) -> int:
    """How many elements of a float array are NaN or infinite, from their bits."""
    flat = _flat_bits(cupy, x)
    magnitude, exponent = {("bfloat16", 2): (0x7FFF, 0x7F80), ("float16", 2): (0x7FFF, 0x7C00),
                           ("float32", 4): (0x7FFFFFFF, 0x7F800000)}[
        (str(x.dtype), x.dtype.itemsize)]
    return sum(int(cupy.count_nonzero((flat[b:b + CHUNK] & magnitude) >= exponent))
               for b in range(0, flat.size, CHUNK))


@contextlib.contextmanager
def _poisoned_allocations(cupy):
    """Every CuPy allocation in the block (cuflash's results, lse, delta, the dq accumulator)
    comes from the pool filled with 0xFF bytes: NaN in every float dtype, so anything a kernel
    fails to write shows."""
    from cuflash.bench.devices import poisoning_allocator

    with cupy.cuda.using_allocator(poisoning_allocator(cupy)):
        yield


def _release(cupy) -> None:
    cupy.cuda.Device().synchronize()
    cupy.get_default_memory_pool().free_all_blocks()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()  # blocks other tests' torch tensors left cached


def _expected_kernels(case: Huge) -> tuple[str, str]:
    from cuflash._core import compute_capability

    if case.dtype == "float32":
        return "fwd_simt", "bwd_dkdv_simt"
    from cuflash.cuda import _launch_sm90

    # Hopper runs its TMA kernels where cuda.bindings can encode the tensor maps.
    if case.path == "dispatch" and compute_capability(0) == 90 and _launch_sm90._driver():
        return "fwd_sm90", "bwd_dkdv_sm90"
    return "fwd_sm80", "bwd_dkdv_sm80"


@pytest.mark.gpu
@pytest.mark.huge
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_huge_tensors_match_the_reference_on_sampled_rows(case, cupy, monkeypatch):
    import cuflash
    from cuflash.cuda import _replay
    from cuflash.cuda._kernel_call import KernelCall

    _release(cupy)
    free, total = cupy.cuda.runtime.memGetInfo()
    need = case.bytes_needed() + MARGIN
    if free < need:
        reason = (f"{case.id} needs {need / GIB:.1f} GiB of GPU memory, {free / GIB:.1f} GiB of "
                  f"{total / GIB:.1f} GiB is free")
        print(f"skipping: {reason}")
        pytest.skip(reason)
    if case.path == "sm80":
        monkeypatch.setenv("CUFLASH_FORCE_SM80", "1")
    _replay.clear()  # a signature planned under another path would replay its kernels
    launched: list[str] = []
    launch = KernelCall.__call__

    def recording(self, pointers, stream):
        launched.append(self.name)
        return launch(self, pointers, stream)

    monkeypatch.setattr(KernelCall, "__call__", recording)

    mask = {"causal": case.causal, "window": case.window, "layout": case.layout}
    failures: list[str] = []
    try:
        rng = cupy.random.default_rng(25)
        q, k, v, dout = (_random(cupy, rng, case.shape, case.dtype) for _ in range(4))
        sums = [_checksum(cupy, x) for x in (q, k, v, dout)]

        out = cupy.empty_like(q)
        cupy.cuda.runtime.memset(out.data.ptr, 0xFF, out.nbytes)  # NaN in every float dtype
        with _poisoned_allocations(cupy):
            result, lse = cuflash.attention(q, k, v, **mask, return_lse=True, out=out)
        assert result is out, "out= must be written in place and returned"
        for name, x in (("out", out), ("lse", lse)):
            bad = _nonfinite(cupy, x)
            assert bad == 0, f"{case.id}: {bad} of {x.size} {name} elements are not finite"

        blocks = sampled_blocks(case, accumulator=True)
        checks = [BlockCheck(case, block, q, k, v, dout) for block in blocks]
        for check in checks:
            failures += check.forward(out, lse)

        for deterministic in (False, True):
            mode = "deterministic" if deterministic else "atomic"
            with _poisoned_allocations(cupy):
                grads = cuflash.attention_backward(dout, q, k, v, out, lse, **mask,
                                                   deterministic=deterministic)
            for name, x in zip(("dq", "dk", "dv"), grads, strict=True):
                bad = _nonfinite(cupy, x)
                assert bad == 0, f"{case.id} ({mode}): {bad} of {x.size} {name} not finite"
            for check in checks:
                failures += check.backward(grads, mode)
            del grads
            _release(cupy)

        for name, x, before in zip("q k v dout".split(), (q, k, v, dout), sums, strict=True):
            assert _checksum(cupy, x) == before, f"{case.id}: {name} was modified"
    finally:
        q = k = v = dout = out = lse = result = None
        _release(cupy)
        _replay.clear()

    fwd, dkdv = _expected_kernels(case)
    assert any(fwd in name for name in launched), (fwd, launched)
    assert any(dkdv in name for name in launched), (dkdv, launched)
    print(f"{case.id}: {len(blocks)} blocks {blocks}, kernels {sorted(set(launched))}")
    assert not failures, "\n".join(failures)


def test_gpu_reason_is_printed_when_absent(capsys):
    """Without a GPU the module's GPU cases skip with the reason (what CI sees)."""
    reason = gpu_skip_reason()
    if reason is None:
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(pytest.skip.Exception):
        require_gpu()
    assert reason in capsys.readouterr().out
