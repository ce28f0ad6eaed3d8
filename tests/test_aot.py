"""Every registered Triton kernel compiles ahead of time for sm_80 (A100) and sm_90 (H100/H200).

The interpreter the rest of the suite uses cannot see GPU-only failures (a tile too large for the
register file fails in ptxas with "Register allocation failed"), so this runs Triton's whole pipeline,
ptxas included, with no GPU present. Compilation happens in one child process with TRITON_INTERPRET
unset (see fastprune.kernels.aot); each (kernel, cc) is then checked as its own test. A missing ptxas
is a failure, not a skip.

What is checked is what would hurt on a GPU, not one ptxas version's exact register allocation:
each kernel compiles, both fully generic and as the JIT specialises it for contiguous ViT-shaped
inputs (``<name>@jit``); it leaves at least :data:`MIN_RESIDENT_WARPS` warps resident per SM (its
registers and shared memory allow that occupancy; :data:`LOW_OCCUPANCY` lists today's exceptions
with the floor each must keep); and no loop is spill-bound: local-memory accesses (register spills)
are at most :data:`MAX_LOOP_LOCAL_DENSITY` of any loop body's instructions. A few bytes of stack
(seen with some ptxas versions: one 4-byte reload per ~110-instruction iteration in
``bat_cluster[bfloat16,N=577]`` on sm_80 with triton 3.8) pass.
"""
import pytest

from fastprune.kernels import aot

CCS = aot.DEFAULT_CCS
SPECS = aot.registered_specs()

#: Occupancy floor: 16 of an SM's 64 warp slots (25%), enough to keep memory-bound kernels fed.
MIN_RESIDENT_WARPS = 16
#: Kernels (name prefixes) below that floor today, with the floor they must still keep (the
#: register-heavy matching and merge tiles that the kernel-primitives rewrite replaces).
LOW_OCCUPANCY = {  # floors hold with triton 3.6 (the GPU machine's), 3.8 (a fresh install's) and 3.9
    "bat_match[": 8,
    "bat_cluster[": 8,
    "evit_merge[": 12,  # generic fp32 variant: the gather and the tail row's tiles in one kernel (148 registers)
    "idle_cls_logit[": 12,
    "idle_cut_loss_": 8,
    "idle_scatter_rows[": 8,
    "idle_topk_select": 8,
}
#: Exceptions for the generic variants only (integer arguments unspecialised: no stride-1 or
#: divisibility hints, so every load computes its own addresses); the JIT-specialised variant
#: (``@jit``, what a launch compiles) keeps :data:`MIN_RESIDENT_WARPS` or its :data:`LOW_OCCUPANCY` floor.
GENERIC_LOW_OCCUPANCY = {
    # ToMe's one-tile match + select (N <= 257): 182-250 registers x 8 warps generic (16-bit), @jit 114-128
    "tome_match_select[": 8,
}
#: Largest fraction of a loop body's instructions that may be local-memory accesses (spills).
MAX_LOOP_LOCAL_DENSITY = 1 / 64


@pytest.fixture(scope="module")
def aot_results():
    rows = aot.compile_all_in_subprocess(CCS)
    return {(row["name"], row["cc"]): row for row in rows}


def test_registry_holds_every_kernel_file():
    names = [s.name for s in SPECS]
    for method in ("mstm_", "tome_", "evit_", "bat_", "idle_"):  # kernels/merge.py, tome.py, evit.py, ...
        assert any(n.startswith(method) for n in names), f"no AOT spec {method}* in {names}"
    for prefix in ("mstm_weighted_merge[", "mstm_merge_backward["):
        for dtype in ("float32", "float16", "bfloat16"):
            assert any(n.startswith(prefix + dtype) for n in names), f"no AOT spec {prefix}{dtype}...] in {names}"
    # the weighted merge from an index map (BAT's launch), not only from a merge plan's lists
    assert any(n.startswith("bat_weighted_merge[") and n.endswith(",map]") for n in names), names
    generic = [n for n in names if not n.endswith("@jit")]
    assert sorted(n + "@jit" for n in generic) == sorted(n for n in names if n.endswith("@jit"))


def test_jit_specialisation_fixes_inner_strides_and_alignment():
    spec = next(s for s in SPECS if s.name.startswith("mstm_weighted_merge[") and not s.name.endswith("@jit"))
    jit = spec.jit_specialized()
    assert jit.constexprs["stride_xc"] == 1 and "stride_xc" not in jit.signature
    assert jit.constexprs["stride_sn"] == 1 and "stride_sb" in jit.signature
    names = spec.kernel.arg_names
    divisible = {names[key[0]] for key in jit.attrs}
    assert {"x_ptr", "out_ptr", "stride_xn", "stride_xb", "C"} <= divisible
    assert "stride_sb" not in divisible and "N" not in divisible


def test_runtime_signature_follows_the_kernel():
    from fastprune.kernels.weighted_merge import _weighted_merge_kernel, merge_config

    consts, _ = merge_config(197, 768, True, True, 13)
    sig = aot.runtime_signature(_weighted_merge_kernel, consts, x_ptr="*bf16", out_ptr="*bf16")
    runtime = [n for n in _weighted_merge_kernel.arg_names if n not in consts]
    assert list(sig) == runtime  # the kernel's order, constexprs left out
    assert sig["x_ptr"] == "*bf16" and sig["N"] == "i32" and sig["stride_xc"] == "i32"
    with pytest.raises(ValueError, match="x_pointer"):
        aot.runtime_signature(_weighted_merge_kernel, consts, x_pointer="*bf16")


def test_local_memory_in_loops_reads_sass():
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   STL [R1], R2 ;
        /*0020*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*0030*/                   LDL.64 R6, [R1+0x8] ;
        /*0040*/              @!P0 BRA 0x20 ;
        /*0050*/                   EXIT ;
    """
    assert aot.local_memory_in_loops(sass) == {"total": 2, "in_loops": 1, "loop_density": 1 / 3}
    assert aot.local_memory_in_loops(sass.replace("BRA 0x20", "BRA 0x50")) == \
        {"total": 2, "in_loops": 0, "loop_density": 0.0}


def test_loads_after_first_product_reads_sass():
    sass = """
        /*0000*/              @P0 LDG.E.128 R8, desc[UR4][R2.64] ;
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT ;
        /*0020*/              @P1 LDG.E.128 R12, desc[UR4][R4.64] ;
        /*0030*/                   HMMA.16816.F32.BF16 R24, R8, R12, R24 ;
        /*0040*/                   EXIT ;
    """
    assert aot.loads_after_first_product(sass) == {"global_loads": 2, "loads_after_product": 1}
    assert aot.loads_after_first_product(sass.replace("HGMMA", "FMUL")) == \
        {"global_loads": 2, "loads_after_product": 0}
    assert aot.barriers(sass) == 0
    assert aot.barriers(sass.replace("EXIT", "BAR.SYNC.DEFER_BLOCKING 0x0")) == 1


def test_tome_one_tile_loads_before_any_product(aot_results):
    """ToMe's one-tile matching for sm_90 issues the sources' and every candidate tile's loads before its
    first product: one memory latency, as benchmarks/cost_model.py counts it, not one per candidate
    tile (sm_80 loads each tile in turn: a prefetched mma.sync operand would take registers)."""
    cc = 90
    names = [s.name for s in SPECS if s.name.startswith("tome_match_select[") and ",N=197," in s.name
             and cc in s.targets(CCS)]
    assert {n.split(",")[0] for n in names} == {f"tome_match_select[{t}" for t in ("float32", "float16", "bfloat16")}
    for name in names:
        row = aot_results[(name, cc)]
        assert row["global_loads"], f"{name} sm_{cc}: no global loads read from the SASS"
        assert row["loads_after_product"] == 0, \
            f"{name} sm_{cc}: {row['loads_after_product']} of {row['global_loads']} loads wait for a product"


def test_resident_warps_model():
    assert aot.resident_warps(32, 4) == 64           # 2048 threads x 32 registers = the whole file
    assert aot.resident_warps(128, 4) == 16          # 65536 / (128 x 128 threads) = 4 programs
    assert aot.resident_warps(129, 4) == 12          # rounded up to 136: 3 programs
    assert aot.resident_warps(32, 4, shared_bytes=100 * 1024) == 8


@pytest.mark.parametrize("cc", CCS)
def test_ptxas_available(cc):
    try:
        path = aot.ptxas_path(cc)
    except RuntimeError as err:
        pytest.fail(f"ptxas is required to compile kernels for real GPUs: {err}")
    assert path


def test_interpreted_kernel_is_refused_clearly(monkeypatch):
    """compile_spec in an interpreter process must say why it cannot compile, not crash obscurely."""
    spec = SPECS[0]
    import triton

    if isinstance(spec.kernel, triton.runtime.JITFunction):
        pytest.skip("this process runs real Triton (GPU present): nothing interpreted to refuse")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.compile_spec(spec, 90)


@pytest.mark.parametrize(("name", "cc"), [(s.name, cc) for s in SPECS for cc in s.targets(CCS)])
def test_kernel_compiles(aot_results, name, cc):
    row = aot_results[(name, cc)]
    usage = (f"registers={row.get('registers')}, stack bytes={row.get('stack_bytes')}, "
             f"shared={row.get('shared_bytes')} B, num_warps={row['num_warps']}, local accesses "
             f"{row.get('local_accesses')} ({row.get('local_accesses_in_loops')} in loops)")
    assert row["ok"], f"{name} failed to compile for sm_{cc}: {row['error']} ({usage})"
    assert row["cubin_bytes"] > 0 and row["ptx_bytes"] > 0, f"{name} sm_{cc}: empty cubin/ptx ({usage})"
    assert row["registers"] is not None and 0 < row["registers"] <= 255, f"{name} sm_{cc}: {usage}"
    warps = aot.resident_warps(row["registers"], row["num_warps"], row.get("shared_bytes") or 0)
    floors = LOW_OCCUPANCY if name.endswith("@jit") else {**LOW_OCCUPANCY, **GENERIC_LOW_OCCUPANCY}
    floor = next((v for k, v in floors.items() if name.startswith(k)), MIN_RESIDENT_WARPS)
    assert warps >= floor, f"{name} sm_{cc}: only {warps} warps fit on an SM (want >= {floor}): {usage}"
    assert row["loop_local_density"] is not None, f"{name} sm_{cc}: SASS could not be read ({usage})"
    assert row["loop_local_density"] <= MAX_LOOP_LOCAL_DENSITY, \
        f"{name} sm_{cc}: a loop is spill-bound, {row['loop_local_density']:.1%} of its instructions " \
        f"access local memory ({usage})"


def test_low_occupancy_exceptions_name_kernels():
    """Every exception names registered kernels (a renamed kernel must not keep a stale exception)."""
    names = [s.name for s in SPECS]
    for prefix in {**LOW_OCCUPANCY, **GENERIC_LOW_OCCUPANCY}:
        assert any(n.startswith(prefix) for n in names), f"LOW_OCCUPANCY names {prefix!r}, which matches no kernel"
