"""Ahead-of-time compilation of fastprune's Triton kernels for real GPUs, without a GPU.

The Triton interpreter (``TRITON_INTERPRET=1``, used by the CPU test suite) runs kernels in numpy and
so cannot prove that a kernel compiles for a GPU: a tile too large for the register file only fails
in ``ptxas``. This module compiles every registered kernel through Triton's whole pipeline
(TTIR -> TTGIR -> LLVM IR -> PTX -> cubin, ptxas included) for a given CUDA compute capability and
reports the resource usage (registers, stack/spill bytes, shared memory).

Registry: a kernel file registers :class:`KernelSpec` objects (a kernel, its argument types, the
compile-time constants and ``num_warps`` its launcher uses for typical shapes and dtypes), or a
function returning them, with :func:`register` at import time. :func:`registered_specs` imports every
module of ``fastprune.kernels`` and returns all specs.

Compiling needs the real ``@triton.jit`` functions, so it must run in a process where
``TRITON_INTERPRET`` is off: :func:`compile_all_in_subprocess` starts such a process
(``python -m fastprune.kernels.aot --json``), which is what the tests use.

Example::

    python -m fastprune.kernels.aot --cc 80 90
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from typing import Any, Callable, Iterable, Sequence, Union

#: Compute capabilities the tests compile for: A100 (sm_80) and H100/H200 (sm_90).
DEFAULT_CCS = (80, 90)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One kernel instantiation to compile ahead of time.

    Attributes:
        name: readable label, e.g. ``"mstm_weighted_merge[float16,size]"``.
        kernel: the ``@triton.jit`` function (an ``InterpretedFunction`` under ``TRITON_INTERPRET``,
            which cannot be compiled: see :func:`compile_spec`).
        signature: Triton type of every runtime argument by name: ``"*fp16"``, ``"*fp32"``,
            ``"*bf16"``, ``"*i64"``, ``"i32"``, ``"i64"``, ``"fp32"``... (constexpr arguments go in
            ``constexprs``).
        constexprs: value of every ``tl.constexpr`` argument by name.
        num_warps: warps per program, as the launcher uses.
        num_stages: software-pipelining stages (Triton's default when None).
        divisible: integer arguments a ViT-shaped launch passes as multiples of 16 (channel counts:
            192, 384, 768...), specialised as such by :meth:`jit_specialized`.
        ccs: the compute capabilities this instantiation is for (a launcher choosing its constants by
            architecture registers one spec per choice); empty: every one compiled.
    """

    name: str
    kernel: Any
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: Union[int, None] = None
    divisible: tuple = ("C", "CM")
    #: Triton ``attrs`` (``{(arg index,): [["tt.divisibility", 16]]}``) of a JIT-specialised variant.
    attrs: Union[dict, None] = None
    ccs: tuple = ()

    def targets(self, ccs: Sequence[int]) -> list:
        """The ``ccs`` this spec is compiled for: those of :attr:`ccs` among them, or all."""
        return [cc for cc in ccs if not self.ccs or cc in self.ccs]

    def jit_specialized(self) -> "KernelSpec":
        """This spec as Triton's JIT compiles it for contiguous, 16-aligned tensors of ViT shapes.

        The JIT specialises a launch on its values: an integer argument equal to 1 becomes the
        constant 1, pointers and integers divisible by 16 get ``tt.divisibility = 16`` (which enables
        vector loads). For contiguous tensors the innermost stride is 1: the last ``stride_<t>*``
        argument of each tensor ``<t>`` (arguments are ordered outer to inner) becomes the constant
        1; the other strides of a rank-3 tensor are multiples of its channel count, so divisible by
        16, like the arguments named in :attr:`divisible`.
        """
        groups: dict = {}
        for arg in self.signature:
            if arg.startswith("stride_") and len(arg) > len("stride_") + 1:
                groups.setdefault(arg[:-1], []).append(arg)
        constexprs = dict(self.constexprs)
        signature = dict(self.signature)
        divisible = {arg for arg, ty in signature.items() if ty.startswith("*")}
        divisible |= {arg for arg in self.divisible if arg in signature}
        for strides in groups.values():
            constexprs[strides[-1]] = 1
            del signature[strides[-1]]
            if len(strides) >= 3:
                divisible |= set(strides[:-1])
        names = list(getattr(self.kernel, "arg_names", ()))
        attrs = {(names.index(arg),): [["tt.divisibility", 16]] for arg in divisible if arg in names}
        return dataclasses.replace(self, name=f"{self.name}@jit", signature=signature, constexprs=constexprs,
                                   attrs=attrs)


def runtime_signature(kernel, constexprs: dict, **types: str) -> dict:
    """:attr:`KernelSpec.signature` of ``kernel``: the Triton type of each runtime argument, in the
    kernel's order: ``types[name]`` for those given (pointers: ``"*fp16"``, ``"*i64"``...), ``"i32"``
    for the others (sizes, strides); arguments in ``constexprs`` are left out.

    Raises:
        ValueError: a name in ``types`` that is not an argument of ``kernel``.
    """
    names = list(kernel.arg_names)
    unknown = sorted(set(types) - set(names))
    if unknown:
        raise ValueError(f"{getattr(kernel, '__name__', kernel)!r} has no arguments {unknown}")
    return {name: types.get(name, "i32") for name in names if name not in constexprs}


_REGISTRY: list[Union[KernelSpec, Callable[[], Iterable[KernelSpec]]]] = []


def register(spec_or_factory: Union[KernelSpec, Callable[[], Iterable[KernelSpec]]]):
    """Add a :class:`KernelSpec`, or a function returning several, to the ahead-of-time registry.

    Returns its argument, so it also works as a decorator on a spec factory.
    """
    if not isinstance(spec_or_factory, KernelSpec) and not callable(spec_or_factory):
        raise TypeError(f"register() takes a KernelSpec or a function returning KernelSpecs, "
                        f"got {type(spec_or_factory).__name__}")
    _REGISTRY.append(spec_or_factory)
    return spec_or_factory


def _import_kernel_modules() -> None:
    """Import every module of the kernels package so that each registers its specs."""
    package = sys.modules[__package__] if __package__ else importlib.import_module("fastprune.kernels")
    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "aot" and not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


def registered_specs(jit_specialized: bool = True) -> list[KernelSpec]:
    """All registered specs, after importing every ``fastprune.kernels`` module. Names are unique.

    With ``jit_specialized`` each spec is followed by its :meth:`KernelSpec.jit_specialized` variant
    (named ``<name>@jit``): the kernel that actually runs for contiguous inputs.
    """
    _import_kernel_modules()
    specs: list[KernelSpec] = []
    for entry in _REGISTRY:
        for spec in [entry] if isinstance(entry, KernelSpec) else list(entry()):
            specs.append(spec)
            if jit_specialized:
                specs.append(spec.jit_specialized())
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate kernel spec names in the AOT registry: {duplicates}")
    return specs


def ptxas_path(cc: int) -> str:
    """Path of the ptxas Triton uses for compute capability ``cc``.

    Raises:
        RuntimeError: no usable ptxas (Triton's bundled one, or ``TRITON_PTXAS_PATH``).
    """
    import triton

    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            tool = get_ptxas(cc)  # triton >= 3.7 picks a ptxas per architecture
        except TypeError:
            tool = get_ptxas()
        path = tool.path if hasattr(tool, "path") else tool
    except (ImportError, RuntimeError, AttributeError) as err:
        raise RuntimeError(f"ptxas not found for sm_{cc} ({err}): ahead-of-time compilation needs the ptxas "
                           f"bundled with triton {triton.__version__} (triton/backends/nvidia/bin) or "
                           "TRITON_PTXAS_PATH pointing to one") from err
    if not path or not os.path.isfile(path):
        raise RuntimeError(f"ptxas not found for sm_{cc} (looked for {path!r}); set TRITON_PTXAS_PATH")
    return path


def _jit_function(kernel):
    import triton

    if not isinstance(kernel, triton.runtime.JITFunction):
        raise RuntimeError(f"{getattr(kernel, '__name__', kernel)!r} is not a JITFunction (it is "
                           f"{type(kernel).__name__}): ahead-of-time compilation must run with TRITON_INTERPRET "
                           "unset; use compile_all_in_subprocess()")
    return kernel


def _ast_source(fn, signature: dict, constexprs: dict, attrs: Union[dict, None] = None):
    """``triton.compiler.ASTSource`` across Triton versions.

    Triton >= 3.3 (3.6 on the GPU machine, 3.9 here) wants constexpr arguments in ``signature`` as
    ``"constexpr"`` and their values in ``constexprs=``; older releases took ``constants=`` and a
    signature of runtime arguments only.
    """
    from triton.compiler import ASTSource

    full = {name: signature[name] if name in signature else "constexpr" for name in fn.arg_names
            if name in signature or name in constexprs}
    missing = [n for n in fn.arg_names if n not in full]
    if missing:
        raise ValueError(f"{fn.__name__}: the spec gives no type or constexpr value for {missing}")
    try:
        return ASTSource(fn=fn, signature=full, constexprs=dict(constexprs), attrs=attrs)
    except TypeError:
        return ASTSource(fn=fn, signature={k: v for k, v in full.items() if v != "constexpr"},
                         constants={fn.arg_names.index(k): v for k, v in constexprs.items()})


def compile_spec(spec: KernelSpec, cc: int):
    """Compile one spec for ``sm_<cc>`` (e.g. 80, 90) and return Triton's compiled kernel object.

    Its ``asm`` dict holds ``"ptx"`` and ``"cubin"``; :func:`resource_usage` reads the cubin.
    Raises whatever Triton raises (e.g. ``Register allocation failed`` from ptxas), or RuntimeError
    when ptxas is missing or when called under ``TRITON_INTERPRET``.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    ptxas_path(cc)
    fn = _jit_function(spec.kernel)
    options = {"num_warps": spec.num_warps}
    if spec.num_stages is not None:
        options["num_stages"] = spec.num_stages
    src = _ast_source(fn, spec.signature, spec.constexprs, spec.attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)


def _cuobjdump_path() -> Union[str, None]:
    try:
        import triton

        return triton.knobs.nvidia.cuobjdump.path
    except Exception:  # older Triton without knobs, or no cuobjdump: registers are then unknown
        return None


#: Register file per SM (32-bit registers) and the most resident warps per SM, sm_80 and sm_90.
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64


def resident_warps(registers: int, num_warps: int, shared_bytes: int = 0, shared_per_sm: int = 228 * 1024) -> int:
    """Warps of one kernel that fit on an SM at once, limited by registers (allocated per warp in
    units of 256, i.e. per-thread counts rounded up to 8) and by shared memory per program."""
    per_warp = -(-registers // 8) * 8 * 32
    programs = REGISTERS_PER_SM // (per_warp * num_warps)
    if shared_bytes:
        programs = min(programs, shared_per_sm // shared_bytes)
    return min(programs * num_warps, MAX_WARPS_PER_SM)


_SASS_ADDRESS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_SASS_BRANCH = re.compile(r"\bBRA\b[^;]*?(0x[0-9a-f]+|`\(\.L_x_(\d+)\))")


def _sass_rows_and_loops(sass: str) -> tuple:
    """``(rows, loops)``: the ``(address, instruction)`` rows of a SASS listing and the ``(start, end)``
    address ranges of its loop bodies (from each backward branch to its target)."""
    rows, labels = [], {}
    for line in sass.splitlines():
        label = re.match(r"\s*\.L_x_(\d+):", line)
        if label:
            labels[label.group(1)] = len(rows)
        m = _SASS_ADDRESS.search(line)
        if m:
            rows.append((int(m.group(1), 16), m.group(2)))
    addresses = [a for a, _ in rows]
    loops = []
    for address, text in rows:
        branch = _SASS_BRANCH.search(text)
        if not branch:
            continue
        if branch.group(2) is not None:
            target_row = labels.get(branch.group(2))
            target = addresses[target_row] if target_row is not None and target_row < len(rows) else None
        else:
            target = int(branch.group(1), 16)
        if target is not None and target <= address:
            loops.append((target, address))
    return rows, loops


def local_memory_in_loops(sass: str) -> dict:
    """Local-memory accesses (``LDL``/``STL``: register spills, local arrays) in a kernel's SASS.

    Returns ``{"total": n, "in_loops": m, "loop_density": d}``: an access is in a loop when it lies
    between a backward branch and its target (the loop's body), so it runs once per iteration;
    ``d`` is the largest fraction of a loop body's instructions that are local accesses (0.0 if none).
    """
    rows, loops = _sass_rows_and_loops(sass)
    addresses = [a for a, _ in rows]
    local = [a for a, text in rows if re.match(r"(@!?U?P\d\s+)?(LDL|STL)\b", text)]
    in_loops = [a for a in local if any(lo <= a <= hi for lo, hi in loops)]
    density = 0.0
    for lo, hi in loops:
        hits = sum(lo <= a <= hi for a in local)
        if hits:
            density = max(density, hits / sum(lo <= a <= hi for a in addresses))
    return {"total": len(local), "in_loops": len(in_loops), "loop_density": density}


def loads_after_first_product(sass: str) -> dict:
    """Global loads (``LDG``) in a kernel's SASS, all and those that wait for a tensor-core product
    (``HMMA``/``HGMMA``): placed after the first one, or in a loop whose body holds one (the next
    iteration's load follows this one's product). ``{"global_loads": n, "loads_after_product": m}``;
    ``m == 0`` says every load is issued before the arithmetic that needs it (one memory latency),
    which :mod:`benchmarks.cost_model` assumes for ToMe's one-tile matching in one channel chunk."""
    rows, loops = _sass_rows_and_loops(sass)
    products = [a for a, text in rows if re.search(r"\bH(G)?MMA\b", text)]
    first = products[0] if products else float("inf")
    product_loops = [(lo, hi) for lo, hi in loops if any(lo <= a <= hi for a in products)]
    loads = [a for a, text in rows if re.search(r"\bLDG\b", text)]
    waiting = [a for a in loads if a > first or any(lo <= a <= hi for lo, hi in product_loops)]
    return {"global_loads": len(loads), "loads_after_product": len(waiting)}


def barriers(sass: str) -> int:
    """Block-wide barriers (``BAR.SYNC``) in a kernel's SASS, as written (a loop's count once): each
    reduction across warps, scan across warps or layout conversion through shared memory takes one
    or two; for straight-line code, roughly the synchronisation steps of one program's chain."""
    return sum(1 for _, text in _SASS_ADDRESS.findall(sass) if re.search(r"\bBAR\.SYNC\b", text))


def resource_usage(compiled) -> dict:
    """Registers, stack bytes (register spills and local arrays), shared memory, local-memory
    accesses (all, and inside loops: see :func:`local_memory_in_loops`), global loads (all, and
    after the first tensor-core product: :func:`loads_after_first_product`) and barriers
    (:func:`barriers`) of a compiled kernel.

    Read from the cubin with ``cuobjdump -res-usage`` and ``-sass``; None where that tool is missing.
    """
    usage = {"registers": None, "stack_bytes": None, "local_bytes": None,
             "shared_bytes": getattr(compiled.metadata, "shared", None),
             "local_accesses": None, "local_accesses_in_loops": None, "loop_local_density": None,
             "global_loads": None, "loads_after_product": None, "barriers": None}
    tool = _cuobjdump_path()
    cubin = compiled.asm.get("cubin")
    if tool is None or not cubin:
        return usage
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    for key, field in (("registers", "REG"), ("stack_bytes", "STACK"), ("local_bytes", "LOCAL")):
        m = re.search(rf"\b{field}:(\d+)", text)
        if m:
            usage[key] = int(m.group(1))
    if sass:
        local = local_memory_in_loops(sass)
        usage["local_accesses"], usage["local_accesses_in_loops"] = local["total"], local["in_loops"]
        usage["loop_local_density"] = local["loop_density"]
        usage.update(loads_after_first_product(sass))
        usage["barriers"] = barriers(sass)
    return usage


def _compile_row(spec: KernelSpec, cc: int) -> dict:
    row = {"name": spec.name, "cc": cc, "ok": False, "cubin_bytes": 0, "ptx_bytes": 0,
           "num_warps": spec.num_warps, "error": None}
    try:
        compiled = compile_spec(spec, cc)
        row["cubin_bytes"] = len(compiled.asm.get("cubin") or b"")
        row["ptx_bytes"] = len(compiled.asm.get("ptx") or "")
        row.update(resource_usage(compiled))
        row["ok"] = row["cubin_bytes"] > 0
    except Exception as err:  # reported per kernel, so one failure does not hide the others
        row["error"] = f"{type(err).__name__}: {err}"
    return row


_WORKER_JOBS: list = []


def _compile_job(i: int) -> dict:
    return _compile_row(*_WORKER_JOBS[i])


def compile_all(ccs: Sequence[int] = DEFAULT_CCS, specs: Union[Sequence[KernelSpec], None] = None,
                jobs: Union[int, None] = None) -> list[dict]:
    """Compile every registered spec for every ``cc``; never raises for one kernel's failure.

    ``jobs`` worker processes (forked; default: the CPU count) share the work, since each compile is
    CPU-bound. Returns one dict per (spec, cc), in order: ``name``, ``cc``, ``ok``, ``cubin_bytes``,
    ``ptx_bytes``, ``registers``, ``stack_bytes``, ``local_bytes``, ``shared_bytes``, ``num_warps`` and
    ``error`` (the exception text, or None).
    """
    global _WORKER_JOBS
    specs = registered_specs() if specs is None else specs
    work = [(spec, cc) for spec in specs for cc in spec.targets(ccs)]
    jobs = min(len(work), jobs or os.cpu_count() or 1)
    if jobs <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [_compile_row(spec, cc) for spec, cc in work]
    _WORKER_JOBS = work  # inherited by the forked workers; only indices and result dicts are pickled
    try:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            return pool.map(_compile_job, range(len(work)), chunksize=1)
    finally:
        _WORKER_JOBS = []


def compile_all_in_subprocess(ccs: Sequence[int] = DEFAULT_CCS, timeout: float = 900,
                              jobs: Union[int, None] = None) -> list[dict]:
    """:func:`compile_all` in a fresh Python process with ``TRITON_INTERPRET`` unset.

    Raises:
        RuntimeError: the process failed (e.g. a kernel module does not import), with its stderr.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's default-change warning
    cmd = [sys.executable, "-m", "fastprune.kernels.aot", "--json", "--cc", *map(str, ccs)]
    if jobs is not None:
        cmd += ["--jobs", str(jobs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])


def _main(argv: Union[Sequence[str], None] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", type=int, nargs="+", default=list(DEFAULT_CCS), help="compute capabilities")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.add_argument("-j", "--jobs", type=int, default=None, help="worker processes (default: CPU count)")
    args = parser.parse_args(argv)
    results = compile_all(args.cc, jobs=args.jobs)
    if args.json:
        print(json.dumps(results))
    else:
        for row in results:
            status = "ok" if row["ok"] else f"FAILED {row['error']}"
            print(f"sm_{row['cc']} {row['name']:<48} regs={row.get('registers')} stack={row.get('stack_bytes')}B "
                  f"shared={row.get('shared_bytes')}B warps={row['num_warps']} {status}")
    return 0 if all(row["ok"] for row in results) else 1


if __name__ == "__main__":
    # Run through the package module, not __main__, so that kernel modules register into one registry.
    from fastprune.kernels import aot as _aot

    sys.exit(_aot._main())
