"""GPU: the Hopper forward (kernels_cu/sm90/fwd_sm90.cu, cuflash.cuda._launch_sm90) against the
reference.

Calls `forward_sm90` directly (not through the dispatcher) so every case is known to run on the
wgmma + TMA kernel, or is known to be refused. Skipped, with the reason printed, without a CUDA GPU
of compute capability 9.0.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.gpu_support import require_gpu, require_hopper, to_numpy, torch_cuda

require_gpu()

import cupy  # noqa: E402

from cuflash import reference  # noqa: E402
from cuflash._variant import Variant  # noqa: E402
from cuflash.cuda import _launch_sm90  # noqa: E402
from tests.accuracy import assert_matches_reference, naive_attention  # noqa: E402
from tests.strategies import Case, examples, make_inputs, problems, seeds, to_bshd4  # noqa: E402

MASK = {False: "none", True: "causal"}  # a case's causal flag as a spec's mask kind

CC = require_hopper("sm90 GPU tests")

pytestmark = pytest.mark.gpu

GPU_SETTINGS = settings(max_examples=examples(150), deadline=None, derandomize=False)
# Head dims whose rows are whole 16-byte vectors: every view strategies.py builds is TMA-legal.
TMA_HEAD_DIMS = (8, 16, 32, 40, 56, 64, 72, 96, 120, 128, 136, 160, 192, 200, 248, 256)


def _namespace(dtype: str):
    if dtype == "bfloat16":
        pytest.importorskip("torch")
        return torch_cuda()
    return cupy


def _run(case: Case, seed: int) -> bool:
    """forward_sm90 on fresh inputs of `case`; checks the result when it ran. Returns whether it
    ran."""
    xp = _namespace(case.dtype)
    q, k, v = make_inputs(case, xp, seed)
    before = [to_numpy(x) for x in (q, k, v)]
    qc, kc, vc = (cupy.from_dlpack(x) for x in (q, k, v))
    out = cupy.full(qc.shape, cupy.nan, dtype=qc.dtype)  # poisoned, in the caller's layout
    batch = 1 if case.three_d else case.batch
    lse = cupy.full((batch, case.heads_q, case.seqlen_q), cupy.nan, dtype=cupy.float32)
    scale = 1.0 / np.sqrt(case.head_dim)
    ran = _launch_sm90.forward_sm90(
        *(to_bshd4(x, case) for x in (qc, kc, vc, out)), lse, variant=Variant.of(**case.mask),
        scale=scale, device_id=0, cc=CC)
    if not ran:
        return False
    cupy.cuda.Device(0).synchronize()
    got = cupy.asnumpy(out).astype(np.float64)
    assert not np.isnan(got).any(), f"{case.id}: unwritten (NaN-poisoned) output elements"
    for name, x, b in zip("qkv", (q, k, v), before, strict=True):
        np.testing.assert_array_equal(to_numpy(x), b, err_msg=f"{case.id}: {name} was modified")
    q4, k4, v4 = (to_bshd4(x, case) for x in before)
    ref, ref_lse = reference.attention(q4, k4, v4, **case.mask, return_lse=True)
    naive, naive_lse = naive_attention(q4, k4, v4, dtype=case.dtype, **case.mask,
                                       scale=scale)
    assert_matches_reference(f"{case.id} out", to_bshd4(got, case), ref, naive, dtype=case.dtype)
    got_lse = cupy.asnumpy(lse).astype(np.float64)
    assert_matches_reference(f"{case.id} lse", got_lse, ref_lse, naive_lse, dtype="float32")
    return True


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@GPU_SETTINGS
@given(data=st.data(), seed=seeds())
def test_forward_sm90_matches_reference(dtype, data, seed):
    case = data.draw(problems(dtypes=(dtype,), max_seqlen=400, max_head_dim=256, windows=True,
                                softcaps=True))
    case = Case(**{**case.__dict__, "head_dim": data.draw(st.sampled_from(TMA_HEAD_DIMS))})
    ran = _run(case, seed)
    # Empty keys are the sm80 kernel's job (it writes zeros and lse = -inf); empty queries: no-op.
    expected = case.seqlen_q == 0 or case.batch == 0 or case.seqlen_k > 0
    assert ran == expected, f"{case.id}: forward_sm90 returned {ran}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_tile_edges(dtype, head_dim, causal):
    """Lengths one either side of the tiles, Sq != Sk both ways, GQA: every instantiation."""
    for sq, sk in ((127, 129), (129, 64), (65, 257), (1, 200), (200, 1), (300, 300), (64, 640)):
        case = Case(batch=2, seqlen_q=sq, seqlen_k=sk, heads_q=4, heads_kv=2, head_dim=head_dim,
                    dtype=dtype, causal=causal)
        assert _run(case, seed=sq * 1000 + sk), case.id


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_persistent_blocks_loop_over_tiles(head_dim, causal):
    """More work units than SMs, so blocks take several (the running K/V and Q counters carry
    across tiles): an odd tile count per head (the middle causal tile is a unit alone) and, causal
    with Sq > Sk, empty tiles (zeros, lse -inf) between ones with keys."""
    for sq, sk, heads_q in ((300, 300, 40), (700, 150, 24)):
        case = Case(batch=2, seqlen_q=sq, seqlen_k=sk, heads_q=heads_q, heads_kv=8,
                    head_dim=head_dim, dtype="float16", causal=causal)
        spec = _launch_sm90.fwd_sm90_spec("float16", head_dim, MASK[causal],
                                          _launch_sm90.takes_short_tile(sq, head_dim))
        tiles = case.batch * heads_q * -(-sq // spec.block_m)
        assert tiles > _launch_sm90.sm_count(0), case.id
        assert _run(case, seed=sq + head_dim), case.id


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_long_d64_runs_three_consumers(dtype, causal):
    """D=64 past SHORT_MAX_SEQLEN_Q queries takes the 192-row, three-consumer tile (shorter
    problems, every other test at D=64, take the 128-row one)."""
    for sq, sk in ((4200, 4200), (4100, 1000), (4097, 5000)):
        assert sq > _launch_sm90.SHORT_MAX_SEQLEN_Q
        assert _launch_sm90.fwd_sm90_spec(dtype, 64, MASK[causal], False).block_m == 192
        case = Case(batch=1, seqlen_q=sq, seqlen_k=sk, heads_q=2, heads_kv=1, head_dim=64,
                    dtype=dtype, causal=causal)
        assert _run(case, seed=sq + sk), case.id


@pytest.mark.parametrize("causal", [False, True])
def test_d64_between_1k_and_4k_takes_the_tile_that_pads_least(causal):
    """D=64 from 1k to 4k queries: three consumers where 192-row tiles pad the queries no more
    than 128-row ones (1536, 2304), two where they would pad more (2560); Sq != Sk as well."""
    for sq, sk, three in ((1536, 1536, True), (2304, 1000, True), (2560, 2600, False)):
        spec = _launch_sm90.fwd_sm90_spec("bfloat16", 64, MASK[causal],
                                          _launch_sm90.takes_short_tile(sq, 64))
        assert (spec.block_m == 192) == three, sq
        case = Case(batch=1, seqlen_q=sq, seqlen_k=sk, heads_q=2, heads_kv=1, head_dim=64,
                    dtype="bfloat16", causal=causal)
        assert _run(case, seed=sq + sk), case.id


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("sq, sk, heads_q", [(4200, 4200, 32), (4300, 1000, 32), (1024, 1024, 72),
                                             (700, 2000, 96)])
def test_causal_schedule_table(dtype, sq, sk, heads_q):
    """Causal D=64 (both tiles) walks the host's table: more pairs than the tail, so blocks take
    pairs and then single tiles; with Sq > Sk, tiles without keys fall both among the pairs and
    in the tail, and with Sq < Sk the pairs are unequal."""
    spec = _launch_sm90.fwd_sm90_spec(dtype, 64, "causal", _launch_sm90.takes_short_tile(sq, 64))
    assert _launch_sm90.takes_table(spec)
    grid = _launch_sm90.grid_size(1, sq, heads_q, spec.block_m, False, _launch_sm90.sm_count(0))
    order = _launch_sm90.causal_order(1, sq, sk, heads_q, spec.block_m, spec.block_n, grid)
    units = order[grid + 1:].reshape(-1, 2)
    assert (units[:, 1] >= 0).any() and (units[:, 1] < 0).any(), "pairs and singles"
    case = Case(batch=1, seqlen_q=sq, seqlen_k=sk, heads_q=heads_q, heads_kv=heads_q // 2,
                head_dim=64, dtype=dtype, causal=True)
    assert _run(case, seed=sq + sk), case.id


def _key_tiles(row0: int, rows: int, sq: int, sk: int, block_n: int) -> int:
    """Key tiles that causal query rows row0 .. row0 + rows - 1 see (fwd_sm90's key_tiles)."""
    return -(-min(sk, max(0, row0 + rows + sk - sq)) // block_n)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_consumers_skip_key_tiles_past_their_diagonal(dtype):
    """Causal D=256 (80-key tiles): each consumer releases unread the key tiles loaded for the
    query tile that lie wholly past its own 64 rows' diagonal; where it sees no key at all (Sq >
    Sk) while the next consumer does, it writes zeros and lse -inf."""
    spec = _launch_sm90.fwd_sm90_spec(dtype, 256, "causal")
    consumers = spec.block_m // 64
    for sq, sk, none_for_consumer_0 in ((1000, 1000, False), (300, 100, True), (700, 760, False)):
        tiles = [(_key_tiles(r0, spec.block_m, sq, sk, spec.block_n),
                  [_key_tiles(r0 + 64 * c, 64, sq, sk, spec.block_n) for c in range(consumers)])
                 for r0 in range(0, sq, spec.block_m)]
        assert any(mine[0] < loaded for loaded, mine in tiles), (sq, sk)  # the case skips
        assert any(mine[0] == 0 < loaded for loaded, mine in tiles) == none_for_consumer_0
        case = Case(batch=1, seqlen_q=sq, seqlen_k=sk, heads_q=4, heads_kv=2, head_dim=256,
                    dtype=dtype, causal=True)
        assert _run(case, seed=sq + sk), case.id


def test_fully_masked_rows_are_zero():
    """Bottom-right causal with Sq > Sk: the first Sq - Sk rows see no key (zeros, lse -inf)."""
    rng = np.random.default_rng(0)
    q = cupy.asarray(rng.standard_normal((1, 300, 2, 64)), dtype=cupy.float16)
    k = cupy.asarray(rng.standard_normal((1, 20, 2, 64)), dtype=cupy.float16)
    out = cupy.full(q.shape, cupy.nan, dtype=q.dtype)
    lse = cupy.full((1, 2, 300), cupy.nan, dtype=cupy.float32)
    assert _launch_sm90.forward_sm90(q, k, k, out, lse, variant=Variant.of(causal=True),
                                     scale=0.125, device_id=0, cc=CC)
    out, lse = cupy.asnumpy(out), cupy.asnumpy(lse)
    assert np.all(out[:, :280] == 0) and np.all(np.isneginf(lse[:, :, :280]))
    assert np.all(np.isfinite(out[:, 280:])) and np.any(out[:, 280:] != 0)


@pytest.mark.parametrize("reason, make", [
    ("float32", lambda: [cupy.ones((1, 8, 1, 64), dtype=cupy.float32)] * 4),
    ("row stride 60 B", lambda: [cupy.ones((1, 8, 1, 30), dtype=cupy.float16)] * 4),
    ("misaligned base", lambda: [cupy.ones((1, 8 * 64 + 1), dtype=cupy.float16)[:, 1:]
                                 .reshape(1, 8, 1, 64)] * 4),
    ("empty keys", lambda: [cupy.ones((1, 8, 1, 64), dtype=cupy.float16),
                            cupy.ones((1, 0, 1, 64), dtype=cupy.float16),
                            cupy.ones((1, 0, 1, 64), dtype=cupy.float16),
                            cupy.ones((1, 8, 1, 64), dtype=cupy.float16)]),
])
def test_refuses_what_tma_cannot_read(reason, make):
    q, k, v, out = make()
    assert not _launch_sm90.forward_sm90(q, k, v, out, None, variant=Variant(), scale=1.0,
                                         device_id=0, cc=CC), reason
