"""Load kernels_cu/, compile with NVRTC, memoise modules.

Sources are found in the installed package (``cuflash/kernels_cu``, mapped from the top-level
``kernels_cu/`` at build time) or, in a source checkout, beside the package. Relative
``#include "x.cuh"`` lines are expanded here, so the text handed to NVRTC is self-contained and
CuPy's disk cache, which hashes only the text and the options, sees every header change.

Debug switches: ``CUFLASH_DEBUG=1`` builds checked kernels (debug_build); ``CUFLASH_LINEINFO=1``
adds ``-lineinfo``; ``CUFLASH_VERBOSE=1`` logs each kernel load (logger ``cuflash``): loaded from
CuPy's disk cache, or compiled, and how long it took.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import posixpath
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cuflash.cuda._spec import KernelSpec

log = logging.getLogger("cuflash")
if os.environ.get("CUFLASH_VERBOSE") and not log.handlers:
    # An explicit switch deserves visible output even in a program that configured no logging.
    log.setLevel(logging.DEBUG)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    log.addHandler(handler)
    log.propagate = False  # one line per record, whatever the application configured

# [ \t], not \s: a match must not swallow the newlines around it (line numbers stay true).
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"[ \t]*$', re.MULTILINE)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", re.MULTILINE)
# Architectures whose kernels need the "a" (architecture-specific) target: wgmma, setmaxnreg.
_ARCH_SPECIFIC = {90}


def kernels_dir() -> Path:
    """Directory holding the CUDA sources, in an installed wheel or a source checkout."""
    package = Path(__file__).resolve().parent.parent  # cuflash/
    for candidate in (package / "kernels_cu", package.parent / "kernels_cu"):
        if (candidate / "core/common.cuh").is_file():
            return candidate
    raise FileNotFoundError(
        f"cuflash CUDA sources not found: looked for kernels_cu/core/common.cuh in {package} and "
        f"{package.parent}; reinstall cuflash"
    )


@functools.cache
def expanded_source(filename: str) -> str:
    """`filename` (a path under kernels_cu/, e.g. ``"sm90/fwd_sm90.cu"``) with its includes,
    relative to the including file, expanded recursively, each header once."""
    root = kernels_dir()
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"kernels_cu/{name} not found (included from the sources)")
        text = _PRAGMA_ONCE.sub("", path.read_text())

        def include(m: re.Match) -> str:
            # After the header, say where the includer resumes: compile errors and the checked
            # build's messages (__FILE__, __LINE__) then name the true file and line.
            resume = text.count("\n", 0, m.start()) + 2
            header = posixpath.normpath(posixpath.join(posixpath.dirname(name), m.group(1)))
            return f'{expand(header)}\n#line {resume} "{name}"'

        body = _INCLUDE.sub(include, text)
        return f'#line 1 "{name}"\n{body}'

    return expand(filename)


def arch_flag(compute_capability: int) -> str:
    """``-arch`` value for a device, e.g. 90 -> ``sm_90a``, 80 -> ``sm_80``."""
    suffix = "a" if compute_capability in _ARCH_SPECIFIC else ""
    return f"sm_{compute_capability}{suffix}"


def nvrtc_options(arch: str) -> tuple[str, ...]:
    """NVRTC options for one architecture (``sm_80``, ``sm_90a``, ...)."""
    from cuflash.cuda import _launch_common

    options = [
        f"-arch={arch}",
        "-std=c++17",
        f"-DCUFLASH_FWD_PARAMS_SIZE={_launch_common.FWD_PARAMS.itemsize}",
        f"-DCUFLASH_BWD_PARAMS_SIZE={_launch_common.BWD_PARAMS.itemsize}",
        f"-DCUFLASH_DECODE_PARAMS_SIZE={_launch_common.DECODE_PARAMS.itemsize}",
    ]
    if debug_build():
        options += ["-DCUFLASH_DEBUG", "-lineinfo"]
    elif os.environ.get("CUFLASH_LINEINFO"):
        options.append("-lineinfo")
    return tuple(options)


def debug_build() -> bool:
    """True where ``CUFLASH_DEBUG`` is set (any non-empty value, as every CUFLASH_ switch):
    kernels compile with kernels_cu/core/check.cuh's bounds assertions on every global access, and
    ``-lineinfo``. Read at each compile, so set it before the first call; the flag is part of
    the options, hence of CuPy's cache key."""
    return bool(os.environ.get("CUFLASH_DEBUG"))


# What CuPy's RawModule adds to every NVRTC compile of ours (cupy/cuda/compiler.py, CuPy 13-14):
# functions without an execution space are device functions, and fp32 denormals are flushed.
# The compiles that check a kernel on the CPU (compile_report, tests/sass.py) add them too, so
# that their registers, spills and SASS are those of the code that runs: without -ftz=true the
# forward's SASS differs in most floating-point instructions, and NVRTC 13.0 rejects the generic
# lambdas without the first.
RAWMODULE_OPTIONS = ("--device-as-default-execution-space", "-ftz=true")


def check_options(arch: str) -> tuple[str, ...]:
    """nvrtc_options(arch) plus what RawModule adds: the options of the code that runs."""
    return (*nvrtc_options(arch), *RAWMODULE_OPTIONS)


# ---- GPU: RawModule memo -------------------------------------------------------------------

_lock = threading.Lock()
_key_locks: dict[tuple, threading.Lock] = {}
_functions: dict[tuple, object] = {}
compile_seconds: dict[str, float] = {}


def get_function(spec: KernelSpec, device_id: int, compute_capability: int):
    """The loaded ``cupy.RawKernel`` for `spec` on a device; compiles once per (device, spec).

    Two threads asking for the same kernel at once get one compile: the second waits on a
    per-key lock and then finds the memo filled.
    """
    key = (device_id, spec)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    with _lock:
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:
        fn = _functions.get(key)
        if fn is None:
            fn = _load(spec, compute_capability)
            _functions[key] = fn
    return fn


@functools.cache
@functools.cache
def compute_capability(device_id: int) -> int:
    """e.g. 90 for an H100 (memoised: asking the driver costs microseconds per call)."""
    import cupy

    return int(cupy.cuda.Device(device_id).compute_capability)


def smem_limit(device_id: int) -> int:
    """Bytes of shared memory one block may opt in to on a device (227 KB on an H100, 163 KB on
    an A100, 99 KB on cc 8.6 / 8.9 / 12.0)."""
    import cupy

    runtime = cupy.cuda.runtime
    return runtime.deviceGetAttribute(runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, device_id)


def _load(spec: KernelSpec, compute_capability: int):
    import cupy

    if compute_capability < spec.min_arch:
        raise RuntimeError(
            f"{spec.name} needs compute capability >= {spec.min_arch / 10:.1f}; "
            f"this GPU has {compute_capability / 10:.1f}"
        )
    limit = smem_limit(cupy.cuda.Device().id)
    if spec.smem_bytes > limit:
        raise RuntimeError(
            f"{spec.name} needs {spec.smem_bytes} bytes of shared memory per block; this GPU "
            f"(compute capability {compute_capability / 10:.1f}) allows {limit}. No smaller tile "
            f"of this kernel is written for such GPUs (the fp16/bf16 backward has them up to "
            f"head dim 128)"
        )
    start = time.perf_counter()
    global _disk_cache_failed
    debug = log.isEnabledFor(logging.DEBUG)
    cache_dir = _cache_dir() if debug else None
    before = _cubins(cache_dir) if cache_dir else {}
    in_memory = _disk_cache_failed or _cupy_in_memory()
    fn = None
    if not _disk_cache_failed:
        try:
            fn = _compile_and_load(spec, compute_capability)
        except OSError as err:
            # CuPy compiled the kernel but could not write its disk cache (a read-only or full
            # CUPY_CACHE_DIR): compile again without the disk, rather than fail the call, and
            # skip the disk for the rest of the process.
            log.debug("kernel cache unusable (%s: %s); compiling %s and later kernels in "
                      "memory", type(err).__name__, err, spec.name)
            _disk_cache_failed = in_memory = True
    if fn is None:
        with _in_memory_compiles():
            fn = _compile_and_load(spec, compute_capability)
    if spec.smem_bytes > 48 * 1024:
        fn.max_dynamic_shared_size_bytes = spec.smem_bytes
    seconds = time.perf_counter() - start
    compile_seconds[spec.name] = seconds
    if debug:
        if in_memory:
            how = "compiled in memory, without the disk cache"
        elif cache_dir is None:
            how = "compiled or loaded through CuPy's kernel cache backend"
        elif any(before.get(name) != stamp for name, stamp in _cubins(cache_dir).items()):
            how = (f"compiled (no valid binary in the disk cache {cache_dir}: missing or corrupt; "
                   f"CuPy wrote a new one)")
        else:
            how = f"loaded from the disk cache {cache_dir}"
        log.debug("%s for cc %d: %s in %.2f s", spec.name, compute_capability, how, seconds)
    return fn


def _cupy_in_memory() -> bool:
    """CUPY_CACHE_IN_MEMORY as CuPy reads it at each compile: only an integer equal to 1 is on."""
    try:
        return int(os.environ.get("CUPY_CACHE_IN_MEMORY") or 0) == 1
    except ValueError:
        return False


def _cache_dir() -> str | None:
    """CuPy's kernel cache directory: CuPy 14's disk backend's (CUPY_CACHE_DIR as read when cupy
    was imported), else CuPy 13's (read at each compile); None for a backend without one."""
    from cupy.cuda import compiler

    backend = getattr(compiler, "_kernel_cache_backend", None)
    if backend is not None:
        return getattr(backend, "_cache_dir", None)
    return os.environ.get("CUPY_CACHE_DIR", os.path.expanduser("~/.cupy/kernel_cache"))


def _cubins(directory: str) -> dict[str, tuple[int, int]]:
    """{name: (inode, mtime_ns)} of the cached binaries in `directory` ({} if it can't be read).

    Only at DEBUG, to tell a load from a compile: CuPy stores a new binary by renaming a new file
    into place, so a compile adds or changes an entry and a load leaves them all alone. (Another
    process writing the directory at the same moment can make a load read as a compile.)
    """
    found = {}
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.endswith(".cubin"):
                with contextlib.suppress(OSError):  # removed meanwhile
                    stat = entry.stat()
                    found[entry.name] = (stat.st_ino, stat.st_mtime_ns)
    return found


def _compile_and_load(spec: KernelSpec, compute_capability: int):
    """NVRTC through CuPy's RawModule (its disk cache unless told otherwise), then load."""
    import cupy
    from cupy.cuda.compiler import CompileException

    try:
        module = cupy.RawModule(
            code=spec_source(spec),
            options=nvrtc_options(arch_flag(compute_capability)),
            name_expressions=[spec.name],
        )
        return module.get_function(spec.name)
    except CompileException as err:
        if isinstance(spec.score, str):
            raise
        raise UserCodeError(spec, str(err)) from None


def spec_source(spec: KernelSpec) -> str:
    """The text NVRTC compiles for `spec`: its file, expanded, then a user kind's C++."""
    return expanded_source(spec.source) + spec.user_source


class UserCodeError(ValueError):
    """NVRTC rejected the C++ of a `cuflash.ScoreMod` or `cuflash.MaskMod`: the message shows
    each error at the user's own line."""

    def __init__(self, spec: KernelSpec, log_text: str):
        from cuflash._user_mods import explain_compile_error

        self.log = log_text
        super().__init__(
            f"score_mod / mask_mod: NVRTC could not compile the modification's C++ (into "
            f"{spec.entry}):\n{explain_compile_error(spec.score, log_text)}")


_in_memory_lock = threading.Lock()
_disk_cache_failed = False  # set once CuPy could not write its disk cache in this process


@contextlib.contextmanager
def _in_memory_compiles():
    """CuPy compiles without touching its disk cache while this is active (it reads
    CUPY_CACHE_IN_MEMORY at each compile). Process-wide, so one such compile at a time; another
    thread's CuPy compile meanwhile merely skips the disk too."""
    with _in_memory_lock:
        saved = os.environ.get("CUPY_CACHE_IN_MEMORY")
        os.environ["CUPY_CACHE_IN_MEMORY"] = "1"
        try:
            yield
        finally:
            if saved is None:
                del os.environ["CUPY_CACHE_IN_MEMORY"]
            else:
                os.environ["CUPY_CACHE_IN_MEMORY"] = saved


# ---- CPU: NVRTC resource report (no GPU needed) --------------------------------------------


@dataclass(frozen=True)
class CompileReport:
    """ptxas's resource report for one kernel instantiation."""

    spec: KernelSpec
    arch: str
    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    static_smem_bytes: int
    seconds: float
    log: str
    # ptxas's coded notes about this function, e.g. (C7511, C7514, C7515) wgmma serialised,
    # (C7517) a wgmma.wait_group the compiler had to inject; printed before the function's report
    # block.
    notes: tuple[str, ...] = ()

    @property
    def clean(self) -> bool:
        """No spills and no stack frame: every array stayed in registers."""
        return self.stack_bytes == 0 and self.spill_stores == 0 and self.spill_loads == 0

    def line(self) -> str:
        return (
            f"{self.arch:7s} regs={self.registers:3d} stack={self.stack_bytes}B "
            f"spill={self.spill_stores}/{self.spill_loads}B smem={self.smem_bytes}B "
            f"{self.seconds:5.2f}s  {self.spec.name}"
        )

    @property
    def wgmma_serialized(self) -> bool:
        """ptxas could not pipeline this kernel's wgmma (it waits after each one, or injects a
        wait): a silent slowdown. Its notes give the reason under several codes (C7511: too few
        registers for the pipeline; C7514 / C7515: other instructions reading / writing
        accumulators while a wgmma may be in flight; C7517: an injected wait_group), so the
        notes are matched by their text."""
        return any(re.search(r"wgmma\.mma_async instructions are serialized|wait_group is injected",
                             note) for note in self.notes)

    @property
    def smem_bytes(self) -> int:
        """Static plus dynamic shared memory per block."""
        return self.static_smem_bytes + self.spec.smem_bytes


def compile_report(spec: KernelSpec, arch: str) -> CompileReport:
    """Compile `spec` for `arch` with NVRTC on the CPU and parse ptxas's ``-v`` report."""
    from cupy_backends.cuda.libs import nvrtc

    source = spec_source(spec)
    prog = nvrtc.createProgram(source, spec.source, [], [])
    start = time.perf_counter()
    try:
        nvrtc.addNameExpression(prog, spec.name)
        try:
            nvrtc.compileProgram(prog, [*check_options(arch), "-Xptxas=-v"])
        except nvrtc.NVRTCError as err:
            if not isinstance(spec.score, str):
                raise UserCodeError(spec, nvrtc.getProgramLog(prog)) from None
            raise RuntimeError(
                f"NVRTC failed on {spec.name} for {arch}:\n{nvrtc.getProgramLog(prog)}"
            ) from err
        text = nvrtc.getProgramLog(prog)
        lowered = nvrtc.getLoweredName(prog, spec.name)
    finally:
        nvrtc.destroyProgram(prog)
    seconds = time.perf_counter() - start
    return _parse_ptxas(spec, arch, lowered, text, seconds)


def _parse_ptxas(spec: KernelSpec, arch: str, lowered: str, text: str, seconds: float):
    # ptxas prints one block per function; keep the one for our entry point.
    blocks = re.split(r"ptxas info\s*: Compiling entry function ", text)
    block = next((b for b in blocks if b.startswith(f"'{lowered}'")), None)
    if block is None:
        raise RuntimeError(f"no ptxas report for {spec.name} ({lowered}) in:\n{text}")

    def number(pattern: str) -> int:
        found = re.search(pattern, block)
        return int(found.group(1)) if found else 0

    return CompileReport(
        spec=spec,
        arch=arch,
        registers=number(r"Used (\d+) registers"),
        stack_bytes=number(r"(\d+) bytes stack frame"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
        static_smem_bytes=number(r"(\d+) bytes smem"),
        seconds=seconds,
        log=block,
        notes=tuple(line for line in text.splitlines()
                    if re.search(r"\(C\d{4}\)", line) and f"'{lowered}'" in line),
    )
