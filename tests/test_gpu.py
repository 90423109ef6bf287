"""GPU tests (marker ``gpu``): the CuPy backend on a real CUDA device. Skipped cleanly without
CUDA or without CuPy; benchmarks/gpu_check.sh runs them on a GPU machine."""

import pytest
import torch
from torch import nn

import fusedlinear
from conftest import ACTIVATIONS, TOL, check_against_reference, has_cuda_and_cupy, make_inputs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not has_cuda_and_cupy(), reason="needs a CUDA GPU and CuPy")]

SHAPES = [((1,), 1, 1), ((7,), 13, 5), ((2, 3), 13, 7), ((2, 3, 4), 9, 6), ((129,), 130, 3), ((64,), 784, 512),
          ((300,), 257, 131)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: str(s))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cupy_matches_pytorch_float64(activation, shape, dtype, bias):
    lead, k, n = shape
    x, w, b = make_inputs(lead, k, n, dtype, bias, device="cuda")
    with fusedlinear.use_backend("cupy"):
        check_against_reference(lambda x, w, b: fusedlinear.fused_linear(x, w, b, activation, 0.2),
                                x, w, b, activation, 0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cpu_numba_and_gpu_cupy_agree(activation, dtype):
    x, w, b = make_inputs((97,), 200, 65, dtype, seed=5)
    outs = {}
    for device in ("cpu", "cuda"):
        leaves = [t.to(device).requires_grad_(True) for t in (x, w, b)]
        out = fusedlinear.fused_linear(*leaves, activation, 0.1)
        out.backward(torch.ones_like(out))
        outs[device] = [out.detach().cpu()] + [t.grad.cpu() for t in leaves]
    for got, want in zip(outs["cuda"], outs["cpu"]):
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_non_default_stream_and_transposed_input():
    x, w, b = make_inputs((50,), 40, 30, torch.float32, device="cuda")
    expected = fusedlinear.fused_linear(x, w, b, "gelu")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        xt = x.t().contiguous().t()  # column-major: copied to row-major by the backend
        got = fusedlinear.fused_linear(xt, w, b, "gelu")
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(got, expected)


def test_cuda_graph_capture_of_forward():
    x, w, b = make_inputs((64,), 784, 512, torch.float32, device="cuda")
    static_x = x.clone()
    fusedlinear.fused_linear(static_x, w, b, "relu")  # warm-up: compiles the module outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fusedlinear.fused_linear(static_x, w, b, "relu")
    new_x = torch.randn_like(x)
    static_x.copy_(new_x)
    graph.replay()
    torch.testing.assert_close(static_out, torch.relu(nn.functional.linear(new_x, w, b)), atol=1e-4, rtol=1e-4)


def test_deterministic_repeats():
    torch.use_deterministic_algorithms(True)
    try:
        x, w, b = make_inputs((513,), 300, 257, torch.float32, device="cuda")
        w.requires_grad_(True)
        results = []
        for _ in range(3):
            w.grad = None
            out = fusedlinear.fused_linear(x, w, b, "silu")
            out.sum().backward()
            results.append((out.detach().clone(), w.grad.clone()))
        assert all(torch.equal(r[0], results[0][0]) and torch.equal(r[1], results[0][1]) for r in results)
    finally:
        torch.use_deterministic_algorithms(False)


def test_mnist_model_trains_on_gpu():
    from fusedlinear import mnist, train

    data = mnist.load_bundled()
    cfg = train.TrainConfig(epochs=3, device="cuda")
    model, summary = train.run_training(data, cfg, progress=False)
    assert summary["backend"] == "cupy"
    assert summary["test_accuracy"] > 0.94


def test_fused_sequential_chain_on_gpu_matches_cpu():
    import copy

    torch.manual_seed(0)
    cpu = fusedlinear.fuse(nn.Sequential(nn.Linear(33, 65), nn.ReLU(), nn.Linear(65, 17), nn.GELU(),
                                         nn.Linear(17, 5))).double()
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(19, 33, dtype=torch.float64)
    outs = []
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        out = model(x.to(device))
        out.square().sum().backward()
        outs.append(out.cpu())
    torch.testing.assert_close(outs[1], outs[0], **TOL[torch.float64])
    for p, q in zip(gpu.parameters(), cpu.parameters()):
        torch.testing.assert_close(p.grad.cpu(), q.grad, **TOL[torch.float64])
