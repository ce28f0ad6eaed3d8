"""Checks of the benchmark harness itself: timer statistics, byte counts, grids, result files.

Cheap (a few seconds on CPU); run with ``pytest benchmarks/test_harness.py``. Skipped under
``--benchmark-only``, which keeps only the timed tests.
"""
import csv

import pytest
import torch

from benchmarks import end_to_end, harness, kernels, plots
from benchmarks.ops import SHAPES, Case, kernel_ops, resolve_r

CPU = torch.device("cpu")


def test_cpu_bench_quantiles_are_ordered_and_respect_min_reps():
    calls = []
    t = harness.bench(lambda: calls.append(sum(range(2000))), CPU, warmup_ms=1, rep_ms=5, min_reps=7)
    assert t.n >= 7
    assert 0 < t.p20_ms <= t.median_ms <= t.p80_ms
    assert len(calls) >= t.n + 1  # warm-up call(s) too


def test_bench_resets_grads_before_every_call():
    x = torch.ones(3, requires_grad=True)
    seen = []

    def fn():
        seen.append(x.grad is None)
        (x * 2).sum().backward()

    harness.bench(fn, CPU, grad_to_none=[x], warmup_ms=0, rep_ms=0, min_reps=4, max_reps=4)
    assert seen[-4:] == [True] * 4


def test_copy_bandwidth_is_positive():
    assert harness.copy_bandwidth_gbps(CPU, nbytes=1 << 20, rep_ms=5) > 0


def test_resolve_r():
    assert resolve_r("13", 197) == 13
    assert resolve_r("n/4", 197) == 49
    assert resolve_r("500", 197) == 195  # MSTM: at most N - p - 1
    assert resolve_r("500", 197, "tome_merge") == 98  # ToMe: at most (N - p) // 2
    with pytest.raises(ValueError, match="r must"):
        resolve_r("lots", 197)
    with pytest.raises(ValueError, match="r must be >= 1"):
        resolve_r("0", 197)


def test_grid_has_one_case_per_combination():
    op = kernel_ops()["mstm_merge"]
    cases = kernels.build_cases(op, CPU, ["deit_s", "vit_l16_384"], [1, 8], ["fp32", "bf16"], list(kernels.MODES),
                                ["13", "n/4"])
    assert len(cases) == 2 * 2 * 2 * 2 * 2
    assert {c.r for c in cases if c.shape.N == 577} == {13, 144}
    cls_cases = kernels.build_cases(kernel_ops()["cls_attention"], CPU, ["deit_s"], [1], ["fp32"], ["fwd"], ["13"])
    assert [c.r for c in cls_cases] == [None]
    evit_cases = kernels.build_cases(kernel_ops()["evit"], CPU, ["deit_s"], [1], ["fp32"], ["fwd"], ["13"],
                                     [0.7, 0.5])
    assert [c.keep_rate for c in evit_cases] == [0.7, 0.5]


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_bytes_match_the_tensors_the_reference_reads_and_writes(dtype):
    """The byte model equals the size of the inputs plus the reference's outputs (x, size, index)."""
    from fastprune.evit import evit_reference
    from fastprune.reference import mstm_merge
    from fastprune.tome import tome_merge_reference

    ops = kernel_ops()
    shape = SHAPES["deit_s"]
    case = Case("mstm_merge", shape, 2, dtype, "fwd", 13, CPU)
    inp = ops["mstm_merge"].make_inputs(case).kwargs
    out = mstm_merge(inp["x"], inp["scores"], 13)
    assert ops["mstm_merge"].bytes_moved(case)[0] == _nbytes(inp["x"], inp["scores"], *out)

    case = Case("tome_merge", shape, 2, dtype, "fwd", 13, CPU)
    inp = ops["tome_merge"].make_inputs(case).kwargs
    out = tome_merge_reference(inp["x"], 13)
    assert ops["tome_merge"].bytes_moved(case)[0] == _nbytes(inp["x"], out.x, out.size.float(), out.index)

    case = Case("evit", shape, 2, dtype, "fwd", None, CPU, 0.7)
    inp = ops["evit"].make_inputs(case).kwargs
    out = evit_reference(inp["x"], inp["scores"], 0.7)
    assert ops["evit"].bytes_moved(case)[0] == _nbytes(inp["x"], inp["scores"], *out)
    assert ops["evit"].n_out(case) == out.x.shape[1]


def test_run_case_checks_times_and_compares(tmp_path):
    op = kernel_ops()["mstm_merge"]
    providers, skipped = kernels.available_providers(op, CPU, None)
    assert "fastprune-triton" in skipped  # never timed without CUDA
    case = Case(op.name, SHAPES["deit_s"], 2, torch.float32, "fwd+bwd", 13, CPU)
    rows = kernels.run_case(op, case, providers, copy_gbps=10.0, warmup_ms=0, rep_ms=1)
    by_name = {r["provider"]: r for r in rows}
    for name in ("reference", "eager"):
        row = by_name[name]
        assert row["status"] == "ok", row.get("note")
        assert row["check"] == "ok" and row["match_frac"] == 1.0
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["gbps"] == pytest.approx(row["bytes"] / (row["median_ms"] * 1e-3) / 1e9)
        assert row["frac_copy_bw"] == pytest.approx(row["gbps"] / 10.0)
    assert by_name["reference"]["speedup_vs_reference"] == pytest.approx(1.0)
    assert by_name["eager"]["speedup_vs_eager"] == pytest.approx(1.0)

    meta = harness.run_metadata(CPU)
    rows = [dict(meta, copy_gbps=10.0, **r) for r in rows]
    path = harness.write_csv(tmp_path / "k.csv", rows)
    with open(path) as f:
        read = list(csv.DictReader(f))
    assert len(read) == len(rows)
    assert {"device", "torch", "triton", "fastprune", "timestamp", "median_ms", "p20_ms", "p80_ms", "bytes",
            "gbps", "frac_copy_bw"} <= set(read[0])
    md = kernels.summary_markdown(rows, {op.name: skipped}, meta, 10.0)
    assert "| DeiT-S | 2 | r=13 |" in md and "fastprune-triton` skipped" in md
    pngs = plots.kernel_plots(rows, tmp_path / "k")
    assert [p.name for p in pngs] == ["k_mstm_merge_speedup.png", "k_mstm_merge_roofline.png"]
    assert all(p.stat().st_size > 0 for p in pngs)


def test_check_flags_a_wrong_output():
    expected = torch.randn(2, 5, 8)
    wrong = expected.clone()
    wrong[:, 1:] += 1.0
    err, match = kernels._check(wrong, expected, torch.float32)
    assert err == pytest.approx(1.0) and match == pytest.approx(0.2)
    assert kernels._check(expected.clone(), expected, torch.float32) == (0.0, 1.0)


def test_parse_variant():
    assert end_to_end.parse_variant("merge:r=13") == ("merge", {"r": 13})
    assert end_to_end.parse_variant("evit:keep_rate=0.7:normalize=True") == \
        ("evit", {"keep_rate": 0.7, "normalize": True})
    with pytest.raises(ValueError, match="key=value"):
        end_to_end.parse_variant("merge:13")


def test_end_to_end_rows_for_a_tiny_vit(monkeypatch):
    """Unreduced row measured; a variant that cannot be applied is a row with the reason, not a crash."""
    from timm.models.vision_transformer import VisionTransformer

    def tiny(name, device, dtype):
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
        return model.eval().to(device=device, dtype=dtype)

    monkeypatch.setattr(end_to_end, "build_model", tiny)
    rows = end_to_end.run_model("tiny", [(None, {}), ("no-such-method", {"r": 2})], CPU, torch.float32, 2,
                                compile_it=False, rep_ms=1, warmup_ms=0)
    base, bad = rows
    assert base["status"] == "ok" and base["images_per_s"] > 0 and base["speedup_vs_unreduced"] == 1.0
    # 2 blocks of 17 tokens x 32 channels plus the head: a few MFLOPs, counted by FlopCounterMode
    assert 1e-3 < base["gflops_per_image"] < 1e-1
    assert bad["status"] in ("skipped", "error") and bad["note"]
    md = end_to_end.summary_markdown(rows, harness.run_metadata(CPU))
    assert "| tiny | unreduced | no |" in md


def test_time_limit_interrupts_a_slow_call():
    import time

    with pytest.raises(end_to_end.CompileTimeout):
        with end_to_end.time_limit(0.05) as alarm:
            time.sleep(2)
    assert alarm["fired"]
    with end_to_end.time_limit(5) as alarm:  # finishes in time: no exception, alarm cleared
        pass
    time.sleep(0.01)
    assert not alarm["fired"]


def test_overhead_rows_compare_each_method_with_its_free_variant(monkeypatch):
    """The free variant keeps the method's token schedule; the profiler finds the reducer's range."""
    from timm.models.vision_transformer import VisionTransformer

    import fastprune.patch
    from benchmarks import overhead, variants

    def tiny(name, device, dtype):
        model = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=12, num_heads=2, num_classes=10)
        return model.eval().to(device=device, dtype=dtype)

    monkeypatch.setattr(end_to_end, "build_model", tiny)
    variants.register()
    base = tiny("tiny", CPU, torch.float32)
    for method, options in variants.MATCHED[:4]:
        labels = dict(overhead._variants(base, method, options))
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            for model in labels.values():
                model(x)
        counts = {label: fastprune.patch.state(m).num_tokens for label, m in labels.items()}
        assert counts["free"] == counts[method] and counts[method][-1] < 65, method
        assert counts.get("eager", counts["free"]) == counts["free"], method
    args = overhead.parse_args(["--model", "tiny", "--device", "cpu", "--batch", "2", "--rounds", "2",
                                "--profile-reps", "1", "--methods", "tome,evit", "--no-write"])
    rows = overhead.run(args)
    assert [r["method"] for r in rows] == ["tome", "evit"]
    assert all(r["ms_free"] > 0 and 0 < r["reduce_share"] < 1 and 0 < r["reduce_share_wall"] < 1 and "ms_eager" in r
               for r in rows)
    with pytest.raises(ValueError, match="no reducer"):
        variants.profiled("idle")
