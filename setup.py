"""Build script: the Python packages, and (see csrc/) the compiled extension when a toolchain is present.

``kernels/`` (the Triton kernels) installs as ``fastprune.kernels``.
"""
from setuptools import setup

setup(
    packages=["fastprune", "fastprune.kernels"],
    package_dir={"fastprune": "fastprune", "fastprune.kernels": "kernels"},
)
