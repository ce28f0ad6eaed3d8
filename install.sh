#!/usr/bin/env bash
# Install fastprune and everything it needs into ./.venv (the README's install command).
#
# torch is installed first and the package is then built with --no-build-isolation, so the build
# compiles the extension against *this* torch instead of pulling another one into an isolated build
# environment. The C++ CPU extension is always built; the CUDA extension is built when the CUDA
# compiler matching torch can be set up (csrc/setup_cuda_toolchain.sh installs it from the package
# registry). FASTPRUNE_BUILD_CUDA=0 skips the CUDA extension.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -q "torch>=2.4" setuptools wheel ninja numpy
if [ "${FASTPRUNE_BUILD_CUDA:-}" != "0" ]; then
    # shellcheck source=csrc/setup_cuda_toolchain.sh
    PYTHON=.venv/bin/python source csrc/setup_cuda_toolchain.sh \
        || echo "install.sh: no CUDA toolchain; building the CPU extension only"
fi
.venv/bin/pip install -q --no-build-isolation -e ".[test,plot]"
.venv/bin/python -c "import fastprune, fastprune._ext as e; print('fastprune', fastprune.__version__, \
'| C++ extension:', e.available(), '| CUDA extension:', e.cuda_available())"
