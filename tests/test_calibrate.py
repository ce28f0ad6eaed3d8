"""fastprune.calibrate on a small random-init timm ViT and random images: the budget, JSON, the patch,
the gain over a uniform schedule, the FLOPs it predicts, and refused arguments."""
import json
import random

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from fastprune import calibrate, evaluate, patch
from fastprune.evaluation import calibration, settings
from fastprune.evaluation.fidelity import kl_divergence

FLOPS = 0.6
STEP = 0.1  # a coarse greedy step keeps the tests fast


@pytest.fixture(scope="module")
def tiny():
    """16 patches + class token, 4 blocks, 32 channels; a scaled head so that the outputs are peaked."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10).eval()
    with torch.no_grad():
        model.head.weight.mul_(30.0)
    return model


@pytest.fixture(scope="module")
def images():
    return torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def calibrated(tiny, images):
    return {(m, start): calibrate.calibrate(tiny, images, flops=FLOPS, method=m, start=start, batch_size=6,
                                            step=STEP, progress=False)
            for m in ("merge", "tome") for start in calibrate.SEARCHES}


def _kl(model, setting, images):
    """Mean KL(unreduced || patched), computed here, independently of the search."""
    with torch.inference_mode():
        base = model(images)
        patch.timm(model, **setting)
        try:
            out = model(images)
        finally:
            patch.revert(model)
    return float(kl_divergence(base, out).mean())


CASES = [("merge", "ramp"), ("tome", "ramp"), ("merge", "greedy"), ("tome", "greedy")]


@pytest.mark.parametrize("case", CASES)
def test_meets_the_budget_and_the_patch_takes_it(tiny, images, calibrated, case):
    method, setting = case[0], calibrated[case]
    base = evaluate.setting_gflops(tiny, "none", images[0])
    assert evaluate.setting_gflops(tiny, setting, images[0]) <= FLOPS * base
    assert setting.meta["flops_fraction"] <= FLOPS and setting.method == method
    assert isinstance(setting.r, list) and len(setting.r) == len(tiny.blocks) and sum(setting.r) > 0
    patch.timm(tiny, **setting)
    try:
        assert patch.state(tiny).r == tuple(setting.r)
        assert tiny(images[:2]).shape == (2, 10)
        assert patch.reduction_schedule(tiny) == setting.r  # every r is what the patch applies
    finally:
        patch.revert(tiny)
    assert not patch.is_patched(tiny)  # calibrate left the model as it found it


@pytest.mark.parametrize("case", CASES)
def test_json_round_trip_gives_the_identical_setting(calibrated, tmp_path, case):
    setting = calibrated[case]
    path = settings.save_setting(setting, tmp_path / "schedule.json")
    loaded = settings.load_setting(path)
    assert loaded == setting and loaded.text == setting.text and loaded.meta == setting.meta
    assert settings.parse_setting(f"file:{path}") == setting
    assert settings.parse_setting(setting.text) == setting  # the setting word says the same
    assert json.loads(path.read_text())["format"] == settings.SETTING_FORMAT
    args = evaluate.build_parser().parse_args(["--schedule", str(path)])
    assert [settings.load_setting(p) for p in args.schedule] == [setting]


@pytest.mark.parametrize("case", CASES)
def test_search_beats_the_uniform_schedule_at_the_same_flops(tiny, images, calibrated, case):
    method, setting = case[0], calibrated[case]
    base = evaluate.setting_gflops(tiny, "none", images[0])
    # the smallest constant r within the budget, found here by counting
    r = next(r for r in range(1, 17) if evaluate.setting_gflops(
        tiny, settings.Setting(method, r, setting.options), images[0]) <= FLOPS * base)
    uniform = settings.Setting(method, r, setting.options)
    assert _kl(tiny, setting, images) < _kl(tiny, uniform, images)
    assert setting.meta["kl"] == pytest.approx(_kl(tiny, setting, images), rel=1e-6)
    assert setting.meta["uniform"]["kl"] == pytest.approx(_kl(tiny, uniform, images), rel=1e-6)


def test_deterministic(tiny, images, calibrated):
    again = calibrate.calibrate(tiny, images, flops=FLOPS, method="tome", start="greedy", batch_size=6, step=STEP,
                                progress=False)
    first = calibrated[("tome", "greedy")]
    assert again == first and again.meta["kl"] == first.meta["kl"]


@pytest.mark.parametrize("method", ["merge", "tome"])
def test_predicted_flops_equal_the_evaluations_count(tiny, images, method):
    search = calibration.CalibrationSearch(tiny, [images[:2]], flip=False, progress=False)
    rng = random.Random(0)
    for options in calibrate.OPTION_GRIDS[method]["metric"]:
        for _ in range(4):
            r = search.applied(method, [rng.randrange(0, 9) for _ in range(4)], {"metric": options})
            setting = calibration.schedule_setting(method, r, {"metric": options})
            counted = evaluate.setting_gflops(tiny, setting, images[0], by_module=True)[""]
            assert search.flops(setting) == counted
            assert search.flops(setting) == search.flops(calibration.schedule_setting(method, r, {"metric": options}))


def test_throughput_target(tiny, images):
    setting = calibrate.calibrate(tiny, images, images_per_s=1e-3, method="tome", sweeps=0, search_options=False,
                                  step=STEP, progress=False)
    assert setting.meta["images_per_s"] >= 1e-3 and setting.meta["target"] == {"images_per_s": 1e-3}


def test_calibration_images_from_tensors_loaders_and_folders(tmp_path):
    x = torch.randn(10, 3, 8, 8)
    assert [b.shape[0] for b in calibration.calibration_batches(x, batch_size=4)] == [4, 4, 2]
    assert sum(len(b) for b in calibration.calibration_batches(x, limit=5, batch_size=4)) == 5
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(10)), batch_size=3)
    batches = calibration.calibration_batches(loader, limit=7)  # labels are ignored
    assert torch.equal(torch.cat(batches), x[:7])
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)
    folder = calibration.calibration_batches(tmp_path, model, limit=2, progress=False)
    assert len(folder) == 1 and folder[0].shape[0] == 2 and folder[0].dim() == 4


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(flops=1.5), ValueError, "flops"),
    (dict(flops=0.0), ValueError, "flops"),
    (dict(flops=True), ValueError, "flops"),
    (dict(), ValueError, "exactly one"),
    (dict(flops=0.6, images_per_s=10.0), ValueError, "exactly one"),
    (dict(images_per_s=-1.0), ValueError, "images_per_s"),
    (dict(flops=0.6, method="evit"), ValueError, "method"),
    (dict(flops=0.6, method=[]), ValueError, "method"),
    (dict(flops=0.6, start="random"), ValueError, "start"),
    (dict(flops=0.6, step=0.0), ValueError, "step"),
    (dict(flops=0.6, step=0.9), ValueError, "step"),
    (dict(flops=0.6, move=0), ValueError, "move"),
    (dict(flops=0.6, sweeps=-1), ValueError, "sweeps"),
    (dict(flops=0.6, sweeps=1.5), ValueError, "sweeps"),
    (dict(flops=0.6, options={"schedule": "paper"}), ValueError, "options"),
    (dict(flops=0.6, options={"colour": "red"}), ValueError, "options"),
    (dict(flops=0.6, limit=0), ValueError, "limit"),
    (dict(flops=0.6, batch_size=0), ValueError, "batch_size"),
    (dict(flops=0.01, sweeps=0, search_options=False), ValueError, "cannot be reached"),
])
def test_bad_arguments_name_the_argument(tiny, images, kwargs, error, match):
    with pytest.raises(error, match=match):
        calibrate.calibrate(tiny, images[:2], progress=False, **kwargs)


def test_bad_images_and_models(tiny, images):
    with pytest.raises(TypeError, match="images"):
        calibrate.calibrate(tiny, 42, flops=0.6, progress=False)
    with pytest.raises(TypeError, match="images"):
        calibrate.calibrate(tiny, [torch.zeros(3, 32, 32)], flops=0.6, progress=False)
    with pytest.raises(TypeError, match="VisionTransformer"):
        calibrate.calibrate(torch.nn.Linear(2, 2), images, flops=0.6, progress=False)
    patch.timm(tiny, method="tome", r=1)
    try:
        with pytest.raises(ValueError, match="model"):
            calibrate.calibrate(tiny, images, flops=0.6, progress=False)
    finally:
        patch.revert(tiny)


def test_setting_files_refuse_what_is_not_a_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="setting file"):
        settings.parse_setting(f"file:{tmp_path / 'missing.json'}")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        settings.load_setting(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"method": "merge", "r": 3}))
    with pytest.raises(ValueError, match="format"):
        settings.load_setting(tmp_path / "other.json")
    for r in ("3", [1, -2], True):
        with pytest.raises(ValueError, match="r must"):
            settings.Setting.from_dict({"format": settings.SETTING_FORMAT, "method": "tome", "r": r})
    with pytest.raises(ValueError, match="nothing to patch"):
        settings.Setting().patch_kwargs()


def test_cli_writes_a_schedule_evaluate_reads(tmp_path, monkeypatch, capsys):
    """The command line end to end, with a small model created in place of the real one."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2, num_classes=5).eval()
    model.pretrained_cfg = {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic"}
    monkeypatch.setattr(calibrate, "load_model", lambda *a, **k: model)
    from PIL import Image

    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    out = tmp_path / "schedule.json"
    assert calibrate.main(["--images", str(tmp_path), "--flops", "0.7", "--method", "tome", "--sweeps", "0",
                           "--no-progress", "-o", str(out)]) == 0
    setting = settings.load_setting(out)
    assert setting.method == "tome" and setting.meta["flops_fraction"] <= 0.7 and "tome" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        calibrate.main(["--images", str(tmp_path), "--flops", "0.7", "--images-per-s", "3", "-o", str(out)])
    with pytest.raises(SystemExit):
        calibrate.main(["--images", str(tmp_path / "nowhere"), "--flops", "0.7", "-o", str(out)])
