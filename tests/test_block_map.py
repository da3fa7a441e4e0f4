"""Block maps of user mask_mods (`cuflash.block_map`, ``block_map=``) on the CPU: the NumPy
map against a brute-force reading of its definition, broadcasting over batches and heads, the
checks that name ``block_map``, calls that take a map, and NVRTC compiles of the build kernel
for every band (sm_80, sm_90a, no spills). The GPU tests (tests/test_gpu_block_map.py) hold
the build kernel's map to this one.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import _block_map, _user_mods
from cuflash._user_mods import positions
from cuflash._variant import Variant
from cuflash.cuda import _compile
from tests.strategies import examples


def _documents(batch: int, length: int, rng) -> np.ndarray:
    lengths = rng.integers(1, max(2, length // 3), size=(batch, length))
    return np.cumsum(lengths, axis=1).astype(np.int32) // max(1, length // 4)


def documents(batch, heads, sq, sk, rng):
    """Documents packed into a sequence (ids by batch): reads b."""
    mod = cuflash.MaskMod("qdoc(b, q_idx) == kdoc(b, kv_idx)",
                          numpy=lambda b, h, q, kv, qdoc, kdoc, **_: qdoc[b, q] == kdoc[b, kv])
    return mod, {"qdoc": _documents(batch, sq, rng), "kdoc": _documents(batch, sk, rng)}


def prefix(batch, heads, sq, sk, rng):
    """A prefix-LM mask: every query sees the first prefix(b) keys and its causal past."""
    mod = cuflash.MaskMod("kv_idx < prefix(b) || kv_idx <= q_idx",
                          numpy=lambda b, h, q, kv, prefix, **_: (kv < prefix[b]) | (kv <= q))
    return mod, {"prefix": rng.integers(0, max(1, sk), size=batch).astype(np.int64)}


def heads(batch, heads, sq, sk, rng):
    """A mask by head, no aux array: broadcast over the batch."""
    mod = cuflash.MaskMod(
        "(h % 2 == 0) ? kv_idx <= q_idx + 3 * h : q_idx - kv_idx < 40 + h",
        numpy=lambda b, h, q, kv: np.where(h % 2 == 0, kv <= q + 3 * h, q - kv < 40 + h))
    return mod, {}


def holes(batch, heads, sq, sk, rng):
    """Stripes of keys no row sees inside a block's range: broadcast over batch and heads."""
    mod = cuflash.MaskMod("(kv_idx / 48) % 3 != 1 || q_idx == kv_idx",
                          numpy=lambda b, h, q, kv: ((kv // 48) % 3 != 1) | (q == kv))
    return mod, {}


MASKS = {"documents": documents, "prefix": prefix, "heads": heads, "holes": holes}


@pytest.fixture(autouse=True)
def _bounds_on(monkeypatch):
    """Maps keep their row and key bounds here, whatever the default."""
    monkeypatch.setenv(_block_map.BOUNDS_ENV, "1")
SHAPES = ((130, 200, True, None), (200, 130, False, None), (300, 257, False, (70, 9)),
          (1, 150, True, None), (64, 64, False, (0, 0)))


def mask_array(mod, aux, batch, heads, sq, sk) -> np.ndarray:
    """The mask_mod as a bool ``(B, Hq, Sq, Sk)`` array (the built-in ``mask=``)."""
    keep = mod.numpy(*positions(batch, heads, np.arange(sq), np.arange(sk)), **aux)
    return np.ascontiguousarray(np.broadcast_to(keep, (batch, heads, sq, sk)))


def seen(mod, aux, batch, heads, sq, sk, causal, window) -> np.ndarray:
    """Which (query, key) pairs attention uses: the band and the mask_mod."""
    first, end = Variant.of(causal=causal, window=window).key_bounds(np.arange(sq), sq, sk)
    cols = np.arange(sk)
    band = (cols[None] >= first[:, None]) & (cols[None] < end[:, None])
    return band & mask_array(mod, aux, batch, heads, sq, sk)


def check_entry(block: np.ndarray, entry) -> None:
    """`entry` read by its definition against `block` (its rows by positions)."""
    begin, end, full_begin, full_end = (int(x) for x in entry)
    cols = np.flatnonzero(block.any(axis=0))
    if cols.size:
        assert (begin, end) == (cols[0], cols[-1] + 1)
    else:
        assert (begin, end) == (0, 0)
    every = block.all(axis=0)
    assert every[full_begin:full_end].all()
    longest = run = 0
    for x in every:
        run = run + 1 if x else 0
        longest = max(longest, run)
    assert full_end - full_begin == longest


def check_bounds(plane: np.ndarray, bounds) -> None:
    """Each row's bounds read by their definition against `plane` (rows by keys; keys by rows
    for the key bounds): its seen keys as one interval, (0, 0) for none and for the padding
    rows, (-1, -1) where not one."""
    bounds = np.asarray(bounds)
    assert bounds.shape == (-(-plane.shape[0] // 64) * 64, 2)
    for row, (first, end) in enumerate(bounds.tolist()):
        cols = np.flatnonzero(plane[row]) if row < plane.shape[0] else np.zeros(0, int)
        if cols.size == 0:
            assert (first, end) == (0, 0), row
        elif cols[-1] - cols[0] + 1 == cols.size:
            assert (first, end) == (cols[0], cols[-1] + 1), row
        else:
            assert (first, end) == (-1, -1), row


@pytest.mark.parametrize("name", sorted(MASKS))
def test_the_numpy_map_holds_its_definition(name):
    """Every row block's and key block's entry, every band, ragged shapes; entries of masks
    that do not read b (h) are broadcast over batches (heads)."""
    for i, (sq, sk, causal, window) in enumerate(SHAPES):
        rng = np.random.default_rng(i)
        mod, aux = MASKS[name](2, 4, sq, sk, rng)
        q = np.zeros((2, sq, 4, 8), np.float32)
        k = np.zeros((2, sk, 2, 8), np.float32)
        bmap = cuflash.block_map(q, k, mask_mod=mod, aux=aux, causal=causal, window=window)
        rows, keys = -(-sq // 64), -(-sk // 64)
        batches = 2 if _user_mods.reads_index(mod.cuda, "b") else 1
        n_heads = 4 if _user_mods.reads_index(mod.cuda, "h") else 1
        assert bmap.shape == (batches, n_heads, rows + keys, 4)
        assert bmap.row_blocks == rows
        pairs = seen(mod, aux, 2, 4, sq, sk, causal, window)
        for b in range(2):
            for h in range(4):
                entries = bmap.entries[min(b, batches - 1), min(h, n_heads - 1)]
                for r in range(rows):
                    check_entry(pairs[b, h, r * 64:(r + 1) * 64], entries[r])
                for c in range(keys):
                    check_entry(pairs[b, h, :, c * 64:(c + 1) * 64].T, entries[rows + c])
                at = min(b, batches - 1), min(h, n_heads - 1)
                check_bounds(pairs[b, h], bmap.bounds[at])
                check_bounds(pairs[b, h].T, bmap.key_bounds[at])
        assert 0.0 <= bmap.density() <= 1.0
        assert 0.0 <= bmap.intervals() <= 1.0


@settings(max_examples=examples(40), deadline=None)
@given(name=st.sampled_from(sorted(MASKS)), sq=st.integers(1, 200), sk=st.integers(1, 200),
       band=st.sampled_from(["none", "causal", "window"]), left=st.integers(-1, 80),
       right=st.integers(-1, 80), seed=st.integers(0, 2**32 - 1))
def test_the_numpy_map_holds_its_definition_for_any_shape_and_band(name, sq, sk, band, left,
                                                                   right, seed):
    """Random lengths (tile edges and single rows included), bands and masks: every entry and
    row bound against the brute-force reading (one batch and two heads, each checked)."""
    rng = np.random.default_rng(seed)
    mod, aux = MASKS[name](1, 2, sq, sk, rng)
    causal, window = band == "causal", (left, right) if band == "window" else None
    x_q, x_k = np.zeros((1, sq, 2, 8), np.float32), np.zeros((1, sk, 2, 8), np.float32)
    bmap = cuflash.block_map(x_q, x_k, mask_mod=mod, aux=aux, causal=causal, window=window)
    pairs = seen(mod, aux, 1, 2, sq, sk, causal, window)
    rows, keys = -(-sq // 64), -(-sk // 64)
    for h in range(2):
        entries = bmap.entries[0, min(h, bmap.shape[1] - 1)]
        for r in range(rows):
            check_entry(pairs[0, h, r * 64:(r + 1) * 64], entries[r])
        for c in range(keys):
            check_entry(pairs[0, h, :, c * 64:(c + 1) * 64].T, entries[rows + c])
        check_bounds(pairs[0, h], bmap.bounds[0, min(h, bmap.shape[1] - 1)])
        check_bounds(pairs[0, h].T, bmap.key_bounds[0, min(h, bmap.shape[1] - 1)])


def test_reads_names_whole_identifiers():
    assert _user_mods.reads_index("doc(b, q_idx) == 1", "b")
    assert not _user_mods.reads_index("hb(q_idx) == b_id(kv_idx)", "b")
    assert not _user_mods.reads_index("hb(q_idx) == b_id(kv_idx)", "h")
    assert _user_mods.reads_index("cf_b == 0", "b")  # a generated member: may read anything


def test_calls_with_a_map_equal_calls_without():
    rng = np.random.default_rng(5)
    mod, aux = documents(2, 4, 150, 150, rng)
    q, k, v = (rng.standard_normal((2, 150, h, 16)).astype(np.float32) for h in (4, 2, 2))
    bmap = cuflash.block_map(q, k, mask_mod=mod, aux=aux, causal=True)
    assert repr(bmap).startswith("BlockMap(B=2, Hq=4, Sq=150, Sk=150, causal")
    out, lse = cuflash.attention(q, k, v, causal=True, mask_mod=mod, aux=aux, block_map=bmap,
                                 return_lse=True)
    want = cuflash.attention(q, k, v, causal=True, mask_mod=mod, aux=aux)
    np.testing.assert_array_equal(out, want)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    got = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, mask_mod=mod,
                                     aux=aux, block_map=bmap)
    ref = cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, mask_mod=mod,
                                     aux=aux)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_array_equal(a, b)


def test_torch_cpu_takes_a_map():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    mod, aux = prefix(1, 2, 70, 70, rng)
    q, k, v = (torch.randn(1, 70, 2, 16, requires_grad=True) for _ in range(3))
    bmap = cuflash.block_map(q, k, mask_mod=mod, aux=aux)
    out = cuflash.attention(q, k, v, mask_mod=mod, aux=aux, block_map=bmap)
    out.sum().backward()
    want = cuflash.reference.attention(q.detach(), k.detach(), v.detach(), mask_mod=mod, aux=aux)
    np.testing.assert_allclose(out.detach().numpy(), want, atol=1e-5)
    assert q.grad is not None


def _problem_map(**options):
    rng = np.random.default_rng(7)
    mod, aux = documents(1, 2, 100, 100, rng)
    x = np.zeros((1, 100, 2, 16), np.float32)
    return mod, aux, x, cuflash.block_map(x, x, mask_mod=mod, aux=aux, **options)


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda mod, aux, x, m: cuflash.block_map(x, x, mask_mod=None), TypeError,
     "mask_mod: a block map is built from a cuflash.MaskMod"),
    (lambda mod, aux, x, m: cuflash.attention(x, x, x, mask_mod=mod, aux=aux, block_map="m"),
     TypeError, "block_map: expected a cuflash.BlockMap"),
    (lambda mod, aux, x, m: cuflash.attention(x, x, x, block_map=m), ValueError,
     "block_map: given without a mask_mod"),
    (lambda mod, aux, x, m: cuflash.attention(x, x, x, causal=True, mask_mod=mod, aux=aux,
                                              block_map=m), ValueError,
     "block_map: built for another problem .*mask: map 'none', call 'causal'"),
    (lambda mod, aux, x, m: cuflash.attention(x[:, :50], x, x, mask_mod=mod, aux=aux,
                                              block_map=m), ValueError,
     "block_map: built for another problem .*Sq: map 100, call 50"),
    (lambda mod, aux, x, m: cuflash.attention(
        x, x, x, mask_mod=cuflash.MaskMod("kv_idx <= q_idx", numpy=lambda b, h, q, kv: kv <= q),
        block_map=m), ValueError, "mask_mod code"),
])
def test_a_wrong_block_map_is_refused_naming_it(call, error, match):
    with pytest.raises(error, match=match):
        call(*_problem_map())


@pytest.mark.parametrize("mask", ["none", "causal", "window"])
def test_the_build_kernel_compiles_without_spills(mask):
    """For sm_80 and sm_90a, with a mask_mod that reads aux arrays and with one that reads
    none."""
    rng = np.random.default_rng(0)
    for make in (documents, holes):
        mod, aux = make(1, 1, 64, 64, rng)
        kind = _user_mods.kind_of(None, mod, _user_mods.aux_signature(
            aux.items(), lambda x: x.dtype.name))
        spec = _block_map.build_spec(Variant(mask=mask, user=kind))
        assert kind.cpp in spec.name
        for arch in ("sm_80", "sm_90a"):
            report = _compile.compile_report(spec, arch)
            assert report.registers > 0 and report.spill_stores == 0, report.log


def test_the_bounds_switch_writes_no_intervals(monkeypatch):
    """CUFLASH_MAP_BOUNDS=0: the entries as with bounds, every row and key bound (-1, -1)."""
    rng = np.random.default_rng(3)
    mod, aux = documents(1, 2, 150, 150, rng)
    x = np.zeros((1, 150, 2, 8), np.float32)
    with_bounds = cuflash.block_map(x, x, mask_mod=mod, aux=aux, causal=True)
    assert with_bounds.intervals() == 1.0  # documents under causal: every row one interval
    monkeypatch.setenv(_block_map.BOUNDS_ENV, "0")
    without = cuflash.block_map(x, x, mask_mod=mod, aux=aux, causal=True)
    np.testing.assert_array_equal(without.entries, with_bounds.entries)
    assert (without.bounds == -1).all() and (without.key_bounds == -1).all()
    assert without.intervals() == 0.0
