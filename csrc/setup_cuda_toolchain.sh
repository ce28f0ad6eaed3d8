# Set up the CUDA compiler that matches the installed torch, from the package registry, so that
# fastprune's CUDA extension (csrc/merge_cuda.cu -> fastprune._C_cuda) compiles and links on a machine
# without a GPU (CI) as well as with one. Source it from the project's virtualenv, then build:
#
#     source csrc/setup_cuda_toolchain.sh
#     pip install --no-build-isolation -e .
#
# What it does (see ../shared/docs/ENVIRONMENT.md, "Building the C++/CUDA extension without a GPU"):
#   1. reads torch.version.cuda (e.g. 13.0) and installs nvidia-cuda-nvcc, nvidia-cuda-crt,
#      nvidia-nvvm and nvidia-cuda-cccl of that exact version (a system nvcc of another version has
#      headers that clash with torch's: "CUDA compiler and CUDA toolkit headers are incompatible";
#      the CUDA 13 compiler wheels ship without the CCCL headers, so without nvidia-cuda-cccl
#      cuda_fp16.h stops at "#include <nv/target>");
#   2. exports CUDA_HOME=<site-packages>/nvidia/cu<major> and puts its bin/ first on PATH;
#   3. adds the unversioned libcudart.so next to libcudart.so.<major> (the linker asks for it);
#   4. checks that the headers torch's CUDA headers need are there (nv/target from CCCL), and
#   5. exports defaults for TORCH_CUDA_ARCH_LIST (8.0;9.0+PTX) and MAX_JOBS (2).
# It does not make the CUDA build mandatory: a failed build is reported and leaves the CPU install,
# unless FASTPRUNE_BUILD_CUDA=1 is set by the caller (CI does).
# Returns non-zero (without exiting the calling shell) if torch has no CUDA or a step fails.

_fastprune_cuda_toolchain() {
    local py="${PYTHON:-python}"
    local torch_cuda
    torch_cuda="$("$py" -c 'import torch; print(torch.version.cuda or "")')" || {
        echo "setup_cuda_toolchain: cannot import torch with $py" >&2; return 1; }
    if [ -z "$torch_cuda" ]; then
        echo "setup_cuda_toolchain: this torch has no CUDA support; nothing to set up" >&2
        return 1
    fi
    local version major
    version="$(echo "$torch_cuda" | cut -d. -f1-2)"
    major="${version%%.*}"
    "$py" -m pip install --quiet "nvidia-cuda-nvcc==${version}.*" "nvidia-cuda-crt==${version}.*" \
        "nvidia-nvvm==${version}.*" "nvidia-cuda-cccl==${version}.*" || {
        echo "setup_cuda_toolchain: pip could not install the CUDA ${version} compiler" >&2; return 1; }
    local home
    home="$("$py" -c "
import os, nvidia
for path in nvidia.__path__:
    if os.access(os.path.join(path, 'cu$major', 'bin', 'nvcc'), os.X_OK):
        print(os.path.join(path, 'cu$major'))
        break
")"
    if [ -z "$home" ]; then
        echo "setup_cuda_toolchain: no nvidia/cu$major/bin/nvcc found after installing the CUDA $version wheels" >&2
        return 1
    fi
    if [ ! -e "$home/lib/libcudart.so" ]; then
        local versioned
        versioned="$(ls "$home"/lib/libcudart.so.* 2>/dev/null | head -n 1)"
        if [ -z "$versioned" ]; then
            echo "setup_cuda_toolchain: no libcudart.so.* in $home/lib" >&2; return 1
        fi
        ln -s "$(basename "$versioned")" "$home/lib/libcudart.so" || return 1
    fi
    # CCCL's headers land in <home>/include/cccl (CUDA 13) or <home>/include (CUDA 12).
    local include
    include=""
    for dir in "$home/include/cccl" "$home/include"; do
        if [ -e "$dir/nv/target" ]; then include="$dir"; break; fi
    done
    if [ -z "$include" ]; then
        echo "setup_cuda_toolchain: no nv/target header under $home/include after installing nvidia-cuda-cccl" >&2
        return 1
    fi
    if [ "$include" != "$home/include" ]; then
        case ":${CPATH:-}:" in
            *":$include:"*) ;;
            *) export CPATH="$include${CPATH:+:$CPATH}" ;;
        esac
    fi
    export CUDA_HOME="$home"
    case ":$PATH:" in
        *":$home/bin:"*) ;;
        *) export PATH="$home/bin:$PATH" ;;
    esac
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
    export MAX_JOBS="${MAX_JOBS:-2}"
    echo "setup_cuda_toolchain: CUDA_HOME=$CUDA_HOME ($("$home/bin/nvcc" --version | grep -o 'release [0-9.]*')," \
         "torch CUDA $torch_cuda, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
}

_fastprune_cuda_toolchain
