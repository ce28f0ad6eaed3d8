"""Test configuration: run Triton kernels through the interpreter when there is no GPU, seed every test.

``TRITON_INTERPRET`` must be set before ``triton`` is imported anywhere, hence at the top of this file.
On a machine with a GPU the kernels run compiled on CUDA tensors instead.
"""
import os
import pathlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def _check_interpreter_numpy():
    """Triton < 3.7's interpreter needs NumPy < 2.4 (it calls int() on 1-element arrays)."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return
    try:
        import numpy
        import triton
    except ImportError:
        return
    version = lambda text: tuple(int(p) for p in text.split("+")[0].split(".")[:2])  # noqa: E731
    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        raise pytest.UsageError(f"triton {triton.__version__}'s interpreter does not work with numpy "
                                f"{numpy.__version__}: install 'numpy<2.4' (install.sh does)")


_check_interpreter_numpy()

#: Device the kernel tests run on: compiled on CUDA when present, interpreted on CPU otherwise.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: ``../shared/data`` next to the project root, or $FASTPRUNE_DATA.
DATA_DIR = pathlib.Path(os.environ.get("FASTPRUNE_DATA",
                                       pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def data_dir():
    return DATA_DIR
