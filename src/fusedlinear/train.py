"""Training the MNIST model, eager or fused: the job behind ``fusedlinear train``."""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import backend
from .mnist import Dataset, NeuralNetwork
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
        self.opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(self.model(xb), yb)
        loss.backward()
        self.opt.step()
        self.schedule.step()
        return loss.detach()

    def epoch(self, progress=None) -> None:
        from . import distributed

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


def prepare_kernels(model: nn.Module, cfg: TrainConfig) -> None:
    """Load (or, on first use, compile) the fused CPU kernels ``model`` runs, before any progress
    bar: a first run's compile, with its one line on stderr, comes before training starts and
    not inside the first epoch's bar and time. Nothing to do for other backends."""
    dtype = {torch.float32: "float32", torch.float64: "float64"}.get(cfg.dtype)
    if dtype is None or backend_for(cfg) != "numba":
        return
    from .kernels import cpu

    activations = {m.activation for m in model.modules() if isinstance(m, FusedLinear)}
    if activations and any(type(m) is nn.Linear for m in model.modules()):
        activations.add("identity")  # a plain nn.Linear in a run of fused layers runs in their fused_chain
    activations = sorted(activations)
    cpu.load([(phase, activation, dtype) for activation in activations for phase in cpu.PHASES])


def _progress(total: int, label: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

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
        trainer.epoch(bar)
        h = trainer.history
        _print(f"epoch {e + 1}/{cfg.epochs}  loss {h.epoch_loss[-1]:.4f}  test accuracy {h.test_accuracy[-1]:.4f}  "
               f"{n / h.epoch_seconds[-1]:,.0f} samples/s", bar)
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    h = trainer.history
    summary = {
        "model": trainer.label,
        "test_accuracy": h.test_accuracy[-1],
        "final_loss": h.epoch_loss[-1],
        "epochs": cfg.epochs,
        "seconds": seconds,
        "train_seconds": sum(h.epoch_seconds),
        "samples_per_s": n * cfg.epochs / sum(h.epoch_seconds),
        "device": cfg.device,
        "backend": backend_for(cfg) if fused else "eager",
        "data": data.source,
        "history": asdict(h),
        "config": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in asdict(cfg).items()},
        **environment(),
    }
    return trainer.model, summary


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
            t.epoch(bar)
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
        **environment(),
    }


def environment() -> dict:
    import numba
    import numpy

    return {
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "numba": numba.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def atomic_write(path: str, write) -> None:
    """Write through a temporary file in the same directory, then rename: never a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_state_dict(model: nn.Module, path: str) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: torch.save(state, f))


def save_json(summary: dict, path: str) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(summary, indent=2, default=str).encode()))


def save_plot(histories: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'fusedlinear[plot]'") from None
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
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
