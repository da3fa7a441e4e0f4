"""Where the barriers fall among a Hopper forward kernel's instructions, from its SASS.

ptxas moves register work across `bar.sync` / `bar.arrive` (they order memory only), so the
source does not say where a consumer's turn begins and ends (kernel_notes_sm90.md step 17).
This compiles each fwd_sm90 instantiation with NVRTC for sm_90a (no GPU needed), disassembles
it with nvdisasm and prints its instruction stream condensed to the kinds that matter here,
runs of equal kinds counted: named barriers (BAR.SYNC / BAR.ARV), wgmma (HGMMA,
WARPGROUP.ARRIVE / DEPBAR), row maxes (FMNMX), exponentials (MUFU.EX2), shared loads (LDS) and
float-to-int conversions (F2I, as `zero_after` emits). For example, the D=128 main loop reads
`BAR.SYNCx1 FMNMXx65 MUFU.EX2x4 ... BAR.ARVx1 MUFU.EX2x50 ...`.

Needs nvdisasm: on PATH, in $NVDISASM, or from the `nvidia-cuda-nvdisasm` wheel
(`pip install nvidia-cuda-nvdisasm`). CuPy's `nvrtc.getCUBIN` returned an image nvdisasm
rejects, so the cubin comes from the NVRTC C API through ctypes.

Run: PYTHONPATH=. python tests/perf/sass_order.py [--kernels DIR] [--dims 128] [--dtype bfloat16]
    [--full]   (--kernels: a directory holding kernels_cu/, as for ab_kernels.py)
"""

import argparse
import ctypes
import glob
import os
import pathlib
import re
import shutil
import site
import subprocess
import sys
import tempfile

from cuflash import _compile, _launch_sm90

KINDS = re.compile(r"\b(HGMMA|WARPGROUP\.\w+|BAR\.\w+|FMNMX|MUFU\.EX2|LDS|F2I)\b")


def _site_files(pattern: str) -> list[str]:
    found = []
    for root in [*site.getsitepackages(), site.getusersitepackages()]:
        found += sorted(glob.glob(os.path.join(root, "nvidia", "**", pattern), recursive=True))
    return found


def nvrtc_library() -> ctypes.CDLL:
    """The NVRTC shared library CuPy would use: by soname first, else from the nvidia wheels."""
    for name in ("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    candidates = [f for f in _site_files("libnvrtc.so*") if "builtins" not in f]
    if not candidates:
        sys.exit("sass_order: no libnvrtc found (install nvidia-cuda-nvrtc)")
    return ctypes.CDLL(candidates[0])


def nvdisasm_path() -> str:
    found = os.environ.get("NVDISASM") or shutil.which("nvdisasm") or next(
        iter(_site_files("nvdisasm")), None)
    if not found:
        sys.exit("sass_order: nvdisasm not found: pip install nvidia-cuda-nvdisasm, or set NVDISASM")
    return found


def cubin(lib: ctypes.CDLL, spec, arch: str = "sm_90a") -> bytes:
    """`spec` compiled by NVRTC's C API (the same source and options as cuflash's own compile)."""
    source = _compile.expanded_source(spec.source).encode()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source, spec.source.encode(), 0, None, None):
        sys.exit(f"sass_order: nvrtcCreateProgram failed for {spec.name}")
    try:
        lib.nvrtcAddNameExpression(prog, spec.name.encode())
        options = [o.encode() for o in _compile.nvrtc_options(arch)]
        if lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options)):
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            sys.exit(f"sass_order: NVRTC failed on {spec.name}:\n{log.value.decode()}")
        size = ctypes.c_size_t()
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        image = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, image)
        return image.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def condensed(sass: str) -> str:
    """The instruction kinds of KINDS in order, equal neighbours merged: "BAR.SYNCx1; FMNMXx65"."""
    runs: list[list] = []
    for line in sass.splitlines():
        found = KINDS.search(line)
        if not found:
            continue
        kind = found.group(1)
        if runs and runs[-1][0] == kind:
            runs[-1][1] += 1
        else:
            runs.append([kind, 1])
    return "; ".join(f"{kind}x{count}" for kind, count in runs)


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
    dims = {int(d) for d in args.dims.split(",")}
    lib, disassembler = nvrtc_library(), nvdisasm_path()
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    print(f"NVRTC {major.value}.{minor.value}, {disassembler}")
    for spec in _launch_sm90.all_fwd_sm90_specs():
        if spec.dtype != args.dtype or spec.head_dim not in dims:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            path = pathlib.Path(tmp) / "kernel.cubin"
            path.write_bytes(cubin(lib, spec))
            sass = subprocess.run([disassembler, "-c", str(path)], capture_output=True, text=True,
                                  check=True).stdout
        print(f"\n{spec.name}\n{condensed(sass)}")
        if args.full:
            print(sass)


if __name__ == "__main__":
    main()
