"""The main job: accuracy, FLOPs and throughput of token reduction on pretrained timm ViTs.

``python -m fastprune.evaluate`` loads a timm model with weights from a safetensors file,
preprocesses a folder of labelled ImageNet images with timm's own transform, runs every requested
setting (the unreduced model first, as the baseline) and prints one row per setting::

    method | r / keep rate | GFLOPs | FLOPs -% | top-1 | Δ top-1 (+ 95% CI) | top-5 | agree % (+ CI)
    | KL (+ CI) | images/s | speed-up

GFLOPs: :func:`~fastprune.evaluation.settings.setting_gflops`; images/s over the forward passes
only, all settings interleaved batch by batch (:func:`~fastprune.evaluation.runner.evaluate_settings`);
top-1 / top-5 on the images as they are; "agree" (top-1 equal to the unreduced model's) and "KL"
(mean KL(unreduced || reduced) of the softmax outputs, nats) over every image and its horizontal
flip; the intervals are paired bootstraps over images with a fixed seed
(:mod:`fastprune.evaluation.fidelity`).

``--split`` picks the half of the images: "report" (default; odd positions of the folder sorted by
file name), "tune" (even positions; make every choice of defaults or schedules there) or "all".
``--limit N`` then takes the first N images of that half. ``--data`` is the data directory or an
image folder, flat (``<synset>_<name>.JPEG``) or an ImageFolder tree (``<class>/<image>``, the
ImageNet-val layout; ``--layout``). ``--weights`` takes a safetensors file or a torch checkpoint,
``--pretrained`` lets timm download the weights. ``--output T.csv|T.json`` writes the table,
``--plot F.png`` the accuracy-GFLOPs and accuracy-images/s frontiers. Under ``torchrun
--nproc_per_node K`` the images are shared between K processes and rank 0 prints the table one
process would (:mod:`fastprune.evaluation.distributed`). Setting syntax:
:mod:`fastprune.evaluation.settings`; data layout: :mod:`fastprune.evaluation.data`. Accuracy on the
sample images is only meaningful relative to the same model unreduced.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import List, Optional, Sequence

import torch

from .evaluation import distributed
from .evaluation.data import (DEFAULT_SPLIT, DEFAULT_WEIGHTS, DTYPES, IMAGE_SUFFIXES, IMAGES_DIR, LAYOUTS, SPLITS,
                              SYNSETS_FILE, Images, LabelledImages, add_data_arguments, add_model_arguments,
                              add_split_arguments, default_data_dir, default_weights, detect_layout, device_label,
                              image_files, image_folder, load_images, load_model, read_synsets, split_files)
from .evaluation.report import plot_frontier, write_results
from .evaluation.runner import COLUMNS, Result, compare, evaluate_setting, evaluate_settings, format_table
from .evaluation.settings import (DEFAULT_SETTINGS, RECOMMENDED_SETTING, Setting, count_gflops, load_setting,
                                  parse_setting, setting_gflops)
from .schedules import RSpec

__all__ = ["DEFAULT_WEIGHTS", "DTYPES", "IMAGE_SUFFIXES", "IMAGES_DIR", "LAYOUTS", "SPLITS", "SYNSETS_FILE", "Images",
           "detect_layout", "write_results", "plot_frontier",
           "LabelledImages", "default_data_dir", "default_weights", "device_label", "image_files", "load_images",
           "load_model", "read_synsets", "split_files", "DEFAULT_SPLIT", "add_split_arguments", "COLUMNS", "Result", "compare", "evaluate_setting", "evaluate_settings", "format_table",
           "DEFAULT_SETTINGS", "RECOMMENDED_SETTING", "Setting", "count_gflops", "parse_setting", "setting_gflops",
           "RSpec", "build_parser", "run", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastprune.evaluate",
        description="Accuracy, GFLOPs and throughput of token reduction on a pretrained timm ViT and a folder "
                    "of labelled ImageNet images. Settings: 'none' or METHOD:R[:KEY=VALUE...], R an int, a keep "
                    "rate in (0, 1] or a per-block list like 0*3,16*9 or 0*2,21..12 (V*K repeats, A..B ramps), or "
                    "file:PATH, a setting saved by python -m fastprune.calibrate.")
    add_model_arguments(parser, pretrained=True)
    add_data_arguments(parser)
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N images of the split, sorted by file name")
    add_split_arguments(parser)
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS),
                        help="settings to evaluate; the unreduced model 'none' always runs first "
                             f"(default: {' '.join(DEFAULT_SETTINGS)})")
    parser.add_argument("--schedule", nargs="+", default=[], type=pathlib.Path, metavar="JSON",
                        help="settings saved by python -m fastprune.calibrate, evaluated after --settings "
                             "(the same as --settings file:JSON)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to run (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="model and input dtype (default: float32); the merge computes in float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (torch.set_num_threads)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for decoding the images")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up batches per setting")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--output", type=pathlib.Path, default=None, metavar="PATH",
                        help="also write the table to PATH.csv or PATH.json (numbers unrounded, interval ends)")
    parser.add_argument("--plot", type=pathlib.Path, default=None, metavar="PATH.png",
                        help="draw top-1 against GFLOPs and against images/s of the settings run (matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--compare", action="store_true",
                        help="instead, every method at ToMe's FLOPs on both models: runs python -m fastprune.compare "
                             "with the other arguments (see its --help)")
    return parser


def _title(args: argparse.Namespace, results: List[Result], world: distributed.World) -> str:
    where = device_label(args.device, cpu_model=False)
    if world.size > 1:
        where = f"{world.size} processes, each {where}"
    views = "images" if args.no_flip else "images and their flips"
    return (f"{args.model} on {len(results[0].predictions)} images (split {args.split}), {args.dtype}, "
            f"batch {args.batch_size}, {where}; agree and KL over the {views}, paired bootstrap 95% CIs")


def run(args: argparse.Namespace, world: Optional[distributed.World] = None) -> Optional[List[Result]]:
    """Evaluate ``args.settings`` (baseline first) and return the compared results; under ``torchrun``
    (``world`` of several processes) this process's share, merged on rank 0 (None on the others)."""
    settings = [parse_setting(s) for s in args.settings] + [load_setting(p) for p in args.schedule]
    settings = [Setting()] + [s for s in settings if s.reduces]
    world = distributed.World(device=args.device) if world is None else world
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    for path, suffixes in ((args.output, (".csv", ".json")), (args.plot, (".png",))):
        if path is not None and path.suffix.lower() not in suffixes:
            raise ValueError(f"{path}: expected a file ending in {' or '.join(suffixes)}")
    data_dir = default_data_dir() if args.data is None else args.data
    dtype = DTYPES[args.dtype]
    model = load_model(args.model, args.weights, data_dir=data_dir, device=world.device, dtype=dtype,
                       pretrained=args.pretrained)
    progress = not args.no_progress and world.is_main
    indices = None
    if world.size > 1:
        count = len(image_files(image_folder(data_dir), args.limit, args.split, args.layout))
        indices = distributed.shard_indices(count, world)
    images = load_images(data_dir, model, limit=args.limit, split=args.split, batch_size=args.batch_size,
                         workers=args.workers, progress=progress, layout=args.layout, synsets=args.synsets,
                         indices=indices)
    results = evaluate_settings(model, images, settings, warmup=args.warmup, flip=not args.no_flip,
                                progress=progress)
    if world.size > 1:
        results = distributed.gather_results(results, images, world)
    return None if results is None else compare(results)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (``python -m fastprune.evaluate`` / ``fastprune-evaluate``, also under
    ``torchrun``); returns the exit status (0 on success, 2 on bad arguments or missing data)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--compare" in argv:  # the method comparison at matched FLOPs has its own arguments
        from . import compare

        return compare.main([a for a in argv if a != "--compare"])
    parser = build_parser()
    args = parser.parse_args(argv)
    world = distributed.init(args.device)
    try:
        results = run(args, world)
    except (FileNotFoundError, ValueError, TypeError) as err:  # bad arguments, settings or missing data
        distributed.shutdown(world)
        parser.error(str(err))  # exits with status 2
    distributed.shutdown(world)
    if results is None:  # not rank 0: rank 0 prints and writes
        return 0
    title = _title(args, results, world)
    print(title)
    print(format_table(results, markdown=args.markdown))
    if args.output is not None:
        meta = {"title": title, "model": args.model, "images": len(results[0].predictions), "split": args.split,
                "dtype": args.dtype, "batch_size": args.batch_size, "processes": world.size}
        print(f"wrote {write_results(results, args.output, meta)}")
    if args.plot is not None:
        print(f"wrote {plot_frontier(results, args.plot, title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
