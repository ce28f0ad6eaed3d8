"""The tuning/report split, the fidelity metrics (agreement, KL over image and flip) and their paired
bootstrap intervals; the evaluation CLI end to end on a few images of ../shared/data."""
import math
import pathlib
import random

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from conftest import DATA_DIR
from fastprune import evaluate
from fastprune.evaluation import fidelity


# ---------------------------------------------------------------------------------------------------
# The split
# ---------------------------------------------------------------------------------------------------

def test_split_halves_are_disjoint_covering_and_alternate():
    names = [pathlib.Path(f"n{i:08d}_x.JPEG") for i in range(11)]
    shuffled = random.Random(3).sample(names, len(names))
    tune, report = evaluate.split_files(shuffled, "tune"), evaluate.split_files(shuffled, "report")
    assert tune == names[0::2] and report == names[1::2]  # even / odd positions of the sorted list
    assert not set(tune) & set(report) and sorted(tune + report) == names
    assert evaluate.split_files(shuffled, "all") == names
    assert evaluate.split_files(list(reversed(names)), "tune") == tune  # input order does not matter
    with pytest.raises(ValueError, match="split"):
        evaluate.split_files(names, "test")


@pytest.mark.realdata
def test_split_of_the_sample_folder():
    folder = DATA_DIR / evaluate.IMAGES_DIR
    every = evaluate.image_files(folder)
    tune, report = (evaluate.image_files(folder, split=s) for s in ("tune", "report"))
    assert len(tune) == len(report) == len(every) // 2 == 250
    assert not set(tune) & set(report) and sorted(tune + report) == every
    assert evaluate.image_files(folder, limit=3, split="report") == every[1:6:2]  # the split, then the limit
    assert evaluate.DEFAULT_SPLIT == "report" and evaluate.build_parser().parse_args([]).split == "report"


# ---------------------------------------------------------------------------------------------------
# Agreement and KL
# ---------------------------------------------------------------------------------------------------

def test_kl_on_hand_made_logits():
    base = torch.tensor([[0.0, 0.0], [1.0, 2.0], [5.0, -1.0]])
    assert np.allclose(fidelity.kl_divergence(base, base), 0.0)
    assert np.allclose(fidelity.kl_divergence(base, base + 7.0), 0.0, atol=1e-12)  # softmax ignores shifts
    # p = (1/2, 1/2) against q = (1/4, 3/4)
    q = torch.tensor([[math.log(0.25), math.log(0.75)]])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert fidelity.kl_divergence(base[:1], q) == pytest.approx([expected], rel=1e-6)  # q rounded to float32
    # KL(p || q) is not symmetric: the direction is unreduced || reduced
    assert fidelity.kl_divergence(q, base[:1])[0] != pytest.approx(expected)
    with pytest.raises(ValueError, match="logits"):
        fidelity.kl_divergence(base, base[:, :1])


def test_agreement_on_hand_made_logits():
    base = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 1.0]])
    other = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0], [-1.0, 0.0, 9.0]])
    assert fidelity.top1_agreement(base, other).tolist() == [1.0, 0.0, 1.0]


def _result(logits, flip_logits=None, correct=None, text="none"):
    return evaluate.Result(setting=evaluate.parse_setting(text), gflops=1.0, top1=0.0, top5=0.0, images_per_s=1.0,
                           predictions=logits.argmax(1), logits=logits, flip_logits=flip_logits, correct=correct)


def test_compare_averages_over_the_image_and_its_flip():
    n = 8
    base = torch.eye(4)[torch.arange(n) % 4] * 5.0
    flip_base = base.clone()
    # the reduced model agrees on every image, but on its flip only for the first half of the images
    flip_other = flip_base.clone()
    flip_other[n // 2:] = flip_other[n // 2:].roll(1, dims=1)
    results = evaluate.compare([_result(base, flip_base), _result(base.clone(), flip_other, text="tome:1")])
    assert results[1].agree == pytest.approx(75.0)
    kl_flip = fidelity.kl_divergence(flip_base, flip_other)
    assert results[1].kl == pytest.approx(kl_flip.mean() / 2) and results[1].kl > 0
    assert results[0].agree == 100.0 and results[0].kl == 0.0
    # without the flipped pass only the images count
    without = evaluate.compare([_result(base), _result(base.clone(), text="tome:1")])
    assert without[1].agree == 100.0 and without[1].kl == 0.0


# ---------------------------------------------------------------------------------------------------
# Bootstrap intervals
# ---------------------------------------------------------------------------------------------------

def test_bootstrap_indices_are_fixed_by_the_seed():
    a, b = fidelity.bootstrap_indices(50), fidelity.bootstrap_indices(50)
    assert a.shape == (fidelity.BOOTSTRAP_SAMPLES, 50) and np.array_equal(a, b)
    assert not np.array_equal(a, fidelity.bootstrap_indices(50, seed=1))
    assert a.min() >= 0 and a.max() < 50


def test_bootstrap_interval_known_cases():
    idx = fidelity.bootstrap_indices(200)
    assert fidelity.bootstrap_interval(np.full(200, 0.3), idx) == pytest.approx((0.3, 0.3))  # no spread
    values = np.zeros(200)
    values[:100] = 1.0
    low, high = fidelity.bootstrap_interval(values, idx)
    assert low < values.mean() < high
    half = 1.96 * math.sqrt(0.25 / 200)  # normal approximation of the mean of 100 ones in 200
    assert low == pytest.approx(0.5 - half, abs=0.01) and high == pytest.approx(0.5 + half, abs=0.01)
    with pytest.raises(ValueError):
        fidelity.bootstrap_interval(values[:10], idx)


def test_compare_intervals_are_paired():
    n = 40
    labels = torch.arange(n) % 3
    base = torch.nn.functional.one_hot(labels, 3).float() * 4.0
    other = base.clone()
    other[:4] = other[:4].roll(1, dims=1)  # 4 images go wrong, 10 points of top-1 and of agreement
    results = evaluate.compare([_result(base, correct=base.argmax(1) == labels),
                                _result(other, correct=other.argmax(1) == labels, text="tome:1")])
    base_res, res = results
    assert base_res.top1_delta_ci == (0.0, 0.0) and base_res.agree_ci == (100.0, 100.0)
    assert base_res.kl_ci == (0.0, 0.0)
    low, high = res.top1_delta_ci
    assert low < -10.0 < high <= 0.0  # every image either stays or goes wrong: the interval is one-sided
    assert res.agree_ci[0] < res.agree == 90.0 <= res.agree_ci[1] <= 100.0
    assert res.kl_ci[0] < res.kl < res.kl_ci[1]


# ---------------------------------------------------------------------------------------------------
# The runner runs the flipped images
# ---------------------------------------------------------------------------------------------------

def test_evaluate_settings_runs_the_flipped_batch():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=24, depth=2, num_heads=2, num_classes=5).eval()
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(3, 3, 224, 224, generator=gen), torch.randn(2, 3, 224, 224, generator=gen)]
    images = evaluate.Images(batches, torch.tensor([0, 1, 2, 3, 4]), [f"n{i}_x.JPEG" for i in range(5)])
    res = evaluate.evaluate_setting(model, images, "none", warmup=0, progress=False)
    with torch.inference_mode():
        flipped = torch.cat([model(b.flip(-1)) for b in batches])
        plain = torch.cat([model(b) for b in batches])
    assert torch.allclose(res.flip_logits, flipped, atol=1e-5) and torch.allclose(res.logits, plain, atol=1e-5)
    assert not torch.allclose(flipped, plain, atol=1e-3)  # the flip is a different view
    assert evaluate.evaluate_setting(model, images, "none", warmup=0, flip=False, progress=False).flip_logits is None


# ---------------------------------------------------------------------------------------------------
# The command line end to end
# ---------------------------------------------------------------------------------------------------

@pytest.mark.realdata
def test_cli_prints_fidelity_with_intervals(capsys):
    assert evaluate.main(["--limit", "3", "--batch-size", "3", "--settings", "none", "tome:13", "--no-progress",
                          "--markdown", "--threads", "2", "--data", str(DATA_DIR)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("vit_tiny_patch16_224 on 3 images (split report)") and "flips" in lines[0]
    header = [c.strip() for c in lines[1].strip("|").split("|")]
    assert header == list(evaluate.COLUMNS)
    for column in ("GFLOPs", "FLOPs -%", "top-1", "Δ top-1", "top-5", "images/s", "speed-up", "agree %",
                   "Δ top-1 95% CI", "agree 95% CI", "KL", "KL 95% CI"):
        assert column in header
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[3:]]
    assert [r["method"] for r in rows] == ["none", "tome"]
    assert rows[0]["agree %"] == "100.0" and rows[0]["KL"] == "0.0000" and rows[0]["Δ top-1 95% CI"] == "[+0.0, +0.0]"
    assert float(rows[1]["KL"]) > 0.0
    low, high = (float(v) for v in rows[1]["agree 95% CI"].strip("[]").split(","))
    assert low <= float(rows[1]["agree %"]) <= high
