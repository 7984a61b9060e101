"""Turning a model spec from the command line into a module on the meta device.

A spec is one of:

- ``gpt:SIZE`` — ``examples/gpt.py`` at a named size (``GPTConfig.from_name``), e.g. ``gpt:175b``;
- ``mlp:SIZE`` — ``examples/mlp.py`` at a named size, e.g. ``mlp:small``;
- ``llama:SIZE`` — a Llama-3-shaped ``transformers.LlamaForCausalLM`` (``8b``, ``70b``, ``405b``,
  and ``tiny`` for tests);
- ``hf:path/to/config.json`` — a local Hugging Face config (file or folder), built with
  ``AutoModelForCausalLM.from_config`` (nothing is downloaded);
- ``path/to/file.py:factory`` — a user file; ``factory()`` returns ``(module, example_inputs)``.
  It may take keyword arguments ``batch_size`` and/or ``seq_len``, which are passed when present.

Every module is built under ``torch.device("meta")``, so a 405B-parameter model costs no memory.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autopar.errors import UserInputError

BUNDLED: tuple[str, ...] = ("gpt", "mlp", "llama", "hf")
"""Spec prefixes that name a bundled model family rather than a file."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedModel:
    """A model spec made concrete: a module on the meta device and inputs to capture it with."""

    name: str
    """The spec as given, e.g. ``"gpt:175b"``: shown in reports."""
    module: nn.Module
    """The model, parameters on the ``meta`` device."""
    example_inputs: tuple[Any, ...] | Mapping[str, Any]
    """Positional tensors (or keyword tensors for Hugging Face models), batch dimension first."""
    seq_len: int
    """Tokens per sample (1 for models without a sequence dimension)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LlamaShape:
    """The sizes that set a Llama-3-style decoder apart (Dubey et al. 2024, Table 3)."""

    hidden: int
    """Model width."""
    ffn_hidden: int
    """SwiGLU inner width."""
    layers: int
    """Decoder layers."""
    heads: int
    """Query heads."""
    kv_heads: int
    """Key/value heads (grouped-query attention)."""
    vocab: int = 128256
    """Vocabulary size."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head."""


LLAMA_SHAPES: dict[str, LlamaShape] = {
    "tiny": LlamaShape(hidden=64, ffn_hidden=128, layers=2, heads=4, kv_heads=2, vocab=512),
    "1b": LlamaShape(hidden=2048, ffn_hidden=8192, layers=16, heads=32, kv_heads=8, tie_embeddings=True),
    "3b": LlamaShape(hidden=3072, ffn_hidden=8192, layers=28, heads=24, kv_heads=8, tie_embeddings=True),
    "8b": LlamaShape(hidden=4096, ffn_hidden=14336, layers=32, heads=32, kv_heads=8),
    "70b": LlamaShape(hidden=8192, ffn_hidden=28672, layers=80, heads=64, kv_heads=8),
    "405b": LlamaShape(hidden=16384, ffn_hidden=53248, layers=126, heads=128, kv_heads=8),
}
"""Llama 3 / 3.1 / 3.2 shapes (``tiny`` is a two-layer test model)."""

LLAMA_DEFAULT_SEQ_LEN = 8192
"""Llama 3's pre-training sequence length, used when ``--seq`` is not given."""

HF_DEFAULT_SEQ_LEN = 2048
"""Sequence length for ``hf:`` configs when ``--seq`` is not given (capped by the config's maximum)."""


def resolve_model(spec: str, *, seq_len: int | None, batch: int = 1) -> ResolvedModel:
    """Build the model a spec names, on the meta device, with example inputs.

    Args:
        spec: ``gpt:SIZE``, ``mlp:SIZE``, ``llama:SIZE``, ``hf:CONFIG`` or ``FILE.py:FACTORY``.
        seq_len: tokens per sample; None for the model's default.
        batch: batch size of the example inputs.

    Returns:
        The resolved model.

    Raises:
        UserInputError: unknown bundled name or size, a file that does not exist or does not
            import, a factory that is missing, raises, or returns the wrong thing.

    Example:
        >>> m = resolve_model("gpt:tiny", seq_len=16)
        >>> m.seq_len, tuple(m.example_inputs[0].shape), m.example_inputs[0].device.type
        (16, (1, 16), 'meta')
    """
    if batch < 1 or (seq_len is not None and seq_len < 1):
        raise UserInputError(f"batch and sequence length must be positive, got batch={batch}, seq={seq_len}")
    prefix, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise UserInputError(
            f"model spec {spec!r} needs the form NAME:ARG, e.g. gpt:175b, llama:70b, hf:config.json "
            "or path/to/file.py:factory"
        )
    builders: dict[str, Callable[[str, int | None, int], ResolvedModel]] = {
        "gpt": _resolve_gpt,
        "mlp": _resolve_mlp,
        "llama": _resolve_llama,
        "hf": _resolve_hf,
    }
    if prefix in builders:
        return builders[prefix](rest, seq_len, batch)
    file_part, _, factory = spec.rpartition(":")
    if file_part.endswith(".py") or "/" in file_part or "\\" in file_part:
        return _resolve_file(spec, Path(file_part), factory, seq_len, batch)
    raise UserInputError(
        f"unknown model {prefix!r} in {spec!r}: use one of {', '.join(p + ':...' for p in BUNDLED)} "
        "or path/to/file.py:factory"
    )


# ---- bundled families ---------------------------------------------------------------------------


def _resolve_gpt(size: str, seq_len: int | None, batch: int) -> ResolvedModel:
    from autopar.examples.gpt import GPT, GPT_SIZES, GPTConfig

    if size.lower() not in GPT_SIZES:
        raise UserInputError(f"unknown GPT size {size!r}; choose one of {', '.join(GPT_SIZES)}")
    config = GPTConfig.from_name(size)
    if seq_len is not None and seq_len > config.block_size:
        config = GPTConfig.from_name(size, block_size=seq_len)
    seq = seq_len or config.block_size
    with torch.device("meta"):
        module = GPT(config)
        ids = torch.zeros(batch, seq, dtype=torch.long)
    return ResolvedModel(name=f"gpt:{size}", module=module, example_inputs=(ids,), seq_len=seq)


def _resolve_mlp(size: str, seq_len: int | None, batch: int) -> ResolvedModel:
    from autopar.examples.mlp import MLP, MLP_SIZES

    if size not in MLP_SIZES:
        raise UserInputError(f"unknown MLP size {size!r}; choose one of {', '.join(MLP_SIZES)}")
    config = MLP_SIZES[size]
    with torch.device("meta"):
        module = MLP(config)
        x = torch.zeros(batch, config.in_features)
    return ResolvedModel(name=f"mlp:{size}", module=module, example_inputs=(x,), seq_len=1)


def _transformers(spec: str) -> Any:
    """The ``transformers`` package, or a ``UserInputError`` naming the extra that installs it."""
    try:
        import transformers
    except ImportError as e:
        raise UserInputError(f"{spec} models are built with Hugging Face transformers, which is not installed; "
                             f"install it with: pip install 'autopar[hf]'") from e
    return transformers


def _resolve_llama(size: str, seq_len: int | None, batch: int) -> ResolvedModel:
    LlamaConfig = _transformers("llama:").LlamaConfig  # noqa: N806 (a class)

    shape = LLAMA_SHAPES.get(size.lower())
    if shape is None:
        raise UserInputError(f"unknown Llama size {size!r}; choose one of {', '.join(LLAMA_SHAPES)}")
    seq = seq_len or LLAMA_DEFAULT_SEQ_LEN
    config = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn_hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        max_position_embeddings=max(seq, LLAMA_DEFAULT_SEQ_LEN),
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=shape.tie_embeddings,
        use_cache=False,
    )
    return _build_causal_lm(f"llama:{size}", config, seq, batch)


def _resolve_hf(path_text: str, seq_len: int | None, batch: int) -> ResolvedModel:
    AutoConfig = _transformers("hf:").AutoConfig  # noqa: N806 (a class)

    path = Path(path_text)
    if not path.exists():
        raise UserInputError(f"Hugging Face config {path_text!r} does not exist (hf: takes a local config.json)")
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UserInputError(f"cannot read Hugging Face config {path_text!r}: {e}") from e
    max_pos = getattr(config, "max_position_embeddings", None)
    seq = seq_len or min(HF_DEFAULT_SEQ_LEN, max_pos or HF_DEFAULT_SEQ_LEN)
    if hasattr(config, "use_cache"):
        config.use_cache = False
    return _build_causal_lm(f"hf:{path_text}", config, seq, batch)


def _build_causal_lm(name: str, config: Any, seq: int, batch: int) -> ResolvedModel:
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            module = AutoModelForCausalLM.from_config(config)
            ids = torch.zeros(batch, seq, dtype=torch.long)
    except (ValueError, KeyError, TypeError) as e:
        raise UserInputError(f"{name}: transformers cannot build a causal LM from this config: {e}") from e
    return ResolvedModel(name=name, module=module, example_inputs={"input_ids": ids}, seq_len=seq)


# ---- user files ---------------------------------------------------------------------------------


def _resolve_file(spec: str, path: Path, factory_name: str, seq_len: int | None, batch: int) -> ResolvedModel:
    if not path.is_file():
        raise UserInputError(f"model file {str(path)!r} does not exist (from spec {spec!r})")
    module_ns = _import_file(path)
    factory = getattr(module_ns, factory_name, None)
    if not callable(factory):
        available = sorted(n for n, v in vars(module_ns).items() if callable(v) and not n.startswith("_"))
        raise UserInputError(
            f"{path} has no callable {factory_name!r}; callables there: {', '.join(available) or 'none'}"
        )
    kwargs = _factory_kwargs(factory, seq_len, batch)
    try:
        with torch.device("meta"):
            result = factory(**kwargs)
    except Exception as e:  # the user's code: any failure is bad input, reported with its type
        raise UserInputError(f"factory {spec!r} raised {type(e).__name__}: {e}") from e
    module, inputs = _split_factory_result(spec, result)
    return ResolvedModel(name=spec, module=module, example_inputs=inputs, seq_len=_infer_seq_len(inputs, seq_len))


def _import_file(path: Path) -> Any:
    name = f"autopar_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserInputError(f"cannot import {str(path)!r}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's code: report which file and what it raised
        del sys.modules[name]
        raise UserInputError(f"cannot import {str(path)!r}: {type(e).__name__}: {e}") from e
    return module


def _factory_kwargs(factory: Callable[..., Any], seq_len: int | None, batch: int) -> dict[str, int]:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    kwargs: dict[str, int] = {}
    if "batch_size" in params:
        kwargs["batch_size"] = batch
    if "seq_len" in params and seq_len is not None:
        kwargs["seq_len"] = seq_len
    return kwargs


def _split_factory_result(spec: str, result: Any) -> tuple[nn.Module, tuple[Any, ...] | Mapping[str, Any]]:
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        module, inputs = result
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        if isinstance(inputs, (tuple, list)):
            return module, tuple(inputs)
        if isinstance(inputs, Mapping):
            return module, inputs
    got = type(result).__name__
    if isinstance(result, nn.Module):
        got = f"only a module ({got})"
    raise UserInputError(
        f"factory {spec!r} must return (module, example_inputs) with example_inputs a tensor, a tuple "
        f"of tensors or a dict of tensors; it returned {got}"
    )


def _infer_seq_len(inputs: tuple[Any, ...] | Mapping[str, Any], seq_len: int | None) -> int:
    if seq_len is not None:
        return seq_len
    tensors = list(inputs.values()) if isinstance(inputs, Mapping) else list(inputs)
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is not None and first.dim() == 2 and not first.is_floating_point():
        return int(first.shape[1])  # token ids (batch, seq)
    if first is not None and first.dim() == 3:
        return int(first.shape[1])  # hidden states (batch, seq, hidden)
    return 1


__all__ = ["LLAMA_SHAPES", "LlamaShape", "ResolvedModel", "resolve_model"]
