"""Training the MNIST model, eager or fused: the job behind ``fusedlinear train``.

In one process (:func:`run_training`, :func:`run_compare`) or in several: ``--nproc N`` starts N
processes itself (:func:`launch`: start method "spawn", a free local port); under ``torchrun``
(RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set) the process joins the group torchrun
describes (:func:`train_worker`). ``--batch-size`` is the *global* batch: each step every rank
takes its own 1/N of the same global batch, and DDP averages the gradients, so a step equals the
single-process step on that global batch (tests/test_distributed.py checks the gradients). Each
rank uses cores/N threads; loss and accuracy are reduced across ranks (:mod:`.distributed`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from tqdm import tqdm

from . import backend, distributed
from .mnist import Dataset, NeuralNetwork
from .report import atomic_write, dtype_name, machine_info, pyplot, save_figure
from .torch_ext import FusedLinear, fuse


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    device: str = "cpu"
    seed: int = 0
    dtype: torch.dtype = torch.float32
    shift: int = 2  # random translation of each training image by up to this many pixels (0: none)

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if self.shift < 0 or self.shift > 8:
            raise ValueError(f"--shift must be between 0 and 8 pixels, got {self.shift}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")


OPTIMIZERS = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}


@dataclass
class History:
    label: str
    step_losses: list[float] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)


def make_model(fused: bool, seed: int, device: str, dtype=torch.float32) -> nn.Module:
    """NeuralNetwork initialised from ``seed``; fused with :func:`fusedlinear.fuse` if asked."""
    torch.manual_seed(seed)
    model = NeuralNetwork()
    if fused:
        fuse(model, inplace=True)
    return model.to(device=device, dtype=dtype)


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(labels), batch):
            correct += (model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum().item()
    model.train()
    return correct / max(len(labels), 1)


class Shift:
    """Training images shifted by a random (dy, dx) in [-shift, shift]², one per image.

    The background (normalised zero) fills what moves in. With 8,000 training digits the MLP
    overfits after a few epochs; shifts of up to 2 pixels lift test accuracy by about a point.
    Deterministic for a seed, so eager and fused models see the very same batches.
    """

    def __init__(self, images: torch.Tensor, shift: int, seed: int):
        self.shift = shift
        self.gen = torch.Generator().manual_seed(seed + 1)
        if shift:
            background = float(images.min()) if images.numel() else 0.0
            self.padded = nn.functional.pad(images, (shift,) * 4, value=background)
            self.base = torch.arange(images.shape[-1], device=images.device)
        self.images = images

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        if not self.shift:
            return self.images[idx]
        oy, ox = (torch.randint(0, 2 * self.shift + 1, (2, len(idx)), generator=self.gen)).to(idx.device)
        rows = (oy[:, None] + self.base)[:, :, None]
        cols = (ox[:, None] + self.base)[:, None, :]
        return self.padded[idx[:, None, None], rows, cols]


class Trainer:
    """One model, its optimizer and its history; ``epoch()`` runs one pass over the training set.

    On several ranks (``world`` > 1, inside an initialised process group, ``model`` wrapped in
    DistributedDataParallel) every rank walks the same global batches and takes its own 1/world
    of each (full global batches only, so the split is even); the epoch's loss and the test
    accuracy are reduced over the ranks, and each rank scores its own share of the test set."""

    def __init__(self, model: nn.Module, data: Dataset, cfg: TrainConfig, label: str, rank: int = 0, world: int = 1):
        self.model, self.cfg, self.label, self.rank, self.world = model, cfg, label, rank, world
        self.opt = OPTIMIZERS[cfg.optimizer](model.parameters(), cfg.lr)
        to = dict(device=cfg.device)
        self.x, self.y = data.train_images.to(dtype=cfg.dtype, **to), data.train_labels.to(**to)
        self.tx, self.ty = data.test_images.to(dtype=cfg.dtype, **to), data.test_labels.to(**to)
        # Cosine decay of the learning rate to 0 over the run, stepped per batch: the last
        # epochs settle instead of bouncing (+~1 point of test accuracy on the bundled split).
        steps = cfg.epochs * len(range(0, self._batch_starts_end(), cfg.batch_size))
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(steps, 1))
        self.shuffle = torch.Generator().manual_seed(cfg.seed)  # same batches for every model (and rank) of one seed
        self.augment = Shift(self.x, cfg.shift, cfg.seed)
        self.history = History(label)
        prepare_kernels(model, cfg)

    def _batch_starts_end(self) -> int:
        n, bs = len(self.y), self.cfg.batch_size
        return n if self.world == 1 else n - bs + 1  # several ranks: full global batches only

    def step(self, xb, yb) -> torch.Tensor:
        loss = sgd_step(self.model, self.opt, xb, yb)
        self.schedule.step()
        return loss.detach()

    def epoch(self, progress=None) -> None:
        order = torch.randperm(len(self.y), generator=self.shuffle).to(self.cfg.device)
        bs = self.cfg.batch_size
        start = time.perf_counter()
        losses = []
        for i in range(0, self._batch_starts_end(), bs):
            idx = order[i:i + bs]
            if self.world > 1:
                idx = distributed.shard(idx, self.rank, self.world)
            losses.append(self.step(self.augment(idx), self.y[idx]))
            if progress is not None:
                progress.update(len(idx))
        losses = torch.stack(losses).double().cpu().tolist()  # one sync per epoch, not per step
        if self.cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        h = self.history
        h.step_losses += losses
        h.epoch_loss.append(sum(losses) / len(losses))
        h.epoch_seconds.append(seconds)
        model = getattr(self.model, "module", self.model)  # scored without DDP's hooks
        if self.world == 1:
            h.test_accuracy.append(evaluate(model, self.tx, self.ty))
            return
        h.epoch_loss[-1] = distributed.all_mean(h.epoch_loss[-1], self.cfg.device)
        mine = torch.arange(self.rank, len(self.ty), self.world)
        correct = evaluate(model, self.tx[mine], self.ty[mine]) * len(mine)
        correct, total = distributed.all_sum([correct, len(mine)], self.cfg.device)
        h.test_accuracy.append(correct / total)


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, x, y, set_to_none: bool = True) -> torch.Tensor:
    """One training step: forward, cross-entropy, backward, optimizer step. Returns the loss.
    ``set_to_none=False`` keeps the gradient tensors, as a step captured in a CUDA graph needs."""
    opt.zero_grad(set_to_none=set_to_none)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def capture_cuda_graph(step, warmup: int = 3):
    """``step()`` (a training step on static tensors) captured with ``torch.cuda.graph``, after
    ``warmup`` calls on a side stream, as torch.cuda.graph's documentation asks (first uses and the
    optimizer's state happen outside the capture). Returns (graph, what the captured call returned);
    ``graph.replay()`` runs the step again on whatever the static tensors hold then."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def prepare_kernels(model: nn.Module, cfg: TrainConfig) -> None:
    """Load (or, on first use, compile) the fused CPU kernels ``model`` runs, before any progress
    bar: a first run's compile, with its one line on stderr, comes before training starts and
    not inside the first epoch's bar and time. Nothing to do for other backends."""
    if cfg.dtype not in (torch.float32, torch.float64) or backend_for(cfg) != "numba":
        return
    activations = {m.activation for m in model.modules() if isinstance(m, FusedLinear)}
    if activations and any(type(m) is nn.Linear for m in model.modules()):
        activations.add("identity")  # a plain nn.Linear in a run of fused layers runs in their fused_chain
    backend.prepare_cpu_kernels(sorted(activations), dtype_name(cfg.dtype))


def _progress(total: int, label: str, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=total, unit="img", desc=label, leave=False, dynamic_ncols=True)


def _print(line: str, bar) -> None:
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)


def backend_for(cfg: TrainConfig) -> str:
    return backend.select(torch.device(cfg.device), cfg.dtype)


def run_training(data: Dataset, cfg: TrainConfig, fused: bool = True, progress: bool = True) -> tuple[nn.Module, dict]:
    """Train one model; print a line per epoch; return (model, summary)."""
    cfg.validate()
    t0 = time.perf_counter()
    trainer = Trainer(make_model(fused, cfg.seed, cfg.device, cfg.dtype), data, cfg, "fused" if fused else "eager")
    n = len(trainer.y)
    for e in range(cfg.epochs):
        bar = _progress(n, f"epoch {e + 1}/{cfg.epochs}", progress)
        try:
            trainer.epoch(bar)
            h = trainer.history
            _print(f"epoch {e + 1}/{cfg.epochs}  loss {h.epoch_loss[-1]:.4f}  test accuracy {h.test_accuracy[-1]:.4f}  "
                   f"{n / h.epoch_seconds[-1]:,.0f} samples/s", bar)
        finally:  # also on Ctrl-C: the bar clears its line before the CLI says what was interrupted
            if bar is not None:
                bar.close()
    summary = _summary(trainer, data, time.perf_counter() - t0, backend_for(cfg) if fused else "eager")
    return trainer.model, summary


def _summary(trainer: Trainer, data: Dataset, seconds: float, backend_name: str, **extra) -> dict:
    """The JSON summary of one trained model (``--json``); ``seconds``: the whole run's."""
    h, cfg, n = trainer.history, trainer.cfg, len(trainer.y)
    return {
        "model": trainer.label,
        **extra,
        "test_accuracy": h.test_accuracy[-1],
        "final_loss": h.epoch_loss[-1],
        "epochs": cfg.epochs,
        "seconds": seconds,
        "train_seconds": sum(h.epoch_seconds),
        "samples_per_s": n * cfg.epochs / sum(h.epoch_seconds),
        "device": cfg.device,
        "backend": backend_name,
        "data": data.source,
        "history": asdict(h),
        "config": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in asdict(cfg).items()},
        **machine_info(),
    }


def run_compare(data: Dataset, cfg: TrainConfig, progress: bool = True) -> dict:
    """Eager and fused from one seed, epochs alternated, printed side by side."""
    cfg.validate()
    t0 = time.perf_counter()
    trainers = [Trainer(make_model(f, cfg.seed, cfg.device, cfg.dtype), data, cfg, "fused" if f else "eager")
                for f in (False, True)]
    n = len(trainers[0].y)
    print(f"{'epoch':>5} | {'eager loss':>10} {'acc':>6} {'s':>6} | {'fused loss':>10} {'acc':>6} {'s':>6} | speed-up")
    for e in range(cfg.epochs):
        for t in trainers:
            bar = _progress(n, f"{t.label} epoch {e + 1}", progress)
            try:
                t.epoch(bar)
            finally:
                if bar is not None:
                    bar.close()
        he, hf = trainers[0].history, trainers[1].history
        print(f"{e + 1:>5} | {he.epoch_loss[-1]:>10.4f} {he.test_accuracy[-1]:>6.4f} {he.epoch_seconds[-1]:>6.2f} | "
              f"{hf.epoch_loss[-1]:>10.4f} {hf.test_accuracy[-1]:>6.4f} {hf.epoch_seconds[-1]:>6.2f} | "
              f"{he.epoch_seconds[-1] / hf.epoch_seconds[-1]:.2f}x", flush=True)
    he, hf = trainers[0].history, trainers[1].history
    ratio = sum(he.epoch_seconds) / sum(hf.epoch_seconds)
    diff = max(abs(a - b) for a, b in zip(he.step_losses, hf.step_losses))
    print(f"fused is {ratio:.2f}x the speed of eager (training time {sum(hf.epoch_seconds):.2f}s vs "
          f"{sum(he.epoch_seconds):.2f}s); largest per-step loss difference {diff:.3g}")
    return {
        "model": "compare",
        "test_accuracy": hf.test_accuracy[-1],
        "final_loss": hf.epoch_loss[-1],
        "eager_test_accuracy": he.test_accuracy[-1],
        "eager_final_loss": he.epoch_loss[-1],
        "epochs": cfg.epochs,
        "seconds": time.perf_counter() - t0,
        "samples_per_s": n * cfg.epochs / sum(hf.epoch_seconds),
        "eager_samples_per_s": n * cfg.epochs / sum(he.epoch_seconds),
        "speed_ratio": ratio,
        "max_loss_difference": diff,
        "device": cfg.device,
        "backend": backend_for(cfg),
        "data": data.source,
        "history": {"eager": asdict(he), "fused": asdict(hf)},
        **machine_info(),
    }


def save_state_dict(model: nn.Module, path: str) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: torch.save(state, f))


def save_json(summary: dict, path: str) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(summary, indent=2, default=str).encode()))


def save_plot(histories: list[dict], path: str) -> None:
    plt = pyplot("plot")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for h in histories:
        epochs = range(1, len(h["epoch_loss"]) + 1)
        ax1.plot(epochs, h["epoch_loss"], marker="o", label=h["label"])
        ax2.plot(epochs, h["test_accuracy"], marker="o", label=h["label"])
    ax1.set(xlabel="epoch", ylabel="mean training loss", title="loss")
    ax2.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


# ---- several processes: DistributedDataParallel over gloo (CPU) or nccl (CUDA) ----------------


def check_batch(batch_size: int, world: int) -> None:
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} must be a multiple of --nproc {world} "
                         f"(it is the global batch, split evenly over the processes)")


def train_worker(rank: int, world: int, port: int | None, data: Dataset, cfg: TrainConfig, out_path=None):
    """One rank of ``fusedlinear train --nproc``: DDP over the fused model (a :class:`Trainer` on
    this rank's share of each global batch); returns rank 0's (summary, state_dict), and writes
    them to ``out_path`` if given."""
    if port is not None or not dist.is_initialized():
        distributed.init(rank, world, cfg.device, port)
    if cfg.device.startswith("cuda"):
        cfg = dataclasses.replace(cfg, device=f"cuda:{rank % torch.cuda.device_count()}")
        torch.cuda.set_device(cfg.device)
    model = make_model(True, cfg.seed, cfg.device, cfg.dtype)
    trainer = Trainer(nn.parallel.DistributedDataParallel(model), data, cfg, "fused-ddp", rank, world)
    n, history = len(trainer.y), trainer.history
    for epoch in range(cfg.epochs):
        trainer.epoch()
        if rank == 0:
            print(f"epoch {epoch + 1}/{cfg.epochs}  loss {history.epoch_loss[-1]:.4f}  "
                  f"test accuracy {history.test_accuracy[-1]:.4f}  {n / history.epoch_seconds[-1]:,.0f} samples/s "
                  f"({world} processes)", flush=True)
    summary = state = None
    if rank == 0:
        summary = _summary(trainer, data, sum(history.epoch_seconds), backend_for(cfg), processes=world)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if out_path is not None:  # a file, not a queue: tensors in a queue die with their sender
            torch.save((summary, state), out_path)
    dist.barrier()
    dist.destroy_process_group()
    return (summary, state) if rank == 0 else None


def launch(world: int, data: Dataset, cfg: TrainConfig):
    """Start ``world`` processes and return rank 0's (summary, state_dict)."""
    check_batch(cfg.batch_size, world)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rank0.pt")
        mp.start_processes(train_worker, args=(world, distributed.free_port(), data, cfg, out_path),
                           nprocs=world, join=True, start_method="spawn")
        return torch.load(out_path, weights_only=False)  # written by our own rank 0, in our temp dir
