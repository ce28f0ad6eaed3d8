"""Pretrained timm models: weights from a safetensors file, a torch checkpoint, or timm's own download.

Weights files (``<data>/weights/<model>.<tag>.safetensors`` by default, :func:`default_weights`):

* ``.safetensors``: a state dict with timm key names;
* ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt``: a torch checkpoint read with ``torch.load(weights_only=True)``,
  either a state dict or a dict holding one under ``state_dict`` or ``model`` (a ``module.`` prefix
  left by ``DistributedDataParallel`` is removed).

``pretrained=True`` lets timm fetch the model's weights instead (needs a network).
"""
from __future__ import annotations

import os
import pathlib
from typing import Dict, Union

import torch

__all__ = ["DEFAULT_WEIGHTS", "DTYPES", "CHECKPOINT_SUFFIXES", "default_data_dir", "default_weights",
           "read_state_dict", "load_model"]

#: Default weights file (in ``<data>/weights``) for the models the project evaluates.
DEFAULT_WEIGHTS = {
    "vit_tiny_patch16_224": "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors",
    "deit_tiny_patch16_224": "deit_tiny_patch16_224.fb_in1k.safetensors",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: File name endings read as torch checkpoints (``torch.load(weights_only=True)``).
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
#: Keys of a training checkpoint that hold the state dict, tried in order.
_STATE_DICT_KEYS = ("state_dict", "model")


def default_data_dir() -> pathlib.Path:
    """``$FASTPRUNE_DATA`` if set, else ``../shared/data`` relative to the repository root."""
    env = os.environ.get("FASTPRUNE_DATA")
    if env:
        return pathlib.Path(env)
    return pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"


def default_weights(model_name: str, data_dir: Union[str, os.PathLike]) -> pathlib.Path:
    """The weights file for ``model_name`` in ``<data_dir>/weights``.

    Known models use :data:`DEFAULT_WEIGHTS`; others use the only ``<model_name>[.<tag>].safetensors``
    file there.

    Raises:
        FileNotFoundError: no (or more than one) matching file.
    """
    folder = pathlib.Path(data_dir) / "weights"
    if model_name in DEFAULT_WEIGHTS:
        path = folder / DEFAULT_WEIGHTS[model_name]
        if not path.is_file():
            raise FileNotFoundError(f"weights for {model_name} not found: {path} (pass --weights or --pretrained)")
        return path
    matches = sorted(folder.glob(f"{model_name}.safetensors")) + sorted(folder.glob(f"{model_name}.*.safetensors"))
    if len(matches) != 1:
        raise FileNotFoundError(f"expected one weights file {model_name}[.<tag>].safetensors in {folder}, "
                                f"found {[m.name for m in matches]} (pass --weights or --pretrained)")
    return matches[0]


def read_state_dict(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """The state dict in a ``.safetensors`` file or a torch checkpoint (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unknown file ending, or a checkpoint without a state dict.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        import safetensors.torch

        return safetensors.torch.load_file(str(path))
    if suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"weights {path}: expected .safetensors or a torch checkpoint "
                         f"({', '.join(CHECKPOINT_SUFFIXES)})")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict):
        state = next((state[k] for k in _STATE_DICT_KEYS if isinstance(state.get(k), dict)), state)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights {path}: not a state dict, nor a dict with one under "
                         f"{' or '.join(map(repr, _STATE_DICT_KEYS))}")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_model(model_name: str = "vit_tiny_patch16_224", weights: Union[str, os.PathLike, None] = None, *,
               data_dir: Union[str, os.PathLike, None] = None, device: Union[str, torch.device] = "cpu",
               dtype: torch.dtype = torch.float32, pretrained: bool = False) -> torch.nn.Module:
    """Create a timm model and load its weights.

    Args:
        model_name: timm model name, e.g. ``"vit_tiny_patch16_224"`` (a ``.tag`` picks the pretrained config).
        weights: a ``.safetensors`` file or a torch checkpoint with timm key names (:func:`read_state_dict`);
            if None and not ``pretrained``, the model's file in ``<data_dir>/weights`` (:func:`default_weights`).
        data_dir: data directory used when ``weights`` is None; :func:`default_data_dir` if None.
        device: where to put the model.
        dtype: parameter dtype (float32, float16 or bfloat16).
        pretrained: let timm fetch the weights (``timm.create_model(pretrained=True)``); not with ``weights``.

    Returns:
        The model in eval mode on ``device`` in ``dtype``. Its timm pretrained config (used for the
        preprocessing) is that of ``model_name``'s tag, or its default tag.

    Raises:
        FileNotFoundError: the weights file does not exist, or timm cannot fetch the weights.
        RuntimeError: the state dict does not match the model (``load_state_dict(strict=True)``).
        TypeError: ``dtype`` is not a floating dtype timm models run in.
        ValueError: both ``weights`` and ``pretrained``, or an unreadable weights file.
    """
    import timm

    if dtype not in DTYPES.values():
        raise TypeError(f"dtype must be one of {list(DTYPES.values())}, got {dtype}")
    if pretrained:
        if weights is not None:
            raise ValueError("pass either weights (--weights) or pretrained (--pretrained), not both")
        try:
            model = timm.create_model(model_name, pretrained=True)
        except Exception as err:  # no network, no hub entry, an offline cache miss: all mean "no weights here"
            raise FileNotFoundError(
                f"timm could not fetch the pretrained weights of {model_name} ({type(err).__name__}: {err}); "
                f"without a network pass a weights file with --weights (safetensors or a torch checkpoint)") from err
        return model.eval().to(device=device, dtype=dtype)
    if weights is None:
        weights = default_weights(model_name, default_data_dir() if data_dir is None else data_dir)
    state = read_state_dict(weights)
    model = timm.create_model(model_name, pretrained=False)
    model.load_state_dict(state, strict=True)
    return model.eval().to(device=device, dtype=dtype)
