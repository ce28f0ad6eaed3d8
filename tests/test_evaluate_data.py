"""fastprune.evaluate on real-dataset layouts: ImageFolder trees and flat folders, their class indices,
weights from torch checkpoints, the --pretrained error, CSV/JSON and PNG output, and data-parallel
runs under torchrun (two CPU processes on gloo) giving the single-process table.

Everything runs on the CPU with timm's small random ``test_vit`` and generated images."""
import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch
from PIL import Image

from fastprune import evaluate
from fastprune.evaluation import distributed, models, report

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = "test_vit"
SYNSETS = [f"n{i:08d}" for i in range(1000)]
CLASSES = (3, 7, 9)  # synset lines of the generated classes
PER_CLASS = 3  # 9 images: an odd count, so two processes get 5 and 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """``root/`` with the synsets file, safetensors weights, a synset ImageFolder tree ``tree/``,
    the same images flat in ``flat/`` and a tree named by class words in ``words/``."""
    root = tmp_path_factory.mktemp("data")
    (root / evaluate.SYNSETS_FILE).write_text("\n".join(SYNSETS) + "\n")
    gen = torch.Generator().manual_seed(1)
    for k, (c, word) in enumerate(zip(CLASSES, ("zebra", "cat", "dog"))):
        for j in range(PER_CLASS):  # a tint per class under noise, so that the classes can be told apart
            tint = torch.zeros(3, 1, 1)
            tint[k] = 0.04
            pixels = ((0.9 * torch.rand(3, 48 + 8 * j, 64, generator=gen) + tint) * 255).byte()
            for path in (root / "tree" / SYNSETS[c] / f"img{j}.JPEG", root / "words" / word / f"img{j}.JPEG",
                         root / "flat" / f"{SYNSETS[c]}_img{j}.JPEG"):
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path)
    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False).eval()
    images = evaluate.load_images(root / "tree", model, progress=False)
    with torch.no_grad():  # the head: nearest class mean of the features, the other classes far below
        feats = model.forward_head(model.forward_features(torch.cat(images.batches)), pre_logits=True)
        feats = feats - feats.mean(0)
        model.head.weight.zero_()
        model.head.bias.fill_(-30.0)
        for c in CLASSES:
            mean = feats[images.labels == c][0]  # one image per class: the others may be wrong
            model.head.weight[c] = 2.0 * mean / mean.norm() ** 2
            model.head.bias[c] = 0.0
    safetensors.torch.save_file(model.state_dict(), str(root / "w.safetensors"))
    return root


def _model(data):
    return evaluate.load_model(MODEL, data / "w.safetensors")


# ---------------------------------------------------------------------------------------------------
# Layouts, the split and the class indices
# ---------------------------------------------------------------------------------------------------

def test_layouts_are_detected_and_split_by_sorted_path(data, tmp_path):
    assert evaluate.detect_layout(data / "tree") == "imagefolder"
    assert evaluate.detect_layout(data / "flat") == "flat"
    every = evaluate.image_files(data / "tree")
    paths = [f.relative_to(data / "tree").as_posix() for f in every]
    assert paths == sorted(paths) and len(paths) == len(CLASSES) * PER_CLASS
    tune, report_half = (evaluate.image_files(data / "tree", split=s) for s in ("tune", "report"))
    assert tune == every[0::2] and report_half == every[1::2]  # even / odd positions, as for the flat folder
    assert evaluate.image_files(data / "tree", limit=2, split="report") == every[1:4:2]
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.JPEG")
    Image.new("RGB", (8, 8)).save(tmp_path / "n00000001_y.JPEG")
    with pytest.raises(ValueError, match="--layout"):
        evaluate.detect_layout(tmp_path)
    assert [f.name for f in evaluate.image_files(tmp_path, layout="flat")] == ["n00000001_y.JPEG"]


@pytest.mark.parametrize("folder, expected", [
    ("tree", [c for c in CLASSES for _ in range(PER_CLASS)]),  # synset folders: the synset's line
    ("flat", [c for c in CLASSES for _ in range(PER_CLASS)]),  # <synset>_<name>: the synset's line
    ("words", [i for i in (0, 1, 2) for _ in range(PER_CLASS)]),  # cat, dog, zebra: sorted folder order
])
def test_class_indices(data, folder, expected):
    images = evaluate.load_images(data / folder, _model(data), batch_size=4, progress=False)
    assert images.labels.tolist() == expected
    assert images.batches[0].shape[1:] == (3, 160, 160) and [len(b) for b in images.batches] == [4, 4, 1]
    if folder == "tree":
        assert images.names[0] == f"{SYNSETS[CLASSES[0]]}/img0.JPEG"


def test_synset_folders_need_the_synsets_file(data, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTPRUNE_DATA", str(tmp_path))  # no synsets file in the default place either
    lone = tmp_path / "lone"
    (lone / SYNSETS[3]).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(lone / SYNSETS[3] / "x.JPEG")
    with pytest.raises(ValueError, match="--synsets"):
        evaluate.load_images(lone, _model(data), progress=False)
    images = evaluate.load_images(lone, _model(data), synsets=data / evaluate.SYNSETS_FILE, progress=False)
    assert images.labels.tolist() == [3]


# ---------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module."])
def test_torch_checkpoints_load(data, tmp_path, wrap):
    state = safetensors.torch.load_file(str(data / "w.safetensors"))
    saved = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3},
             "model": {"model": state, "optimizer": {}},
             "module.": {f"module.{k}": v for k, v in state.items()}}[wrap]
    path = tmp_path / "w.pth"
    torch.save(saved, path)
    model = evaluate.load_model(MODEL, path)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_unreadable_weights_fail_clearly(data, tmp_path):
    torch.save({"epoch": 3}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="state dict"):
        models.read_state_dict(tmp_path / "bad.pt")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors"):
        models.read_state_dict(tmp_path / "w.npz")
    with pytest.raises(ValueError, match="not both"):
        evaluate.load_model(MODEL, data / "w.safetensors", pretrained=True)


def test_pretrained_without_network_names_the_model(data, monkeypatch, capsys):
    create = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return create(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(FileNotFoundError, match=rf"{MODEL}.*--weights"):
        evaluate.load_model(MODEL, pretrained=True)
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--model", MODEL, "--pretrained", "--data", str(data / "tree"), "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert MODEL in err and "--weights" in err


# ---------------------------------------------------------------------------------------------------
# The table as CSV / JSON, the frontier as PNG, and the same table under torchrun
# ---------------------------------------------------------------------------------------------------

def _argv(data, *extra):
    return ["--model", MODEL, "--weights", str(data / "w.safetensors"), "--data", str(data / "tree"), "--split",
            "all", "--settings", "none", "tome:14", "--batch-size", "2", "--warmup", "0", "--threads", "1",
            "--no-progress", *extra]


#: The columns that must not depend on how many processes ran (not the timing ones).
_EXACT = ("method", "r / keep rate", "setting", "GFLOPs", "FLOPs -%", "top-1", "Δ top-1", "top-5", "agree %",
          "Δ top-1 95% CI low", "Δ top-1 95% CI high", "agree 95% CI low", "agree 95% CI high")
_CLOSE = ("KL", "KL 95% CI low", "KL 95% CI high")


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    assert evaluate.main(_argv(data, "--output", str(out / "t.json"))) == 0
    assert evaluate.main(_argv(data, "--output", str(out / "t.csv"), "--plot", str(out / "f.png"))) == 0
    return out


def test_csv_and_json_hold_the_table(single):
    doc = json.loads((single / "t.json").read_text())
    assert doc["model"] == MODEL and doc["images"] == len(CLASSES) * PER_CLASS and doc["processes"] == 1
    rows = doc["rows"]
    assert [r["setting"] for r in rows] == ["none", "tome:14"]
    for column in evaluate.COLUMNS:
        assert column in rows[0]
    low, high = rows[1]["agree 95% CI low"], rows[1]["agree 95% CI high"]
    assert low <= rows[1]["agree %"] <= high and rows[1]["agree 95% CI"] == f"[{low:.1f}, {high:.1f}]"
    assert rows[0]["KL"] == 0.0 and rows[1]["KL"] > 0.0 and rows[1]["GFLOPs"] < rows[0]["GFLOPs"]
    assert 0.0 < rows[0]["top-1"] < 100.0 and rows[1]["agree %"] < 100.0  # a table worth comparing
    with (single / "t.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(rows[0])
    for column in _EXACT[3:]:  # timings differ between the two runs, the rest does not
        assert [float(r[column]) for r in table] == pytest.approx([r[column] for r in rows], abs=1e-9)


def test_plot_is_a_png(single):
    png = (single / "f.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert report.pareto_front([1.0, 2.0, 3.0], [50.0, 60.0, 55.0]) == [0, 1]
    assert report.pareto_front([100.0, 200.0], [60.0, 50.0], lower_is_better=False) == [1, 0]


def test_bad_output_suffix_is_refused(data):
    with pytest.raises(SystemExit):
        evaluate.main(_argv(data, "--output", "table.txt"))


def test_shards_cover_every_image_once():
    for n, size in ((9, 2), (10, 3), (4, 4)):
        shares = [distributed.shard_indices(n, distributed.World(rank, size)) for rank in range(size)]
        assert sorted(i for s in shares for i in s) == list(range(n))
    with pytest.raises(ValueError, match="processes"):
        distributed.shard_indices(1, distributed.World(0, 2))


def test_torchrun_two_processes_give_the_single_process_table(data, single, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastprune.evaluate", *_argv(data, "--output", str(tmp_path / "t.json"))]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test_vit on 9 images") == 1  # rank 0 alone prints
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["processes"] == 2 and doc["images"] == len(CLASSES) * PER_CLASS
    ref = json.loads((single / "t.json").read_text())["rows"]
    for got, want in zip(doc["rows"], ref):
        assert {c: got[c] for c in _EXACT} == pytest.approx({c: want[c] for c in _EXACT}, abs=1e-6)
        assert {c: got[c] for c in _CLOSE} == pytest.approx({c: want[c] for c in _CLOSE}, rel=1e-3, abs=1e-6)
