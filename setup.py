"""Build fastddpm's compiled core.

fastddpm._C       the C++ CPU core: OpenMP, runtime dispatch AVX-512 / AVX2 / generic (each ISA file
                  selects its own target with #pragma GCC target, so no -march=native). Optional: a
                  machine without a working C++17 compiler with OpenMP still installs, with one
                  warning, and runs on numba (FASTDDPM_REQUIRE_NATIVE=1 makes that an error).
fastddpm._C_cuda  the CUDA core, built when nvcc is found (FASTDDPM_CUDA=auto|0|1), even without a GPU.
                  The CUDA runtime is linked statically and finds the driver at run time, and the module
                  is separate from _C, so a broken or absent CUDA stack never stops the CPU core importing.
FASTDDPM_CUDA_ARCHS  semicolon list of SM numbers (default 75;80;86;89;90; PTX for the last).
The build writes what it built, and why anything was not, into fastddpm/_build_info.json.
"""
import glob
import json
import os
import shutil
import subprocess
import sys

from concurrent.futures import ThreadPoolExecutor

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(ROOT, "csrc", "include")
DEFAULT_ARCHS = "75;80;86;89;90"


def find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        cand = os.path.join(home, "bin", "nvcc")
        nvcc = cand if os.path.exists(cand) else None
    return nvcc


def find_cuda_home(nvcc):
    """The toolkit root of this nvcc (its include/ and lib64/): nvcc may be a wrapper script elsewhere."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    try:  # nvcc names its own bin/ in its dry-run environment (#$ _HERE_=...)
        dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True).stderr
        candidates += [os.path.dirname(ln.split("=", 1)[1].strip()) for ln in dry.splitlines()
                       if ln.startswith("#$ _HERE_=")]
    except OSError:
        pass
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    raise OSError(f"CUDA toolkit root of {nvcc} not found (set CUDA_HOME)")


def cuda_wanted():
    mode = os.environ.get("FASTDDPM_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FASTDDPM_CUDA must be auto, 0 or 1, got {mode!r}")
    nvcc = find_nvcc()
    if mode == "1" and nvcc is None:
        raise SystemExit("FASTDDPM_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
    return (nvcc if mode != "0" else None), mode


# What a missing or broken toolchain raises while building an extension.
BUILD_ERRORS = (CCompilerError, CompileError, LinkError, ExecError, OSError, subprocess.CalledProcessError)


def native_required():
    """FASTDDPM_REQUIRE_NATIVE=1: a C++ core that fails to build fails the install."""
    value = os.environ.get("FASTDDPM_REQUIRE_NATIVE", "0")
    if value not in ("0", "1"):
        raise SystemExit(f"FASTDDPM_REQUIRE_NATIVE must be 0 or 1, got {value!r}")
    return value == "1"


def one_line(exc) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def cuda_archs():
    archs = [a.strip() for a in os.environ.get("FASTDDPM_CUDA_ARCHS", DEFAULT_ARCHS).replace(",", ";").split(";")]
    archs = [a for a in archs if a]
    for a in archs:
        if not a.isdigit():
            raise SystemExit(f"FASTDDPM_CUDA_ARCHS entries must be SM numbers like 90, got {a!r}")
    return archs


# C++ sources compile in parallel (FASTDDPM_BUILD_JOBS, default: every core); nvcc runs likewise.
ParallelCompile("FASTDDPM_BUILD_JOBS").install()


def build_jobs():
    jobs = os.environ.get("FASTDDPM_BUILD_JOBS", "")
    return int(jobs) if jobs.isdigit() and int(jobs) > 0 else (os.cpu_count() or 1)


CXX_FLAGS = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno", "-Wall"]

# Headers and the shared kernel source: a change to any of them rebuilds the extensions.
HEADERS = sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.inc", recursive=True)
                 + glob.glob("csrc/**/*.cuh", recursive=True))

cpu_ext = Pybind11Extension(
    "fastddpm._C",
    sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/bindings.cpp"],
    include_dirs=[INCLUDE],
    depends=HEADERS,
    extra_compile_args=CXX_FLAGS,
    extra_link_args=["-fopenmp"],
    cxx_std=17,
)

cuda_ext = Pybind11Extension(
    "fastddpm._C_cuda",
    ["csrc/bindings_cuda.cpp"],
    include_dirs=[INCLUDE],
    extra_compile_args=["-O2", "-std=c++17"],
    cxx_std=17,
)


class BuildExt(build_ext):
    """Compiles csrc/cuda/*.cu with nvcc into objects linked into _C_cuda; records the build."""

    def run(self):
        self.nvcc, self.cuda_mode = cuda_wanted()
        self.require_native = native_required()
        self.cuda_info = {"built": False}
        self.cpu_info = {"built": False, "reason": "not built"}
        if self.nvcc is None:
            self.cuda_info["reason"] = ("FASTDDPM_CUDA=0" if self.cuda_mode == "0"
                                        else "nvcc not found at build time")
            self.extensions = [e for e in self.extensions if e.name != "fastddpm._C_cuda"]
        super().run()
        self.write_build_info()

    def build_extension(self, ext):
        if ext.name == "fastddpm._C_cuda":
            try:
                self.build_cuda(ext)
            except BUILD_ERRORS as exc:
                if self.cuda_mode == "1":
                    raise
                self.cuda_info = {"built": False, "reason": f"CUDA build failed: {one_line(exc)}"}
                self.drop_stale(ext)
                print(f"warning: fastddpm._C_cuda not built: {one_line(exc)}", file=sys.stderr)
            return
        try:
            super().build_extension(ext)
            self.cpu_info = {"built": True}
        except BUILD_ERRORS as exc:
            if self.require_native:
                raise
            self.cpu_info = {"built": False, "reason": f"the C++ build failed: {one_line(exc)}"}
            self.drop_stale(ext)
            print(f"warning: fastddpm._C (the C++ CPU core) was not built: {one_line(exc)}. fastddpm "
                  "installs and runs on its numba backend; for the native core, install the binary wheel "
                  "or build with a C++17 compiler with OpenMP (FASTDDPM_REQUIRE_NATIVE=1 makes this an "
                  "error)", file=sys.stderr)

    def drop_stale(self, ext):
        """An extension left by an earlier build would contradict _build_info.json: remove it."""
        path = self.get_ext_fullpath(ext.name)
        if os.path.exists(path):
            os.remove(path)

    def build_cuda(self, ext):
        archs = cuda_archs()
        cuda_home = find_cuda_home(self.nvcc)
        gencode = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        objdir = os.path.join(self.build_temp, "cuda")
        os.makedirs(objdir, exist_ok=True)
        objects, commands = [], []
        sources = sorted(glob.glob("csrc/cuda/*.cu"))
        stamp = os.path.join(objdir, "archs.txt")   # a change of archs must rebuild every object
        archs_changed = True
        if os.path.exists(stamp):
            with open(stamp) as f:
                archs_changed = f.read() != " ".join(gencode)
        for src in sources:
            obj = os.path.join(objdir, os.path.basename(src) + ".o")
            stale = (archs_changed or self.force or not os.path.exists(obj)
                     or max(os.path.getmtime(f) for f in [src, *HEADERS]) > os.path.getmtime(obj))
            if stale:
                commands.append([self.nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-I", INCLUDE,
                                 "-Xcompiler", "-fPIC,-Wall", "-lineinfo", *gencode])
            objects.append(obj)

        def compile_one(cmd):
            print(" ".join(cmd), flush=True)
            subprocess.check_call(cmd)
        with ThreadPoolExecutor(max_workers=min(build_jobs(), max(1, len(commands)))) as pool:
            list(pool.map(compile_one, commands))  # re-raises the first failure
        with open(stamp, "w") as f:
            f.write(" ".join(gencode))
        libdir = next((d for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib"),
                                   os.path.join(cuda_home, "targets", "x86_64-linux", "lib"))
                       if os.path.exists(os.path.join(d, "libcudart_static.a"))), None)
        if libdir is None:
            raise OSError(f"libcudart_static.a not found under {cuda_home}")
        ext.include_dirs.append(os.path.join(cuda_home, "include"))
        ext.extra_objects = objects + [os.path.join(libdir, "libcudart_static.a")]
        ext.extra_link_args = ["-lrt", "-lpthread", "-ldl"]
        # relink when a CUDA object or a header changed, not only when bindings_cuda.cpp did
        ext.depends = HEADERS + sources + objects
        super().build_extension(ext)
        version = subprocess.run([self.nvcc, "--version"], capture_output=True, text=True).stdout
        release = next((ln.split("release")[1].split(",")[0].strip() for ln in version.splitlines()
                        if "release" in ln), "unknown")
        self.cuda_info = {"built": True, "cuda_version": release, "archs": archs, "ptx": archs[-1],
                          "runtime": "static"}

    def write_build_info(self):
        info = {
            "cpu": {**self.cpu_info, "isa_paths": ["avx512", "avx2", "generic"], "openmp": True, "march_native": False,
                    "compiler": self.compiler.compiler_so[0] if hasattr(self.compiler, "compiler_so") else "?"},
            "cuda": self.cuda_info,
            "python": sys.version.split()[0],
            # `make wheel` sets FASTDDPM_DIST=wheel: a binary wheel (manylinux); else a build from source
            "distribution": "binary wheel" if os.environ.get("FASTDDPM_DIST") == "wheel" else "source build",
        }
        targets = [os.path.join(ROOT, "src", "fastddpm")] if self.inplace else []
        targets.append(os.path.join(self.build_lib, "fastddpm"))
        for d in targets:
            if os.path.isdir(d):   # written whole, then renamed: a reader never sees half a record
                path = os.path.join(d, "_build_info.json")
                with open(path + ".tmp", "w") as f:
                    json.dump(info, f, indent=2)
                os.replace(path + ".tmp", path)


setup(ext_modules=[cpu_ext, cuda_ext], cmdclass={"build_ext": BuildExt})
