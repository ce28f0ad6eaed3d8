"""Data-parallel evaluation under ``torchrun``: one process per GPU (or CPU worker), one table.

``torchrun --nproc_per_node K -m fastprune.evaluate ...`` starts K processes with ``WORLD_SIZE=K``.
Each process evaluates its share of the images (:func:`shard_indices`: a ``DistributedSampler``
without its padding duplicates, so every image is evaluated exactly once), then :func:`gather_results`
brings the per-image logits to rank 0 in the order of the file list, where the table is computed as
one process would. images/s is then the images of all processes over the slowest process's forward time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

import torch

from .data import Images
from .runner import Result, make_result

__all__ = ["World", "init", "shutdown", "shard_indices", "gather_results"]


@dataclass
class World:
    """This process's ``rank`` among ``size`` processes, its ``device``; ``size == 1`` when not distributed."""

    rank: int = 0
    size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device: str) -> World:
    """Join the process group if ``torchrun`` started this process (``WORLD_SIZE`` > 1).

    The backend is nccl on CUDA (each process on GPU ``LOCAL_RANK``), gloo on the CPU. Outside
    ``torchrun`` nothing is initialised and the world is this process alone.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(device=device)
    import torch.distributed as dist

    if torch.device(device).type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return World(rank=dist.get_rank(), size=dist.get_world_size(), device=device)


def shutdown(world: World) -> None:
    """Leave the process group (after the last collective)."""
    import torch.distributed as dist

    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def shard_indices(n: int, world: World) -> List[int]:
    """The positions of ``n`` images that ``world.rank`` evaluates: ``DistributedSampler``'s share
    (``shuffle=False``: rank, rank + size, ...) without the duplicates it pads with.

    Raises:
        ValueError: fewer images than processes.
    """
    if n < world.size:
        raise ValueError(f"{n} images for {world.size} processes: every process needs at least one image")
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world.size, rank=world.rank,
                                                  shuffle=False, drop_last=False)
    return list(sampler)[:len(range(world.rank, n, world.size))]


def gather_results(results: List[Result], images: Images, world: World) -> Optional[List[Result]]:
    """The results of all processes, merged on rank 0 (None on the other ranks).

    Args:
        results: this process's results of :func:`~fastprune.evaluation.runner.evaluate_settings`
            on its share of the images.
        images: this process's share (``images.indices``: its positions in the full list of
            ``images.total``, :func:`shard_indices`).

    Returns:
        On rank 0 one :class:`Result` per setting over all ``n`` images, in the order of the list
        (call :func:`~fastprune.evaluation.runner.compare` on them); the others get None.
    """
    import torch.distributed as dist

    if world.size == 1:
        return results
    share = {"indices": list(images.indices), "labels": images.labels,
             "rows": [(r.logits, r.flip_logits, len(r.predictions) / r.images_per_s) for r in results]}
    gathered = [None] * world.size if world.is_main else None
    dist.gather_object(share, gathered, dst=0)
    if not world.is_main:
        return None
    n = images.total
    order = torch.tensor([i for part in gathered for i in part["indices"]])
    if sorted(order.tolist()) != list(range(n)):
        raise RuntimeError(f"the processes' shares do not cover the {n} images exactly once")
    labels = torch.empty(n, dtype=torch.int64)
    labels[order] = torch.cat([part["labels"] for part in gathered])
    merged = []
    for k, res in enumerate(results):
        rows = [part["rows"][k] for part in gathered]
        logits = torch.empty(n, res.logits.shape[1])
        logits[order] = torch.cat([row[0] for row in rows])
        flip = None
        if res.flip_logits is not None:
            flip = torch.empty_like(logits)
            flip[order] = torch.cat([row[1] for row in rows])
        merged.append(make_result(res.setting, res.gflops, logits, labels, max(row[2] for row in rows), flip))
    return merged
