"""Model specs: bundled families, Hugging Face configs, user files, and the errors for each."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autopar.errors import UserInputError
from autopar.models import LLAMA_SHAPES, resolve_model


def test_bundled_models_are_on_meta() -> None:
    gpt = resolve_model("gpt:tiny", seq_len=32, batch=2)
    assert gpt.name == "gpt:tiny" and gpt.seq_len == 32
    assert gpt.example_inputs[0].shape == (2, 32) and gpt.example_inputs[0].device.type == "meta"
    assert all(p.device.type == "meta" for p in gpt.module.parameters())
    assert resolve_model("gpt:tiny", seq_len=None).seq_len == 64  # the config's block size
    assert resolve_model("gpt:tiny", seq_len=128).module.config.block_size == 128  # longer than the default
    mlp = resolve_model("mlp:tiny", seq_len=None, batch=4)
    assert mlp.seq_len == 1 and mlp.example_inputs[0].shape == (4, 32)


def test_llama_shapes() -> None:
    llama = resolve_model("llama:tiny", seq_len=16)
    assert llama.example_inputs["input_ids"].shape == (1, 16)
    cfg = llama.module.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (64, 2, 2)
    big = LLAMA_SHAPES["405b"]
    assert (big.hidden, big.layers, big.heads, big.kv_heads, big.ffn_hidden) == (16384, 126, 128, 8, 53248)
    assert resolve_model("llama:tiny", seq_len=None).seq_len == 8192


def test_hf_config_file(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=100, max_position_embeddings=512).save_pretrained(tmp_path)
    model = resolve_model(f"hf:{tmp_path / 'config.json'}", seq_len=None)
    assert type(model.module).__name__ == "LlamaForCausalLM" and model.seq_len == 512  # capped by the config
    assert next(model.module.parameters()).device.type == "meta"
    with pytest.raises(UserInputError, match="does not exist"):
        resolve_model(f"hf:{tmp_path / 'nope.json'}", seq_len=None)


def test_user_file_factory(tmp_path: Path) -> None:
    path = tmp_path / "mine.py"
    path.write_text(
        "import torch\n"
        "def build(batch_size, seq_len=8):\n"
        "    return torch.nn.Embedding(10, 4), torch.zeros(batch_size, seq_len, dtype=torch.long)\n"
        "def only_module():\n"
        "    return torch.nn.Linear(2, 2)\n"
    )
    model = resolve_model(f"{path}:build", seq_len=12, batch=3)
    assert model.seq_len == 12 and model.example_inputs[0].shape == (3, 12)
    assert model.example_inputs[0].device.type == "meta"  # built under torch.device("meta")
    assert resolve_model(f"{path}:build", seq_len=None).seq_len == 8  # read from the inputs
    with pytest.raises(UserInputError, match=r"must return \(module, example_inputs\).*only a module"):
        resolve_model(f"{path}:only_module", seq_len=None)


@pytest.mark.parametrize(("spec", "match"), [
    ("gpt", "needs the form NAME:ARG"),
    ("bert:base", "unknown model 'bert'"),
    ("gpt:huge", "unknown GPT size 'huge'"),
    ("llama:7b", "unknown Llama size '7b'"),
    ("mlp:xl", "unknown MLP size 'xl'"),
    ("/no/such/file.py:build", "does not exist"),
])
def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(UserInputError, match=match):
        resolve_model(spec, seq_len=None)
    assert torch.get_default_device().type == "cpu"  # the meta device context never leaks
