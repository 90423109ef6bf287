"""Several Python threads calling forward and backward at once get correct results."""

import threading

import torch

import fusedlinear
from conftest import make_inputs, reference


def test_eight_threads_forward_backward_agree():
    errors, results = [], {}

    def work(i):
        try:
            x, w, b = make_inputs((97 + i,), 64, 33, torch.float64, seed=i)
            w.requires_grad_(True)
            for _ in range(5):
                w.grad = None
                out = fusedlinear.fused_linear(x, w, b, "gelu")
                out.sum().backward()
            wr = w.detach().clone().requires_grad_(True)
            ref = reference(x, wr, b, "gelu")
            ref.sum().backward()
            results[i] = (torch.allclose(out, ref, atol=1e-10), torch.allclose(w.grad, wr.grad, atol=1e-10))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    assert results == {i: (True, True) for i in range(8)}
