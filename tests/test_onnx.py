"""ONNX export (``torch.onnx.export(..., dynamo=True)``) of patched timm models, run with onnxruntime on CPU.

Under ONNX export ``backend="auto"`` runs the PyTorch reference (ONNX knows its ops, not fastprune's
kernels), and the reference replaces the two ops ONNX lacks: the stable sort (by ranks) and ``cdist``.
"""
import warnings

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import fastprune.patch as fpatch
from fastprune import reference

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

METHODS = [("tome", 3), ("merge", 3), ("evit", 0.7), ("bat", 0.7), ("idle", 0.7)]


def make_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=12, num_heads=2, num_classes=5).eval()


@pytest.mark.parametrize("method,r", METHODS)
def test_patched_model_exports_and_onnxruntime_matches_eager(method, r, tmp_path):
    model = fpatch.timm(make_vit(), method=method, r=r)
    x, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want, want2 = model(x), model(x2)
    assert fpatch.state(model).num_tokens[-1] < 17 or method == "idle"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    path = tmp_path / f"{method}.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for inp, ref in ((x, want), (x2, want2)):  # the exported graph stands alone: other images too
        got = torch.from_numpy(session.run(None, {name: inp.numpy()})[0])
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_rank_order_is_the_stable_sort(descending, dtype):
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 5, (4, 23), generator=g).to(dtype)  # many ties
    if dtype.is_floating_point:
        values[0, 3] = values[0, 7] = values[2, 0] = float("nan")
        values[1, 5], values[1, 9] = float("inf"), float("-inf")
    want = torch.sort(values, dim=1, descending=descending, stable=True).indices
    assert torch.equal(reference._rank_order(values, descending), want)


def test_true_positions_without_a_sort():
    mask = torch.tensor([[True, False, True, True, False], [False, False, True, True, True]])
    assert reference.true_positions(mask, 3).tolist() == [[0, 2, 3], [2, 3, 4]]
