"""The process group of multi-process training and its collectives: gloo (CPU) or nccl (CUDA).

Pure collectives, nothing of the model: the training loop over them (``train.train_worker``,
``train.launch``) lives beside the Trainer in :mod:`fusedlinear.train`.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, world: int, device: str, port: int | None = None) -> None:
    if port is not None:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(port)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))


def shard(indices: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's part of a global batch: a contiguous 1/world slice."""
    per = len(indices) // world
    return indices[rank * per:(rank + 1) * per]


def all_mean(value: float, device: str) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def all_sum(values: list[float], device: str) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
