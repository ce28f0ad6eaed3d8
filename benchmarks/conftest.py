"""pytest configuration for ``pytest benchmarks/``: seed every test.

The Triton interpreter is deliberately NOT switched on here (unlike ``tests/conftest.py``): the
benchmarks never time interpreted kernels, so on a CPU machine the Triton providers are skipped.
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
