"""Where a benchmark runs: a CUDA GPU (CUDA events, torch's or CuPy's allocator) or the CPU path
(wall clock, tracemalloc); each makes the inputs, times calls and measures workspace."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from cuflash.bench.config import CPU_CACHE_BYTES, GIB, MIB, SDPA_BACKENDS, Case
from cuflash.bench.impls import Cuflash, Impl, Inputs, Sdpa, Standard, first_line
from cuflash.bench.provenance import cuda_version, guard


class Gpu:
    """A CUDA device seen through CuPy, with torch or CuPy as the array framework."""

    mode = "cuda"
    unit, unit_scale = "TFLOP/s", 1.0
    timer = "CUDA events"

    def __init__(self, framework: str):
        import cupy

        self.cupy = cupy
        self.framework = framework
        self.device_id = cupy.cuda.Device().id
        props = cupy.cuda.runtime.getDeviceProperties(self.device_id)
        name = props["name"]
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        self.props = props
        self.cache_bytes = int(props.get("l2CacheSize", 50 * MIB))
        self.capacity = int(props["totalGlobalMem"])
        self.torch = None
        if framework == "torch":
            import torch

            self.torch = torch

    def scope(self):
        """This device, and CuPy's current stream made torch's (as cuflash does for torch
        tensors), so that CuPy events time SDPA, cuflash and CuPy work alike."""
        from cuflash import _interop

        return _interop.stream_scope(_interop.Source(self.framework, "cuda", self.device_id))

    def implementations(self) -> list[Impl]:
        impls: list[Impl] = [Cuflash()]
        if self.torch is not None:
            impls += [Sdpa(name, self.torch) for name in SDPA_BACKENDS]
        impls.append(Standard("cupy-standard", self.cupy, self._to_cupy))
        return impls

    def _to_cupy(self, x):
        return x if self.torch is None else self.cupy.from_dlpack(x)

    def inputs(self, case: Case, count: int, seed: int) -> list[Inputs]:
        """`count` sets of fresh standard-normal q, k, v, dout."""
        if self.torch is not None:
            torch = self.torch
            device = f"cuda:{self.device_id}"
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
            dtype = getattr(torch, case.dtype)

            def rand():
                return torch.randn(case.shape, generator=generator, dtype=dtype, device=device)
        else:
            rng = self.cupy.random.default_rng(seed)
            normal = "float64" if case.dtype == "float64" else "float32"
            dtype = numpy_dtype(case.dtype)

            def rand():
                return rng.standard_normal(case.shape, dtype=normal).astype(dtype)

        return [Inputs(rand(), rand(), rand(), rand()) for _ in range(count)]

    def synchronize(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()

    def elapsed_ms(self, calls: list[Callable]) -> list[float]:
        """Milliseconds of each call, from CUDA events around it; one synchronisation at the end."""
        event = self.cupy.cuda.Event
        events = [(event(), event()) for _ in calls]
        for call, (start, end) in zip(calls, events, strict=True):
            start.record()
            call()
            end.record()
        events[-1][1].synchronize()
        return [self.cupy.cuda.get_elapsed_time(start, end) for start, end in events]

    def release(self, collect: bool = False) -> None:
        """Hand cached blocks back to the driver so the next implementation has the device
        (after a failure, `collect` first frees what the exception's frames held)."""
        if collect:
            gc.collect()
        if self.torch is not None:
            self.torch.cuda.empty_cache()
        self.cupy.get_default_memory_pool().free_all_blocks()

    def workspace(self, call: Callable[[], tuple]) -> tuple[int, int]:
        """(peak bytes above the baseline minus the outputs, output bytes) of one call.

        torch's allocator reports its own peak; CuPy's pool is watched by a memory hook. The two
        peaks are added (an upper bound where they happen at different moments).
        """
        self.synchronize()
        self.release()
        hook = pool_peak_hook()
        torch = self.torch
        if torch is not None:
            torch.cuda.reset_peak_memory_stats(self.device_id)
            base = torch.cuda.memory_allocated(self.device_id)
        with hook:
            outputs = call()
            self.synchronize()
        torch_peak = 0 if torch is None else torch.cuda.max_memory_allocated(self.device_id) - base
        output_bytes = sum(int(x.nbytes) for x in outputs)
        return torch_peak + hook.peak - output_bytes, output_bytes

    def describe(self) -> str:
        return f"{self.name} ({self.framework} arrays)"

    def environment(self) -> dict:
        cupy, props = self.cupy, self.props
        env = {
            "device": "cuda",
            "gpu": self.name,
            "compute_capability": f"{props['major']}.{props['minor']}",
            "sm_count": int(props["multiProcessorCount"]),
            "memory_bytes": self.capacity,
            "l2_bytes": self.cache_bytes,
            "driver": guard(lambda: cuda_version(cupy.cuda.runtime.driverGetVersion())),
            "cuda_runtime": guard(lambda: cuda_version(cupy.cuda.runtime.runtimeGetVersion())),
            "framework": self.framework,
        }
        if self.torch is not None:
            env["cudnn"] = guard(lambda: str(self.torch.backends.cudnn.version()))
        return env


class Cpu:
    """The CPU path: NumPy arrays, wall-clock timing, tracemalloc for memory."""

    mode = "cpu"
    unit, unit_scale = "GFLOP/s", 1e3
    timer = "wall clock"
    framework = "numpy"
    cache_bytes = CPU_CACHE_BYTES

    def __init__(self):
        self.name = platform.processor() or platform.machine() or "CPU"
        try:
            self.capacity = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            self.capacity = 8 * GIB

    def scope(self):
        return contextlib.nullcontext()

    def implementations(self) -> list[Impl]:
        return [Cuflash(), Standard("numpy-standard", np, lambda x: x)]

    def inputs(self, case: Case, count: int, seed: int) -> list[Inputs]:
        rng = np.random.default_rng(seed)

        def rand():
            return rng.standard_normal(case.shape, dtype=np.float32).astype(case.dtype)

        return [Inputs(rand(), rand(), rand(), rand()) for _ in range(count)]

    def synchronize(self) -> None:
        pass

    def elapsed_ms(self, calls: list[Callable]) -> list[float]:
        times = []
        for call in calls:
            start = time.perf_counter()
            call()
            times.append(1e3 * (time.perf_counter() - start))
        return times

    def release(self, collect: bool = False) -> None:
        if collect:
            gc.collect()

    def workspace(self, call: Callable[[], tuple]) -> tuple[int, int]:
        """(peak bytes minus the outputs, output bytes); NumPy reports buffers to tracemalloc."""
        tracemalloc.start()
        try:
            outputs = call()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        output_bytes = sum(int(x.nbytes) for x in outputs)
        return peak - output_bytes, output_bytes

    def describe(self) -> str:
        return f"CPU {self.name} ({os.cpu_count()} cores, NumPy)"

    def environment(self) -> dict:
        return {"device": "cpu", "cpu": self.name, "cores": os.cpu_count(),
                "memory_bytes": self.capacity}


def pool_peak_hook(start: int = 0):
    """A CuPy memory hook recording the peak of pool memory in use while it is active, counted
    from `start` bytes."""
    import cupy

    class PoolPeak(cupy.cuda.MemoryHook):
        name = "cuflash-bench-peak"

        def __init__(self):
            self.current = self.peak = start

        def malloc_postprocess(self, **kwargs):
            self.current += kwargs["mem_size"]
            self.peak = max(self.peak, self.current)

        def free_postprocess(self, **kwargs):
            self.current -= kwargs["mem_size"]

    return PoolPeak()


def poisoning_allocator(cupy):
    """A CuPy allocator drawing from the default pool and filling each allocation with 0xFF bytes
    (NaN in every float dtype) on the current stream, so anything a kernel fails to write shows."""
    pool = cupy.get_default_memory_pool()

    def alloc(nbytes: int):
        memory = pool.malloc(nbytes)
        if nbytes:
            cupy.cuda.runtime.memsetAsync(memory.ptr, 0xFF, nbytes,
                                          cupy.cuda.get_current_stream().ptr)
        return memory

    return alloc


def numpy_dtype(name: str):
    """NumPy dtype for CuPy arrays; bfloat16 comes from ml_dtypes."""
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def find_gpu() -> str | None:
    """None when CuPy sees a CUDA GPU, else why not."""
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # ImportError, no driver, no device: CuPy raises its own errors
        return f"{type(err).__name__}: {first_line(str(err))}"
    return None if count else "device count 0"


def torch_sees_gpu() -> bool:
    """Whether torch is installed and sees a CUDA GPU."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()

