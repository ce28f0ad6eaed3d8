"""fastprune.unmerge (the full grid back from a position map) and fastprune.visualize (pictures of the groups)."""
import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import fastprune
import fastprune.patch as fpatch
from fastprune import visualize


def make_vit(depth=12):
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=5).eval()


def test_unmerge_gives_every_position_its_token_and_gradients_sum():
    x = torch.randn(2, 9, 4)
    attn = torch.rand(2, 9)
    merged = fastprune.merge_tokens(x, attn, 3)
    tokens = merged.x.clone().requires_grad_(True)
    full = fastprune.unmerge(tokens, merged.index)
    assert full.shape == (2, 9, 4)
    for b in range(2):
        for i in range(9):
            assert torch.equal(full[b, i], tokens[b, merged.index[b, i]])
    full.sum().backward()  # a token's gradient counts the positions it fills: its size
    torch.testing.assert_close(tokens.grad[..., 0], merged.size)


@pytest.mark.parametrize("method,r", [("tome", 2), ("merge", 3), ("evit", 0.5)])
def test_unmerge_through_a_patched_model_composes_every_block(method, r):
    model = fpatch.timm(make_vit(), method=method, r=r)
    captured = {}
    model.blocks[-1].register_forward_hook(lambda mod, inp, out: captured.update(out=out))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    st = fpatch.state(model)
    full = fastprune.unmerge(captured["out"], st.index)
    assert full.shape == (2, 17, 32)
    assert torch.equal(full[:, 0], captured["out"][:, 0])  # the class token stays at position 0
    counts = torch.stack([torch.bincount(st.index[b], minlength=captured["out"].shape[1]) for b in range(2)])
    torch.testing.assert_close(counts.float(), st.size)


def test_unmerge_refuses_bad_maps():
    tokens = torch.randn(1, 4, 2)
    with pytest.raises(TypeError, match="int64"):
        fastprune.unmerge(tokens, torch.zeros(1, 6, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        fastprune.unmerge(tokens, torch.tensor([[0, 1, 4]]))
    with pytest.raises(ValueError, match="B=1"):
        fastprune.unmerge(tokens, torch.zeros(2, 3, dtype=torch.int64))


def test_render_groups_fills_merged_groups_with_their_mean_and_outlines_them():
    image = np.zeros((4, 4, 3))
    image[:, :2] = 0.2
    image[:, 2:] = 0.6
    groups = np.array([[0, 1], [0, 2]])  # patch (0,0) and (1,0) are one token; the others alone
    out = visualize.render_groups(image, groups)
    assert np.allclose(out[0, 3], 0.6) and np.allclose(out[3, 3], 0.6)  # untouched singletons
    assert np.allclose(out[:, :1], 0.2)  # the merged group's mean, away from its outline
    assert np.allclose(out[0, 1], visualize.OUTLINE)  # boundary between the group and a singleton
    with pytest.raises(ValueError, match="multiple"):
        visualize.render_groups(np.zeros((5, 4, 3)), groups)


def test_merge_figure_draws_one_panel_per_block_and_the_cli_writes_a_png(tmp_path, monkeypatch):
    from PIL import Image

    model = fpatch.timm(make_vit(), method="tome", r=3)
    image = Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8))
    fig = visualize.merge_figure(model, image, blocks=[1, 12])
    assert len(fig.axes) == 2 and "tokens" in fig.axes[1].get_title()
    with pytest.raises(ValueError, match="blocks"):
        visualize.merge_figure(model, image, blocks=[13])
    with pytest.raises(ValueError, match="patched"):
        visualize.merge_figure(make_vit(), image)
    path = tmp_path / "img.png"
    image.save(path)
    monkeypatch.setattr("fastprune.evaluation.data.load_model", lambda name, weights=None: make_vit())
    out = visualize.main([str(path), "--method", "merge", "--r", "2", "--blocks", "2,12", "-o", str(tmp_path / "m.png")])
    assert out.is_file() and out.stat().st_size > 1000
