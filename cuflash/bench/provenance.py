"""What ran where, for a benchmark's JSON: versions, the device, the git state and a digest of the
package's sources."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np

import cuflash
from cuflash.bench.impls import describe


def environment(device) -> dict:
    """Versions, device and source revision, for the JSON."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cuflash": cuflash.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "cupy": _cupy_version(),
        "torch": _version("torch"),
        "matplotlib": _version("matplotlib"),
        "nvrtc": guard(_nvrtc_version),
        **git_state(),
        "source_digest": guard(source_digest),
        **device.environment(),
    }
    return env


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cupy_version() -> str | None:
    try:
        import cupy
    except Exception:  # not installed, or a broken CUDA install failing at import
        return None
    return cupy.__version__


def _nvrtc_version() -> str:
    from cupy_backends.cuda.libs import nvrtc

    major, minor = nvrtc.getVersion()
    return f"{major}.{minor}"


def cuda_version(encoded: int) -> str:
    """CUDA's ``1000 * major + 10 * minor`` as text."""
    return f"{encoded // 1000}.{encoded % 1000 // 10}" if encoded else "none"


def guard(probe: Callable[[], str]) -> str:
    """`probe()`, or "unavailable (why)" where it raises: a report field never stops a run."""
    try:
        return probe()
    except Exception as err:  # a report field, never a crash
        return f"unavailable ({describe(err)})"


def git_state() -> dict:
    root = Path(cuflash.__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def source_digest() -> str:
    """12 hex digits of SHA-256 over the package's Python files (this subpackage's included) and
    the CUDA sources (names and bytes). It names the code that ran even where git cannot: a copy
    of a working tree whose .git is stale or absent (the GPU machine's), or an installed wheel."""
    import hashlib

    from cuflash.cuda import _compile

    package = Path(cuflash.__file__).resolve().parent
    files = sorted(package.rglob("*.py")) + sorted(_compile.kernels_dir().rglob("*.cu*"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.parent.name}/{path.name}\0".encode())  # folder/file
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]
