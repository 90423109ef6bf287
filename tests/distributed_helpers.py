"""Helpers that test processes run: importable by name, as the start method "spawn" needs."""

import torch
import torch.distributed as dist
from torch import nn

from fusedlinear import distributed
from fusedlinear.mnist import load_bundled
from fusedlinear.train import make_model


def gradients(rank: int, world: int, port: int, seed: int, batch: int, path: str) -> None:
    """One DDP backward of the fused MNIST model on this rank's half of a fixed global batch;
    rank 0 writes the averaged gradients to ``path``."""
    distributed.init(rank, world, "cpu", port)
    data = load_bundled()
    model = make_model(True, seed, "cpu")
    ddp = nn.parallel.DistributedDataParallel(model)
    idx = distributed.shard(torch.arange(batch), rank, world)
    nn.functional.cross_entropy(ddp(data.train_images[idx]), data.train_labels[idx]).backward()
    if rank == 0:
        torch.save({k: p.grad for k, p in model.named_parameters()}, path)
    dist.barrier()
    dist.destroy_process_group()
