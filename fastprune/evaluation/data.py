"""Evaluation data: labelled ImageNet images in one of two layouts, device labels.

Data layout (default ``$FASTPRUNE_DATA`` or ``../shared/data`` next to the repository):
``imagenet-sample/``, ``imagenet_synsets.txt`` (the class index is the synset's line number, from 0:
timm's ImageNet-1k order), ``weights/<model>.<tag>.safetensors`` (:mod:`.models`).

An image folder is read in one of two layouts (:data:`LAYOUTS`, found by :func:`detect_layout`):

* ``flat``: images named ``<synset>_<anything>.JPEG`` in the folder itself; the class index is the
  synset's line in the synsets file;
* ``imagefolder``: ``<folder>/<class>/<image>`` (the ImageNet-val layout); when every class folder
  is named by a synset (``n01440764``) the class index is its line in the synsets file, else the
  position of the folder in the sorted list of class folders.

Either way the files are sorted by their path below the folder before the tune/report split.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import re
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .models import DEFAULT_WEIGHTS, DTYPES, default_data_dir, default_weights, load_model

__all__ = ["DEFAULT_WEIGHTS", "DTYPES", "IMAGES_DIR", "SYNSETS_FILE", "IMAGE_SUFFIXES", "SPLITS", "DEFAULT_SPLIT",
           "LAYOUTS", "default_data_dir", "default_weights", "load_model", "read_synsets", "split_files",
           "detect_layout", "class_folders", "image_folder", "image_files", "image_labels", "find_synsets", "Images",
           "LabelledImages", "UnlabelledImages", "load_images", "load_unlabelled_images", "add_model_arguments",
           "add_split_arguments", "add_data_arguments", "cpu_name", "device_label"]

#: Sub-folder of the data directory holding the labelled images.
IMAGES_DIR = "imagenet-sample"
#: File of the 1000 ImageNet-1k synsets; line number (from 0) = class index.
SYNSETS_FILE = "imagenet_synsets.txt"
#: File name endings accepted as images (case-insensitive).
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
#: The halves of the image folder (see :func:`split_files`), and "all" for every image.
SPLITS = ("tune", "report", "all")
#: The half the command lines evaluate unless told otherwise.
DEFAULT_SPLIT = "report"
#: Layouts of an image folder ("auto": :func:`detect_layout`).
LAYOUTS = ("auto", "flat", "imagefolder")
_SYNSET = re.compile(r"n\d{8}")


def read_synsets(path: Union[str, os.PathLike]) -> Dict[str, int]:
    """``{synset: class index}`` from a file of one synset per line (index = line number from 0)."""
    lines = pathlib.Path(path).read_text().split()
    return {synset: i for i, synset in enumerate(lines)}


def split_files(files: Sequence[pathlib.Path], split: str = "all",
                root: Union[str, os.PathLike, None] = None) -> List[pathlib.Path]:
    """One half of ``files`` by position in the sorted list: "tune" the even positions (0, 2, 4, ...),
    "report" the odd ones (1, 3, 5, ...), "all" every file.

    The list is sorted by file name, or by the path below ``root`` if given (``class/name`` in an
    ImageFolder tree). Choices (defaults, schedules, thresholds) are made on "tune"; results are
    reported on "report". The rule depends only on the names, so the halves are fixed, disjoint and
    together cover the folder; with one image per class in synset order they alternate classes.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    key = ((lambda f: pathlib.Path(f).name) if root is None
           else (lambda f: pathlib.Path(f).relative_to(root).as_posix()))
    files = sorted(files, key=key)
    if split == "all":
        return files
    return files[0::2] if split == "tune" else files[1::2]


def add_model_arguments(parser: argparse.ArgumentParser, pretrained: bool = False) -> None:
    """``--model``, ``--weights`` and ``--data`` of the command lines (see :func:`load_model`), and
    ``--pretrained`` if ``pretrained``."""
    parser.add_argument("--model", default="vit_tiny_patch16_224",
                        help="timm model name (vit_tiny_patch16_224, deit_tiny_patch16_224, ...)")
    parser.add_argument("--weights", type=pathlib.Path, default=None,
                        help="safetensors state dict or torch checkpoint (.pth/.pt/.bin: a state dict, or a dict "
                             "with 'state_dict' or 'model'); default: the model's file in <data>/weights")
    if pretrained:
        parser.add_argument("--pretrained", action="store_true",
                            help="let timm download the model's pretrained weights (needs a network) instead "
                                 "of --weights")
    parser.add_argument("--data", type=pathlib.Path, default=None,
                        help="data directory or image folder (default: $FASTPRUNE_DATA or ../shared/data next to "
                             "the repository)")


def add_split_arguments(parser: argparse.ArgumentParser) -> None:
    """``--split`` and ``--no-flip`` of the command lines (``fastprune.evaluate``, ``fastprune.compare``)."""
    parser.add_argument("--split", choices=SPLITS, default=DEFAULT_SPLIT,
                        help="which images: 'report' (odd positions of the folder sorted by file name), 'tune' "
                             "(even positions: tune on these) or 'all'; --limit applies within it "
                             "(default: %(default)s)")
    parser.add_argument("--no-flip", action="store_true",
                        help="skip the horizontally flipped pass (agreement and KL on the images alone)")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--layout`` and ``--synsets`` of the command lines (see :func:`load_images`)."""
    parser.add_argument("--layout", choices=LAYOUTS, default="auto",
                        help="image folder layout: 'flat' (<synset>_<name>.JPEG), 'imagefolder' "
                             "(<class>/<image>, the ImageNet-val layout) or 'auto' (found from the folder)")
    parser.add_argument("--synsets", type=pathlib.Path, default=None,
                        help=f"synsets file, one per line, line = class index (default: {SYNSETS_FILE} in the "
                             "data directory, next to the image folder, or in the default data directory)")


def _is_image(path: pathlib.Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def class_folders(folder: Union[str, os.PathLike]) -> List[pathlib.Path]:
    """The sub-folders of ``folder`` that hold images, sorted by name (the classes of an ImageFolder tree)."""
    return sorted((d for d in pathlib.Path(folder).iterdir() if d.is_dir() and any(map(_is_image, d.iterdir()))),
                  key=lambda d: d.name)


def detect_layout(folder: Union[str, os.PathLike]) -> str:
    """"flat" if ``folder`` holds images, "imagefolder" if only its sub-folders do.

    Raises:
        FileNotFoundError: no such folder.
        ValueError: both hold images (say which with ``layout``).
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    flat, tree = any(map(_is_image, folder.iterdir())), bool(class_folders(folder))
    if flat and tree:
        raise ValueError(f"{folder} holds images and class folders of images: pass --layout flat or imagefolder")
    return "imagefolder" if tree else "flat"


def image_files(folder: Union[str, os.PathLike], limit: Optional[int] = None, split: str = "all",
                layout: str = "auto") -> List[pathlib.Path]:
    """The image files of ``folder`` (``flat``: in it; ``imagefolder``: in its class folders) sorted by
    their path below it: the ``split`` half (:func:`split_files`), then the first ``limit`` if given."""
    folder = pathlib.Path(folder)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    layout = detect_layout(folder) if layout == "auto" else layout
    folders = class_folders(folder) if layout == "imagefolder" else [folder]
    files = split_files([f for d in folders for f in d.iterdir() if _is_image(f)], split, root=folder)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder} ({layout} layout, "
                                f"split {split!r})")
    return files[:limit] if limit is not None else files


def find_synsets(*folders: Union[str, os.PathLike, None]) -> Optional[pathlib.Path]:
    """The first ``SYNSETS_FILE`` in ``folders`` and then in :func:`default_data_dir`, or None."""
    for d in [*folders, default_data_dir()]:
        if d is not None and (pathlib.Path(d) / SYNSETS_FILE).is_file():
            return pathlib.Path(d) / SYNSETS_FILE
    return None


def image_labels(files: Sequence[pathlib.Path], folder: Union[str, os.PathLike], layout: str,
                 synsets: Optional[Dict[str, int]]) -> List[int]:
    """The class index of every file (the rules of the module docstring).

    Args:
        files: images from :func:`image_files` of ``folder``.
        layout: "flat" or "imagefolder".
        synsets: :func:`read_synsets` of the synsets file; needed unless the class folders are not synsets.

    Raises:
        ValueError: a synset that is not in ``synsets``, or ``synsets`` None where it is needed.
    """
    folder = pathlib.Path(folder)
    if layout == "imagefolder":
        classes = [d.name for d in class_folders(folder)]
        if not all(_SYNSET.fullmatch(c) for c in classes):  # class names: sorted folder order
            index = {c: i for i, c in enumerate(classes)}
            return [index[f.parent.name] for f in files]
        names = [f.parent.name for f in files]
    else:
        names = [f.name.split("_", 1)[0] for f in files]
    if synsets is None:
        raise ValueError(f"the images of {folder} are labelled by synsets but no {SYNSETS_FILE} was found "
                         "(pass --synsets)")
    for f, synset in zip(files, names):
        if synset not in synsets:
            raise ValueError(f"image {f.name}: synset {synset!r} is not in the synsets file")
    return [synsets[s] for s in names]


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
    """``(image tensor, class index)`` pairs; ``labels`` one class index per file, or ``{synset: index}``
    for files named ``<synset>_<name>.<ext>``."""

    def __init__(self, files: Sequence[pathlib.Path], labels: Union[Sequence[int], Dict[str, int]], transform):
        super().__init__(files, transform)
        if isinstance(labels, dict):
            labels = image_labels(self.files, self.files[0].parent if self.files else ".", "flat", labels)
        if len(labels) != len(self.files):
            raise ValueError(f"{len(self.files)} files but {len(labels)} labels")
        self.labels = list(labels)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        return super().__getitem__(i), self.labels[i]


def _check_sizes(limit: Optional[int], batch_size: int) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _transform(model: torch.nn.Module):
    import timm.data

    return timm.data.create_transform(**timm.data.resolve_data_config(model=model))


def load_unlabelled_images(folder: Union[str, os.PathLike], model: torch.nn.Module, *, limit: Optional[int] = None,
                           split: str = "all", batch_size: int = 32, progress: bool = True) -> List[torch.Tensor]:
    """The images of ``folder`` (:func:`image_files`: the ``split`` half, then ``limit``), preprocessed
    with timm's transform for ``model``, as float32 CPU batches ``[b, 3, H, W]``; no labels are read.

    Raises:
        FileNotFoundError: no such folder, or no images in it.
        ValueError: ``limit`` or ``batch_size`` not positive, unknown ``split``.
    """
    from tqdm import tqdm

    _check_sizes(limit, batch_size)
    dataset = UnlabelledImages(image_files(folder, limit, split), _transform(model))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return list(tqdm(loader, desc="decoding images", unit="batch", disable=not progress, file=sys.stderr))


@dataclass
class Images:
    """Preprocessed images kept in memory: ``batches`` float32 ``[b, 3, H, W]`` (b <= batch size),
    ``labels`` int64 ``[n]`` and the ``names`` (paths below the image folder), in sorted order;
    ``total`` the length of the (split, limited) list and, when these are one process's share of it
    (:mod:`.distributed`), ``indices`` their positions in it (None: the whole list)."""

    batches: List[torch.Tensor]
    labels: torch.Tensor
    names: List[str]
    indices: Optional[List[int]] = None
    total: Optional[int] = None

    def __len__(self) -> int:
        return len(self.names)


def image_folder(data_dir: Union[str, os.PathLike, None] = None) -> pathlib.Path:
    """The image folder of a data directory: its ``imagenet-sample/`` if present, else itself."""
    root = default_data_dir() if data_dir is None else pathlib.Path(data_dir)
    return root / IMAGES_DIR if (root / IMAGES_DIR).is_dir() else root


def load_images(data_dir: Union[str, os.PathLike, None] = None, model: Optional[torch.nn.Module] = None, *,
                limit: Optional[int] = None, split: str = "all", batch_size: int = 32, workers: int = 0,
                progress: bool = True, layout: str = "auto", synsets: Union[str, os.PathLike, None] = None,
                indices: Optional[Sequence[int]] = None) -> Images:
    """Decode and preprocess the labelled images once, with timm's transform for ``model``.

    Args:
        data_dir: the data directory (with ``imagenet-sample/`` and ``imagenet_synsets.txt``), or an
            image folder (either layout); :func:`default_data_dir` if None.
        model: the timm model whose pretrained config gives the preprocessing
            (``timm.data.resolve_data_config(model=model)`` + ``timm.data.create_transform``:
            resize, centre crop, normalisation).
        limit: use only the first ``limit`` images (sorted by path) of the ``split``.
        split: "tune", "report" or "all" (:func:`split_files`); applied before ``limit``.
        batch_size: images per batch (the last batch may be smaller).
        workers: DataLoader worker processes for decoding (0 = in this process).
        progress: show a tqdm progress bar.
        layout: "flat", "imagefolder" or "auto" (:func:`detect_layout`).
        synsets: the synsets file; if None, :func:`find_synsets` in ``data_dir`` and next to the folder.
        indices: decode only these positions of the (split, limited) list: one process's share.

    Returns:
        :class:`Images` with the float32 batches on the CPU.

    Raises:
        FileNotFoundError: the image folder or the synsets file does not exist, or has no images.
        ValueError: a file's synset is unknown, ``limit`` or ``batch_size`` not positive, unknown ``split``.
    """
    from tqdm import tqdm

    if model is None:
        raise TypeError("model must be a timm model (its pretrained config gives the preprocessing)")
    _check_sizes(limit, batch_size)
    folder = image_folder(data_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"data directory not found: {folder} (set --data or $FASTPRUNE_DATA)")
    layout = detect_layout(folder) if layout == "auto" else layout
    files = image_files(folder, limit, split, layout)
    if synsets is not None and not pathlib.Path(synsets).is_file():
        raise FileNotFoundError(f"synsets file not found: {synsets}")
    synsets = synsets or find_synsets(data_dir, folder.parent)
    labels = image_labels(files, folder, layout, None if synsets is None else read_synsets(synsets))
    total = len(files)
    if indices is not None:
        indices = list(indices)
        files, labels = [files[i] for i in indices], [labels[i] for i in indices]
    dataset = LabelledImages(files, labels, _transform(model))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    batches, targets = [], []
    for images, target in tqdm(loader, desc="decoding images", unit="batch", disable=not progress,
                               file=sys.stderr):
        batches.append(images)
        targets.append(target)
    return Images(batches, torch.cat(targets) if targets else torch.zeros(0, dtype=torch.int64),
                  [f.relative_to(folder).as_posix() for f in files], indices, total)


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
