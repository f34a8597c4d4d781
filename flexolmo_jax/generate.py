"""Batched autoregressive decoding with a KV cache: greedy, temperature, top-k, top-p, eos.

  tokens = generate(config, params, [[5, 6, 7], [8, 9]], max_new_tokens=32)

Decoding runs `model.Transformer` itself (dense or MoE, any `attention_impl`) with its KV cache
collection (`model.init_cache`, `cache_index`); tests check it token for token against full
recomputation and against transformers' `generate`.

Prompts are LEFT-padded to a length bucket, so every sequence writes its next token into the same
cache slot; positions count only real tokens and padded key slots are masked out. The prompt is
prefilled in one call, then one token per step inside `jax.lax.while_loop`, all in one jit: one
compilation per (batch, prompt bucket, max_new_tokens) (sampling values are traced arguments),
no host round trip per token. The steps run `model.decode_step` on per-layer weights and caches,
so a step reads each weight once, in place, and writes its keys and values into the cache in
place (docs/performance.md, Decoding).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model import (Transformer, decode_step, init_cache, transposed_decode_weights,
                                unstack_layers)


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen. temperature 0 is greedy (argmax); top_k 0 and top_p 1 are off.

  The values reach the decode loop as traced arrays (`traced`), not as static arguments, so new
  values never compile again."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

  def traced(self, vocab_size: int) -> "TracedSampling":
    """The same settings as float32 / int32 scalars, top_k capped at the vocabulary (any larger
    k keeps every token)."""
    return TracedSampling(np.float32(self.temperature), np.int32(min(self.top_k, vocab_size)),
                          np.float32(self.top_p))


class TracedSampling(NamedTuple):
  """Sampling's values as scalars a jitted function takes as ordinary (traced) arguments."""
  temperature: np.ndarray
  top_k: np.ndarray
  top_p: np.ndarray


def filter_logits(logits_BxV, sampling: Sampling):
  """Float32 logits scaled by 1/temperature with tokens outside top-k / top-p set to -inf.

  Works on traced values: top-k and top-p are thresholds read off one descending sort."""
  logits = logits_BxV.astype(jnp.float32)
  # Subtracting the maximum first keeps the best token finite (0) however small the temperature.
  logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / sampling.temperature
  vocab = logits.shape[-1]
  sorted_desc = -jnp.sort(-logits, axis=-1)
  k = jnp.where(sampling.top_k > 0, jnp.minimum(sampling.top_k, vocab), vocab)
  in_top_k = jnp.arange(vocab) < k
  # Top-p runs on the top-k survivors: keep the smallest prefix whose mass reaches top_p; a token
  # stays if the mass BEFORE it is below top_p, so the most likely token always stays.
  probs = jax.nn.softmax(jnp.where(in_top_k, sorted_desc, -jnp.inf), axis=-1)
  keep = in_top_k & (((jnp.cumsum(probs, axis=-1) - probs) < sampling.top_p) |
                     (sampling.top_p >= 1.0))  # Rounding must not drop the tail at 1.
  cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < cutoff, -jnp.inf, logits)


def _next_token(logits_BxV, rng, sampling: Sampling):
  """Greedy when the (traced) temperature is 0; `lax.cond` runs only the branch taken, so greedy
  decoding pays for no sort."""
  def sample(logits):
    return jax.random.categorical(rng, filter_logits(logits, sampling)).astype(jnp.int32)

  def greedy(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  return jax.lax.cond(sampling.temperature > 0, sample, greedy, logits_BxV)


# ----------------------------------------------------------------------------- decode loop


@functools.partial(jax.jit, static_argnames=("config", "max_new", "eos_id", "pad_id", "use_cache"))
def _decode(params, prompt_BxP, prompt_mask_BxP, rng, allowed_BxE, *, config, max_new, sampling,
            eos_id, pad_id, use_cache):
  batch, prompt_len = prompt_BxP.shape
  slots = prompt_len + max_new
  prompt_positions = jnp.maximum(jnp.cumsum(prompt_mask_BxP, axis=1) - 1, 0).astype(jnp.int32)
  next_position_B = jnp.sum(prompt_mask_BxP, axis=1).astype(jnp.int32)
  key_valid_BxS = jnp.concatenate([prompt_mask_BxP, jnp.ones((batch, max_new), bool)], axis=1)

  model = Transformer(config)
  if use_cache:
    # The model's own forward with its "cache" collection; segment 0 marks prompt padding, which
    # real tokens (segment 1) never see.
    def cached(tokens_BxT, positions_BxT, segments_BxT, cache, index):
      return model.apply({"params": params, "cache": cache}, tokens_BxT, positions=positions_BxT,
                         segment_ids=segments_BxT, expert_mask=allowed_BxE, cache_index=index,
                         last_only=True, mutable=["cache"])

    logits, state = cached(prompt_BxP, prompt_positions, prompt_mask_BxP.astype(jnp.int32),
                           init_cache(config, batch, slots), 0)
    # The steps run layer by layer on per-layer weights and caches (model.decode_step): sliced
    # once here, outside the loop, not on every step.
    layer_params = unstack_layers(params["layers"], config.n_layers)
    # On CPU, from 2 rows per step up, the experts transposed once here multiply faster on every
    # step (measured on XLA:CPU only; other backends keep the parameters as they are).
    transpose = batch > 1 and jax.default_backend() == "cpu"
    decode_weights = transposed_decode_weights(config, layer_params) if transpose else None
    state = (unstack_layers(state["cache"]["layers"], config.n_layers),
             state["cache"]["segment_ids"])
  else:
    # Full recomputation: the whole [B, S] buffer every step; causal masking keeps the not yet
    # written slots from influencing earlier ones.
    buffer = jnp.concatenate([prompt_BxP, jnp.full((batch, max_new), pad_id, jnp.int32)], 1)
    positions = jnp.concatenate(
        [prompt_positions, next_position_B[:, None] + jnp.arange(max_new)[None]], axis=1)
    segments = key_valid_BxS.astype(jnp.int32)
    full = lambda buf: model.apply({"params": params}, buf, positions=positions,
                                   segment_ids=segments, expert_mask=allowed_BxE)
    logits, state = full(buffer)[:, :prompt_len], buffer

  def cond(carry):
    step, _, _, _, done = carry
    return (step < max_new) & ~jnp.all(done)

  def body(carry):
    step, logits_BxV, state, out_BxN, done_B = carry
    token = _next_token(logits_BxV, jax.random.fold_in(rng, step), sampling)
    token = jnp.where(done_B, pad_id, token)
    out_BxN = out_BxN.at[:, step].set(token)
    done_B = done_B | (token == eos_id)
    slot = prompt_len + step
    if use_cache:
      layer_caches, kv_segments_BxS = state
      ones = jnp.ones((batch, 1), jnp.int32)
      kv_segments_BxS = jax.lax.dynamic_update_slice_in_dim(kv_segments_BxS, ones, slot, axis=1)
      logits, layer_caches = decode_step(config, params, layer_params, layer_caches, token[:, None],
                                         (next_position_B + step)[:, None], ones, kv_segments_BxS,
                                         slot, allowed_BxE, decode_weights)
      state = (layer_caches, kv_segments_BxS)
      logits_BxV = logits[:, 0]
    else:
      state = state.at[:, slot].set(token)
      logits_BxV = jax.lax.dynamic_index_in_dim(full(state), slot, axis=1, keepdims=False)
    return step + 1, logits_BxV, state, out_BxN, done_B

  out = jnp.full((batch, max_new), pad_id, jnp.int32)
  done = jnp.zeros((batch,), bool)
  carry = (jnp.int32(0), logits[:, -1], state, out, done)
  return jax.lax.while_loop(cond, body, carry)[3]


def bucket_length(length: int, bucket: int) -> int:
  """`length` rounded up to a multiple of `bucket` (so nearby prompt lengths share a compile)."""
  return -(-length // bucket) * bucket


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int):
  """Left-padded int32 tokens [B, P] and their bool mask, P a multiple of `bucket`."""
  if not len(prompts) or any(len(p) == 0 for p in prompts):
    raise ValueError("generate needs at least one prompt, each with at least one token")
  width = bucket_length(max(len(p) for p in prompts), bucket)
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), bool)
  for row, prompt in enumerate(prompts):
    tokens[row, width - len(prompt):] = np.asarray(prompt, np.int32)
    mask[row, width - len(prompt):] = True
  return tokens, mask


def generate(config: ModelConfig, params, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, sampling: Sampling = Sampling(), seed: int = 0,
             eos_id: int | None = None, pad_id: int | None = None, stop_at_eos: bool = True,
             expert_mask=None, prompt_bucket: int = 16, use_cache: bool = True) -> np.ndarray:
  """Continues each prompt by up to `max_new_tokens` tokens; returns int32 [B, max_new_tokens].

  A sequence stops at its first `eos_id` (kept in the output) and is filled with `pad_id` after;
  eos/pad default to the config's token ids. `stop_at_eos=False` (or no eos id anywhere) always
  generates `max_new_tokens`. `expert_mask` [B, E]
  bool opts experts out per sequence (MoE configs only). The same seed gives the same samples.
  `use_cache=False` recomputes the whole sequence every step (the reference the cache must match).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  eos_id = config.eos_token_id if eos_id is None else eos_id
  eos_id = eos_id if stop_at_eos else None
  pad_id = (config.pad_token_id if config.pad_token_id is not None else 0) if pad_id is None \
      else pad_id
  for name, token in (("eos_id", eos_id), ("pad_id", pad_id)):
    if token is not None and not 0 <= token < config.vocab_size:
      raise ValueError(f"{name} {token} lies outside the vocabulary (size {config.vocab_size})")
  tokens, mask = pad_prompts(prompts, pad_id, prompt_bucket)
  if tokens.max() >= config.vocab_size or tokens.min() < 0:
    raise ValueError(f"prompt token ids must lie in [0, {config.vocab_size})")
  if expert_mask is not None:
    if not config.is_moe:
      raise ValueError("expert_mask needs a mixture-of-experts config (num_experts > 0)")
    expert_mask = jnp.asarray(expert_mask, bool)
    if expert_mask.shape != (len(prompts), config.num_experts):
      raise ValueError(f"expert_mask must be [batch, num_experts] = "
                       f"{[len(prompts), config.num_experts]}, got {list(expert_mask.shape)}")
  out = _decode(params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(seed), expert_mask,
                config=config, max_new=max_new_tokens, sampling=sampling.traced(config.vocab_size),
                eos_id=-1 if eos_id is None else eos_id, pad_id=pad_id, use_cache=use_cache)
  return np.asarray(out)
