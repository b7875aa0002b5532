"""Build keye: the Python package plus, where possible, the CUDA extension keye/_C*.so (via CMake).

The extension is built when torch (a CUDA build) and nvcc are found; otherwise, or with
KEYE_BUILD_KERNELS=0, keye installs as pure Python and runs its PyTorch references.
Build against the torch you run with: `pip install --no-build-isolation .` (or -e .).

Environment:
  KEYE_BUILD_KERNELS=0   pure-Python install (no CUDA extension)
  KEYE_CUDA_ARCHS        nvcc targets, e.g. "90a" (default) or "90a;100a"
  KEYE_BUILD_JOBS        parallel compile jobs (default: CPU count)
  KEYE_BUILD_TYPE        CMake build type (default Release)
  CUDA_HOME              CUDA toolkit root, if nvcc is not on PATH
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc") or (("/usr/local/cuda/bin/nvcc") if Path("/usr/local/cuda/bin/nvcc").exists() else None)


def _why_no_kernels():
    """Reason the CUDA extension cannot be built here, or None."""
    if os.environ.get("KEYE_BUILD_KERNELS", "1") == "0":
        return "KEYE_BUILD_KERNELS=0"
    try:
        import torch
    except ImportError:
        return ("torch is not importable in the build environment "
                "(install torch first, then `pip install --no-build-isolation .`)")
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if _find_nvcc() is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return None


def _tool(module, attr, name):
    """A build tool from its PyPI package (cmake, ninja) or from PATH."""
    try:
        mod = __import__(module)
        path = Path(getattr(mod, attr)) / name
        if path.exists():
            return str(path)
    except ImportError:
        pass
    return shutil.which(name)


class CMakeBuildExt(build_ext):
    def run(self):
        reason = _why_no_kernels()
        if reason:
            print(f"keye: building WITHOUT CUDA kernels: {reason}. "
                  "keye will run its PyTorch reference implementations.", file=sys.stderr)
            return
        super().run()

    def build_extension(self, ext):
        import torch

        cmake = _tool("cmake", "CMAKE_BIN_DIR", "cmake")
        if cmake is None:
            raise RuntimeError("keye: cmake not found; `pip install cmake ninja`")
        ninja = _tool("ninja", "BIN_DIR", "ninja")
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        nvcc = _find_nvcc()
        args = [
            f"-DCMAKE_BUILD_TYPE={os.environ.get('KEYE_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DKEYE_OUTPUT_FILE={out}",
            f"-DPython3_EXECUTABLE={sys.executable}",
        ]
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if shutil.which("ccache"):
            args += ["-DCMAKE_CXX_COMPILER_LAUNCHER=ccache", "-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
        jobs = os.environ.get("KEYE_BUILD_JOBS", str(os.cpu_count() or 1))
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([cmake, str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(
    ext_modules=[Extension("keye._C", sources=[])],
    cmdclass={"build_ext": CMakeBuildExt},
)
