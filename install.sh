#!/usr/bin/env bash
# Install fastprune and everything it needs into ./.venv (the README's install command).
#
# torch is installed first and the package is then built with --no-build-isolation, so the build
# compiles the extension against *this* torch instead of pulling another one into an isolated build
# environment. The C++ CPU extension is always built. The CUDA extension is built when torch has
# CUDA and the compiler matching it can be set up (csrc/setup_cuda_toolchain.sh installs it from the
# package registry); if that fails, the install says why and goes on without it.
#
# Environment: FASTPRUNE_BUILD_CUDA=0 skips the CUDA extension; FASTPRUNE_BUILD_CUDA=1 makes a CUDA
# toolchain or build failure an error (CI sets it). VENV (default .venv) is the folder to install
# into; TORCH_SPEC (default: the supported range) which torch/triton to install, e.g.
# TORCH_SPEC="torch==2.11.0 triton==3.6.0".
set -euo pipefail
cd "$(dirname "$0")"
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch>=2.11,<2.16}"
python3 -m venv "$VENV"
# shellcheck disable=SC2086  # TORCH_SPEC is a list of requirement strings
"$VENV/bin/pip" install -q $TORCH_SPEC setuptools wheel ninja numpy
# Triton < 3.7's interpreter (the CPU test suite's way of running the kernels) converts 1-element
# arrays to ints, which NumPy >= 2.4 refuses; the compiled kernels do not use NumPy.
if "$VENV/bin/python" -c 'import sys, triton; sys.exit(tuple(map(int, triton.__version__.split(".")[:2])) >= (3, 7))' \
        2>/dev/null; then
    "$VENV/bin/pip" install -q "numpy<2.4"
fi
if [ "${FASTPRUNE_BUILD_CUDA:-}" != "0" ]; then
    # shellcheck source=csrc/setup_cuda_toolchain.sh
    if ! PYTHON="$VENV/bin/python" source csrc/setup_cuda_toolchain.sh; then
        if [ "${FASTPRUNE_BUILD_CUDA:-}" = "1" ]; then
            echo "install.sh: FASTPRUNE_BUILD_CUDA=1 but the CUDA toolchain could not be set up" >&2
            exit 1
        fi
        echo "install.sh: no CUDA toolchain; building the CPU extension only"
        export FASTPRUNE_BUILD_CUDA=0
    fi
fi
"$VENV/bin/pip" install -q --no-build-isolation -e ".[test,plot]"
"$VENV/bin/python" -c "import fastprune, fastprune._ext as e, torch, triton, timm; \
print('fastprune', fastprune.__version__, '| torch', torch.__version__, '| triton', triton.__version__, \
'| timm', timm.__version__, '| C++ extension:', e.available(), '| CUDA extension:', e.cuda_available())"
