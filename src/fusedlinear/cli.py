"""``fusedlinear`` command line: ``train`` (the main job), ``info``, ``bench``.

Bad input (an argument, an environment variable, a path) is refused before any work starts,
with one line on stderr naming the value and the fix, and exit status 2 (as argparse's own
usage errors); no traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import warnings

import torch

from . import __version__, _startup, backend, bench, distributed, mnist, parity_command, train
from .argtypes import UsageError, seed, writable_file
from .backend import cupy_cuda, numba_cpu
from .kernels import tiling as numba_tiling
from .report import dtype_name, machine_info


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block): ``prog: error: message``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _check_environment() -> None:
    """FUSEDLINEAR_BACKEND and FUSEDLINEAR_CPU_BLAS, before any work."""
    try:
        backend.forced_backend()
    except ValueError as exc:
        raise UsageError(f"{exc}; unset it or choose one of those") from None
    if numba_cpu.BLAS_CHOICE not in numba_cpu.BLAS_CHOICES:
        raise UsageError(f"FUSEDLINEAR_CPU_BLAS={numba_cpu.BLAS_CHOICE!r} is not a BLAS choice: use one of "
                         f"{', '.join(numba_cpu.BLAS_CHOICES)} (or unset it)")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train the MNIST model with fused layers (default: bundled digits)",
                       description="Train NeuralNetwork (784-512-512-10 MLP) with fused Linear+ReLU layers.")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training set (default 10)")
    p.add_argument("--batch-size", type=int, default=64, help="mini-batch size (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="adam", help="default adam (sgd: momentum 0.9)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=seed, default=0, help="initialisation and shuffling seed (default 0)")
    p.add_argument("--shift", type=int, default=2,
                   help="shift each training image by up to this many pixels at random (default 2; 0: off)")
    p.add_argument("--data-dir", default=None,
                   help="directory of IDX files (train-images-idx3-ubyte[.gz], ...) instead of the bundled digits")
    p.add_argument("--save", metavar="PATH", type=writable_file,
                   help="save the trained state_dict (loads into plain NeuralNetwork)")
    p.add_argument("--json", metavar="PATH", type=writable_file, help="write a JSON summary")
    p.add_argument("--compare", action="store_true", help="train eager and fused from one seed, side by side")
    p.add_argument("--plot", metavar="PATH", type=writable_file, help="PNG of the loss and accuracy curves (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, default=1,
                   help="train with DistributedDataParallel in N processes (gloo on CPU, nccl on CUDA); "
                        "--batch-size is then the global batch. Under torchrun the group comes from torchrun.")


def _check_device(device: str) -> str:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device name (try cpu or cuda)") from None
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {device} asked for, but PyTorch sees "
                         f"{torch.cuda.device_count() or 'no'} CUDA GPU(s); use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: only cpu and cuda are supported")
    return device


def _check_forced_backend(device: str) -> None:
    """FUSEDLINEAR_BACKEND must run the training's tensors (float32 on ``device``), before training."""
    forced, dev = backend.forced_backend(), torch.device(device)
    if forced is not None and not backend.runs(forced, dev, torch.float32):
        fits = [name for name in backend.BACKENDS if backend.runs(name, dev, torch.float32)]
        raise UsageError(f"{backend.ENV_VAR}={forced} cannot run on --device {device} tensors; "
                         f"unset it or use {'/'.join(fits)}")


def cmd_train(args) -> int:
    device = _check_device(args.device or _default_device())
    _check_forced_backend(device)
    if args.nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {args.nproc}")
    if args.compare and args.save:
        raise UsageError("--save needs a single training run: drop --compare (or --save)")
    if args.compare and args.nproc > 1:
        raise UsageError("--compare runs in one process: drop --nproc")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'fusedlinear[plot]' (or drop --plot)")
    cfg = train.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            optimizer=args.optimizer, device=device, seed=args.seed, shift=args.shift)
    try:
        cfg.validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        data = mnist.load_idx_dir(args.data_dir) if args.data_dir else mnist.load_bundled()
    except mnist.IDXError as exc:
        raise UsageError(str(exc)) from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        print(f"data: {data.source}")
        print(f"device: {device}, fused backend: {train.backend_for(cfg)}, torch threads: {torch.get_num_threads()}")
    progress = not args.no_progress
    if args.nproc > 1 or distributed.under_torchrun():
        if args.compare:
            raise UsageError("--compare runs in one process; drop --nproc")
        try:
            if distributed.under_torchrun():
                world = int(os.environ["WORLD_SIZE"])
                train.check_batch(cfg.batch_size, world)
                result = train.train_worker(int(os.environ["RANK"]), world, None, data, cfg)
            else:
                result = train.launch(args.nproc, data, cfg)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if result is None:  # not rank 0 under torchrun: rank 0 reports and saves
            return 0
        summary, state = result
        model = train.make_model(True, cfg.seed, "cpu")
        model.load_state_dict(state)
        histories = [summary["history"] | {"label": f"fused, {summary['processes']} processes"}]
        print(f"test accuracy {summary['test_accuracy']:.4f}, final loss {summary['final_loss']:.4f}, "
              f"{summary['samples_per_s']:,.0f} samples/s with {summary['processes']} processes")
    elif args.compare:
        summary = train.run_compare(data, cfg, progress)
        histories = [summary["history"]["eager"], summary["history"]["fused"]]
        model = None
    else:
        model, summary = train.run_training(data, cfg, fused=True, progress=progress)
        histories = [summary["history"]]
        print(f"test accuracy {summary['test_accuracy']:.4f}, final loss {summary['final_loss']:.4f}, "
              f"{summary['seconds']:.1f} s in all, {summary['samples_per_s']:,.0f} samples/s while training")
    if args.save:
        train.save_state_dict(model, args.save)
        args.written.append(args.save)
        print(f"saved state_dict to {args.save} (loads into fusedlinear.mnist.NeuralNetwork with strict=True)")
    if args.json:
        train.save_json(summary, args.json)
        args.written.append(args.json)
        print(f"wrote {args.json}")
    if args.plot and histories:
        try:
            train.save_plot(histories, args.plot)
        except RuntimeError as exc:
            raise UsageError(str(exc)) from None
        args.written.append(args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_info(args) -> int:
    env = machine_info()
    print(f"fusedlinear {__version__}  (python {env['python']}, {platform.machine()}, {env['cores']} CPUs)")
    print(f"torch {env['torch']}, numpy {env['numpy']}, numba {env['numba']}")
    try:
        import cupy  # optional (the CUDA extra): asked for here only

        print(f"cupy {cupy.__version__}")
    except ImportError:
        print("cupy: not installed (pip install 'fusedlinear[cuda]' for CUDA 12, 'fusedlinear[cuda13]' for CUDA 13)")
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    print("devices:")
    for d in devices:
        name = "CPU" if d == "cpu" else torch.cuda.get_device_name(int(d.split(":")[1]))
        chosen = {dt: _safe_select(d, dt) for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16)}
        print(f"  {d:8s} {name}: " + ", ".join(f"{dtype_name(dt)} -> {b}" for dt, b in chosen.items()))
    print("backends:")
    for name, status in backend.available().items():
        print(f"  {name:6s} {status}")
    forced = os.environ.get(backend.ENV_VAR)
    print(f"forced backend ({backend.ENV_VAR}): {forced or 'none'}")
    try:
        engine = cupy_cuda.engine()
    except ValueError as exc:
        engine = f"error: {exc}"
    print(f"CUDA GEMM engine (FUSEDLINEAR_CUDA_GEMM): {engine}  (vendor: PyTorch's cuBLAS GEMMs + fused element-wise "
          f"kernels; own: fused SIMT GEMM, float32/float64), TF32 matmul: {torch.backends.cuda.matmul.allow_tf32}")
    print("threads:")
    print(f"  torch intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}")
    print(f"  fused CPU kernels: {numba_cpu.threading_report()}, torch.get_num_threads() threads")
    small, large = numba_cpu.blas_functions(1)["library"], numba_cpu.blas_functions()["library"]
    print(f"  BLAS per tile: {small}" if small == large else
          f"  BLAS per tile: {small} below {numba_tiling.CPU_OPENBLAS_MIN_ROWS} rows, {large} from there on")
    print("JIT caches:")
    print(f"  numba: {backend.cpu_kernel_cache() or 'disabled'}"
          f"{' (NUMBA_CACHE_DIR)' if os.environ.get('NUMBA_CACHE_DIR') else ''}")
    print(f"  cupy: {os.environ.get('CUPY_CACHE_DIR', os.path.expanduser('~/.cupy/kernel_cache'))}")
    return 0


def _safe_select(device, dtype) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return backend.select(torch.device(device), dtype)
    except Exception as exc:
        return f"error: {exc}"


def main(argv=None) -> int:
    parser = _Parser(prog="fusedlinear", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    sub.add_parser("info", help="versions, devices, backends, JIT caches, threads")
    bench.add_parser(sub)
    parity_command.add_parser(sub)
    args = parser.parse_args(argv)
    args.written = []  # the files train has finished writing, for the Ctrl-C line
    try:
        _startup.done()  # from here on Ctrl-C is a KeyboardInterrupt, reported below
        _check_environment()
        return {"train": cmd_train, "info": cmd_info}.get(args.command, getattr(args, "func", None))(args)
    except UsageError as exc:
        print(f"fusedlinear {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line and 130 (128 + SIGINT, as a shell reports it), no traceback
        print(f"fusedlinear {args.command}: interrupted (Ctrl-C); {_what_was_saved(args)}", file=sys.stderr)
        return 130


def _what_was_saved(args) -> str:
    """After Ctrl-C: which output files exist whole (train writes each through a temporary file and a
    rename, after training: never half-written) and which were not written."""
    outputs = [getattr(args, name, None) for name in ("save", "json", "plot", "csv")]
    missing = [path for path in outputs if path and path not in args.written]
    if args.written:
        return (f"written before it: {', '.join(args.written)}"
                + (f"; not written: {', '.join(missing)}" if missing else ""))
    if missing:
        return f"nothing saved ({', '.join(missing)} not written: outputs are written only when the run completes)"
    return "nothing to save"


if __name__ == "__main__":
    sys.exit(main())
