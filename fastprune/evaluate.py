"""Real-input evaluation: accuracy, FLOPs and throughput of token reduction on pretrained timm ViTs.

``python -m fastprune.evaluate`` (or the console script ``fastprune-evaluate``) loads a timm model
with weights from a safetensors file, preprocesses a folder of labelled ImageNet images with timm's
own transform, runs every requested setting (the unreduced model first, as the baseline) and prints
one row per setting::

    method | r / keep rate | GFLOPs | FLOPs -% | top-1 | Δ top-1 | top-5 | agree | images/s | speed-up

* GFLOPs per image are counted by :func:`setting_gflops` / :func:`count_gflops` with
  :class:`torch.utils.flop_counter.FlopCounterMode` on one image (FLOPs = 2 x multiply-adds of the
  convolutions and matrix products, which is what the counter records; elementwise work, softmax
  and LayerNorm are not counted, as usual for ViT FLOP figures), on a float32 CPU copy of the model
  so the figure does not depend on the device. Attention: the model keeps timm's fused
  ``F.scaled_dot_product_attention``, and torch's counter has a formula for it, the CPU kernel
  ``aten._scaled_dot_product_flash_attention_for_cpu`` included (checked on torch 2.15: the count
  equals the explicit ``q @ k^T`` / ``attn @ v`` path's, ``4 N^2 C`` per block;
  :func:`count_gflops` raises if a torch version records no attention FLOPs). The token reduction is
  counted through its PyTorch reference (``backend="reference"``), whose full ``N x N`` cosine
  similarity is an upper bound on the fused kernels' matching work.
* top-1 / top-5 are percentages on the images; "agree" is the percentage of images whose top-1
  prediction equals the unreduced model's.
* images/s are measured over the model forward passes only: the preprocessed batches are decoded
  once and kept in memory, every setting is warmed up, then all settings are timed side by side in
  the same process, interleaved batch by batch (see :func:`evaluate_settings`; CUDA is synchronised
  around each forward).

The reduced settings use :func:`fastprune.patch.timm` (patched in place) and
:func:`fastprune.patch.revert` after each setting, so one model instance serves all settings.

Setting syntax (``--settings``), one word per setting:

* ``none``: the unreduced model (always evaluated first as the baseline, added if missing).
* ``METHOD:R[:KEY=VALUE...]``, e.g. ``merge:13``, ``merge:0.9``, ``merge:13:metric=x:prop_attn=off``.
  ``R`` is an int (tokens removed in every block), a float in (0, 1] (keep rate per block), or a
  per-block list of ints separated by commas, where ``V*K`` repeats ``V`` K times and ``A..B`` is
  the ramp ``A, A+-1, ..., B`` (``merge:0*4,16*8`` = no reduction in blocks 0-3, 16 tokens in
  blocks 4-11; ``merge:0*2,21..12`` = none in blocks 0-1, then 21, 20, ..., 12).
  ``KEY=VALUE`` options are passed to the patch as keyword arguments; values ``true/on/yes`` and
  ``false/off/no`` become bools, numbers become int/float, anything else stays a string.

Labels: images are named ``<synset>_<anything>.JPEG``; the class index is the synset's line number
(from 0) in ``imagenet_synsets.txt`` (the timm ImageNet-1k class order).

Data layout (``--data``, default ``$FASTPRUNE_DATA`` or ``../shared/data`` next to the repository):
``imagenet-sample/`` (images), ``imagenet_synsets.txt``, ``weights/<model>.<tag>.safetensors``.
Accuracy on these images is only meaningful relative to the same model unreduced (see the data
README: the images come from ImageNet's training split).
"""
from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import flops

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
#: Recommended off-the-shelf MSTM merge (tuned on the 500 sample images, CPU float32, ViT-Ti and
#: DeiT-Ti): no merging in blocks 0-1 (their class attention does not yet rank tokens well), then
#: 21, 20, ..., 12 tokens per block; matching on the tokens ``x``, merge weights size x class
#: attention, proportional attention on. 37.7% fewer FLOPs; top-1 -0.4 (ViT-Ti) / +0.0 (DeiT-Ti).
RECOMMENDED_SETTING = "merge:0*2,21..12:metric=x:weight=size_attn"
#: Default ``--settings``: the baseline and the recommended merge.
DEFAULT_SETTINGS = ("none", RECOMMENDED_SETTING)
#: ATen ops whose FLOPs are the attention's ``q k^T`` and ``attn v`` products.
_ATTENTION_OPS = ("bmm", "baddbmm", "matmul", "_scaled_dot_product")

RSpec = Union[int, float, List[int]]


def default_data_dir() -> pathlib.Path:
    """``$FASTPRUNE_DATA`` if set, else ``../shared/data`` relative to the repository root."""
    env = os.environ.get("FASTPRUNE_DATA")
    if env:
        return pathlib.Path(env)
    return pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


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


def image_files(folder: Union[str, os.PathLike], limit: Optional[int] = None) -> List[pathlib.Path]:
    """The image files in ``folder`` sorted by file name, the first ``limit`` of them if given."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted((f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES), key=lambda f: f.name)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files[:limit] if limit is not None else files


class LabelledImages(torch.utils.data.Dataset):
    """``(image tensor, class index)`` pairs from files named ``<synset>_<name>.<ext>``."""

    def __init__(self, files: Sequence[pathlib.Path], synsets: Dict[str, int], transform):
        self.files = list(files)
        self.transform = transform
        self.labels = []
        for f in self.files:
            synset = f.name.split("_", 1)[0]
            if synset not in synsets:
                raise ValueError(f"image {f.name}: synset {synset!r} is not in the synsets file")
            self.labels.append(synsets[synset])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return self.transform(im.convert("RGB")), self.labels[i]


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
                limit: Optional[int] = None, batch_size: int = 32, workers: int = 0,
                progress: bool = True) -> Images:
    """Decode and preprocess the labelled images once, with timm's transform for ``model``.

    Args:
        data_dir: the data directory (with ``imagenet-sample/`` and ``imagenet_synsets.txt``), or a
            folder of images whose parent holds ``imagenet_synsets.txt``;
            :func:`default_data_dir` if None.
        model: the timm model whose pretrained config gives the preprocessing
            (``timm.data.resolve_data_config(model=model)`` + ``timm.data.create_transform``:
            resize, centre crop, normalisation).
        limit: use only the first ``limit`` images (sorted by file name).
        batch_size: images per batch (the last batch may be smaller).
        workers: DataLoader worker processes for decoding (0 = in this process).
        progress: show a tqdm progress bar.

    Returns:
        :class:`Images` with the float32 batches on the CPU.

    Raises:
        FileNotFoundError: the image folder or the synsets file does not exist, or has no images.
        ValueError: a file's synset is unknown, ``limit`` or ``batch_size`` not positive.
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
    dataset = LabelledImages(image_files(folder, limit), read_synsets(synsets_file),
                             timm.data.create_transform(**config))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    batches, labels = [], []
    for images, target in tqdm(loader, desc="decoding images", unit="batch", disable=not progress,
                               file=sys.stderr):
        batches.append(images)
        labels.append(target)
    return Images(batches, torch.cat(labels), [f.name for f in dataset.files])


@dataclass
class Setting:
    """One evaluated configuration: ``method`` ("none" or a patch method), ``r`` (int, keep rate or
    per-block list; None for "none") and the patch ``options``."""

    method: str = "none"
    r: Optional[RSpec] = None
    options: Dict[str, Any] = field(default_factory=dict)
    text: str = "none"

    @property
    def reduces(self) -> bool:
        return self.method != "none"

    def r_label(self) -> str:
        """The r / keep rate column: ``13``, ``ρ=0.9``, or a compact list ``0*2,21..12``."""
        if self.r is None:
            return "-"
        if isinstance(self.r, float):
            return f"ρ={self.r:g}"
        if isinstance(self.r, list):
            return _run_length(self.r)
        return str(self.r)

    def method_label(self) -> str:
        if not self.options:
            return self.method
        return self.method + " (" + ", ".join(f"{k}={_format_value(v)}" for k, v in self.options.items()) + ")"


def _run_length(values: Sequence[int]) -> str:
    """Compact per-block list: repeats as ``v*k``, ramps of 3+ steps of one as ``a..b``."""
    parts, i = [], 0
    while i < len(values):
        j = i
        while j < len(values) and values[j] == values[i]:
            j += 1
        if j - i > 1:
            parts.append(f"{values[i]}*{j - i}")
            i = j
            continue
        for step in (1, -1):
            j = i
            while j + 1 < len(values) and values[j + 1] - values[j] == step:
                j += 1
            if j - i >= 2:
                break
        if j - i >= 2:
            parts.append(f"{values[i]}..{values[j]}")
            i = j + 1
        else:
            parts.append(str(values[i]))
            i += 1
    return ",".join(parts)


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "on", "yes"):
        return True
    if low in ("false", "off", "no"):
        return False
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _parse_r(text: str, setting: str) -> RSpec:
    try:
        if "," in text or "*" in text or ".." in text:
            values: List[int] = []
            for part in text.split(","):
                if ".." in part:  # a ramp a..b, both ends included
                    first, _, last = part.partition("..")
                    a, b = int(first), int(last)
                    values.extend(range(a, b + 1) if a <= b else range(a, b - 1, -1))
                    continue
                value, _, count = part.partition("*")
                values.extend([int(value)] * (int(count) if count else 1))
            if any(v < 0 for v in values):
                raise ValueError
            return values
        if any(c in text for c in ".eE"):
            rate = float(text)
            if not 0.0 < rate <= 1.0:
                raise ValueError
            return rate
        return int(text)
    except ValueError:
        raise ValueError(f"setting {setting!r}: r must be an int, a keep rate in (0, 1] or a per-block list "
                         f"of ints >= 0 like 0*3,16*9 or 0*2,21..12, got {text!r}") from None


def parse_setting(text: str) -> Setting:
    """Parse one ``--settings`` word: ``none`` or ``METHOD:R[:KEY=VALUE...]`` (see the module docstring).

    Raises:
        ValueError: malformed word (missing r, bad r, option without ``=``).
    """
    if not isinstance(text, str):
        raise TypeError(f"setting must be a str, got {type(text).__name__}")
    parts = text.strip().split(":")
    method = parts[0].strip().lower()
    if method == "none":
        if len(parts) > 1:
            raise ValueError(f"setting {text!r}: 'none' takes no r or options")
        return Setting(text="none")
    if not method or len(parts) < 2 or not parts[1]:
        raise ValueError(f"setting {text!r} must be 'none' or 'METHOD:R[:KEY=VALUE...]', e.g. 'merge:13'")
    r = _parse_r(parts[1].strip(), text)
    options = {}
    for part in parts[2:]:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ValueError(f"setting {text!r}: option {part!r} must be KEY=VALUE")
        options[key.strip()] = _parse_value(value.strip())
    return Setting(method, r, options, text)


def _sdpa_or_matmul_flops(counts: Dict[Any, int]) -> int:
    return sum(v for op, v in counts.items() if any(name in str(op) for name in _ATTENTION_OPS))


def count_gflops(model: torch.nn.Module, image: torch.Tensor) -> float:
    """GFLOPs of one forward pass of ``model`` on one image, counted with ``FlopCounterMode``.

    FLOPs are ``2 x`` multiply-adds of convolutions and matrix products (torch's counter). Attention
    counts the same whether it runs through ``F.scaled_dot_product_attention`` (every SDPA kernel is
    counted by :func:`fastprune.flops.sdpa_flops`, whatever torch's own counter knows) or through the
    explicit ``q @ k^T``/``attn @ v`` path. Work inside compiled custom operators (fastprune's C++ /
    Triton kernels) is NOT counted by torch's counter: use :func:`setting_gflops`, which counts the
    token reduction through its PyTorch reference.

    Args:
        model: any module taking ``[1, 3, H, W]``.
        image: ``[3, H, W]`` or ``[1, 3, H, W]``, on the model's device and dtype.

    Returns:
        GFLOPs (1e9 FLOPs) per image.

    Raises:
        ValueError: ``image`` of the wrong shape.
        RuntimeError: the model has attention blocks but no attention FLOPs were recorded (an SDPA
            kernel the counter does not know; count with the explicit path then).
    """
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must have shape [3, H, W] or [1, 3, H, W], got {tuple(image.shape)}")
    counter = flops.counter()
    with torch.no_grad(), counter:
        model(image)
    has_attention = any(hasattr(m, "qkv") for m in model.modules())
    if has_attention and _sdpa_or_matmul_flops(counter.get_flop_counts().get("Global", {})) == 0:
        raise RuntimeError("no attention FLOPs were counted: this torch's FlopCounterMode does not know the "
                           "attention kernel that ran; disable fused attention to count the explicit path")
    return counter.get_total_flops() / 1e9


def setting_gflops(model: torch.nn.Module, setting: Union[Setting, str], image: torch.Tensor) -> float:
    """GFLOPs per image of ``model`` under ``setting``, the same on every device and backend.

    Counted by :func:`count_gflops` on a float32 CPU copy of the model (so the table's GFLOPs do not
    depend on where the timing ran: on CUDA, for instance, proportional attention pads the head dim),
    with the token reduction run by its PyTorch reference (``backend="reference"`` when the method
    takes that option) so that its matrix products are visible to torch's counter. The reference
    computes the full ``[N, N]`` cosine-similarity matrix where the fused kernels only compare the
    tokens that are merged away with the kept ones, so the reduction's cost is an upper bound and
    the FLOP savings are, if anything, understated.

    Args:
        model: the (unpatched) timm model; not modified.
        setting: a :class:`Setting` or its text form.
        image: one preprocessed image ``[3, H, W]`` or ``[1, 3, H, W]`` (any device and dtype).

    Returns:
        GFLOPs (1e9 FLOPs) per image.
    """
    import copy

    if isinstance(setting, str):
        setting = parse_setting(setting)
    counted = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    image = image.to(device="cpu", dtype=torch.float32)
    if setting.reduces:
        try:
            _patch(counted, Setting(setting.method, setting.r, {**setting.options, "backend": "reference"},
                                    setting.text))
        except TypeError as err:  # a method without a backend option runs plain PyTorch: count it as is
            if "backend" not in str(err):
                raise
            _patch(counted, setting)
    return count_gflops(counted, image)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Result:
    """One row of the table. ``top1``/``top5``/``agree`` in percent, ``images_per_s`` over forward
    passes only, ``speedup`` and ``flops_reduction`` (percent) against the baseline, ``predictions``
    int64 ``[n]`` top-1 class per image."""

    setting: Setting
    gflops: float
    top1: float
    top5: float
    images_per_s: float
    predictions: torch.Tensor
    agree: float = 100.0
    speedup: float = 1.0
    flops_reduction: float = 0.0
    top1_delta: float = 0.0


def _patch(model: torch.nn.Module, setting: Setting) -> None:
    if setting.reduces:
        from . import patch

        if setting.method not in patch.available_methods():
            try:  # methods living in their own module (fastprune/tome.py, ...) register on import
                importlib.import_module(f"{__package__}.{setting.method}")
            except ImportError:
                pass
        patch.timm(model, method=setting.method, r=setting.r, **setting.options)


def _revert(model: torch.nn.Module, setting: Setting) -> None:
    if setting.reduces:
        from . import patch

        patch.revert(model)


def evaluate_setting(model: torch.nn.Module, images: Images, setting: Union[Setting, str] = "none", *,
                     device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
                     warmup: int = 1, progress: bool = True) -> Result:
    """Evaluate one setting: patch ``model`` (unless "none"), count GFLOPs, run every batch, revert.

    Args:
        model: the timm model from :func:`load_model`; patched in place for the duration of the call
            and reverted afterwards (also on error).
        images: preprocessed images from :func:`load_images` (float32 CPU batches).
        setting: a :class:`Setting` or its text form (see :func:`parse_setting`).
        device, dtype: where and in what dtype to run; the model's own if None.
        warmup: untimed forward passes on the first batch before timing.
        progress: show a tqdm progress bar.

    Returns:
        :class:`Result` with GFLOPs per image, top-1 / top-5 in percent and images/s over the model
        forward passes only (decoding excluded; CUDA synchronised). Baseline-relative fields
        (``agree``, ``speedup``...) are filled in by :func:`compare`.
    """
    return evaluate_settings(model, images, [setting], device=device, dtype=dtype, warmup=warmup,
                             progress=progress)[0]


def evaluate_settings(model: torch.nn.Module, images: Images, settings: Sequence[Union[Setting, str]], *,
                      device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
                      warmup: int = 1, progress: bool = True) -> List[Result]:
    """Evaluate several settings side by side, timing them interleaved batch by batch.

    Each setting's GFLOPs are counted and it is warmed up (``warmup`` forwards of the first batch);
    then for every batch each setting in turn is patched in, timed on that batch and reverted. The
    settings thus share the machine's conditions (other load, clock changes) and their images/s are
    comparable even on a busy machine. Patching and reverting are outside the timed region.

    Arguments as in :func:`evaluate_setting`; returns one :class:`Result` per setting, in order
    (call :func:`compare` for the baseline-relative fields).
    """
    from tqdm import tqdm

    settings = [parse_setting(s) if isinstance(s, str) else s for s in settings]
    param = next(model.parameters())
    device = param.device if device is None else torch.device(device)
    dtype = param.dtype if dtype is None else dtype
    batches = [b.to(device=device, dtype=dtype) for b in images.batches]
    gflops = [setting_gflops(model, setting, images.batches[0][:1]) for setting in settings]
    for setting in settings:
        _patch(model, setting)
        try:
            with torch.inference_mode():
                for _ in range(warmup):
                    model(batches[0])
                _sync(device)
        finally:
            _revert(model, setting)
    elapsed = [0.0] * len(settings)
    logits: List[List[torch.Tensor]] = [[] for _ in settings]
    bar = tqdm(total=len(batches) * len(settings), desc="evaluating", unit="batch", disable=not progress,
               file=sys.stderr)
    with torch.inference_mode(), bar:
        for batch in batches:
            for i, setting in enumerate(settings):
                _patch(model, setting)
                try:
                    _sync(device)
                    start = time.perf_counter()
                    out = model(batch)
                    _sync(device)
                    elapsed[i] += time.perf_counter() - start
                finally:
                    _revert(model, setting)
                logits[i].append(out.float().cpu())
                bar.update(1)
    labels = images.labels
    results = []
    for setting, flops, seconds, chunks in zip(settings, gflops, elapsed, logits):
        top5 = torch.cat(chunks).topk(5, dim=1).indices
        predictions = top5[:, 0]
        results.append(Result(setting=setting, gflops=flops,
                              top1=100.0 * (predictions == labels).float().mean().item(),
                              top5=100.0 * (top5 == labels[:, None]).any(dim=1).float().mean().item(),
                              images_per_s=len(labels) / seconds, predictions=predictions))
    return results


def compare(results: List[Result]) -> List[Result]:
    """Fill in the baseline-relative fields of every result against ``results[0]`` (in place)."""
    base = results[0]
    for res in results:
        res.agree = 100.0 * (res.predictions == base.predictions).float().mean().item()
        res.speedup = res.images_per_s / base.images_per_s
        res.flops_reduction = 100.0 * (1.0 - res.gflops / base.gflops)
        res.top1_delta = res.top1 - base.top1
    return results


COLUMNS = ("method", "r / keep rate", "GFLOPs", "FLOPs -%", "top-1", "Δ top-1", "top-5", "agree %",
           "images/s", "speed-up")


def _row(res: Result) -> List[str]:
    return [res.setting.method_label(), res.setting.r_label(), f"{res.gflops:.3f}", f"{res.flops_reduction:.1f}",
            f"{res.top1:.1f}", f"{res.top1_delta:+.1f}", f"{res.top5:.1f}", f"{res.agree:.1f}",
            f"{res.images_per_s:.1f}", f"{res.speedup:.2f}x"]


def format_table(results: List[Result], markdown: bool = False) -> str:
    """The results as an aligned text table, or a Markdown table if ``markdown``."""
    rows = [list(COLUMNS)] + [_row(r) for r in results]
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" if i < 2 else "---:"
                                                                   for i in range(len(COLUMNS))) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(row) for row in rows[1:]])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastprune.evaluate",
        description="Accuracy, GFLOPs and throughput of token reduction on a pretrained timm ViT and a folder "
                    "of labelled ImageNet images. Settings: 'none' or METHOD:R[:KEY=VALUE...], R an int, a keep "
                    "rate in (0, 1] or a per-block list like 0*3,16*9 or 0*2,21..12 (V*K repeats, A..B ramps).")
    parser.add_argument("--model", default="vit_tiny_patch16_224",
                        help="timm model name (vit_tiny_patch16_224, deit_tiny_patch16_224, ...)")
    parser.add_argument("--weights", type=pathlib.Path, default=None,
                        help="safetensors state dict (default: the model's file in <data>/weights)")
    parser.add_argument("--data", type=pathlib.Path, default=None,
                        help="data directory (default: $FASTPRUNE_DATA or ../shared/data next to the repository)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images, sorted by file name")
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS),
                        help="settings to evaluate; the unreduced model 'none' always runs first "
                             f"(default: {' '.join(DEFAULT_SETTINGS)})")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="model and input dtype (default: float32); the merge computes in float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch.set_num_threads)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for decoding the images")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up batches per setting")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--compare", action="store_true",
                        help="instead, every method at ToMe's FLOPs on both models: runs python -m fastprune.compare "
                             "with the other arguments (see its --help)")
    return parser


def run(args: argparse.Namespace) -> List[Result]:
    """Evaluate ``args.settings`` (baseline first) and return the compared results."""
    settings = [parse_setting(s) for s in args.settings]
    settings = [Setting()] + [s for s in settings if s.reduces]
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    data_dir = default_data_dir() if args.data is None else args.data
    dtype = DTYPES[args.dtype]
    model = load_model(args.model, args.weights, data_dir=data_dir, device=args.device, dtype=dtype)
    images = load_images(data_dir, model, limit=args.limit, batch_size=args.batch_size, workers=args.workers,
                         progress=not args.no_progress)
    return compare(evaluate_settings(model, images, settings, warmup=args.warmup, progress=not args.no_progress))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``python -m fastprune.evaluate`` / ``fastprune-evaluate``); returns
    the exit status (0 on success, 2 on bad arguments or missing data)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--compare" in argv:  # the method comparison at matched FLOPs has its own arguments
        from . import compare

        return compare.main([a for a in argv if a != "--compare"])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        results = run(args)
    except (FileNotFoundError, ValueError, TypeError) as err:  # bad arguments, settings or missing data
        parser.error(str(err))  # exits with status 2
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model} on {len(results[0].predictions)} images, {args.dtype}, batch {args.batch_size}, {where}")
    print(format_table(results, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
