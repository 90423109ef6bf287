"""fuse() on Hugging Face models built from tiny configs with random weights (no download): the
pairs fused in each, output and every gradient in float64 against the unfused model, state_dict
keys unchanged, unfuse gives the model back; and the recogniser on every class of ACT2CLS."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub

import sys

import pytest
import torch
from torch import nn

import fusedlinear
from fusedlinear.torch_ext.fuse.recognise import Refused, recognise



def _import_transformers():
    """transformers imports Hugging Face's ``kernels`` package; with the repository root on sys.path
    (``python -m pytest`` from it, as tests/mutation/run.py does) this project's ``kernels/`` folder
    would shadow it. Import the installed one first, without the root, so transformers finds it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    try:
        if "kernels" not in sys.modules:
            try:
                import kernels  # noqa: F401
            except ImportError:
                pass
        return pytest.importorskip("transformers")
    finally:
        sys.path[:] = saved


transformers = _import_transformers()
from transformers.activations import ACT2CLS, ACT2FN  # noqa: E402

# float64 through every layer: the fused kernels and PyTorch differ in summation order only
# (K <= 64 terms of size O(1): ~1e-15 per layer), and two layers of attention and norms do not
# amplify that beyond 1e-12; 1e-9 leaves a wide margin and still fails any wrong activation.
TOL = dict(atol=1e-9, rtol=1e-9)
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=64)


def _ids(*shape):
    return torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(1))


def _t5(**kw):
    return transformers.T5Model(transformers.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                                      vocab_size=64, **kw))


# name: (model builder, inputs, {activation: pairs fused}, paths the pairs are fused by)
MODELS = {
    "bert": (lambda: transformers.BertModel(transformers.BertConfig(**SMALL)),
             lambda: dict(input_ids=_ids(2, 5)), {"gelu": 2, "tanh": 1}),
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(**SMALL, image_size=8, patch_size=4)),
            lambda: dict(pixel_values=torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))),
            {"gelu": 2, "tanh": 1}),
    "llama": (lambda: transformers.LlamaModel(transformers.LlamaConfig(**SMALL, num_key_value_heads=1)),
              lambda: dict(input_ids=_ids(2, 5)), {"silu": 2}),
    "t5-relu": (lambda: _t5(), lambda: dict(input_ids=_ids(2, 5), decoder_input_ids=_ids(2, 3)), {"relu": 4}),
    "t5-gated-gelu": (lambda: _t5(feed_forward_proj="gated-gelu"),
                      lambda: dict(input_ids=_ids(2, 5), decoder_input_ids=_ids(2, 3)), {"gelu_tanh": 4}),
    "opt": (lambda: transformers.OPTModel(transformers.OPTConfig(hidden_size=32, num_hidden_layers=2,
                                                                 num_attention_heads=2, ffn_dim=64, vocab_size=64,
                                                                 word_embed_proj_dim=32)),
            lambda: dict(input_ids=_ids(2, 5)), {"relu": 2}),
    "bart": (lambda: transformers.BartModel(transformers.BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64)),
             lambda: dict(input_ids=_ids(2, 5), decoder_input_ids=_ids(2, 3)), {"gelu": 4}),
    "whisper": (lambda: transformers.WhisperModel(transformers.WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64, num_mel_bins=8, max_source_positions=8,
        max_target_positions=16, pad_token_id=1, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)),
                lambda: dict(input_features=torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(5)),
                             decoder_input_ids=_ids(2, 3)), {"gelu": 4}),
    "clip-text": (lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**SMALL)),  # quick_gelu default
                  lambda: dict(input_ids=_ids(2, 5)), {"quick_gelu": 2}),
    "mistral": (lambda: transformers.MistralModel(transformers.MistralConfig(**SMALL, num_key_value_heads=1)),
                lambda: dict(input_ids=_ids(2, 5)), {"silu": 2}),
    "gpt-neox": (lambda: transformers.GPTNeoXModel(transformers.GPTNeoXConfig(**SMALL)),
                 lambda: dict(input_ids=_ids(2, 5)), {"gelu": 2}),
    "distilbert": (lambda: transformers.DistilBertModel(transformers.DistilBertConfig(
        dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=64)), lambda: dict(input_ids=_ids(2, 5)),
        {}),  # FFN.ff_chunk, a method of its own, calls lin1: a direct call of it would see the fused layer
}


def _output(model, inputs):
    out = model(**inputs)
    return out.last_hidden_state


@pytest.mark.parametrize("name", list(MODELS))
def test_fuses_hugging_face_model_exactly(name):
    build, make_inputs, want = MODELS[name]
    torch.manual_seed(0)
    model = build().double().eval()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in make_inputs().items()}
    fused, report = fusedlinear.fuse(model, report=True, example_inputs=inputs)

    counts = {}
    for pair in report.fused:
        counts[pair.activation] = counts.get(pair.activation, 0) + 1
    assert counts == want, str(report)
    if name == "distilbert":
        assert "FFN.ff_chunk also uses self.lin1" in dict(report.left_alone)["transformer.layer.0.ffn.lin1"]
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert len(report.fused) + len(report.left_alone) == linears, "every nn.Linear is fused or explained"
    assert all(reason for _, reason in report.left_alone)
    assert list(fused.state_dict()) == list(model.state_dict())

    ref = _output(model, inputs)
    got = _output(fused, inputs)
    torch.testing.assert_close(got, ref, **TOL)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref.backward(grad)
    got.backward(grad)
    fused_params = dict(fused.named_parameters())
    for key, p in model.named_parameters():
        q = fused_params[key]
        if p.grad is None:
            assert q.grad is None or not q.grad.any(), key
            continue
        torch.testing.assert_close(q.grad, p.grad, **TOL, msg=lambda m: f"{key}: {m}")

    back = fusedlinear.unfuse(fused)
    assert not any(isinstance(m, (fusedlinear.FusedLinear, fusedlinear.FusedActivation)) for m in back.modules())
    assert list(back.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(_output(back, inputs), ref.detach(), **TOL)


# ACT2CLS entry -> the table entry it computes, or None: refused (and why, in the test).
EXPECTED = {
    "gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh", "gelu_accurate": "gelu_tanh", "gelu_fast": "gelu_fast",
    "quick_gelu": "quick_gelu", "hardswish": "hardswish", "leaky_relu": "leaky_relu", "linear": "identity",
    "mish": "mish", "relu": "relu", "relu2": "relu2", "relu6": "relu6", "sigmoid": "sigmoid", "silu": "silu",
    "swish": "silu", "tanh": "tanh",
    # refused: clipped at ±10 (not gelu beyond), Laplace's erf CDF and sqrt(softplus) are no entry;
    # PReLU and xIELU learn their parameters
    "gelu_10": None, "laplace": None, "sqrtsoftplus": None, "prelu": None, "xielu": None,
}


@pytest.mark.parametrize("key", list(ACT2CLS))
def test_recogniser_on_every_act2cls_class(key):
    module = ACT2FN[key]
    want = EXPECTED.get(key, "not listed")
    assert want != "not listed", f"ACT2CLS has a new entry {key!r}: add what it computes to EXPECTED"
    if want is None:
        with pytest.raises(Refused) as refused:
            recognise(module)
        assert str(refused.value)
    else:
        assert recognise(module)[0] == want








def test_refused_activation_is_reported_with_the_reason():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), ACT2FN["gelu_10"]

        def forward(self, x):
            return self.act(self.fc(x))

    _, report = fusedlinear.fuse(MLP(), report=True)
    (path, reason), = report.left_alone
    assert path == "fc" and "not taken for an activation" in reason and "nearest: gelu" in reason






