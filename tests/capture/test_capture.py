"""Capture: fx first, export fallback, meta device, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autopar
from autopar.examples.gpt import GPT, GPTConfig
from autopar.examples.mlp import MLP_SIZES, build_mlp, example_inputs


def _gpt(**kw):
    return GPT(GPTConfig(n_layer=3, n_embd=64, n_head=4, vocab_size=128, block_size=16, **kw))


def test_fx_path_on_real_weights_leaves_module_untouched():
    torch.manual_seed(0)
    model = _gpt().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = autopar.capture(model, (torch.randint(0, 128, (2, 16)),))
    assert graph.capture_method == "fx"
    assert not model.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert graph.num_params == sum(p.numel() for p in model.parameters())


def test_meta_model_and_inputs_allocate_nothing():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_name("1.3b"))
    graph = autopar.capture(model, (torch.zeros(1, 256, dtype=torch.long, device="meta"),))
    assert graph.num_params == sum(p.numel() for p in model.parameters())
    assert graph.batch_size == 1 and graph.inputs[0].shape == (1, 256)


class DataDependent(nn.Module):
    """Python control flow on a tensor value defeats symbolic tracing; export handles it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        if x.shape[0] > 1:  # shape-dependent: fx fails (Proxy in bool), export specialises
            return self.b(self.a(x))
        return self.a(x)


def test_export_fallback_reports_why():
    graph = autopar.capture(DataDependent(), (torch.randn(4, 8),))
    assert graph.capture_method == "export"
    assert "symbolic_trace failed" in graph.capture_note
    assert graph.summary().matmul_flops == 2 * (2 * 4 * 8 * 8 + 4 * 8)  # two addmm incl. bias adds


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent on values: neither fx nor export without torch.cond
            return self.inner(x)
        return x


def test_untraceable_model_raises_capture_error_with_fix():
    with pytest.raises(autopar.CaptureError) as info:
        autopar.capture(Untraceable(), (torch.randn(2, 8),))
    msg = str(info.value)
    assert "Untraceable" in msg and "symbolic_trace failed" in msg and "torch.export" in msg
    assert "example inputs" in msg and "leaf" in msg  # suggests fixes


def test_bad_example_inputs_raise_capture_error():
    with pytest.raises(autopar.CaptureError, match="example_inputs must be"):
        autopar.capture(build_mlp("tiny"), 3.0)
    with pytest.raises(autopar.CaptureError, match="nn.Module"):
        autopar.capture(lambda x: x, (torch.randn(2),))


def test_wrong_input_shape_names_the_failing_op():
    with pytest.raises(autopar.CaptureError) as info:
        autopar.capture(build_mlp("tiny"), (torch.randn(4, 7),))  # in_features is 32
    assert "0.fc" in str(info.value) or "mat" in str(info.value)


def test_keyword_inputs():
    class KW(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(16, 8)

        def forward(self, input_ids=None, scale=None):
            return self.emb(input_ids)

    graph = autopar.capture(KW(), {"input_ids": torch.zeros(3, 5, dtype=torch.long)})
    assert graph.batch_size == 3 and graph.inputs[0].dtype == "int64"


def test_capture_is_callable_after_submodule_import():
    import autopar.capture.trace  # noqa: F401  (binds the package over the function name)

    graph = autopar.capture(build_mlp("tiny"), example_inputs(MLP_SIZES["tiny"]))
    assert graph.summary().num_layers == 3


def test_saved_tensors_follow_gpu_kernels():
    """SDPA keeps no s×s tensor (fused kernel); dropout keeps a 1-byte mask."""
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=1, n_embd=64, n_head=4, vocab_size=128, block_size=32, dropout=0.1))
    graph = autopar.capture(model, (torch.zeros(2, 32, dtype=torch.long),))
    block = graph.layers[1]
    shapes = [s.meta.shape for s in block.saved]
    assert not any(len(sh) >= 2 and sh[-1] == 32 and sh[-2] == 32 for sh in shapes)
    masks = [s for s in block.saved if s.meta.dtype == "bool"]
    assert len(masks) == 2 and all(m.meta.shape == (2, 32, 64) for m in masks)
    assert any(op.target == "aten._scaled_dot_product_efficient_attention.default" for op in block.ops)


def test_functional_dropout_by_keyword_is_captured():
    """fx passes ``F.dropout``'s ``training`` by keyword (it failed: the capture's dropout took ``train``); it is
    captured as a dropout with its mask."""
    import torch.nn.functional as F

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # on a value with a gradient, so its mask is saved
            return self.fc2(F.dropout(self.fc1(x), p=0.1, training=self.training))

    with torch.device("meta"):
        net = Net()
    masks = [s for layer in autopar.capture(net, (torch.zeros(4, 16),)).layers for s in layer.saved
             if s.meta.dtype == "bool"]
    assert [m.meta.shape for m in masks] == [(4, 16)]


def test_tied_weights_counted_once():
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=4, vocab_size=64, block_size=8, tie_weights=True))
    graph = autopar.capture(model, (torch.zeros(1, 8, dtype=torch.long),))
    assert graph.num_params == sum(p.numel() for p in model.parameters())
    assert graph.tied_params == (("lm_head.weight", "tok_emb.weight"),)
