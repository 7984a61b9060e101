"""Tiny Hugging Face models of 32 architectures, built from config (random weights, nothing downloaded).

Each entry gives a builder, example keyword inputs and targets for one batch,
and the loss the tests train with. Sizes are the smallest that keep every
split of the test layouts meaningful: hidden 32, 4 heads (2 key/value heads
where the family has grouped-query attention, 1 for the multi-query ones), 2 blocks per
stack, sequence 8.
Dropout is off (the equivalence tests compare exact numbers); ``dropout=True``
turns on the family's dropout for the dropout tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SEQ = 8
"""Tokens per sample (text), decoder tokens (encoder-decoders)."""
VOCAB = 64
"""Vocabulary size of the text models."""
HIDDEN = 32
LAYERS = 2
HEADS = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class Arch:
    """One architecture of the test matrix."""

    name: str
    """Short name, e.g. ``gpt2``."""
    build: Callable[[bool], nn.Module]
    """``build(dropout)`` → the model, on the current default device."""
    inputs: Callable[[torch.Generator, int], dict[str, torch.Tensor]]
    """``inputs(generator, batch)`` → keyword inputs of one batch."""
    targets: Callable[[torch.Generator, int], torch.Tensor]
    """``targets(generator, batch)`` → the targets of that batch."""
    loss: Callable[[Any, torch.Tensor], torch.Tensor]
    """``loss(model output, targets)`` → mean loss."""


def _tokens(g: torch.Generator, batch: int, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def lm_loss(out: Any, targets: torch.Tensor) -> torch.Tensor:
    """Token cross-entropy on ``out.logits`` (or ``out["logits"]``, or ``out`` itself)."""
    logits = out["logits"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


def _text(g: torch.Generator, batch: int) -> dict[str, torch.Tensor]:
    return {"input_ids": _tokens(g, batch)}


def _text_masked(g: torch.Generator, batch: int) -> dict[str, torch.Tensor]:
    ids = _tokens(g, batch)
    mask = torch.ones_like(ids)
    mask[:, : SEQ // 4] = torch.randint(0, 2, (batch, SEQ // 4), generator=g)  # left padding
    mask[:, -1] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _seq2seq(g: torch.Generator, batch: int) -> dict[str, torch.Tensor]:
    return {"input_ids": _tokens(g, batch), "decoder_input_ids": _tokens(g, batch)}


def _pixels(g: torch.Generator, batch: int) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}


def _audio(g: torch.Generator, batch: int) -> dict[str, torch.Tensor]:
    return {"input_features": torch.randn(batch, 16, 16, generator=g), "decoder_input_ids": _tokens(g, batch)}


def _token_targets(g: torch.Generator, batch: int) -> torch.Tensor:
    return _tokens(g, batch)


def _class_targets(g: torch.Generator, batch: int) -> torch.Tensor:
    return torch.randint(0, 10, (batch,), generator=g)


def _causal(config_name: str, model_name: str, **fields: Any) -> Callable[[bool], nn.Module]:
    def build(dropout: bool) -> nn.Module:
        import transformers

        config = getattr(transformers, config_name)(**fields)
        _set_dropout(config, 0.1 if dropout else 0.0)
        config._attn_implementation = "eager"
        config.use_cache = False
        return getattr(transformers, model_name)(config)

    return build


_DROPOUT_FIELDS = ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout",
                   "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout_rate", "dropout",
                   "activation_dropout", "attention_probs_dropout_prob", "hidden_dropout_prob")


def _set_dropout(config: Any, p: float) -> None:
    for name in _DROPOUT_FIELDS:
        if hasattr(config, name) and isinstance(getattr(config, name), float):
            setattr(config, name, p)


_LLAMA_LIKE = {"hidden_size": HIDDEN, "intermediate_size": 64, "num_hidden_layers": LAYERS,
               "num_attention_heads": HEADS, "num_key_value_heads": 2, "vocab_size": VOCAB,
               "max_position_embeddings": 64}

ARCHS: dict[str, Arch] = {}


def _add(name: str, build: Callable[[bool], nn.Module], inputs: Callable[..., dict[str, torch.Tensor]] = _text,
         targets: Callable[..., torch.Tensor] = _token_targets,
         loss: Callable[[Any, torch.Tensor], torch.Tensor] = lm_loss) -> None:
    ARCHS[name] = Arch(name=name, build=build, inputs=inputs, targets=targets, loss=loss)


_add("gpt2", _causal("GPT2Config", "GPT2LMHeadModel", n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS,
                     vocab_size=VOCAB, n_positions=64, tie_word_embeddings=True))
_add("gptj", _causal("GPTJConfig", "GPTJForCausalLM", n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS,
                     vocab_size=VOCAB, n_positions=64, rotary_dim=4, tie_word_embeddings=False))
_add("gpt_neox", _causal("GPTNeoXConfig", "GPTNeoXForCausalLM", num_hidden_layers=LAYERS, hidden_size=HIDDEN,
                         num_attention_heads=HEADS, intermediate_size=64, vocab_size=VOCAB,
                         max_position_embeddings=64, tie_word_embeddings=False))
_add("opt", _causal("OPTConfig", "OPTForCausalLM", num_hidden_layers=LAYERS, hidden_size=HIDDEN, ffn_dim=64,
                    num_attention_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=64,
                    word_embed_proj_dim=HIDDEN, tie_word_embeddings=False), inputs=_text_masked)
_add("bloom", _causal("BloomConfig", "BloomForCausalLM", n_layer=LAYERS, hidden_size=HIDDEN, n_head=HEADS,
                      vocab_size=VOCAB, tie_word_embeddings=False))
_add("falcon", _causal("FalconConfig", "FalconForCausalLM", num_hidden_layers=LAYERS, hidden_size=HIDDEN,
                       num_attention_heads=HEADS, vocab_size=VOCAB, new_decoder_architecture=False,
                       multi_query=True, parallel_attn=True, bias=False, tie_word_embeddings=False))
_add("llama", _causal("LlamaConfig", "LlamaForCausalLM", **_LLAMA_LIKE, tie_word_embeddings=False),
     inputs=_text_masked)
_add("mistral", _causal("MistralConfig", "MistralForCausalLM", **_LLAMA_LIKE, sliding_window=3,
                        tie_word_embeddings=False))
_add("qwen2", _causal("Qwen2Config", "Qwen2ForCausalLM", **_LLAMA_LIKE, tie_word_embeddings=False))
_add("gemma2", _causal("Gemma2Config", "Gemma2ForCausalLM", **_LLAMA_LIKE, head_dim=8, sliding_window=3,
                       final_logit_softcapping=5.0, attn_logit_softcapping=10.0, query_pre_attn_scalar=8,
                       tie_word_embeddings=True))
_add("phi3", _causal("Phi3Config", "Phi3ForCausalLM", **_LLAMA_LIKE, pad_token_id=0, tie_word_embeddings=False))
_add("mixtral", _causal("MixtralConfig", "MixtralForCausalLM", **_LLAMA_LIKE, num_local_experts=4,
                        num_experts_per_tok=2, tie_word_embeddings=False))
_add("qwen3", _causal("Qwen3Config", "Qwen3ForCausalLM", **_LLAMA_LIKE, head_dim=8, tie_word_embeddings=False),
     inputs=_text_masked)
_add("qwen3_moe", _causal("Qwen3MoeConfig", "Qwen3MoeForCausalLM", **_LLAMA_LIKE, head_dim=8, num_experts=4,
                          num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[],
                          tie_word_embeddings=False))
_add("olmo2", _causal("Olmo2Config", "Olmo2ForCausalLM", **_LLAMA_LIKE, tie_word_embeddings=False))
_add("olmoe", _causal("OlmoeConfig", "OlmoeForCausalLM", **_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2,
                      tie_word_embeddings=False))
_add("starcoder2", _causal("Starcoder2Config", "Starcoder2ForCausalLM", **_LLAMA_LIKE, tie_word_embeddings=False))
_add("granite", _causal("GraniteConfig", "GraniteForCausalLM", **_LLAMA_LIKE, embedding_multiplier=2.0,
                        residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=4.0,
                        tie_word_embeddings=False))
_add("cohere", _causal("CohereConfig", "CohereForCausalLM", **_LLAMA_LIKE, logit_scale=0.5, tie_word_embeddings=True))
_add("stablelm", _causal("StableLmConfig", "StableLmForCausalLM", **_LLAMA_LIKE, partial_rotary_factor=0.5,
                         tie_word_embeddings=False))
_add("phi", _causal("PhiConfig", "PhiForCausalLM", **{**_LLAMA_LIKE, "num_key_value_heads": HEADS},
                    partial_rotary_factor=0.5, tie_word_embeddings=False))
_add("gemma", _causal("GemmaConfig", "GemmaForCausalLM", **{**_LLAMA_LIKE, "num_key_value_heads": 1}, head_dim=8,
                      tie_word_embeddings=True))  # multi-query attention, as Gemma 2B
_add("gemma3_text", _causal("Gemma3TextConfig", "Gemma3ForCausalLM", **_LLAMA_LIKE, head_dim=8, sliding_window=3,
                            query_pre_attn_scalar=8, tie_word_embeddings=True))
_add("deepseek_v3", _causal("DeepseekV3Config", "DeepseekV3ForCausalLM", **{**_LLAMA_LIKE, "num_key_value_heads": HEADS},
                            n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                            first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=16, kv_lora_rank=16,
                            qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, tie_word_embeddings=False))
_add("glm4", _causal("Glm4Config", "Glm4ForCausalLM", **_LLAMA_LIKE, head_dim=8, pad_token_id=0,
                     tie_word_embeddings=False))
_add("gpt_bigcode", _causal("GPTBigCodeConfig", "GPTBigCodeForCausalLM", n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS,
                            vocab_size=VOCAB, n_positions=64, multi_query=True, tie_word_embeddings=False))
_add("bert", _causal("BertConfig", "BertForMaskedLM", num_hidden_layers=LAYERS, hidden_size=HIDDEN,
                     num_attention_heads=HEADS, intermediate_size=64, vocab_size=VOCAB,
                     max_position_embeddings=64, tie_word_embeddings=False), inputs=_text_masked)
_add("t5", _causal("T5Config", "T5ForConditionalGeneration", num_layers=LAYERS, num_decoder_layers=LAYERS,
                   d_model=HIDDEN, d_kv=8, d_ff=64, num_heads=HEADS, vocab_size=VOCAB,
                   decoder_start_token_id=0, tie_word_embeddings=False), inputs=_seq2seq)
_add("vit", _causal("ViTConfig", "ViTForImageClassification", num_hidden_layers=LAYERS, hidden_size=HIDDEN,
                    num_attention_heads=HEADS, intermediate_size=64, image_size=16, patch_size=4,
                    num_labels=10), inputs=_pixels, targets=_class_targets)
_add("bart", _causal("BartConfig", "BartForConditionalGeneration", encoder_layers=LAYERS, decoder_layers=LAYERS,
                     d_model=HIDDEN, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=64,
                     decoder_ffn_dim=64, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False),
     inputs=_seq2seq)
_add("roberta", _causal("RobertaConfig", "RobertaForMaskedLM", num_hidden_layers=LAYERS, hidden_size=HIDDEN,
                        num_attention_heads=HEADS, intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
                        tie_word_embeddings=False), inputs=_text_masked)
_add("whisper", _causal("WhisperConfig", "WhisperForConditionalGeneration", encoder_layers=LAYERS,
                        decoder_layers=LAYERS, d_model=HIDDEN, encoder_attention_heads=HEADS,
                        decoder_attention_heads=HEADS, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        vocab_size=VOCAB, num_mel_bins=16, max_source_positions=8, max_target_positions=64,
                        decoder_start_token_id=0, pad_token_id=0, tie_word_embeddings=False), inputs=_audio)


def batch(arch: Arch, size: int, *, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Keyword inputs and targets of one batch, the same on every rank for a seed."""
    g = torch.Generator().manual_seed(seed)
    return arch.inputs(g, size), arch.targets(g, size)
