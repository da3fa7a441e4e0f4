"""The SASS of a kernel instantiation, on the CPU: NVRTC's cubin disassembled by nvdisasm.

The cubin comes from NVRTC's C API through ctypes, compiled from the same source and options as
the code that runs (`_compile.expanded_source`, `_compile.check_options`: ours and what CuPy's
RawModule adds); CuPy's `nvrtc.getCUBIN` returned an image that nvdisasm rejects. nvdisasm comes
from $NVDISASM, PATH or the `nvidia-cuda-nvdisasm` wheel (in the `test` extra); libnvrtc from the
loader path or the `nvidia-cuda-nvrtc` wheel.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import re
import shutil
import site
import subprocess
import tempfile

from cuflash.cuda import _compile

# The instruction kinds that show how a Hopper kernel's warpgroups take turns: named barriers,
# wgmma, row maxes, exponentials, shared loads and float-to-int conversions (zero_after's F2I).
KINDS = re.compile(r"\b(HGMMA|WARPGROUP\.\w+|BAR\.\w+|FMNMX|MUFU\.EX2|LDS|F2I)\b")


def _site_files(pattern: str) -> list[str]:
    found = []
    for root in [*site.getsitepackages(), site.getusersitepackages()]:
        found += sorted(glob.glob(os.path.join(root, "nvidia", "**", pattern), recursive=True))
    return found


@functools.cache
def nvrtc_library() -> ctypes.CDLL | None:
    """libnvrtc by soname, else from the nvidia wheels; None where there is none."""
    for name in ("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    for path in _site_files("libnvrtc.so*"):
        if "builtins" not in path:
            return ctypes.CDLL(path)
    return None


def load_nvrtc(lib_dir: str) -> ctypes.CDLL:
    """The libnvrtc.so.* in `lib_dir` (an unpacked nvidia-cuda-nvrtc wheel's lib/), with its
    builtins library loaded first so that NVRTC finds it without LD_LIBRARY_PATH. Load it before
    any other libnvrtc in the process: the loader reuses a library of the same soname."""
    for path in sorted(glob.glob(os.path.join(lib_dir, "libnvrtc-builtins.so.*"))):
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    paths = sorted(glob.glob(os.path.join(lib_dir, "libnvrtc.so.*")))
    if not paths:
        raise FileNotFoundError(f"no libnvrtc.so.* in {lib_dir}")
    return ctypes.CDLL(paths[0])


def nvdisasm_path() -> str | None:
    return os.environ.get("NVDISASM") or shutil.which("nvdisasm") or next(
        iter(_site_files("nvdisasm")), None)


def missing_tools() -> str | None:
    """Why SASS cannot be had here, or None."""
    if nvrtc_library() is None:
        return "no libnvrtc (install nvidia-cuda-nvrtc)"
    if nvdisasm_path() is None:
        return "no nvdisasm (install nvidia-cuda-nvdisasm, or set NVDISASM)"
    return None


def nvrtc_version(lib: ctypes.CDLL | None = None) -> str:
    """"major.minor" of `lib` (default: nvrtc_library())."""
    major, minor = ctypes.c_int(), ctypes.c_int()
    (lib or nvrtc_library()).nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return f"{major.value}.{minor.value}"


def _compiled(spec, arch: str, lib: ctypes.CDLL | None, options: tuple[str, ...] = ()):
    """(cubin, log, lowered name) of `spec` compiled for `arch` by NVRTC's C API (`lib`, default:
    nvrtc_library()), with check_options(arch) and `options`."""
    lib = lib or nvrtc_library()
    prog = ctypes.c_void_p()
    source = _compile.expanded_source(spec.source).encode()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source, spec.source.encode(), 0, None, None):
        raise RuntimeError(f"nvrtcCreateProgram failed for {spec.name}")
    try:
        lib.nvrtcAddNameExpression(prog, spec.name.encode())
        encoded = [o.encode() for o in (*_compile.check_options(arch), *options)]
        argv = (ctypes.c_char_p * len(encoded))(*encoded)
        failed = lib.nvrtcCompileProgram(prog, len(encoded), argv)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if failed:
            raise RuntimeError(f"NVRTC failed on {spec.name}:\n{log.value.decode()}")
        lowered = ctypes.c_char_p()
        lib.nvrtcGetLoweredName(prog, spec.name.encode(), ctypes.byref(lowered))
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        image = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, image)
        return image.raw, log.value.decode(), lowered.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def cubin(spec, arch: str = "sm_90a", lib: ctypes.CDLL | None = None) -> bytes:
    """`spec` compiled for `arch` by NVRTC's C API (`lib`, default: nvrtc_library())."""
    return _compiled(spec, arch, lib)[0]


def ptxas_report(spec, arch: str = "sm_90a", lib: ctypes.CDLL | None = None):
    """_compile.compile_report's CompileReport, from NVRTC's C API (`lib`, default:
    nvrtc_library()) rather than CuPy's: for another NVRTC than the one CuPy loads."""
    _, log, lowered = _compiled(spec, arch, lib, ("-Xptxas=-v",))
    return _compile._parse_ptxas(spec, arch, lowered, log, 0.0)


def sass(spec, arch: str = "sm_90a") -> str:
    """The disassembly (`nvdisasm -c`) of `spec` compiled for `arch`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin(spec, arch))
        return subprocess.run([nvdisasm_path(), "-c", path], capture_output=True, text=True,
                              check=True).stdout


def kinds(text: str) -> list[str]:
    """The instructions of KINDS in program order, one entry each ("BAR.SYNC", "MUFU.EX2", ...)."""
    return [found.group(1) for line in text.splitlines() if (found := KINDS.search(line))]


def condensed(text: str) -> str:
    """kinds() with equal neighbours merged: "BAR.SYNCx1; FMNMXx65; MUFU.EX2x4; ..."."""
    runs: list[list] = []
    for kind in kinds(text):
        if runs and runs[-1][0] == kind:
            runs[-1][1] += 1
        else:
            runs.append([kind, 1])
    return "; ".join(f"{kind}x{count}" for kind, count in runs)
