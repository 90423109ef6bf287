"""Failures a hostile user found in the merged work (session of 2026-12-05), each a strict xfail:
the coordinator fixes the code and removes the mark. Every test compares with plain PyTorch (or
with what the docs promise) and fails today."""

import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedlinear


# ---- 1. wrong value: fuse(example_inputs=...) reads only the model's current mode ------------


class _ModeDependent(nn.Module):
    """fx cannot trace it (a branch on x.dim()), Dynamo can; its activation runs only in eval mode."""

    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)

    def forward(self, x):
        if x.dim() > 5:
            x = x * 2
        h = self.fc(x)
        return self.out(h if self.training else self.act(h))


def test_dynamo_capture_fused_in_eval_stays_exact_in_train():
    torch.manual_seed(0)
    model = _ModeDependent().double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    fused = fusedlinear.fuse(model, example_inputs=(x,))
    model.train(), fused.train()
    torch.testing.assert_close(fused(x), model(x), atol=1e-12, rtol=1e-12)


class _ShapeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)

    def forward(self, x):
        if x.shape[0] > 3:
            return self.out(self.act(self.fc(x)))
        return self.out(self.fc(x))  # the same Linear, no activation


def test_dynamo_capture_branch_not_taken_keeps_values():
    torch.manual_seed(0)
    model = _ShapeBranch().double()
    fused = fusedlinear.fuse(model, example_inputs=(torch.ones(5, 4, dtype=torch.float64),))
    x = -torch.ones(3, 4, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), atol=1e-12, rtol=1e-12)


# ---- 2. wrong value: the recogniser probes only 1-D and 2-D tensors ----------------------------


class _DimDependent(nn.Module):
    def forward(self, x):
        return F.gelu(x) if x.dim() < 3 else F.relu(x)


def test_recogniser_does_not_accept_a_rank_dependent_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), _DimDependent(), nn.Linear(16, 4)).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    fused = fusedlinear.fuse(model)
    torch.testing.assert_close(fused(x), model(x), atol=1e-12, rtol=1e-12)


# ---- 3. wrong value: the torch backend's quick_gelu g' overflows in float32 ------------------


def test_torch_backend_quick_gelu_grad_at_float32_max():
    z = torch.tensor([[3.4e38]], dtype=torch.float32)
    x = z.clone().requires_grad_()
    w = torch.ones(1, 1)
    with fusedlinear.use_backend("torch"):
        fusedlinear.fused_linear(x, w, None, "quick_gelu").sum().backward()
    xr = z.clone().requires_grad_()
    (xr * torch.sigmoid(1.702 * xr)).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)


# ---- 4. crash: meta tensors ------------------------------------------------------------------


def test_fused_linear_on_meta_tensors():
    x, w = torch.randn(2, 4, device="meta"), torch.randn(5, 4, device="meta")
    assert fusedlinear.fused_linear(x, w, None, "relu").shape == F.linear(x, w).shape
    layer = fusedlinear.FusedLinearMish(4, 5, device="meta")
    assert layer(x).shape == (2, 5)


@pytest.mark.parametrize("activation", ["relu", "gelu", "leaky_relu"])
def test_meta_tensors_behave_as_f_linear_does(activation):
    """Shapes, dtype, device and gradients' shapes as F.linear + activation give them on meta
    (accelerate's init_empty_weights, torch.device('meta')), for fused_linear, fused_chain, modules."""
    w1, b1 = torch.randn(5, 4, device="meta", requires_grad=True), torch.randn(5, device="meta", requires_grad=True)
    w2 = torch.randn(3, 5, device="meta", dtype=torch.float32, requires_grad=True)
    x = torch.randn(2, 7, 4, device="meta", requires_grad=True)
    ref = F.linear(F.relu(F.linear(x, w1, b1)), w2)
    for out in (fusedlinear.fused_linear(fusedlinear.fused_linear(x, w1, b1, activation), w2, None, "identity"),
                fusedlinear.fused_chain(x, [(w1, b1, activation, 0.01), (w2, None, "identity", 0.0)])):
        assert (out.shape, out.dtype, out.device) == (ref.shape, ref.dtype, ref.device)
        out.sum().backward()
        assert x.grad.shape == x.shape and w1.grad.shape == w1.shape and b1.grad.shape == b1.shape
        assert x.grad.device.type == "meta"
    y = fusedlinear.fused_linear(x.double(), w1.double(), None, activation)
    assert y.dtype == torch.float64 and y.shape == (2, 7, 5)


def test_module_built_on_meta_then_to_empty_computes_like_linear():
    torch.manual_seed(0)
    with torch.device("meta"):
        layer = fusedlinear.FusedLinearReLU(4, 5)
        seq = fusedlinear.fuse(nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3)))
    x = torch.randn(3, 4, device="meta")
    assert layer(x).shape == (3, 5) and seq(x).shape == (3, 3)
    layer.to_empty(device="cpu")
    with torch.no_grad():
        layer.weight.copy_(torch.randn(5, 4)), layer.bias.copy_(torch.randn(5))
    xc = torch.randn(3, 4)
    torch.testing.assert_close(layer(xc), F.relu(F.linear(xc, layer.weight, layer.bias)))


# ---- 5. destructive: the CLI's atomic writes replace links, devices and modes -----------------


# Fixed: report.py atomic_write os.replace()d the path itself: a symlink (or /dev/stdout, a FIFO, a
# device: 'train --json /dev/full' replaced the device node as root and said 'wrote') became a
# regular file and its target was never written.
def test_save_json_through_a_symlink_writes_the_target(tmp_path):
    from fusedlinear.train import save_json

    target = tmp_path / "target.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    save_json({"a": 1}, str(link))
    assert link.is_symlink(), "the symlink was replaced by a regular file"
    assert '"a": 1' in target.read_text()


def test_save_json_into_a_fifo_writes_through_it(tmp_path):
    import threading

    from fusedlinear.train import save_json

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    save_json({"a": 1}, str(fifo))
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode), "the FIFO was replaced by a regular file"
    assert got and b'"a": 1' in got[0]


def test_save_json_to_dev_null_and_through_a_link_to_it(tmp_path):
    from fusedlinear.train import save_json

    before = os.stat("/dev/null")
    save_json({"a": 1}, "/dev/null")
    link = tmp_path / "null"
    link.symlink_to("/dev/null")
    save_json({"a": 1}, str(link))
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_ino == before.st_ino and link.is_symlink()
    assert not list(tmp_path.glob(".tmp-*"))


def test_atomic_write_refuses_a_directory(tmp_path):
    from fusedlinear.report import atomic_write

    with pytest.raises(IsADirectoryError, match="name a file inside it"):
        atomic_write(str(tmp_path), lambda f: f.write(b"x"))


# Fixed: atomic_write used mkstemp's mode 0600: --save/--json/--plot files were unreadable to
# group/others, unlike torch.save/open() under the umask.
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_saved_files_follow_the_umask(tmp_path, umask, mode):
    from fusedlinear.train import save_json

    old = os.umask(umask)
    try:
        save_json({"a": 1}, str(tmp_path / "s.json"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "s.json").st_mode) == mode


def test_saving_over_a_file_keeps_its_mode(tmp_path):
    from fusedlinear.train import save_json

    path = tmp_path / "s.json"
    path.write_text("old")
    path.chmod(0o640)
    save_json({"a": 1}, str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640 and '"a": 1' in path.read_text()


# ---- 6. crash (SIGILL elsewhere): native kernels are built for this CPU, keyed by no CPU ------


def _avx512_host() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512f" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not (_avx512_host() and shutil.which("objdump") and shutil.which("cc")),
                    reason="needs an AVX-512 host, objdump and a C compiler")
def test_native_kernels_respect_numba_cpu_name(tmp_path):
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path))
    code = ("import warnings; warnings.simplefilter('ignore')\n"
            "from fusedlinear import backend\n"
            "backend.prepare_cpu_kernels(['relu'], 'float64')\n")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, timeout=300)
    objects = list((tmp_path / "fusedlinear-cpu").glob("*.so"))
    assert objects, "no native kernel was built"
    for so in objects:
        text = subprocess.run(["objdump", "-d", str(so)], capture_output=True, text=True, check=True).stdout
        assert "zmm" not in text and "%k1" not in text, f"{so.name} holds AVX-512 instructions"


# ---- 7. wrong value: an activation module swapped for an identity is also called elsewhere ----


class _ActUsedByAnotherMethod(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(4, 4), nn.GELU()

    def forward(self, x):
        return self.act(self.fc(x))

    def extra(self, x):  # a public method forward does not call
        return self.act(x)


def test_activation_module_called_from_another_method_keeps_values():
    torch.manual_seed(0)
    model = _ActUsedByAnotherMethod().double()
    fused = fusedlinear.fuse(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(fused.extra(x), model.extra(x), atol=1e-12, rtol=1e-12)


class _NumelDependent(nn.Module):
    def forward(self, x):
        return F.relu(x) if x.numel() > 1000 else torch.tanh(x)


def test_recogniser_does_not_accept_a_numel_dependent_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), _NumelDependent(), nn.Linear(16, 4)).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    fused = fusedlinear.fuse(model)
    torch.testing.assert_close(fused(x), model(x), atol=1e-12, rtol=1e-12)


# ---- fuse's TorchDynamo path: errors in the example call, a forward whose first parameter is not `self`


class _Straight(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2)

    def forward(me, x, *rest):  # noqa: N805 - the first parameter need not be called self
        if x.dim() > 5:
            x = x * 2
        h = me.fc(x)
        h = me.act(h)
        return me.out(h)


def test_dynamo_capture_fuses_a_straight_call_whatever_self_is_called():
    torch.manual_seed(0)
    model = _Straight().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    fused, report = fusedlinear.fuse(model, report=True, example_inputs=(x,))
    assert [(p.linear, p.activation) for p in report.fused] == [("fc", "gelu")], str(report)
    for mode in (True, False):
        model.train(mode), fused.train(mode)
        torch.testing.assert_close(fused(x), model(x), atol=1e-12, rtol=1e-12)


def test_dynamo_capture_says_when_the_example_call_fails():
    model = _Straight().double()
    with pytest.raises(ValueError, match="calling the model on example_inputs raised RuntimeError"):
        fusedlinear.fuse(model, example_inputs=(torch.randn(5, 3, dtype=torch.float64),))


class _LinearUsedByAnotherMethod(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act = nn.Linear(4, 4), nn.GELU()
        nn.init.zeros_(self.fc.bias)  # __init__ runs before fuse: fine

    def forward(self, x):
        return self.act(self.fc(x))

    def extra(self, x):  # would get the fused layer's activation too
        return self.fc(x)

    def width(self):  # reading an attribute is fine
        return self.fc.out_features


def test_linear_called_from_another_method_is_left_alone():
    torch.manual_seed(0)
    model = _LinearUsedByAnotherMethod().double()
    fused, report = fusedlinear.fuse(model, report=True)
    assert "extra also uses self.fc" in dict(report.left_alone)["fc"], str(report)
    x = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(fused.extra(x), model.extra(x), atol=1e-12, rtol=1e-12)
