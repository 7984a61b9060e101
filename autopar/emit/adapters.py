"""Model-family knowledge the emitter needs, and nothing else.

A plan names layers by module path (``blocks.3``, ``model.layers.3``). To cut a
real module into pipeline stages the emitter must also know which top-level
modules run before the repeated blocks (embeddings), which run after them (final
norm, head), and how a stage without some of them is called. That is what an
adapter says; every parallelization rule in ``tp.py``/``dp.py``/``ac.py`` stays
generic.

Two families are supported:

- ``gpt``: ``autopar.examples.gpt.GPT`` and anything shaped like it (``tok_emb``,
  ``pos_emb``, ``drop``, ``blocks``, ``ln_f``, ``lm_head``). The model itself runs a
  stage when its embeddings or head are ``None``, like torchtitan's per-stage
  model copies.
- ``hf-causal-lm``: Hugging Face decoder-only ``*ForCausalLM`` models laid out like
  Llama (``model.embed_tokens``, ``model.layers``, ``model.norm``,
  ``model.rotary_emb``, ``lm_head``). They run through ``CausalLMStage``, whose
  forward returns the logits tensor and whose parameter names equal the
  original model's, so checkpoints move between plans.

Stages keep the original module paths: pruned blocks leave holes in the block
list (``blocks.2``, ``blocks.3`` stay ``blocks.2``, ``blocks.3``), so state-dict
keys are the same under every plan.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autopar._compat import StrEnum
from autopar.errors import UserInputError


class ModelFamily(StrEnum):
    """Model families the emitter can cut into stages."""

    GPT = "gpt"
    HF_CAUSAL_LM = "hf-causal-lm"


@dataclass(frozen=True, slots=True, kw_only=True)
class StageCut:
    """Which parts of the model one pipeline stage keeps."""

    blocks: tuple[str, ...]
    """Module paths of the repeated blocks the stage runs, in order."""
    has_pre: bool
    """Whether the stage runs the modules before the blocks (embeddings)."""
    has_post: bool
    """Whether the stage runs the modules after the blocks (final norm, head)."""


class ModelAdapter(ABC):
    """What the emitter must know about one model family."""

    family: ModelFamily
    """The family this adapter handles."""
    pre_paths: tuple[str, ...]
    """Module paths that run before the first block."""
    post_paths: tuple[str, ...]
    """Module paths that run after the last block."""

    @abstractmethod
    def block_container(self, model: nn.Module) -> str:
        """Module path of the list of repeated blocks."""

    def block_paths(self, model: nn.Module) -> tuple[str, ...]:
        """Module paths of the repeated blocks, in execution order."""
        container = self.block_container(model)
        blocks = model.get_submodule(container)
        return tuple(f"{container}.{name}" for name, _ in blocks.named_children())

    @abstractmethod
    def build_stage(self, model: nn.Module, cut: StageCut, *, seq_shards: int) -> nn.Module:
        """A copy of ``model`` that runs only the layers of ``cut``; ``model`` is not changed.

        Args:
            model: The full model (on the meta device, or real).
            cut: What the stage keeps.
            seq_shards: Factor by which the hidden states between stages are cut
                along the sequence (the TP size under sequence parallelism, else 1).
        """

    @abstractmethod
    def sizes(self, model: nn.Module) -> tuple[int, int]:
        """(hidden size, vocabulary size)."""

    @abstractmethod
    def init_weights(self, stage: nn.Module) -> None:
        """Initialise a materialised stage in place (under the caller's RNG seed)."""

    def output_sequence_dim(self, path: str) -> int:
        """Sequence dimension of the output of the pre-block module at ``path`` (for sequence parallelism)."""
        return 1

    def hidden_kwarg(self, module: nn.Module) -> str | None:
        """Keyword under which a block passes hidden states to ``module``; None if positional."""
        return None

    def region(self, model: nn.Module, path: str) -> str:
        """``"block"``, ``"pre"`` or ``"post"``: where the module at ``path`` runs."""
        container = self.block_container(model) + "."
        if path.startswith(container):
            return "block"
        if any(_is_under(path, p) for p in self.pre_paths):
            return "pre"
        if any(_is_under(path, p) for p in self.post_paths):
            return "post"
        raise UserInputError(f"module {path!r} is neither a block nor a known embedding/head module")

    def boundary_meta(
        self, model: nn.Module, cut: StageCut, *, micro_batch_size: int, seq_len: int,
        seq_shards: int, dtype: torch.dtype, token_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Meta tensors shaped like one micro-batch's input and output of the stage.

        Hidden states between stages are (micro_batch, seq / seq_shards, hidden); the
        first stage takes token ids (micro_batch, seq); the last returns logits
        (micro_batch, seq, vocab).
        """
        hidden, vocab = self.sizes(model)
        shard_len = seq_len // seq_shards
        if cut.has_pre:
            x = torch.empty(micro_batch_size, seq_len, dtype=token_dtype, device="meta")
        else:
            x = torch.empty(micro_batch_size, shard_len, hidden, dtype=dtype, device="meta").requires_grad_()
        out_shape = (micro_batch_size, seq_len, vocab) if cut.has_post else (micro_batch_size, shard_len, hidden)
        y = torch.empty(*out_shape, dtype=dtype, device="meta").requires_grad_()
        return x, y


def _is_under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def copy_without(model: nn.Module, dropped: Iterable[nn.Module]) -> nn.Module:
    """Deep copy of ``model`` in which the ``dropped`` submodules become ``None``.

    Dropped modules are never copied (the deepcopy memo maps them to None), so
    cutting a stage from a real model costs the memory of the stage only. Holes
    left in ``nn.ModuleList``/``nn.ModuleDict`` containers are removed without
    renumbering the rest.

    Example:
        >>> blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(4))
        >>> [name for name, _ in copy_without(blocks, [blocks[0], blocks[2]]).named_children()]
        ['1', '3']
    """
    memo: dict[int, Any] = {id(m): None for m in dropped}
    clone = copy.deepcopy(model, memo)
    for module in clone.modules():
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            for name in [n for n, m in module._modules.items() if m is None]:
                del module._modules[name]
    return clone


class GPTAdapter(ModelAdapter):
    """``autopar.examples.gpt.GPT``: embeddings, ``blocks``, ``ln_f`` + ``lm_head``."""

    family = ModelFamily.GPT
    pre_paths = ("tok_emb", "pos_emb", "drop")
    post_paths = ("ln_f", "lm_head")

    def block_container(self, model: nn.Module) -> str:
        """``blocks``."""
        return "blocks"

    def build_stage(self, model: nn.Module, cut: StageCut, *, seq_shards: int) -> nn.Module:
        """The GPT itself with the other stages' blocks deleted and embeddings/head set to None."""
        dropped = [model.get_submodule(p) for p in self.block_paths(model) if p not in cut.blocks]
        if not cut.has_pre:
            dropped += [model.tok_emb, model.pos_emb]
        if not cut.has_post:
            dropped += [model.ln_f, model.lm_head]
        return copy_without(model, dropped)

    def sizes(self, model: nn.Module) -> tuple[int, int]:
        """(n_embd, vocab_size) from the config."""
        return int(model.config.n_embd), int(model.config.vocab_size)

    def init_weights(self, stage: nn.Module) -> None:
        """GPT's own ``init_weights`` (GPT-2 initialisation)."""
        stage.init_weights()

    def output_sequence_dim(self, path: str) -> int:
        """1, except ``pos_emb``: it looks up arange(T), so its output is (T, C), broadcast over the batch."""
        return 0 if path == "pos_emb" else 1


class CausalLMStage(nn.Module):
    """One pipeline stage of a Hugging Face Llama-style causal LM; returns logits or hidden states.

    Its children are the original model's (``model``, ``lm_head``), so parameter
    names match ``LlamaForCausalLM``'s. The forward is LlamaModel's, split at the
    stage's edges: token ids in when it holds the embeddings, hidden states
    otherwise; rotary embeddings and the causal mask are rebuilt on every stage.
    """

    def __init__(self, inner: nn.Module, lm_head: nn.Module | None, *, seq_shards: int) -> None:
        super().__init__()
        self.model = inner
        self.lm_head = lm_head
        self.seq_shards = seq_shards

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) or hidden states (B, T', C) in; logits (B, T, V) or hidden states out."""
        from transformers.masking_utils import create_causal_mask

        inner = self.model
        if inner.embed_tokens is not None:
            seq_len = x.shape[1]
            h = inner.embed_tokens(x)  # (B, T, C), or (B, T/tp, C) under sequence parallelism
        else:
            seq_len = x.shape[1] * self.seq_shards  # x: hidden states, maybe a sequence shard
            h = x
        batch = h.shape[0]
        position_ids = torch.arange(seq_len, device=h.device).unsqueeze(0)
        shape_probe = h.new_empty(batch, seq_len, 0)  # only its shape/dtype/device are read
        mask = create_causal_mask(
            config=inner.config, inputs_embeds=shape_probe, attention_mask=None,
            past_key_values=None, position_ids=position_ids,
        )
        rotary = inner.rotary_emb(shape_probe, position_ids=position_ids)
        for layer in inner.layers:
            h = layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary)
        if inner.norm is not None:
            h = inner.norm(h)
        if self.lm_head is not None:
            h = self.lm_head(h)
        return h


class HFCausalLMAdapter(ModelAdapter):
    """Hugging Face ``*ForCausalLM`` with a Llama layout."""

    family = ModelFamily.HF_CAUSAL_LM
    pre_paths = ("model.embed_tokens", "model.rotary_emb")
    post_paths = ("model.norm", "lm_head")

    def block_container(self, model: nn.Module) -> str:
        """``model.layers``."""
        return "model.layers"

    def build_stage(self, model: nn.Module, cut: StageCut, *, seq_shards: int) -> nn.Module:
        """A ``CausalLMStage`` over a copy of the model without the other stages' layers."""
        dropped = [model.get_submodule(p) for p in self.block_paths(model) if p not in cut.blocks]
        if not cut.has_pre:
            dropped.append(model.model.embed_tokens)
        if not cut.has_post:
            dropped += [model.model.norm, model.lm_head]
        clone = copy_without(model, dropped)
        return CausalLMStage(clone.model, clone.lm_head, seq_shards=seq_shards)

    def sizes(self, model: nn.Module) -> tuple[int, int]:
        """(hidden_size, vocab_size) from the config."""
        return int(model.config.hidden_size), int(model.config.vocab_size)

    def init_weights(self, stage: nn.Module) -> None:
        """``PreTrainedModel._init_weights`` on every module (it also recomputes rotary ``inv_freq``)."""
        init_module = stage.model._init_weights  # PreTrainedModel's per-module initialiser
        for module in stage.modules():
            init_module(module)

    def hidden_kwarg(self, module: nn.Module) -> str | None:
        """``hidden_states`` for attention (HF decoder layers call ``self_attn(hidden_states=...)``), else None."""
        return "hidden_states" if "Attention" in type(module).__name__ else None


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s family.

    Raises:
        UserInputError: The model matches no supported family.
    """
    if all(hasattr(model, n) for n in ("tok_emb", "pos_emb", "blocks", "ln_f", "lm_head")):
        return GPTAdapter()
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(model, "lm_head") and all(
        hasattr(inner, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb")
    ):
        return HFCausalLMAdapter()
    raise UserInputError(
        f"autopar.parallelize does not know how to split {type(model).__name__} into pipeline stages "
        f"and tensor-parallel regions; supported: autopar.examples.gpt.GPT-shaped models and Hugging "
        f"Face Llama-shaped *ForCausalLM models (model.embed_tokens, model.layers, model.norm, lm_head)"
    )
