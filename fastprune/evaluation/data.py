"""Evaluation data: pretrained timm models from safetensors, labelled ImageNet images, device labels.

Data layout (default ``$FASTPRUNE_DATA`` or ``../shared/data`` next to the repository):
``imagenet-sample/`` (images named ``<synset>_<anything>.JPEG``), ``imagenet_synsets.txt`` (the
class index is the synset's line number, from 0: timm's ImageNet-1k order),
``weights/<model>.<tag>.safetensors``.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

#: Default weights file (in ``<data>/weights``) for the models the project evaluates.
DEFAULT_WEIGHTS = {
    "vit_tiny_patch16_224": "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors",
    "deit_tiny_patch16_224": "deit_tiny_patch16_224.fb_in1k.safetensors",
}
#: Sub-folder of the data directory holding the labelled images.
IMAGES_DIR = "imagenet-sample"
#: File of the 1000 ImageNet-1k synsets; line number (from 0) = class index.
SYNSETS_FILE = "imagenet_synsets.txt"
#: File name endings accepted as images (case-insensitive).
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: The halves of the image folder (see :func:`split_files`), and "all" for every image.
SPLITS = ("tune", "report", "all")
#: The half the command lines evaluate unless told otherwise.
DEFAULT_SPLIT = "report"


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
            raise FileNotFoundError(f"weights for {model_name} not found: {path} (pass --weights)")
        return path
    matches = sorted(folder.glob(f"{model_name}.safetensors")) + sorted(folder.glob(f"{model_name}.*.safetensors"))
    if len(matches) != 1:
        raise FileNotFoundError(f"expected one weights file {model_name}[.<tag>].safetensors in {folder}, "
                                f"found {[m.name for m in matches]} (pass --weights)")
    return matches[0]


def load_model(model_name: str = "vit_tiny_patch16_224", weights: Union[str, os.PathLike, None] = None, *,
               data_dir: Union[str, os.PathLike, None] = None, device: Union[str, torch.device] = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Create a timm model without downloading anything and load its weights from a safetensors file.

    Args:
        model_name: timm model name, e.g. ``"vit_tiny_patch16_224"`` or ``"deit_tiny_patch16_224"``.
        weights: path of a ``.safetensors`` state dict with timm key names; if None, the model's file
            in ``<data_dir>/weights`` (see :func:`default_weights`).
        data_dir: data directory used when ``weights`` is None; :func:`default_data_dir` if None.
        device: where to put the model.
        dtype: parameter dtype (float32, float16 or bfloat16).

    Returns:
        The model in eval mode on ``device`` in ``dtype``. Its timm pretrained config (used by
        :func:`load_images` for preprocessing) is the default tag of ``model_name``.

    Raises:
        FileNotFoundError: the weights file does not exist.
        RuntimeError: the state dict does not match the model (``load_state_dict(strict=True)``).
        TypeError: ``dtype`` is not a floating dtype timm models run in.
    """
    import safetensors.torch
    import timm

    if dtype not in DTYPES.values():
        raise TypeError(f"dtype must be one of {list(DTYPES.values())}, got {dtype}")
    if weights is None:
        weights = default_weights(model_name, default_data_dir() if data_dir is None else data_dir)
    weights = pathlib.Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    model = timm.create_model(model_name, pretrained=False)
    model.load_state_dict(safetensors.torch.load_file(str(weights)), strict=True)
    return model.eval().to(device=device, dtype=dtype)


def read_synsets(path: Union[str, os.PathLike]) -> Dict[str, int]:
    """``{synset: class index}`` from a file of one synset per line (index = line number from 0)."""
    lines = pathlib.Path(path).read_text().split()
    return {synset: i for i, synset in enumerate(lines)}


def split_files(files: Sequence[pathlib.Path], split: str = "all") -> List[pathlib.Path]:
    """One half of ``files`` by position in the list sorted by file name: "tune" the even positions
    (0, 2, 4, ...), "report" the odd ones (1, 3, 5, ...), "all" every file.

    Choices (defaults, schedules, thresholds) are made on "tune"; results are reported on "report".
    The rule depends only on the file names, so the halves are fixed, disjoint and together cover
    the folder; with one image per class in synset order they alternate classes.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    files = sorted(files, key=lambda f: pathlib.Path(f).name)
    if split == "all":
        return files
    return files[0::2] if split == "tune" else files[1::2]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--weights`` and ``--data`` of the command lines (see :func:`load_model`)."""
    parser.add_argument("--model", default="vit_tiny_patch16_224",
                        help="timm model name (vit_tiny_patch16_224, deit_tiny_patch16_224, ...)")
    parser.add_argument("--weights", type=pathlib.Path, default=None,
                        help="safetensors state dict (default: the model's file in <data>/weights)")
    parser.add_argument("--data", type=pathlib.Path, default=None,
                        help="data directory (default: $FASTPRUNE_DATA or ../shared/data next to the repository)")


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """``--split`` and ``--no-flip`` of the command lines (``fastprune.evaluate``, ``fastprune.compare``)."""
    parser.add_argument("--split", choices=SPLITS, default=DEFAULT_SPLIT,
                        help="which images: 'report' (odd positions of the folder sorted by file name), 'tune' "
                             "(even positions: tune on these) or 'all'; --limit applies within it "
                             "(default: %(default)s)")
    parser.add_argument("--no-flip", action="store_true",
                        help="skip the horizontally flipped pass (agreement and KL on the images alone)")


def image_files(folder: Union[str, os.PathLike], limit: Optional[int] = None,
                split: str = "all") -> List[pathlib.Path]:
    """The image files in ``folder`` sorted by file name: the ``split`` half (:func:`split_files`),
    then the first ``limit`` of those if given."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = split_files([f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES], split)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder} (split {split!r})")
    return files[:limit] if limit is not None else files


class UnlabelledImages(torch.utils.data.Dataset):
    """Preprocessed image tensors from a list of files (no labels: calibration images)."""

    def __init__(self, files: Sequence[pathlib.Path], transform):
        self.files = list(files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB"))


class LabelledImages(UnlabelledImages):
    """``(image tensor, class index)`` pairs from files named ``<synset>_<name>.<ext>``."""

    def __init__(self, files: Sequence[pathlib.Path], synsets: Dict[str, int], transform):
        super().__init__(files, transform)
        self.labels = []
        for f in self.files:
            synset = f.name.split("_", 1)[0]
            if synset not in synsets:
                raise ValueError(f"image {f.name}: synset {synset!r} is not in the synsets file")
            self.labels.append(synsets[synset])

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        return super().__getitem__(i), self.labels[i]


def load_unlabelled_images(folder: Union[str, os.PathLike], model: torch.nn.Module, *, limit: Optional[int] = None,
                           split: str = "all", batch_size: int = 32, progress: bool = True) -> List[torch.Tensor]:
    """The images of ``folder`` (:func:`image_files`: the ``split`` half, then ``limit``), preprocessed
    with timm's transform for ``model``, as float32 CPU batches ``[b, 3, H, W]``; no labels are read.

    Raises:
        FileNotFoundError: no such folder, or no images in it.
        ValueError: ``limit`` or ``batch_size`` not positive, unknown ``split``.
    """
    import timm.data
    from tqdm import tqdm

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dataset = UnlabelledImages(image_files(folder, limit, split),
                               timm.data.create_transform(**timm.data.resolve_data_config(model=model)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return list(tqdm(loader, desc="decoding images", unit="batch", disable=not progress, file=sys.stderr))


@dataclass
class Images:
    """Preprocessed images kept in memory: ``batches`` float32 ``[b, 3, H, W]`` (b <= batch size),
    ``labels`` int64 ``[n]`` and the file ``names``, in file-name order."""

    batches: List[torch.Tensor]
    labels: torch.Tensor
    names: List[str]

    def __len__(self) -> int:
        return len(self.names)


def load_images(data_dir: Union[str, os.PathLike, None] = None, model: Optional[torch.nn.Module] = None, *,
                limit: Optional[int] = None, split: str = "all", batch_size: int = 32, workers: int = 0,
                progress: bool = True) -> Images:
    """Decode and preprocess the labelled images once, with timm's transform for ``model``.

    Args:
        data_dir: the data directory (with ``imagenet-sample/`` and ``imagenet_synsets.txt``), or a
            folder of images whose parent holds ``imagenet_synsets.txt``;
            :func:`default_data_dir` if None.
        model: the timm model whose pretrained config gives the preprocessing
            (``timm.data.resolve_data_config(model=model)`` + ``timm.data.create_transform``:
            resize, centre crop, normalisation).
        limit: use only the first ``limit`` images (sorted by file name) of the ``split``.
        split: "tune", "report" or "all" (:func:`split_files`); applied before ``limit``.
        batch_size: images per batch (the last batch may be smaller).
        workers: DataLoader worker processes for decoding (0 = in this process).
        progress: show a tqdm progress bar.

    Returns:
        :class:`Images` with the float32 batches on the CPU.

    Raises:
        FileNotFoundError: the image folder or the synsets file does not exist, or has no images.
        ValueError: a file's synset is unknown, ``limit`` or ``batch_size`` not positive, unknown ``split``.
    """
    import timm.data
    from tqdm import tqdm

    if model is None:
        raise TypeError("model must be a timm model (its pretrained config gives the preprocessing)")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    root = default_data_dir() if data_dir is None else pathlib.Path(data_dir)
    folder = root / IMAGES_DIR if (root / IMAGES_DIR).is_dir() else root
    synsets_file = next((d / SYNSETS_FILE for d in (root, folder.parent) if (d / SYNSETS_FILE).is_file()), None)
    if not folder.is_dir():
        raise FileNotFoundError(f"data directory not found: {root} (set --data or $FASTPRUNE_DATA)")
    if synsets_file is None:
        raise FileNotFoundError(f"{SYNSETS_FILE} not found in {root} or {folder.parent}")

    config = timm.data.resolve_data_config(model=model)
    dataset = LabelledImages(image_files(folder, limit, split), read_synsets(synsets_file),
                             timm.data.create_transform(**config))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    batches, labels = [], []
    for images, target in tqdm(loader, desc="decoding images", unit="batch", disable=not progress,
                               file=sys.stderr):
        batches.append(images)
        labels.append(target)
    return Images(batches, torch.cat(labels), [f.name for f in dataset.files])



def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``, else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return name or platform.processor() or platform.machine()


def device_label(device: Union[str, torch.device], *, cpu_model: bool = True) -> str:
    """Where a run happens: the GPU's name, or the CPU (its model if ``cpu_model``, else ``"CPU"``)
    and torch's thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = cpu_name() if cpu_model else ""
    return f"{name or 'CPU'}, {torch.get_num_threads()} threads"
