"""Multi-process training on PyTorch's own engine: DistributedDataParallel over gloo (CPU) or nccl (CUDA).

``fusedlinear train --nproc N`` starts N processes itself (start method "spawn", a free local
port); under ``torchrun`` (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set) the process joins
the group torchrun describes. ``--batch-size`` is the *global* batch: each step every rank takes
its own 1/N of the same global batch, and DDP averages the gradients, so a step equals the
single-process step on that global batch (tests/test_distributed.py checks the gradients).
Each rank uses cores/N threads; loss and accuracy are reduced across ranks.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
from torch import nn


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


def check_batch(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} must be a multiple of --nproc {world} "
                         f"(it is the global batch, split evenly over the processes)")


def all_mean(value: float, device: str) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def all_sum(values: list[float], device: str) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def train_worker(rank: int, world: int, port: int | None, data, cfg, progress: bool, out_path=None):
    """One rank of ``fusedlinear train --nproc``: DDP over the fused model (``train.Trainer`` on
    this rank's share of each global batch); returns rank 0's (summary, state_dict)."""
    import dataclasses

    from . import train

    if port is not None or not dist.is_initialized():
        init(rank, world, cfg.device, port)
    if cfg.device.startswith("cuda"):
        cfg = dataclasses.replace(cfg, device=f"cuda:{rank % torch.cuda.device_count()}")
        torch.cuda.set_device(cfg.device)
    model = train.make_model(True, cfg.seed, cfg.device, cfg.dtype)
    trainer = train.Trainer(nn.parallel.DistributedDataParallel(model), data, cfg, "fused-ddp", rank, world)
    n, history = len(trainer.y), trainer.history
    for epoch in range(cfg.epochs):
        trainer.epoch()
        if rank == 0:
            print(f"epoch {epoch + 1}/{cfg.epochs}  loss {history.epoch_loss[-1]:.4f}  "
                  f"test accuracy {history.test_accuracy[-1]:.4f}  {n / history.epoch_seconds[-1]:,.0f} samples/s "
                  f"({world} processes)", flush=True)
    summary = state = None
    if rank == 0:
        summary = {
            "model": "fused-ddp", "processes": world, "test_accuracy": history.test_accuracy[-1],
            "final_loss": history.epoch_loss[-1], "epochs": cfg.epochs,
            "seconds": sum(history.epoch_seconds),
            "samples_per_s": n * cfg.epochs / sum(history.epoch_seconds), "device": cfg.device,
            "backend": train.backend_for(cfg), "data": data.source,
            "history": {"epoch_loss": history.epoch_loss, "test_accuracy": history.test_accuracy,
                        "epoch_seconds": history.epoch_seconds},
            **train.environment(),
        }
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if out_path is not None:  # a file, not a queue: tensors in a queue die with their sender
            torch.save((summary, state), out_path)
    dist.barrier()
    dist.destroy_process_group()
    return (summary, state) if rank == 0 else None


def _spawned(rank, world, port, data, cfg, progress, out_path):
    train_worker(rank, world, port, data, cfg, progress, out_path)


def launch(world: int, data, cfg, progress: bool = False):
    """Start ``world`` processes and return rank 0's (summary, state_dict)."""
    import tempfile

    import torch.multiprocessing as mp

    check_batch(cfg.batch_size, world)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rank0.pt")
        mp.start_processes(_spawned, args=(world, free_port(), data, cfg, progress, out_path), nprocs=world,
                           join=True, start_method="spawn")
        return torch.load(out_path, weights_only=False)  # written by our own rank 0, in our temp dir


def gradients(rank: int, world: int, port: int, seed: int, batch: int, path: str) -> None:
    """Test helper: one DDP backward of the fused MNIST model on this rank's half of a fixed
    global batch; rank 0 writes the averaged gradients to ``path``."""
    from .mnist import load_bundled
    from .train import make_model

    init(rank, world, "cpu", port)
    data = load_bundled()
    model = make_model(True, seed, "cpu")
    ddp = nn.parallel.DistributedDataParallel(model)
    idx = shard(torch.arange(batch), rank, world)
    nn.functional.cross_entropy(ddp(data.train_images[idx]), data.train_labels[idx]).backward()
    if rank == 0:
        torch.save({k: p.grad for k, p in model.named_parameters()}, path)
    dist.barrier()
    dist.destroy_process_group()
