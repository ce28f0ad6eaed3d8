"""Every registered Triton kernel compiles ahead of time for sm_80 (A100) and sm_90 (H100/H200).

The interpreter the rest of the suite uses cannot see GPU-only failures (a tile too large for the
register file fails in ptxas with "Register allocation failed"), so this runs Triton's whole pipeline,
ptxas included, with no GPU present. Compilation happens in one child process with TRITON_INTERPRET
unset (see fastprune.kernels.aot); each (kernel, cc) is then checked as its own test.
A missing ptxas is a failure, not a skip. Every kernel must also compile without register spills to
local memory (:data:`MAY_SPILL` lists exceptions, none today).
"""
import pytest

from fastprune.kernels import aot

CCS = aot.DEFAULT_CCS
SPECS = aot.registered_specs()


@pytest.fixture(scope="module")
def aot_results():
    rows = aot.compile_all_in_subprocess(CCS)
    return {(row["name"], row["cc"]): row for row in rows}


def test_registry_holds_every_kernel_file():
    names = [s.name for s in SPECS]
    for method in ("mstm_", "tome_", "evit_", "bat_", "idle_"):  # kernels/merge.py, tome.py, evit.py, ...
        assert any(n.startswith(method) for n in names), f"no AOT spec {method}* in {names}"
    for prefix in ("mstm_select_match[", "mstm_weighted_merge[", "mstm_merge_backward["):
        for dtype in ("float32", "float16", "bfloat16"):
            assert any(n.startswith(prefix + dtype) for n in names), f"no AOT spec {prefix}{dtype}...] in {names}"


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


@pytest.mark.parametrize("cc", CCS)
@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_kernel_compiles(aot_results, name, cc):
    row = aot_results[(name, cc)]
    usage = (f"registers={row.get('registers')}, stack/spill bytes={row.get('stack_bytes')}, "
             f"shared={row.get('shared_bytes')} B, num_warps={row['num_warps']}")
    assert row["ok"], f"{name} failed to compile for sm_{cc}: {row['error']} ({usage})"
    assert row["cubin_bytes"] > 0 and row["ptx_bytes"] > 0, f"{name} sm_{cc}: empty cubin/ptx ({usage})"
    assert row["registers"] is not None and 0 < row["registers"] <= 255, f"{name} sm_{cc}: {usage}"


#: Kernels (name prefixes) allowed to spill registers to local memory, with the reason. Empty: every
#: registered kernel (MSTM, ToMe, EViT, BAT, IdleViT) compiled spill-free for sm_80 and sm_90.
MAY_SPILL: dict = {}


@pytest.mark.parametrize("cc", CCS)
def test_kernels_do_not_spill(aot_results, cc):
    """Every registered kernel's tiles are sized to fit the register file (no local-memory spills)."""
    rows = [row for (name, c), row in aot_results.items()
            if c == cc and not any(name.startswith(prefix) for prefix in MAY_SPILL)]
    assert len(rows) == len(SPECS) - sum(any(s.name.startswith(p) for p in MAY_SPILL) for s in SPECS)
    spilling = [(r["name"], r["registers"], r["stack_bytes"]) for r in rows if r["ok"] and r["stack_bytes"]]
    assert not spilling, f"sm_{cc}: (kernel, registers, stack bytes) spilling: {spilling}"
