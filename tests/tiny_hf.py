"""Tiny Hugging Face Olmo2 / FlexOlmo reference models with every weight randomised.

Test helper (needs torch and transformers, from requirements-test.txt). Initialised HF models
have unit norms and a zero router, which would hide norm and routing bugs, so every tensor here
is redrawn: norm weights around 1 with std 0.5, everything else, the router included, normal.
"""

from __future__ import annotations

import os
import pathlib

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


# ----------------------------------------------------------------------------------------------
# A stand-in for the released FlexOlmo files: a byte-level BPE tokenizer.json with OLMo-2's special
# tokens at the end of the vocabulary, a public dense model, a 3-expert FlexOlmo and the 2-expert
# checkpoint of each domain (public FFN + that domain's expert), all sharing their weights exactly
# as the released checkpoints do, written by save_pretrained with sharded safetensors.

EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
RELEASED_VOCAB = 320  # Model vocabulary: the tokenizer's ~300 ids, rounded up (OLMo-2 pads too).
DOMAINS = ("math", "code")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
_TOKENIZER_TEXT = [
    "The public model was trained on web text; each data owner trains one expert.",
    "Solve 12 + 30 = 42, then multiply by 3 to get 126.",
    "def add(a, b):\n    return a + b\n",
    "Owners never share documents, only router embeddings.",
] * 8


def write_bpe_tokenizer(path: str | os.PathLike, vocab_size: int = 300):
  """A byte-level BPE tokenizer trained on a few sentences, saved by transformers with its
  tokenizer_config.json and chat template; returns the transformers tokenizer."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_TOKENIZER_TEXT, trainer)
  tok.add_special_tokens([EOS_TOKEN, PAD_TOKEN])  # At the end of the vocabulary, as in dolma2.
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN,
                                              pad_token=PAD_TOKEN, chat_template=CHAT_TEMPLATE)
  fast.save_pretrained(path)
  return fast


def _released_config(tokenizer, moe: bool, num_experts: int = 3):
  ids = dict(vocab_size=RELEASED_VOCAB, eos_token_id=tokenizer.eos_token_id,
             pad_token_id=tokenizer.pad_token_id)
  if moe:
    return hf_config(True, num_experts=num_experts, num_experts_per_tok=2, **ids)
  return hf_config(False, **ids)


def _save(model, tokenizer, path) -> None:
  model.save_pretrained(path, max_shard_size="100KB")  # Sharded, with an index, as released.
  tokenizer.save_pretrained(path)


def write_released(root: str | os.PathLike, seed: int = 0) -> dict[str, pathlib.Path]:
  """Writes the stand-in under `root`; returns name -> directory for "public" (dense Olmo2),
  "flexolmo" (public + math + code) and "math" / "code" (2-expert checkpoints)."""
  root = pathlib.Path(root)
  tokenizer = write_bpe_tokenizer(root / "tokenizer")
  full = random_hf_model(True, seed, **_released_config(tokenizer, True).to_dict())
  state = full.state_dict()
  paths = {"flexolmo": root / "flexolmo"}
  _save(full, tokenizer, paths["flexolmo"])

  dense = transformers.Olmo2ForCausalLM(_released_config(tokenizer, False)).eval()
  ffn = full.config.intermediate_size
  dense_state = {}
  for key, value in state.items():
    if key.endswith("mlp.experts.gate_up_proj"):
      prefix = key[:-len("experts.gate_up_proj")]
      dense_state[prefix + "gate_proj.weight"] = value[0, :ffn]
      dense_state[prefix + "up_proj.weight"] = value[0, ffn:]
    elif key.endswith("mlp.experts.down_proj"):
      dense_state[key[:-len("experts.down_proj")] + "down_proj.weight"] = value[0]
    elif not key.endswith("mlp.gate.weight"):
      dense_state[key] = value
  dense.load_state_dict(dense_state)
  paths["public"] = root / "public"
  _save(dense, tokenizer, paths["public"])

  for j, domain in enumerate(DOMAINS, 1):
    two = transformers.FlexOlmoForCausalLM(_released_config(tokenizer, True, 2)).eval()
    rows = [0, j]
    two.load_state_dict({k: (v[rows] if ".mlp." in k else v) for k, v in state.items()})
    paths[domain] = root / f"flex_{domain}_2x"
    _save(two, tokenizer, paths[domain])
  return paths
