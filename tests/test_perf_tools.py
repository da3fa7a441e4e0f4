"""CPU: the parts of the GPU performance tools (tests/perf/) that decide what gets measured.

`ab_kernels.py` runs on the GPU machine only, but its variant syntax and its tile override (which
swaps module-level tile tables of `_launch_sm90` for one plan and must put them back) decide
which kernel a ratio is about; a slip there would make an A/B compare the wrong kernels silently.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

pytest.importorskip("torch")

from cuflash.cuda import _launch_sm90
from cuflash.cuda._launch import Tile

PERF = pathlib.Path(__file__).parent / "perf"


@pytest.fixture(scope="module")
def ab_kernels():
    spec = importlib.util.spec_from_file_location("ab_kernels", PERF / "ab_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(tmp_path: pathlib.Path, name: str) -> pathlib.Path:
    (tmp_path / name / "kernels_cu").mkdir(parents=True)
    return tmp_path / name


def test_variants_name_a_tree_and_optional_tiles(ab_kernels, tmp_path, monkeypatch):
    main, new = _tree(tmp_path, "main"), _tree(tmp_path, "new")
    monkeypatch.setattr(sys, "argv", ["ab_kernels.py", f"main={main}", f"main2={main}",
                                      f"two={new},64=128x128x12,256=128x64x12", "--dims", "64"])
    args, variants, tiles = ab_kernels.parse_args()
    assert variants == {"main": main / "kernels_cu", "main2": main / "kernels_cu",
                        "two": new / "kernels_cu"}
    assert tiles == {"main": {}, "main2": {},
                     "two": {64: Tile(block_m=128, block_n=128, warps=12),
                             256: Tile(block_m=128, block_n=64, warps=12)}}
    assert args.dims == [64]


@pytest.mark.parametrize("item, message", [
    ("two={tree},64=128x128", "tile override '64=128x128' is not WIDTH=BMxBNxW"),
    ("two={tree},x=128x128x12", "tile override 'x=128x128x12' is not WIDTH=BMxBNxW"),
    ("two={tmp}/absent", "expected NAME=DIR with DIR/kernels_cu/ present"),
    ("{tree}", "expected NAME=DIR with DIR/kernels_cu/ present"),
])
def test_bad_variants_are_refused_by_name(ab_kernels, tmp_path, monkeypatch, capsys, item,
                                          message):
    tree = _tree(tmp_path, "tree")
    monkeypatch.setattr(sys, "argv", ["ab_kernels.py", item.format(tree=tree, tmp=tmp_path)])
    with pytest.raises(SystemExit):
        ab_kernels.parse_args()
    assert message in capsys.readouterr().err


def test_tile_override_holds_for_one_plan_only(ab_kernels, monkeypatch):
    tiles, short = dict(_launch_sm90.FWD_SM90_TILES), dict(_launch_sm90.FWD_SM90_SHORT_TILES)
    assert 64 in short  # the override must also hide the width's short tile
    seen = []

    def plan(*args, **kwargs):
        seen.append([_launch_sm90.fwd_sm90_spec("bfloat16", 64, mask, short=True)
                     for mask in ("none", "causal")])
        if kwargs.get("fail"):
            raise RuntimeError("plan failed")
        return "launch"

    monkeypatch.setattr(_launch_sm90, "plan_sm90", plan)
    override = {64: Tile(block_m=64, block_n=64, warps=8)}
    assert ab_kernels.plan_with_tiles(override) == "launch"
    with pytest.raises(RuntimeError):
        ab_kernels.plan_with_tiles(override, fail=True)
    for specs in seen:  # every sequence length takes the override
        assert [(s.block_m, s.block_n, s.warps) for s in specs] == [(64, 64, 8)] * 2
    # Afterwards (also after a failed plan) the tables and the memoised specs are the shipped ones.
    assert _launch_sm90.FWD_SM90_TILES == tiles
    assert _launch_sm90.FWD_SM90_SHORT_TILES == short
    assert _launch_sm90.fwd_sm90_spec("bfloat16", 64, "none", short=True).block_m == (
        short[64].block_m)


def test_tile_cost_fit_recovers_a_line():
    spec = importlib.util.spec_from_file_location("tile_cost", PERF / "tile_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lengths = [128, 256, 512, 1024, 2048]
    a, b = module.fit(lengths, [40.0 + 283.0 * sk / 1024 for sk in lengths])
    assert a == pytest.approx(40.0) and b == pytest.approx(283.0)


def test_shards_cover_every_test_once(monkeypatch):
    """tests/perf/shard.py: the n shards of a collection are disjoint and cover it, in order;
    a malformed SHARD is a usage error naming it."""
    from tests.perf import shard

    class Hook:
        def pytest_deselected(self, items):
            self.deselected = list(items)

    config = type("Config", (), {"hook": Hook()})()
    collected = [f"test_{i}" for i in range(11)]
    seen = []
    for i in range(4):
        monkeypatch.setenv("SHARD", f"{i}/4")
        items = list(collected)
        shard.pytest_collection_modifyitems(config, items)
        assert items == collected[i::4]
        assert sorted(config.hook.deselected + items) == sorted(collected)
        seen += items
    assert sorted(seen) == sorted(collected)
    for bad in ("4/4", "1", "a/b"):
        monkeypatch.setenv("SHARD", bad)
        with pytest.raises(pytest.UsageError, match=r"^SHARD: expected"):
            shard.pytest_collection_modifyitems(config, list(collected))


def test_prewarm_lists_every_kernel_once_hopper_first():
    from cuflash.cuda import _decode, _launch, _launch_bwd
    from tests.perf import prewarm

    specs = prewarm.specs()
    every = (_launch.all_fwd_specs() + _launch_bwd.all_bwd_specs() + _decode.all_decode_specs()
             + _launch_sm90.all_fwd_sm90_specs() + _launch_bwd.all_bwd_sm90_specs())
    assert len(specs) == len(set(specs)) and set(specs) == set(every)
    hopper = [s.min_arch == 90 for s in specs]
    assert hopper == sorted(hopper, reverse=True)  # the slow Hopper kernels start first


def _decode_rows():
    """Bench rows of one cell: cuflash (chosen 8 splits), two swept counts, SDPA cuDNN."""
    cell = {"batch": 1, "seqlen_k": 8192, "heads_q": 8, "heads_kv": 1, "steps": 1}
    return [{**cell, "impl": "cuflash", "ms": 0.020, "gbps": 210.0, "splits": 8, "host_us": 400},
            {**cell, "impl": "cuflash splits 4", "ms": 0.010, "gbps": 420.0, "splits": 4},
            {**cell, "impl": "cuflash splits 128", "ms": 0.030, "gbps": 140.0, "splits": 128},
            {**cell, "impl": "sdpa cudnn", "ms": 0.008, "gbps": 525.0}]


def test_decode_tables_report_ratios_and_the_fastest_split_count():
    from cuflash.bench import decode

    main = decode.table(_decode_rows(), copy_gbps=2100.0).splitlines()
    assert main[2].split("|")[1:-1] == [
        " 8/1 ", " 1 ", " 1 ", " 8192 ", " 8 ", " 20.0 ", " 210 ", " - ", " - ", " 525 ", " - ",
        " 0.40 ", " 0.10 ", " 400 "]
    sweep = decode.sweep_table(_decode_rows(), (4, 128, 16)).splitlines()
    assert sweep[0].count("splits us") == 3
    assert sweep[2].split("|")[1:-1] == [
        " 8/1 ", " 1 ", " 1 ", " 8192 ", " 8 ", " 20.0 ", " 10.0 ", " 30.0 ", " - ", " 4 "]
