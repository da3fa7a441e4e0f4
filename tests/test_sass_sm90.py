"""The Hopper kernels' SASS, read on the CPU (NVRTC's cubin through nvdisasm, tests/sass.py).

- Every fwd_sm90 and bwd_dkdv_sm90 instantiation runs on wgmma (HGMMA) and TMA (UTMALDG), not on
  mma.sync (HMMA).
- The forward's softmax turns (two consumers: D = 128, and D = 64's short tile) sit where they
  were measured fastest (kernel_notes_sm90.md steps 17-18): ptxas moves register work across
  named barriers, so the source alone does not fix the order. In the key-tile loop a consumer
  waits (BAR.SYNC), takes every row max (~65 FMNMX) and then a few exponentials before it hands
  over (BAR.ARV): 9 MUFU in the causal kernel and 15 in the non-causal one as measured (step
  17; D = 128 causal hands over after 20 with the TMA-store epilogue, measured in step 26). Forced
  orders ran up to 12% slower; a failure here means re-measure (tests/perf/ab_kernels.py) and
  then update the bounds. (The first key tile's turn is left to ptxas: with the TMA-store
  epilogue it hoists most of that tile's row maxes above the wait.)
- Where there are no turns (three consumers at D = 64, D = 256) the consumers use no turn
  barrier at all; at D = 256 they wait on each other only in the epilogue (the slots that O is
  staged in), after the tile's last product.
- Only the turns' barriers (256 threads: two consumer warpgroups) count here; the epilogue's
  (128 threads, one warpgroup, kTmaStore) are left out.
"""

from __future__ import annotations

import re
from concurrent.futures import Future

import pytest

from cuflash.cuda import _launch_bwd, _launch_sm90
from cuflash.cuda._launch import Tile
from cuflash.cuda._spec import KernelSpec
from tests import compile_pool, sass

pytestmark = pytest.mark.skipif(sass.missing_tools() is not None,
                                reason=f"no SASS on this machine: {sass.missing_tools()}")

FWD = _launch_sm90.all_fwd_sm90_specs()
BWD = _launch_bwd.all_bwd_sm90_specs()
TWO_CONSUMERS = [s for s in FWD if s.head_dim <= 128 and s.warps == 12]
FREE_SPECS = [s for s in FWD if s not in TWO_CONSUMERS]
# The hand-over's place was tuned (and is held) for the kernels without a score modification;
# with a softcap's tanh in the turn ptxas places it later, which no measurement has judged yet.
TURN_SPECS = [s for s in TWO_CONSUMERS if s.score == "none"]
ROW_MAX_FMNMX = 60  # 2 rows x (16 pairs + a 15-deep tree + the old max + 2 quad shuffles' maxes)
MAX_MUFU_IN_TURN = 20  # exponentials (and the 2 rescale factors) before the hand-over


@pytest.fixture(scope="module")
def sm90a_sass(request) -> dict[KernelSpec, Future]:
    """The SASS of every spec the selected tests read, each compiled once (the forwards are read
    by two tests each), in parallel."""
    return compile_pool.run(sass.sass, compile_pool.selected(request, "spec"))


def _kinds(text: str) -> list[str]:
    """sass.kinds of a kernel's SASS without its one-warpgroup (128-thread) named barriers."""
    return sass.kinds("\n".join(line for line in text.splitlines()
                                if not re.search(r"\bBAR\.[\w.]+ [^,;]+, 0x80\b", line)))


def _windows(kinds: list[str]) -> list[list[str]]:
    """The instructions from each BAR.SYNC to the next BAR.ARV (a turn, or the block's start)."""
    windows = []
    for i, kind in enumerate(kinds):
        if kind == "BAR.SYNC" and "BAR.ARV" in kinds[i + 1:]:
            end = kinds.index("BAR.ARV", i + 1)
            if "BAR.SYNC" not in kinds[i + 1:end]:
                windows.append(kinds[i + 1:end])
    return windows


@pytest.mark.parametrize("spec", FWD + BWD, ids=[s.name for s in FWD + BWD])
def test_runs_on_wgmma_and_tma(spec, sm90a_sass):
    text = sm90a_sass[spec].result()
    assert "HGMMA" in text and "UTMALDG" in text
    assert "HMMA" not in text.replace("HGMMA", ""), "an mma.sync in a Hopper kernel"


@pytest.mark.parametrize("spec", TURN_SPECS, ids=[s.name for s in TURN_SPECS])
def test_softmax_turn_hands_over_after_the_row_maxes_and_a_few_exponentials(spec, sm90a_sass):
    kinds = _kinds(sm90a_sass[spec].result())
    turns = [w for w in _windows(kinds) if w.count("FMNMX") >= ROW_MAX_FMNMX]
    print(f"NVRTC {sass.nvrtc_version()} {spec.name}:",
          [(w.count("FMNMX"), w.count("MUFU.EX2")) for w in turns])
    # The loop's turn comes last (the first key tile's, before the loop, may come first).
    assert 1 <= len(turns) <= 2, sass.condensed("\n".join(kinds))
    loop = turns[-1]
    assert 1 <= loop.count("MUFU.EX2") <= MAX_MUFU_IN_TURN, sass.condensed("\n".join(loop))
    assert "HGMMA" not in loop  # no matrix product is issued inside a turn


@pytest.mark.parametrize("spec", FREE_SPECS, ids=[s.name for s in FREE_SPECS])
def test_free_consumers_take_no_softmax_turns(spec, sm90a_sass):
    kinds = _kinds(sm90a_sass[spec].result())
    tile = Tile(spec.block_m, spec.block_n, spec.warps)
    if _launch_sm90.tma_store(spec.head_dim, tile):  # three consumers: no shared barrier at all
        assert "BAR.ARV" not in kinds
        assert kinds.count("BAR.SYNC") == 1  # the block's __syncthreads after the mbarrier setup
        return
    # D = 256 stages O in the last key tile's K/V slots: the two consumers arrive on the slot
    # barriers after their last S and P V (predicated arrivals) and wait on them only in the
    # epilogue, after the tile's last product; no window from a wait to an arrival holds the
    # row maxes of a turn.
    assert not [w for w in _windows(kinds) if w.count("FMNMX") >= ROW_MAX_FMNMX]
    last_product = max(i for i, kind in enumerate(kinds) if kind == "HGMMA")
    waits = [i for i, kind in enumerate(kinds) if kind == "BAR.SYNC"][1:]  # after __syncthreads
    assert waits and all(i > last_product for i in waits), sass.condensed("\n".join(kinds))
