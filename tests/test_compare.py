"""The method comparison at matched FLOPs (fastprune.compare): bisection, family monotonicity, FLOPs
matching on a small random-init ViT, the table and its verdict, argument checks. No data needed."""
import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from fastprune import compare, evaluate, patch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: one thread is as fast as two, and not slowed down 10x by other work on the machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_vit():
    # 197 tokens and 12 blocks like ViT-Ti, but 24 channels: counting FLOPs takes milliseconds
    torch.manual_seed(0)
    return VisionTransformer(img_size=224, patch_size=16, embed_dim=24, depth=12, num_heads=2,
                             num_classes=5).eval()


@pytest.fixture(scope="module")
def image():
    return torch.randn(3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def gflops(tiny_vit, image):
    """Memoised ``setting text -> GFLOPs`` of the tiny ViT (the searches share many members)."""
    cache = {}

    def count(text):
        if text not in cache:
            cache[text] = evaluate.setting_gflops(tiny_vit, text, image)
        return cache[text]
    return count


# ---- bisection on a grid ------------------------------------------------------------------------

@pytest.mark.parametrize("increasing", [True, False])
@pytest.mark.parametrize("target", [0.5, 3.33, 7.0, 7.2, 12.9, 19.0])
def test_match_parameter_finds_the_closest_member_in_log_calls(increasing, target):
    params = list(range(100))
    values = {p: (0.2 * p if increasing else 20.0 - 0.2 * p) for p in params}
    calls = []

    def gflops_of(p):
        calls.append(p)
        return values[p]

    i, reachable, seen = compare.match_parameter(params, gflops_of, target, increasing=increasing)
    best = min(params, key=lambda p: abs(values[p] - target))
    assert abs(values[params[i]] - target) == pytest.approx(abs(values[best] - target))
    assert reachable
    assert len(set(calls)) == len(calls) <= math.ceil(math.log2(len(params))) + 3  # memoised, O(log n)
    assert seen == {p: values[p] for p in calls}


def test_match_parameter_with_plateaus_and_at_most():
    params = [0.1 * i for i in range(1, 11)]
    steps = [1.0, 1.0, 2.0, 2.0, 2.0, 3.5, 3.5, 4.0, 4.0, 5.0]  # non-decreasing step function
    g = dict(zip(params, steps))
    i, ok, _ = compare.match_parameter(params, g.__getitem__, 3.3, increasing=True)
    assert ok and g[params[i]] == 3.5
    i, ok, _ = compare.match_parameter(params, g.__getitem__, 3.3, increasing=True, side="at-most")
    assert ok and g[params[i]] == 2.0
    i, ok, _ = compare.match_parameter(params, g.__getitem__, 4.0, increasing=True, side="at-most")
    assert ok and g[params[i]] == 4.0


@pytest.mark.parametrize("target, end", [(0.5, 0), (9.0, 9)])
def test_match_parameter_out_of_range_is_flagged(target, end):
    params = list(range(10))
    i, reachable, _ = compare.match_parameter(params, lambda p: 1.0 + p * 0.5, target, increasing=True)
    assert i == end and not reachable
    # nothing at or below the target: at-most cannot be satisfied either
    i, reachable, _ = compare.match_parameter(params, lambda p: 1.0 + p * 0.5, 0.5, increasing=True,
                                              side="at-most")
    assert i == 0 and not reachable


@pytest.mark.parametrize("kwargs, error", [
    (dict(params=[], target=1.0), ValueError),
    (dict(params=[1, 2], target=0.0), ValueError),
    (dict(params=[1, 2], target=float("nan")), ValueError),
    (dict(params=[1, 2], target=True), ValueError),
    (dict(params=[1, 2], target=1.0, side="nearest"), ValueError),
])
def test_match_parameter_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error):
        compare.match_parameter(gflops_of=float, increasing=True, **kwargs)


# ---- the families --------------------------------------------------------------------------------

def test_default_families_settings_parse_and_merge_ramp():
    fams = compare.default_families(12, 196)
    assert [f.name for f in fams] == list(compare.FAMILY_NAMES)
    merge = fams[0]
    assert merge.params[0] == 9 and merge.make(21) == "merge:0*2,21..12:metric=x:weight=size_attn"
    assert evaluate.parse_setting(merge.make(21)).r == [0, 0] + list(range(21, 11, -1))
    for fam in fams[1:]:
        assert fam.params[0] == pytest.approx(0.01) and fam.params[-1] == 1.0 and len(fam.params) == 100
        for rho in (0.01, 0.55, 1.0):
            setting = fam.setting(rho)
            assert isinstance(setting.r, float) and setting.r == pytest.approx(rho)
    assert fams[-1].setting(0.7).options == {"reselect": False}
    assert fams[1].setting(0.7).options == {"schedule": "paper"}
    assert compare.merge_ramp(5, 4) == "0*2,5..4" and compare.merge_ramp(3, 3) == "0*2,3"


@pytest.mark.parametrize("kwargs, error", [
    (dict(depth=2), ValueError), (dict(depth=12.0), TypeError), (dict(num_patches=0), ValueError),
    (dict(keep_rate_step=0.0), ValueError), (dict(keep_rate_step=0.7), ValueError),
])
def test_default_families_reject_bad_arguments(kwargs, error):
    with pytest.raises(error):
        compare.default_families(**kwargs)


def test_merge_ramp_rejects_negative_tail():
    with pytest.raises(ValueError, match="a must be >= 9"):
        compare.merge_ramp(8, 12)


def test_every_family_is_monotone_in_flops(gflops):
    """Bisection is valid only if GFLOPs are monotone in the family parameter: check a sweep."""
    base = gflops("none")
    for fam in compare.default_families(12, 196):
        picks = (0.05, 0.3, 0.55, 0.62, 0.8, 1.0) if fam.name != "merge" else (9, 12, 16, 21, 24, 40)
        flops = [gflops(fam.make(p)) for p in picks]
        ordered = flops if fam.flops_increase else flops[::-1]
        assert all(a <= b + 1e-9 for a, b in zip(ordered, ordered[1:])), (fam.name, picks, flops)
        assert min(flops) < 0.8 * base, fam.name  # the family does reduce
        if fam.flops_increase:  # keep rate 1.0 keeps every token: the unreduced FLOPs (up to the ranking)
            assert flops[-1] == pytest.approx(base, rel=0.02), fam.name


@pytest.fixture(scope="module")
def matched(tiny_vit, image):
    return compare.match_all(tiny_vit, image, anchors=[8, 13])


@pytest.mark.parametrize("anchor", [8, 13])
def test_match_all_meets_the_anchor_flops_for_every_family(gflops, matched, anchor):
    targets, matches = matched
    assert targets[anchor] == pytest.approx(gflops(f"tome:{anchor}"))
    mine = [m for m in matches if m.anchor == anchor]
    assert [m.family.name for m in mine] == list(compare.FAMILY_NAMES)
    for m in mine:
        assert m.reachable, m.family.name
        assert abs(m.relative_error) <= compare.DEFAULT_TOLERANCE, (m.family.name, m.setting, m.gflops)
        # the reported GFLOPs are the setting's, and no neighbour on the grid is closer to the anchor
        assert m.gflops == pytest.approx(gflops(m.setting))
        i = m.family.params.index(m.param)
        for j in (i - 1, i + 1):
            if 0 <= j < len(m.family.params):
                other = gflops(m.family.make(m.family.params[j]))
                assert abs(other - m.target) >= abs(m.gflops - m.target) - 1e-9, (m.family.name, j)
        assert len(m.evaluated) <= math.ceil(math.log2(len(m.family.params))) + 3


def test_lower_flops_level_reduces_more(matched):
    targets, matches = matched
    assert targets[13] < targets[8]
    at8 = {m.family.name: m.param for m in matches if m.anchor == 8}
    at13 = {m.family.name: m.param for m in matches if m.anchor == 13}
    assert at13["merge"] > at8["merge"]  # a longer ramp
    assert all(at13[n] < at8[n] for n in compare.FAMILY_NAMES if n != "merge")  # a lower keep rate


def test_match_all_at_most_never_exceeds_the_anchor(tiny_vit, image):
    targets, matches = compare.match_all(tiny_vit, image, anchors=[10], methods=["merge", "evit"],
                                         side="at-most")
    assert [m.family.name for m in matches] == ["merge", "evit"]
    for m in matches:
        assert m.reachable and m.gflops <= targets[10] + 1e-12


@pytest.mark.parametrize("kwargs, error", [
    (dict(anchors=[]), ValueError), (dict(anchors=[0]), ValueError), (dict(anchors=[8.5]), TypeError),
    (dict(anchors=[True]), TypeError), (dict(anchors="8"), ValueError),
    (dict(methods=["random"]), ValueError), (dict(methods=[]), ValueError),
    (dict(side="below"), ValueError),
])
def test_match_all_rejects_bad_arguments(tiny_vit, image, kwargs, error):
    with pytest.raises(error):
        compare.match_all(tiny_vit, image, **{"anchors": [8], **kwargs})


# ---- evaluation, table and verdict ---------------------------------------------------------------

def _images(n=6, size=224, classes=5):
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(3, 3, size, size, generator=g), torch.randn(n - 3, 3, size, size, generator=g)]
    return evaluate.Images(batches, torch.randint(0, classes, (n,), generator=g), [f"img{i}" for i in range(n)])


def test_compare_model_evaluates_matched_settings_side_by_side(tiny_vit):
    comp = compare.compare_model(tiny_vit, _images(), anchors=[13], model_name="tiny",
                                 methods=["merge", "evit"], progress=False)
    assert [(r.level, r.label) for r in comp.rows] == [
        (None, "none (unreduced)"), (13, "tome (ToMe)"), (13, "merge (MSTM, recommended shape)"), (13, "evit")]
    base, tome, merge, evit = (r.result for r in comp.rows)
    assert base.flops_reduction == 0 and tome.flops_reduction > 30
    for row in comp.rows[2:]:
        assert abs(row.result.gflops / tome.gflops - 1) <= compare.DEFAULT_TOLERANCE
        assert row.result.gflops == pytest.approx(row.match.gflops)
        assert row.result.setting.text == row.match.setting
    assert comp.num_images == 6 and not comp.left_out and "threads" in comp.device
    assert not patch.is_patched(tiny_vit)  # every setting was reverted
    text = compare.format_comparison(comp)
    assert "ToMe r=13" in text and "best is" in text


def test_compare_model_leaves_out_matches_beyond_tolerance(tiny_vit):
    comp = compare.compare_model(tiny_vit, _images(4), anchors=[13], methods=["merge"], tolerance=1e-6,
                                 progress=False)
    assert len(comp.left_out) == 1 and [r.label for r in comp.rows] == ["none (unreduced)", "tome (ToMe)"]
    assert "Left out at ToMe r=13: merge (MSTM, recommended shape) off by" in compare.format_comparison(comp)


def _fake_result(text, gflops, top1, base_top1=80.0):
    res = evaluate.Result(setting=evaluate.parse_setting(text), gflops=gflops, top1=top1, top5=95.0,
                          images_per_s=100.0, predictions=torch.zeros(1, dtype=torch.long))
    res.top1_delta, res.flops_reduction, res.speedup = top1 - base_top1, 100 * (1 - gflops / 2.5), 1.0
    return res


def test_best_rows_and_verdict():
    rows = [compare.ComparisonRow(None, "none (unreduced)", _fake_result("none", 2.5, 80.0)),
            compare.ComparisonRow(8, "tome (ToMe)", _fake_result("tome:8", 1.86, 78.0))]
    fam = compare.default_families()[2]
    m = compare.Match(fam, 8, 1.86, 0.79, "evit:0.79", 1.857)
    rows += [compare.ComparisonRow(8, "evit", _fake_result("evit:0.79", 1.857, 79.0), m),
             compare.ComparisonRow(8, "bat", _fake_result("bat:0.79", 1.85, 79.0), m),
             compare.ComparisonRow(13, "tome (ToMe)", _fake_result("tome:13", 1.47, 76.0)),
             compare.ComparisonRow(13, "evit", _fake_result("evit:0.62", 1.47, 75.4), m)]
    comp = compare.ModelComparison("m", rows, [], "CPU", 500)
    best = compare.best_rows(comp)
    assert best[8][0].label == "tome (ToMe)" and best[8][1].label == "bat"  # same top-1: fewer GFLOPs wins
    assert best[13][1].label == "evit"
    text = compare.format_comparison(comp, markdown=True)
    lines = text.splitlines()
    assert lines[0].startswith("| FLOPs level | method | setting | GFLOPs |") and lines[1].startswith("|---|")
    assert "| ToMe r=8 | bat | ρ=0.79 | 1.850 |" in text
    assert "At ToMe r=8 (1.860 GFLOPs): best is bat" in text and "loses less top-1 than ToMe (+1.0 points)" in text
    assert "At ToMe r=13" in text and "loses more top-1 than ToMe (-0.6 points)" in text


@pytest.mark.parametrize("argv", [["--anchors", "0"], ["--tolerance", "2"], ["--threads", "0"],
                                  ["--methods", "nope"], ["--match", "x"]])
def test_cli_rejects_bad_arguments(argv, tmp_path):
    with pytest.raises(SystemExit) as err:
        compare.main(argv + ["--data", str(tmp_path)])
    assert err.value.code == 2


def test_cli_missing_data_exits_2(tmp_path):
    with pytest.raises(SystemExit) as err:
        compare.main(["--data", str(tmp_path / "missing"), "--models", "vit_tiny_patch16_224"])
    assert err.value.code == 2


def test_evaluate_cli_delegates_compare(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        evaluate.main(["--compare", "--anchors", "0", "--data", str(tmp_path)])
    assert err.value.code == 2
    assert "python -m fastprune.compare" in capsys.readouterr().err  # compare's parser answered
    assert "--compare" in evaluate.build_parser().format_help()
