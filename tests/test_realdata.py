"""Real-input checks of ``fastprune.evaluate`` on pretrained ViT-Ti and the first images of ../shared/data.

The data is always present in CI: a missing data folder FAILS these tests, it never skips them.
Accuracy on the slice is only compared with the same model unreduced (the data README explains why).
"""

import pytest
import torch

from conftest import DATA_DIR
from fastprune import evaluate, patch

pytestmark = pytest.mark.realdata

#: Images of the slice (the first ones by file name) and the setting checked on them.
N_IMAGES = 32
MODEL = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def model():
    assert DATA_DIR.is_dir(), f"data folder {DATA_DIR} is missing (set FASTPRUNE_DATA or provide ../shared/data)"
    return evaluate.load_model(MODEL, data_dir=DATA_DIR)


@pytest.fixture(scope="module")
def images(model):
    return evaluate.load_images(DATA_DIR, model, limit=N_IMAGES, batch_size=16, progress=False)


@pytest.fixture(scope="module")
def results(model, images):
    """The baseline and the default reduced setting, evaluated side by side on the slice."""
    settings = ["none"] + [s for s in evaluate.DEFAULT_SETTINGS if s != "none"]
    return evaluate.compare(evaluate.evaluate_settings(model, images, settings, warmup=0, progress=False))


def test_data_folder_present():
    for path in (DATA_DIR / evaluate.IMAGES_DIR, DATA_DIR / evaluate.SYNSETS_FILE,
                 DATA_DIR / "weights" / evaluate.DEFAULT_WEIGHTS[MODEL]):
        assert path.exists(), f"{path} is missing: the real-data tests need ../shared/data"


def test_labels_follow_synset_line_numbers(images):
    synsets = (DATA_DIR / evaluate.SYNSETS_FILE).read_text().split()
    assert len(images) == N_IMAGES == len(images.labels)
    assert images.names == sorted(images.names)
    for name, label in zip(images.names, images.labels.tolist()):
        assert synsets[label] == name.split("_", 1)[0]
    # n01440764 (tench) is class 0 of ImageNet-1k and the first file by name.
    assert images.names[0].startswith("n01440764_") and images.labels[0] == 0
    assert [b.shape[0] for b in images.batches] == [16, 16]
    assert images.batches[0].shape[1:] == (3, 224, 224) and images.batches[0].dtype == torch.float32


def test_unreduced_top1_is_plausible(results):
    base = results[0]
    assert base.setting.method == "none"
    assert base.top1 > 50.0, f"unreduced ViT-Ti top-1 on {N_IMAGES} images is {base.top1:.1f}%"
    assert base.top5 >= base.top1


def test_patched_model_agrees_with_unreduced(results):
    base, reduced = results
    assert reduced.setting.reduces
    # Measured on the first 32 images: see the report; the threshold leaves room for a few flips.
    assert reduced.agree >= 75.0, f"{reduced.setting.text}: top-1 agrees on only {reduced.agree:.1f}% of images"
    assert reduced.top1 >= base.top1 - 15.0
    assert reduced.gflops < base.gflops


def test_revert_restores_the_unreduced_predictions(model, images, results):
    again = evaluate.evaluate_setting(model, images, "none", warmup=0, progress=False)
    assert torch.equal(again.predictions, results[0].predictions)
    assert again.gflops == results[0].gflops


def test_count_gflops_matches_the_vit_formula(model):
    """Conv + linear + attention matmuls (2 FLOPs per multiply-add), fused SDPA and explicit path alike."""
    C, N, depth, mlp, classes = model.embed_dim, 197, len(model.blocks), 4 * model.embed_dim, 1000
    per_block = 2 * N * C * (3 * C + C + 2 * mlp) + 2 * 2 * N * N * C
    expected = (2 * 196 * (3 * 16 * 16) * C + depth * per_block + 2 * C * classes) / 1e9
    image = torch.zeros(1, 3, 224, 224)
    assert evaluate.count_gflops(model, image) == pytest.approx(expected, rel=1e-9)
    fused = [blk.attn.fused_attn for blk in model.blocks]
    try:
        for blk in model.blocks:
            blk.attn.fused_attn = False
        assert evaluate.count_gflops(model, image[0]) == pytest.approx(expected, rel=1e-9)
    finally:
        for blk, f in zip(model.blocks, fused):
            blk.attn.fused_attn = f


def test_setting_gflops_counts_the_reduction(model):
    """Patched with r=0 the count is the baseline's; merging 5 tokens in the last block saves their MLP
    and adds the reference's N x N cosine similarity on x (C wide); the class-attention row is tiny."""
    image = torch.zeros(3, 224, 224)
    base = evaluate.setting_gflops(model, "none", image)
    assert evaluate.setting_gflops(model, "merge:0", image) == base
    C, N, r = model.embed_dim, 197, 5
    mlp_saved = 2 * r * C * 4 * C * 2
    similarity = 2 * N * N * C
    last = evaluate.setting_gflops(model, "merge:0*11,5:metric=x", image)
    assert last == pytest.approx(base + (similarity - mlp_saved) / 1e9, abs=1e-3)
    assert not patch.is_patched(model)  # counted on a copy


def test_main_prints_the_table(capsys):
    assert evaluate.main(["--limit", "2", "--batch-size", "2", "--settings", "none", "--no-progress",
                          "--markdown", "--data", str(DATA_DIR)]) == 0
    out = capsys.readouterr().out
    assert "| method | r / keep rate | GFLOPs |" in out
    assert "| none | - | 2.507 |" in out


def test_missing_data_fails_clearly(tmp_path, model, capsys):
    with pytest.raises(FileNotFoundError, match="not found"):
        evaluate.load_images(tmp_path / "nowhere", model)
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--data", str(tmp_path / "nowhere"), "--no-progress"])
    assert exc.value.code == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("text, method, r, options", [
    ("none", "none", None, {}),
    ("merge:13", "merge", 13, {}),
    ("merge:0.9", "merge", 0.9, {}),
    ("merge:0*3,16*9", "merge", [0, 0, 0] + [16] * 9, {}),
    ("merge:0*2,21..12", "merge", [0, 0] + list(range(21, 11, -1)), {}),
    ("tome:1..3,7", "tome", [1, 2, 3, 7], {}),
    ("merge:8,9:metric=x:prop_attn=off:weight=size_attn", "merge", [8, 9],
     {"metric": "x", "prop_attn": False, "weight": "size_attn"}),
])
def test_parse_setting(text, method, r, options):
    setting = evaluate.parse_setting(text)
    assert (setting.method, setting.r, setting.options) == (method, r, options)
    assert type(setting.r) is type(r)


@pytest.mark.parametrize("text", ["merge", "merge:", "merge:abc", "merge:1.5", "merge:13:metric", "none:3",
                                  "merge:-1,4", "merge:2..x"])
def test_parse_setting_rejects_bad_words(text):
    with pytest.raises(ValueError, match="setting"):
        evaluate.parse_setting(text)


def test_r_label_round_trips():
    for r in ([13], [0] * 2 + list(range(21, 11, -1)), [0, 1, 2, 2, 5, 4, 3, 9], [8] * 12, [3, 1]):
        label = evaluate.Setting("merge", r if len(r) > 1 else r[0]).r_label()
        assert evaluate.parse_setting(f"merge:{label}").r == (r if len(r) > 1 else r[0]), label
    assert evaluate.parse_setting("merge:0.75").r_label() == "ρ=0.75"
