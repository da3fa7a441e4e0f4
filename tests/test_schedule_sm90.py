"""The Hopper forward's persistent schedule (its Python mirror, `_launch_sm90.schedule`), on the
CPU: every query tile once, no idle block, and the split tail's balance in the cost model the
kernel notes use (step 20). The GPU tests check the kernel's own walk: an unvisited tile leaves
its NaN-poisoned output in place."""

from __future__ import annotations

import math

import pytest

from cuflash import _launch_sm90

SMS = 132  # an H100 SXM


def _key_tiles(m_block: int, block_m: int, block_n: int, sq: int, sk: int) -> int:
    """Key tiles a causal query tile loads (fwd_sm90's key_tiles for the whole tile)."""
    return math.ceil(min(sk, max(0, (m_block + 1) * block_m + sk - sq)) / block_n)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("split_tail", [False, True])
@pytest.mark.parametrize("batch, heads, sq, block_m, sms", [
    (1, 1, 64, 128, SMS), (2, 3, 700, 128, SMS), (16, 8, 1024, 128, SMS), (1, 14, 4200, 192, SMS),
    (2, 5, 300, 192, 7), (1, 40, 16384, 192, SMS), (3, 7, 1000, 128, 16),
])
def test_every_tile_once_and_no_block_idle(batch, heads, sq, block_m, sms, causal, split_tail):
    grid = min(_launch_sm90.work_units(batch, sq, heads, block_m, causal), sms)
    blocks = _launch_sm90.schedule(batch, sq, heads, block_m, causal, grid, split_tail)
    tiles = [t for block in blocks for t in block]
    expected = {(m, h, b) for m in range(math.ceil(sq / block_m)) for h in range(heads)
                for b in range(batch)}
    assert len(tiles) == len(expected) and set(tiles) == expected
    assert len(blocks) == grid and all(blocks)


@pytest.mark.parametrize("sq", [8192, 16384])
def test_split_tail_evens_out_the_last_round(sq):
    """D=64 causal, the benchmark's shape (B*S = 16384, 32 heads) on the three-consumer tile:
    modelled as key tiles plus one per query tile, the busiest block's load with the split tail
    is closer to the mean than with pairs alone (which leave the last round partly empty)."""
    batch, heads, block_m, block_n = 16384 // sq, 32, 192, 128
    grid = min(_launch_sm90.work_units(batch, sq, heads, block_m, True), SMS)

    def busiest(split: bool) -> float:
        blocks = _launch_sm90.schedule(batch, sq, heads, block_m, True, grid, split)
        loads = [sum(_key_tiles(m, block_m, block_n, sq, sq) + 1 for m, _, _ in block)
                 for block in blocks]
        return max(loads) / (sum(loads) / len(loads))

    assert busiest(True) < busiest(False) - 0.01
