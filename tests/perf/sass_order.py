"""Where the barriers fall among a Hopper forward kernel's instructions, from its SASS.

ptxas moves register work across `bar.sync` / `bar.arrive` (they order memory only), so the
source does not say where a consumer's turn begins and ends (kernel_notes_sm90.md step 17).
This compiles each fwd_sm90 instantiation with NVRTC for sm_90a (no GPU needed), disassembles
it with nvdisasm (tests/sass.py) and prints its instruction stream condensed to the kinds that
matter here, runs of equal kinds counted: named barriers (BAR.SYNC / BAR.ARV), wgmma (HGMMA,
WARPGROUP.ARRIVE / DEPBAR), row maxes (FMNMX), exponentials (MUFU.EX2), shared loads (LDS) and
float-to-int conversions (F2I, as `zero_after` emits). For example, the D=128 main loop reads
`BAR.SYNCx1; FMNMXx65; MUFU.EX2x4; ...; BAR.ARVx1; MUFU.EX2x50; ...`.
tests/test_sass_sm90.py holds the shipped kernels to the placement measured fastest.

Run: PYTHONPATH=. python tests/perf/sass_order.py [--kernels DIR] [--dims 128] [--dtype bfloat16]
    [--full]   (--kernels: a directory holding kernels_cu/, as for ab_kernels.py)
"""

import argparse
import pathlib
import sys

from cuflash.cuda import _compile, _launch_sm90
from tests import sass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", type=pathlib.Path, help="directory holding kernels_cu/")
    parser.add_argument("--dims", default="64,128,256")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--full", action="store_true", help="print the whole SASS as well")
    args = parser.parse_args()
    if args.kernels is not None:
        root = args.kernels.resolve() / "kernels_cu"
        if not root.is_dir():
            parser.error(f"--kernels {args.kernels}: no kernels_cu/ inside")
        _compile.kernels_dir = lambda: root
        _compile.expanded_source.cache_clear()
    missing = sass.missing_tools()
    if missing:
        sys.exit(f"sass_order: {missing}")
    dims = {int(d) for d in args.dims.split(",")}
    print(f"NVRTC {sass.nvrtc_version()}, {sass.nvdisasm_path()}")
    for spec in _launch_sm90.all_fwd_sm90_specs():
        if spec.dtype == args.dtype and spec.head_dim in dims:
            text = sass.sass(spec)
            print(f"\n{spec.name}\n{sass.condensed(text)}")
            if args.full:
                print(text)


if __name__ == "__main__":
    main()
