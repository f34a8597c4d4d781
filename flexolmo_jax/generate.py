"""Batched autoregressive decoding with a KV cache: greedy, temperature, top-k, top-p, eos.

  tokens = generate(config, params, [[5, 6, 7], [8, 9]], max_new_tokens=32)

Decoding runs `model.Transformer` itself (dense or MoE, any `attention_impl`) with its KV cache
collection (`model.init_cache`, `cache_index`); tests check it token for token against full
recomputation and against transformers' `generate`.

Prompts are LEFT-padded to a length bucket, so every sequence writes its next token into the same
cache slot; positions count only real tokens and padded key slots are masked out. The prompt is
prefilled in one call, then one token per step inside `jax.lax.while_loop`, all in one jit: one
compilation per (batch, prompt bucket, max_new_tokens, sampling settings), no host round trip per
token. The steps run `model.decode_step` on per-layer weights and caches, so a step reads each
weight once, in place, and writes its keys and values into the cache in place
(docs/performance.md, Decoding).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model import Transformer, decode_step, init_cache, unstack_layers


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen. temperature 0 is greedy (argmax); top_k 0 and top_p 1 are off."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


def filter_logits(logits_BxV, sampling: Sampling):
  """Float32 logits scaled by 1/temperature with tokens outside top-k / top-p set to -inf."""
  logits = logits_BxV.astype(jnp.float32) / sampling.temperature
  if sampling.top_k:
    kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    sorted_desc = -jnp.sort(-logits, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass BEFORE it is
    # below top_p, so the most likely token always stays.
    keep = (cum - jax.nn.softmax(sorted_desc, axis=-1)) < sampling.top_p
    cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return logits


def _next_token(logits_BxV, rng, sampling: Sampling):
  if sampling.temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  if sampling.top_k:
    # Same distribution as filter_logits, but top-p runs on the k candidates only: a full-vocabulary
    # sort per step dominates decoding time on CPU.
    k = min(sampling.top_k, logits_BxV.shape[-1])
    values_BxK, ids_BxK = jax.lax.top_k(logits_BxV.astype(jnp.float32), k)
    values_BxK = filter_logits(values_BxK, Sampling(sampling.temperature, 0, sampling.top_p))
    choice_B = jax.random.categorical(rng, values_BxK)
    return jnp.take_along_axis(ids_BxK, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jax.random.categorical(rng, filter_logits(logits_BxV, sampling)).astype(jnp.int32)


# ----------------------------------------------------------------------------- decode loop


@functools.partial(jax.jit, static_argnames=("config", "max_new", "sampling", "eos_id", "pad_id",
                                             "use_cache"))
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
                         mutable=["cache"])

    logits, state = cached(prompt_BxP, prompt_positions, prompt_mask_BxP.astype(jnp.int32),
                           init_cache(config, batch, slots), 0)
    # The steps run layer by layer on per-layer weights and caches (model.decode_step): sliced
    # once here, outside the loop, not on every step.
    layer_params = unstack_layers(params["layers"], config.n_layers)
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
                                         slot, allowed_BxE)
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
                config=config, max_new=max_new_tokens, sampling=sampling,
                eos_id=-1 if eos_id is None else eos_id, pad_id=pad_id, use_cache=use_cache)
  return np.asarray(out)
