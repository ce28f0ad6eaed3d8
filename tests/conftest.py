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
