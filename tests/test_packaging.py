"""The wheel: built offline from a copy of the checkout, installed into a fresh venv, used from
outside the source tree. It must carry the CUDA sources as ``cuflash/kernels_cu`` and find them
there, not in a checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNEL_SOURCES = sorted(p.relative_to(ROOT / "kernels_cu").as_posix()
                        for p in (ROOT / "kernels_cu").rglob("*") if p.suffix in (".cu", ".cuh"))

pytestmark = pytest.mark.slow


def run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} exited {result.returncode}:\n"
        f"{result.stdout}\n{result.stderr}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built with this interpreter's setuptools and no network."""
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy: the build writes build/ and *.egg-info, and others may be building too.
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis",
        ".pytest_cache", ".ruff_cache", "bench-out"))
    dist = tmp / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
        "-w", dist, src, cwd=tmp)
    (built,) = dist.glob("cuflash-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (no deps: they come from this interpreter's env)."""
    env_dir = tmp_path_factory.mktemp("venv") / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", env_dir, cwd=env_dir.parent)
    python = env_dir / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
        wheel, cwd=env_dir.parent)
    # numpy & co. from the running environment, placed after the venv's own site-packages (so the
    # installed cuflash wins over any editable cuflash there: .pth files in an added directory
    # are not executed).
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                    cwd=env_dir.parent).strip())
    outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "outer_env.pth").write_text("\n".join(sorted(outer)) + "\n")
    return env_dir


def test_wheel_contents(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in KERNEL_SOURCES:
        assert f"cuflash/kernels_cu/{source}" in names, source
    assert {"cuflash/__init__.py", "cuflash/__main__.py", "cuflash/api.py"} <= names
    assert not [n for n in names if n.startswith(("tests/", "scratch/", "kernels_cu/", "docs/"))]
    assert not [n for n in names if n.endswith((".so", ".pyd", ".pyc"))], "the wheel is pure Python"
    assert wheel.name.endswith("-py3-none-any.whl")


def test_installed_package_finds_its_own_kernel_sources(venv: Path, tmp_path: Path):
    code = textwrap.dedent(f"""
        import cuflash, cuflash.cuda._compile as c
        print(cuflash.__file__)
        print(c.kernels_dir())
        for name in {KERNEL_SOURCES!r}:
            assert (c.kernels_dir() / name).read_text(), name
        for name in {[s for s in KERNEL_SOURCES if s.endswith(".cu")]!r}:
            assert '#include "' not in c.expanded_source(name), name  # every header shipped
    """)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    module_file, kernels = run(venv / "bin" / "python", "-c", code, cwd=outside,
                               env=env).split()
    site = (venv / "lib").resolve()
    assert Path(module_file).resolve().is_relative_to(site), module_file
    assert Path(kernels).resolve().is_relative_to(site), kernels
    assert Path(kernels).name == "kernels_cu" and Path(kernels).parent.name == "cuflash"
    for name in ("sm80/fwd_sm80.cu", "core/common.cuh"):
        assert (Path(kernels) / name).is_file(), name


def test_installed_cli_runs(venv: Path, tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    stdout = run(venv / "bin" / "python", "-m", "cuflash", "info", cwd=tmp_path, env=env)
    (line,) = (line for line in stdout.splitlines() if line.startswith("kernel sources"))
    kernels = Path(line.removeprefix("kernel sources").strip())
    assert kernels.resolve().is_relative_to((venv / "lib").resolve()), stdout
    assert (venv / "bin" / "cuflash").is_file(), "the console script is installed"


def test_docs_and_sources_stand_alone():
    # Files outside this tree (a design document, a shared folder above it) are not shipped: the
    # README, docs, package, kernels and tests must point into the tree instead.
    outside = ("DESIGN" + ".md", "../" + "shared")
    files = [ROOT / "README.md", *(p for top in ("docs", "cuflash", "kernels_cu", "tests")
                                   for p in (ROOT / top).rglob("*") if p.is_file())]
    cited = [f"{p.relative_to(ROOT)}: {name}" for p in files
             if p.suffix in (".md", ".py", ".cu", ".cuh")
             for name in outside if name in p.read_text(encoding="utf-8")]
    assert not cited, cited
