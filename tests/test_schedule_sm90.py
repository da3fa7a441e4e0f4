"""The Hopper forward's persistent schedule on the CPU: the causal table (`causal_order`, D=64) and
the walk of every kernel (`_launch_sm90.schedule`, FwdSm90Schedule in Python): every query tile
once, no idle block, pairs only under a causal mask (a window's tiles go singly, round robin),
and the table's balance in the cost model of the kernel notes (step 23). The GPU tests check the
kernel's own walk: an unvisited tile leaves its NaN-poisoned output in place."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from cuflash._variant import Variant
from cuflash.cuda import _launch_sm90

SMS = 132  # an H100 SXM


def _spec(head_dim: int, block_m: int, mask: str):
    """The bfloat16 kernel of that width, tile and mask kind."""
    return next(s for s in _launch_sm90.all_fwd_sm90_specs() if s.dtype == "bfloat16" and
                s.head_dim == head_dim and s.block_m == block_m and s.mask == mask)


@pytest.mark.parametrize("mask", ["none", "causal", "window"])
@pytest.mark.parametrize("head_dim, block_m", [(64, 128), (64, 192), (128, 128), (256, 128)])
@pytest.mark.parametrize("batch, heads, sq, sk, sms", [
    (1, 1, 64, 64, SMS), (2, 3, 700, 700, SMS), (16, 8, 1024, 1024, SMS), (1, 14, 4200, 4200, SMS),
    (2, 5, 300, 100, 7), (1, 40, 16384, 16384, SMS), (3, 7, 1000, 3000, 16), (4, 9, 1001, 999, 32),
])
def test_every_tile_once_and_no_block_idle(batch, heads, sq, sk, sms, head_dim, block_m, mask):
    spec = _spec(head_dim, block_m, mask)
    pairs = _launch_sm90.pairs_tiles(spec) and not _launch_sm90.takes_table(spec)
    grid = _launch_sm90.grid_size(batch, sq, heads, block_m, pairs, sms)
    blocks = _launch_sm90.schedule(batch, sq, sk, heads, spec, grid)
    tiles = [t for block in blocks for t in block]
    expected = {(m, h, b) for m in range(math.ceil(sq / block_m)) for h in range(heads)
                for b in range(batch)}
    assert len(tiles) == len(expected) and set(tiles) == expected
    assert len(blocks) == grid and all(blocks)


def test_the_table_is_causal_d64_only():
    """Every D=64 causal kernel walks a table; the others the round robin (kScheduleTable, taken
    only with kPairs)."""
    for spec in _launch_sm90.all_fwd_sm90_specs():
        assert _launch_sm90.takes_table(spec) == (spec.causal and spec.head_dim == 64), spec.name


def test_only_causal_pairs_tiles():
    """A tile's cost grows with m_block only under a causal mask (FwdSm90Schedule's kPairs: a
    right edge without a left one); a window's tiles cost about alike and go singly."""
    for spec in _launch_sm90.all_fwd_sm90_specs():
        assert _launch_sm90.pairs_tiles(spec) == (spec.mask == "causal"), spec.name


@pytest.mark.parametrize("head_dim, block_m", [(64, 128), (64, 192), (128, 128), (256, 128)])
@pytest.mark.parametrize("batch, heads, sq, sms", [(1, 1, 64, SMS), (2, 3, 700, 7),
                                                   (16, 8, 1024, SMS), (3, 7, 1000, 16)])
def test_window_deals_single_tiles_round_robin(batch, heads, sq, sms, head_dim, block_m):
    """Under a window, work unit u is query tile u (query tiles fastest, then heads, then
    batches) on block u % grid, as under no mask; the grid counts tiles, not pairs."""
    spec = _spec(head_dim, block_m, "window")
    m_blocks = math.ceil(sq / block_m)
    grid = _launch_sm90.grid_size(batch, sq, heads, block_m, _launch_sm90.pairs_tiles(spec), sms)
    assert grid == min(m_blocks * heads * batch, sms)
    units = [(m, h, b) for b in range(batch) for h in range(heads) for m in range(m_blocks)]
    expected = [units[u::grid] for u in range(grid)]
    assert _launch_sm90.schedule(batch, sq, 2 * sq, heads, spec, grid) == expected
    dense = _spec(head_dim, block_m, "none")
    assert _launch_sm90.schedule(batch, sq, 2 * sq, heads, dense, grid) == expected


@pytest.mark.parametrize("sq, sk, block_m, block_n", [
    (1024, 1024, 128, 128), (1024, 1024, 128, 80), (8192, 8192, 192, 128), (700, 2000, 128, 128)])
def test_causal_table_is_pairs_then_singles(sq, sk, block_m, block_n):
    """Offsets into the table itself, two entries per unit; a block's pairs (a long tile before a
    short one of the same head) come before its singles."""
    batch, heads = 16384 // sq, 24
    grid = _launch_sm90.grid_size(batch, sq, heads, block_m, False, SMS)
    order = _launch_sm90.causal_order(batch, sq, sk, heads, block_m, block_n, grid)
    assert order.dtype == np.int32 and not order.flags.writeable
    offsets = order[:grid + 1]
    assert offsets[0] == grid + 1 and offsets[-1] == len(order)
    assert (np.diff(offsets) >= 0).all() and (np.diff(offsets) % 2 == 0).all()
    m_blocks = math.ceil(sq / block_m)
    for b in range(grid):
        units = order[offsets[b]:offsets[b + 1]].reshape(-1, 2)
        single = units[:, 1] < 0
        assert not (np.diff(single.astype(int)) < 0).any(), "a pair after a single"
        pairs = units[~single]
        assert (pairs[:, 0] // m_blocks == pairs[:, 1] // m_blocks).all()
        assert (pairs[:, 0] % m_blocks > pairs[:, 1] % m_blocks).all()


def _busiest(blocks, cost) -> float:
    """The busiest block's load over the mean, a tile costing its key tiles + 1."""
    loads = [sum(cost[m] for m, _, _ in block) for block in blocks]
    return max(loads) / (sum(loads) / len(loads))


@pytest.mark.parametrize("block_m", [128, 192])
@pytest.mark.parametrize("sq", [1024, 2048, 4096, 8192, 16384])
def test_causal_table_evens_out_the_blocks(block_m, sq):
    """D=64 causal at the benchmark's shapes (B*S = 16384, 32 heads): with the round robin of
    pairs the last round is partly empty (the busiest block 1.5-3% over the mean); with the
    table's single-tile tail the busiest block is within 1.5%."""
    batch, heads = 16384 // sq, 32
    spec = _spec(64, block_m, "causal")
    cost = Variant.of(causal=True).key_tiles(sq, sq, block_m, spec.block_n) + 1
    table = _launch_sm90.schedule(batch, sq, sq, heads, spec, _launch_sm90.grid_size(
        batch, sq, heads, block_m, False, SMS))
    round_robin = dataclasses.replace(spec, head_dim=128)  # the same tiles, walked in pairs
    pairs = _launch_sm90.schedule(batch, sq, sq, heads, round_robin, _launch_sm90.grid_size(
        batch, sq, heads, block_m, True, SMS))
    assert _busiest(table, cost) <= 1.015 < _busiest(pairs, cost)


def test_causal_table_rejects_int32_overflow():
    with pytest.raises(ValueError, match="int32"):
        _launch_sm90.causal_order(2**16, 2**20, 2**20, 2**10, 128, 128, SMS)
