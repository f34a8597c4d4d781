"""Tiny Hugging Face Olmo2 / FlexOlmo reference models with every weight randomised.

Test helper (needs torch and transformers, from requirements-test.txt). Initialised HF models
have unit norms and a zero router, which would hide norm and routing bugs, so every tensor here
is redrawn: norm weights around 1 with std 0.5, everything else, the router included, normal.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import transformers

_BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             pad_token_id=1, eos_token_id=2, bos_token_id=None, rms_norm_eps=1e-6,
             rope_parameters={"rope_theta": 10_000.0, "rope_type": "default"},
             tie_word_embeddings=False)
# Standard deviations by tensor role; chosen so the residual stream is O(1) and router
# probabilities are neither uniform nor one-hot.
_STD = {"embed_tokens": 1.0, "gate": 0.1, "norm": 0.5, "other": 0.15}


def hf_config(moe: bool = True, **overrides) -> transformers.PretrainedConfig:
  """A tiny FlexOlmoConfig (E=4, top-2 unless overridden) or, with `moe=False`, Olmo2Config."""
  if moe:
    return transformers.FlexOlmoConfig(**{**_BASE, "num_experts": 4, "num_experts_per_tok": 2,
                                          **overrides})
  return transformers.Olmo2Config(**{**_BASE, **overrides})


def _std(name: str) -> float:
  if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
    return _STD["norm"]
  if "embed_tokens" in name:
    return _STD["embed_tokens"]
  if name.endswith("mlp.gate.weight"):
    return _STD["gate"]
  return _STD["other"]


def random_hf_model(moe: bool = True, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
  """A tiny float32 eager-attention HF causal LM in eval mode, all weights drawn from `seed`."""
  config = hf_config(moe, **overrides)
  cls = transformers.FlexOlmoForCausalLM if moe else transformers.Olmo2ForCausalLM
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  model = cls(config).to(torch.float32).eval()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator) * _std(name)
      is_norm = name.endswith("norm.weight")
      param.copy_(noise + 1.0 if is_norm else noise)
  return model


def write_tiny_hf_checkpoint(path: str | os.PathLike, moe: bool = True, seed: int = 0,
                             max_shard_size: str | None = None,
                             **overrides) -> transformers.PreTrainedModel:
  """Saves a `random_hf_model` with `save_pretrained` to `path` and returns the model."""
  model = random_hf_model(moe, seed, **overrides)
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(path, **kwargs)
  return model


def load_reference(path: str | os.PathLike) -> transformers.PreTrainedModel:
  """A checkpoint directory loaded by transformers, float32, eager attention, eval mode."""
  return transformers.AutoModelForCausalLM.from_pretrained(
      path, attn_implementation="eager", dtype=torch.float32).eval()


def hf_logits(model: transformers.PreTrainedModel, tokens: np.ndarray) -> np.ndarray:
  """Float32 logits [B, L, V] of `model` on int tokens [B, L]."""
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def random_tokens(vocab_size: int, batch: int = 2, length: int = 16, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab_size, size=(batch, length), dtype=np.int32)
