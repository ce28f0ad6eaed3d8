"""Build script: the Python packages, and the compiled extension of ``csrc/`` when a toolchain is present.

``kernels/`` (the Triton kernels) installs as ``fastprune.kernels``. Compiled code (``csrc/``):

* ``fastprune._C``: the C++ CPU kernels and the ``torch.ops.fastprune`` schemas. Built whenever torch
  is importable at build time.
* ``fastprune._C_cuda``: the CUDA kernels of the same operators. Built when torch has CUDA and an
  ``nvcc`` of the same CUDA version is found (``CUDA_HOME`` or ``PATH``); a failure is reported and
  leaves a working install without it.

Supported command (keeps the installed torch; pip's build isolation would hide it)::

    pip install --no-build-isolation -e .

Environment:

* ``FASTPRUNE_BUILD_EXT=0`` skips all compiled code (pure Python package); ``=1`` makes a missing
  torch or a failed CPU build an error.
* ``FASTPRUNE_BUILD_CUDA=0`` skips the CUDA extension; ``=1`` builds it even if the version check
  fails and makes a failed build an error.
* ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0+PTX``: A100, H100/H200, PTX for newer GPUs) and
  ``MAX_JOBS`` (parallel compile jobs of ninja; ``csrc/setup_cuda_toolchain.sh`` sets 2 for CI).
"""
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

PACKAGES = ["fastprune", "fastprune.kernels", "fastprune.patch", "fastprune.evaluation"]
PACKAGE_DIR = {"fastprune": "fastprune", "fastprune.kernels": "kernels", "fastprune.patch": "fastprune/patch",
               "fastprune.evaluation": "fastprune/evaluation"}
HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"


def _say(message: str) -> None:
    print(f"fastprune setup: {message}", file=sys.stderr, flush=True)


def _env_flag(name: str):
    """True / False when the variable is set to 1/0 (yes/no, true/false, on/off), None when unset."""
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"fastprune setup: {name} must be 0 or 1, got {os.environ[name]!r}")


def _nvcc_version(cuda_home):
    """``"major.minor"`` of ``$CUDA_HOME/bin/nvcc`` (or the nvcc on PATH), None if there is none."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def _extensions():
    """(ext_modules, cmdclass) for the compiled parts that this environment can build."""
    build_ext = _env_flag("FASTPRUNE_BUILD_EXT")
    build_cuda = _env_flag("FASTPRUNE_BUILD_CUDA")
    if build_ext is False:
        _say("FASTPRUNE_BUILD_EXT=0: installing the pure-Python package without compiled code.")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        message = (f"torch is not importable in the build environment ({exc}), so the C++/CUDA "
                   "extension (csrc/) is not built. pip's build isolation hides the installed torch: "
                   "install with `pip install --no-build-isolation -e .` (or `pip install "
                   "--no-build-isolation .`).")
        if build_ext:
            raise SystemExit(f"fastprune setup: FASTPRUNE_BUILD_EXT=1 but {message}")
        _say(message + " Installing the pure-Python package (reference and Triton kernels) only.")
        return [], {}

    # -fopenmp: at::parallel_for is OpenMP, inlined into our code; -g0: no debug info (faster build)
    cxx_flags = ["-O3", "-g0", "-fopenmp"]
    ext_modules = [
        cpp_extension.CppExtension(
            "fastprune._C",
            sources=[f"{CSRC}/ops.cpp", f"{CSRC}/merge_cpu.cpp", f"{CSRC}/tome_cpu.cpp", f"{CSRC}/bat_cpu.cpp"],
            include_dirs=[os.path.join(HERE, CSRC)],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            optional=not build_ext,
        )
    ]

    cuda_home = cpp_extension.CUDA_HOME
    nvcc = _nvcc_version(cuda_home)
    if build_cuda is False:
        _say("FASTPRUNE_BUILD_CUDA=0: not building the CUDA extension.")
    elif torch.version.cuda is None:
        message = f"torch {torch.__version__} has no CUDA support, so the CUDA extension is not built."
        if build_cuda:
            raise SystemExit(f"fastprune setup: FASTPRUNE_BUILD_CUDA=1 but {message}")
        _say(message)
    elif nvcc is None:
        message = (f"no nvcc found (CUDA_HOME={cuda_home!r}), so the CUDA extension is not built; "
                   f"torch was built with CUDA {torch.version.cuda}: see csrc/setup_cuda_toolchain.sh.")
        if build_cuda:
            raise SystemExit(f"fastprune setup: FASTPRUNE_BUILD_CUDA=1 but {message}")
        _say(message)
    elif nvcc != ".".join(torch.version.cuda.split(".")[:2]) and not build_cuda:
        _say(f"nvcc in {cuda_home} is CUDA {nvcc} but torch was built with CUDA {torch.version.cuda}: "
             "not building the CUDA extension (its headers would not match; set "
             "FASTPRUNE_BUILD_CUDA=1 to try anyway, or see csrc/setup_cuda_toolchain.sh).")
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        _say(f"building the CUDA extension with nvcc {nvcc} from {cuda_home} for "
             f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}.")
        ext_modules.append(
            cpp_extension.CUDAExtension(
                "fastprune._C_cuda",
                sources=[f"{CSRC}/cuda_module.cpp", f"{CSRC}/merge_cuda.cu"],
                include_dirs=[os.path.join(HERE, CSRC)],
                extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": ["-O3"]},  # no fast math: w / w == 1
                optional=not build_cuda,
            )
        )

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension, where a failed optional extension is reported, not fatal."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # ninja failures arrive as RuntimeError
                stale = self.get_ext_fullpath(ext.name)
                if os.path.exists(stale):
                    os.remove(stale)
                if not ext.optional:
                    raise
                _say(f"building {ext.name} failed, installing without it: {exc}")

    return ext_modules, {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
