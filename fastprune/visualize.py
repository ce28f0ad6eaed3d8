"""Pictures of the reduction: which patches each token stands for, block by block.

    python -m fastprune.visualize IMAGE --model vit_tiny_patch16_224 --method tome --r 13 -o merged.png

draws the (preprocessed) image once per chosen block: every group of patches merged into one token
is filled with the group's mean colour and outlined; patches still on their own are left as they
are. The groups come from :attr:`fastprune.patch.PatchState.index_at`, the composed per-block maps
(``[B, N0]``, never an ``N x N`` matrix). :func:`merge_figure` returns the figure for a patched model.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import sys
from typing import Optional, Sequence, Union

import numpy as np
import torch

from . import patch
from .evaluation.settings import parse_setting

__all__ = ["merge_figure", "group_grid", "render_groups", "main"]

#: Outline colour (RGB in [0, 1]).
OUTLINE = (1.0, 1.0, 1.0)


def group_grid(index: torch.Tensor, num_prefix_tokens: int, grid: tuple[int, int]) -> np.ndarray:
    """``[H_p, W_p]`` int array: the token each patch belongs to, from one image's ``index`` ``[N0]``.

    Raises:
        ValueError: ``index`` is not 1-D with ``num_prefix_tokens + H_p * W_p`` entries.
    """
    h, w = grid
    if index.dim() != 1 or index.numel() != num_prefix_tokens + h * w:
        raise ValueError(f"index must be [{num_prefix_tokens + h * w}] (prefix tokens + {h}x{w} patches), "
                         f"got {tuple(index.shape)}")
    return index[num_prefix_tokens:].reshape(h, w).cpu().numpy()


def render_groups(image: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """``image`` ``[H, W, 3]`` in [0, 1] with each group of >= 2 patches in its mean colour, outlined.

    ``groups`` ``[H_p, W_p]`` (:func:`group_grid`); ``H`` and ``W`` must be multiples of ``H_p`` and ``W_p``.

    Raises:
        ValueError: the image is not ``[H, W, 3]`` or its size is not a multiple of the grid.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3], got {image.shape}")
    H, W, _ = image.shape
    hp, wp = groups.shape
    if H % hp or W % wp:
        raise ValueError(f"image {H}x{W} is not a multiple of the {hp}x{wp} patch grid")
    pixel_groups = np.kron(groups, np.ones((H // hp, W // wp), dtype=groups.dtype))  # [H, W]
    ids, inverse, counts = np.unique(pixel_groups, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(H, W)
    sums = np.zeros((len(ids), 3))
    np.add.at(sums, inverse, image)
    means = sums / counts[:, None]
    merged = (counts // ((H // hp) * (W // wp)) >= 2)[inverse]  # pixels of tokens standing for >= 2 patches
    out = np.where(merged[..., None], means[inverse], image)
    edge = np.zeros((H, W), dtype=bool)  # a boundary pixel: its right or lower neighbour is in another group
    edge[:, :-1] |= (pixel_groups[:, :-1] != pixel_groups[:, 1:]) & (merged[:, :-1] | merged[:, 1:])
    edge[:-1, :] |= (pixel_groups[:-1, :] != pixel_groups[1:, :]) & (merged[:-1, :] | merged[1:, :])
    out[edge] = OUTLINE
    return out


def _display_image(tensor: torch.Tensor, model: torch.nn.Module) -> np.ndarray:
    """Undo the model's normalisation: ``[3, H, W]`` -> ``[H, W, 3]`` in [0, 1]."""
    import timm.data

    cfg = timm.data.resolve_data_config(model=model)
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    return (tensor.float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def merge_figure(model: torch.nn.Module, image, *, blocks: Optional[Sequence[int]] = None, title: str = ""):
    """Run a patched timm model on one image and draw its token groups; returns a matplotlib Figure.

    Args:
        model: a model patched by :func:`fastprune.patch.timm` (any method).
        image: a path, a PIL image, or a preprocessed ``[3, H, W]`` tensor (the model's transform).
        blocks: the blocks whose *output* groups are drawn, 1-based (``depth``: after the last
            block); default: 4 evenly spaced blocks ending with the last.
        title: the figure's title.

    Raises:
        ValueError: the model is not patched; a block outside ``1..depth``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import timm.data

    if not patch.is_patched(model):
        raise ValueError("model must be patched with fastprune.patch.timm(...) first")
    st = patch.state(model)
    depth = st.depth
    blocks = list(blocks) if blocks is not None else sorted({math.ceil(depth * k / 4) for k in (1, 2, 3, 4)})
    bad = [b for b in blocks if not 1 <= int(b) <= depth]
    if bad or not blocks:
        raise ValueError(f"blocks must be in 1..{depth}, got {blocks}")
    if not isinstance(image, torch.Tensor):
        from PIL import Image

        pil = Image.open(image) if isinstance(image, (str, pathlib.Path)) else image
        cfg = timm.data.resolve_data_config(model=model)
        cfg["input_size"] = (3, *model.patch_embed.img_size)  # the size the patch embedding takes
        image = timm.data.create_transform(**cfg)(pil.convert("RGB"))
    param = next(model.parameters())
    with torch.no_grad():
        model(image[None].to(device=param.device, dtype=param.dtype))
    grid = tuple(model.patch_embed.grid_size)
    picture = _display_image(image, model)
    fig, axes = plt.subplots(1, len(blocks), figsize=(3 * len(blocks), 3.3), squeeze=False)
    for ax, b in zip(axes[0], blocks):
        groups = group_grid(st.index_at(int(b))[0], st.num_prefix_tokens, grid)
        ax.imshow(render_groups(picture, groups))
        tokens = int(st.index_at(int(b))[0].max()) + 1
        ax.set_title(f"after block {b}: {tokens} tokens", fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastprune.visualize", description=__doc__.split("\n")[0])
    p.add_argument("image", type=pathlib.Path)
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm model name")
    p.add_argument("--weights", type=pathlib.Path, default=None,
                   help="safetensors state dict (default: the model's file in ../shared/data/weights)")
    p.add_argument("--method", default="tome", help="a fastprune.patch method")
    p.add_argument("--r", default="13", help="the schedule, as in the evaluation's settings: 13, 0.7, 0*2,21..12")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a method option (repeatable)")
    p.add_argument("--blocks", default=None, help="comma-separated 1-based blocks (default: 4 evenly spaced)")
    p.add_argument("-o", "--output", type=pathlib.Path, default=pathlib.Path("merged.png"))
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> pathlib.Path:
    from .evaluation.data import load_model

    args = parse_args(argv)
    if not args.image.is_file():
        sys.exit(f"image not found: {args.image}")
    setting = parse_setting(":".join([args.method, args.r] + list(args.option)))
    model = load_model(args.model, args.weights)
    patch.timm(model, method=setting.method, r=setting.r, **setting.options)
    blocks = [int(b) for b in args.blocks.split(",")] if args.blocks else None
    fig = merge_figure(model, args.image, blocks=blocks, title=f"{args.model}, {setting.text}: {args.image.name}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")
    return args.output


if __name__ == "__main__":
    main()
