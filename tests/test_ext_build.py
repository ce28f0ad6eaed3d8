"""Building the compiled extension: the CUDA module's presence (CI builds it without a GPU) and
setup.py's decisions (no torch at build time, forced and skipped builds), run as subprocesses of
``setup.py --name``, which decides what to build without compiling anything.
"""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from fastprune import _ext

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_cuda_extension_built_when_required():
    """CI sources csrc/setup_cuda_toolchain.sh, builds, and sets FASTPRUNE_REQUIRE_CUDA_EXT=1.

    The CUDA kernels can only run on a GPU; here the module must exist, import (it links against
    torch's CUDA libraries, which load without a GPU) and register the CUDA kernels of the MSTM merge and the shared weighted merge.
    """
    if os.environ.get("FASTPRUNE_REQUIRE_CUDA_EXT") != "1":
        pytest.skip("FASTPRUNE_REQUIRE_CUDA_EXT is not 1: the CUDA extension is optional here")
    assert importlib.util.find_spec("fastprune._C_cuda") is not None, "fastprune._C_cuda was not built"
    assert _ext.cuda_available(), f"fastprune._C_cuda does not import: {_ext.cuda_load_error()}"
    for op in ("fastprune::mstm_merge", "fastprune::mstm_merge_backward", "fastprune::weighted_merge",
               "fastprune::weighted_merge_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has no CUDA kernel"


def _setup_name(tmp_path, hide_torch=False, **env):
    """Run ``python setup.py --name`` in the project root; returns the CompletedProcess."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FASTPRUNE_BUILD")}
    if hide_torch:  # a torch that fails to import, as in pip's isolated build environment
        fake = tmp_path / "hidden" / "torch"
        fake.mkdir(parents=True, exist_ok=True)
        (fake / "__init__.py").write_text("raise ImportError('No module named torch (hidden by the test)')\n")
        environ["PYTHONPATH"] = str(tmp_path / "hidden")
    environ.update(env)
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=300)


def test_setup_without_torch_installs_pure_python(tmp_path):
    done = _setup_name(tmp_path, hide_torch=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "fastprune"
    assert "torch is not importable" in done.stderr
    assert "pip install --no-build-isolation -e ." in done.stderr


def test_setup_without_torch_fails_when_extension_forced(tmp_path):
    done = _setup_name(tmp_path, hide_torch=True, FASTPRUNE_BUILD_EXT="1")
    assert done.returncode != 0
    assert "FASTPRUNE_BUILD_EXT=1" in done.stderr and "--no-build-isolation" in done.stderr


def test_setup_flags(tmp_path):
    done = _setup_name(tmp_path, hide_torch=True, FASTPRUNE_BUILD_EXT="0")
    assert done.returncode == 0 and "without compiled code" in done.stderr
    done = _setup_name(tmp_path, hide_torch=True, FASTPRUNE_BUILD_CUDA="maybe")
    assert done.returncode != 0 and "FASTPRUNE_BUILD_CUDA must be 0 or 1" in done.stderr


@pytest.mark.skipif(torch.version.cuda is None, reason="this torch has no CUDA: setup.py skips CUDA early")
def test_setup_cuda_needs_a_compiler(tmp_path):
    """Without nvcc the CUDA extension is skipped with the reason, or is an error when forced."""
    empty = tmp_path / "no-cuda"
    empty.mkdir()
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if not (pathlib.Path(p) / "nvcc").exists())
    done = _setup_name(tmp_path, CUDA_HOME=str(empty), PATH=path)
    assert done.returncode == 0, done.stderr
    assert "no nvcc found" in done.stderr
    done = _setup_name(tmp_path, CUDA_HOME=str(empty), PATH=path, FASTPRUNE_BUILD_CUDA="1")
    assert done.returncode != 0 and "FASTPRUNE_BUILD_CUDA=1 but no nvcc found" in done.stderr


def test_cuda_extension_targets_a100_and_h100():
    """The default TORCH_CUDA_ARCH_LIST (8.0;9.0+PTX) embeds machine code for sm_80 and sm_90: the fat
    binary records the ptxas options ("-arch sm_XX") of each cubin."""
    if os.environ.get("FASTPRUNE_REQUIRE_CUDA_EXT") != "1":
        pytest.skip("FASTPRUNE_REQUIRE_CUDA_EXT is not 1: the CUDA extension is optional here")
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    if "8.0" not in arch_list or "9.0" not in arch_list:
        pytest.skip(f"TORCH_CUDA_ARCH_LIST={arch_list!r} does not ask for sm_80 and sm_90")
    spec = importlib.util.find_spec("fastprune._C_cuda")
    assert spec is not None and spec.origin, "fastprune._C_cuda was not built"
    data = pathlib.Path(spec.origin).read_bytes()
    for arch in (b"sm_80", b"sm_90"):
        assert b"-arch " + arch in data, f"no {arch.decode()} code in {spec.origin}"
