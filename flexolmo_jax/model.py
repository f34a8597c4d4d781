"""The OLMo-2 / FlexOlmo transformer in Flax Linen (docs/method.md, section 1).

`Transformer(config).apply({"params": params}, tokens)` returns float32 logits [B, L, V].
Parameters are a plain nested dict; layers are scanned, so every layer parameter carries a
leading [n_layers] axis. Every parameter dimension has a logical axis name (see sharding.py).
Routing statistics are sown into the "router_stats" collection when it is mutable, each token's
routing decisions and router probabilities into "routing" (routing_counts, routing_probs).
Attention runs through attention.py (`config.attention_impl`); KV-cached decoding is this same
module with the "cache" collection (init_cache, Transformer's `cache_index`).

Shape suffixes: B batch, L length, D d_model, H query heads, K kv heads, G = H // K, Dh head
dim, F ffn hidden, E experts, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from flexolmo_jax import attention, expert_parallel, moe
from flexolmo_jax.config import ModelConfig

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

# The variable collection of transposed_decode_weights.
DECODE_WEIGHTS = "decode_weights"

_NO_CACHE = ("cache_index needs a KV cache: apply with {'cache': model.init_cache(...)} and "
             "mutable=['cache']")


def rms_norm(x, weight, eps):
  """OLMo-2 RMSNorm, computed in float32 and cast back to the input dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (weight.astype(jnp.float32) * y).astype(x.dtype)


def rope(x_BxLxHxDh, positions_BxL, theta):
  """Non-interleaved ("rotate half") rotary embedding, computed in float32."""
  head_dim = x_BxLxHxDh.shape[-1]
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles_BxLxDh = jnp.concatenate([positions_BxL[..., None].astype(jnp.float32) * inv_freq] * 2, -1)
  cos, sin = jnp.cos(angles_BxLxDh)[:, :, None], jnp.sin(angles_BxLxDh)[:, :, None]
  x = x_BxLxHxDh.astype(jnp.float32)
  first, second = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return (x * cos + rotated * sin).astype(x_BxLxHxDh.dtype)


class _ParamMixin:
  """Declares parameters with logical axis names, in the configured parameter dtype."""

  def weight(self, name, shape, axes, init=None):
    init = init or nn.initializers.normal(self.config.init_std)
    return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                      jnp.dtype(self.config.param_dtype))

  def norm_weight(self, name, width, axis):
    return self.weight(name, (width,), (axis,), nn.initializers.ones)


class Attention(nn.Module, _ParamMixin):
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, kv_segment_ids=None,
               cache_index=None):
    """kv_segment_ids [B, S] and cache_index: decoding with a KV cache (see Transformer)."""
    c = self.config
    dtype, head_dim = jnp.dtype(c.dtype), c.resolved_head_dim
    q_width, kv_width = c.n_heads * head_dim, c.n_kv_heads * head_dim
    q_proj = self.weight("q_proj", (c.d_model, q_width), ("embed", "q_heads"))
    k_proj = self.weight("k_proj", (c.d_model, kv_width), ("embed", "kv_heads"))
    v_proj = self.weight("v_proj", (c.d_model, kv_width), ("embed", "kv_heads"))
    o_proj = self.weight("o_proj", (q_width, c.d_model), ("q_heads", "embed"))
    q_norm = self.norm_weight("q_norm", q_width, "q_heads")
    k_norm = self.norm_weight("k_norm", kv_width, "kv_heads")

    batch, length, _ = x_BxLxD.shape
    # QK-norm spans the whole projection (all heads together), before the split into heads.
    q = rms_norm(x_BxLxD @ q_proj.astype(dtype), q_norm, c.rms_norm_eps)
    k = rms_norm(x_BxLxD @ k_proj.astype(dtype), k_norm, c.rms_norm_eps)
    v = x_BxLxD @ v_proj.astype(dtype)
    q_BxLxHxDh = rope(q.reshape(batch, length, c.n_heads, head_dim), positions_BxL, c.rope_theta)
    k_BxLxKxDh = rope(k.reshape(batch, length, c.n_kv_heads, head_dim), positions_BxL, c.rope_theta)
    v_BxLxKxDh = v.reshape(batch, length, c.n_kv_heads, head_dim)
    impl = attention.resolve(c.attention_impl, dtype, length=length,
                             block_size=c.attention_block_size)
    if cache_index is None:
      out = attention.attend(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_ids_BxL, impl=impl,
                             block_size=c.attention_block_size)
    else:
      # Decoding: write this call's keys and values at [cache_index, cache_index + L) and attend
      # over every slot of the cache (init_cache). Keys are cached after RoPE.
      keys_BxKxSxDh = self._write_cache("k", k_BxLxKxDh, cache_index)
      values_BxKxSxDh = self._write_cache("v", v_BxLxKxDh, cache_index)
      out = attention.attend_cache(q_BxLxHxDh, keys_BxKxSxDh, values_BxKxSxDh, segment_ids_BxL,
                                   kv_segment_ids, q_offset=cache_index, impl=impl,
                                   block_size=c.attention_block_size)
    return out.reshape(batch, length, q_width) @ o_proj.astype(dtype)

  def _write_cache(self, name, new_BxLxKxDh, cache_index):
    if not self.has_variable("cache", name):
      raise ValueError(_NO_CACHE)
    cached = self.variable("cache", name, lambda: None)
    new_BxKxLxDh = new_BxLxKxDh.transpose(0, 2, 1, 3).astype(cached.value.dtype)
    cached.value = jax.lax.dynamic_update_slice_in_dim(cached.value, new_BxKxLxDh, cache_index,
                                                       axis=2)
    return cached.value


class Mlp(nn.Module, _ParamMixin):
  """The dense SwiGLU FFN of the public model, or the FlexOlmo mixture of SwiGLU experts."""

  config: ModelConfig

  @nn.compact
  def __call__(self, h_BxLxD, allowed_BxE=None, decode=False):
    """decode: a decoding step (a cached call of at most attention.DECODE_QUERIES tokens per
    sequence); MoE FFNs then use moe.dispatch_decode (the same sum, no weight copies)."""
    c = self.config
    dtype = jnp.dtype(c.dtype)
    if not c.is_moe:
      gate = self.weight("gate_proj", (c.d_model, c.ffn_hidden), ("embed", "mlp"))
      up = self.weight("up_proj", (c.d_model, c.ffn_hidden), ("embed", "mlp"))
      down = self.weight("down_proj", (c.ffn_hidden, c.d_model), ("mlp", "embed"))
      return moe.swiglu(h_BxLxD, gate.astype(dtype), up.astype(dtype), down.astype(dtype))

    E = c.num_experts
    router = self.weight("router", (E, c.d_model), ("expert", "embed"))
    if self.has_variable("params", "public_ffn"):
      # experts.training_moe's layout (expert training): expert 0 is the unstacked frozen
      # public FFN; kept apart, it is never copied or given a weight gradient.
      public = self.get_variable("params", "public_ffn")
      new = self.get_variable("params", "new_ffn")
      gate, up, down = ([public[k]] + [new[k][j] for j in range(E - 1)]
                        for k in ("gate_proj", "up_proj", "down_proj"))
      if c.moe_backend != "dense" or c.expert_parallel != "none":
        gate, up, down = jnp.stack(gate), jnp.stack(up), jnp.stack(down)
    else:
      gate = self.weight("gate_proj", (E, c.d_model, c.ffn_hidden), ("expert", "embed", "mlp"))
      up = self.weight("up_proj", (E, c.d_model, c.ffn_hidden), ("expert", "embed", "mlp"))
      down = self.weight("down_proj", (E, c.ffn_hidden, c.d_model), ("expert", "mlp", "embed"))
    bias = None
    if c.expert_bias:
      bias = self.weight("expert_bias", (E,), ("expert",),
                         nn.initializers.constant(c.expert_bias_init))

    batch, length, dim = h_BxLxD.shape
    h_TxD = h_BxLxD.reshape(batch * length, dim)
    allowed_TxE = None
    if allowed_BxE is not None:
      allowed_TxE = jnp.repeat(allowed_BxE, length, axis=0)
    # The router sees the raw residual stream (no norm before it).
    routing = moe.route(h_TxD, router, c.top_k, norm_topk_prob=c.norm_topk_prob, bias_E=bias,
                        allowed_TxE=allowed_TxE)
    self.sow("router_stats", "z_loss", routing.z_loss)
    self.sow("router_stats", "load", routing.load_E)
    self.sow("router_stats", "mean_prob", routing.mean_prob_E)
    if self.is_mutable_collection("routing"):
      # Which experts each token is routed to: top-k slots of nonzero weight (slots beyond the
      # allowed experts carry weight 0). routing_counts() sums them.
      routed_TxE = jnp.any(jax.nn.one_hot(routing.top_experts_TxK, E, dtype=jnp.bool_), axis=1)
      if allowed_TxE is not None:
        routed_TxE &= allowed_TxE
      self.sow("routing", "routed", routed_TxE.reshape(batch, length, E))
      self.sow("routing", "probs", routing.probs_TxE.reshape(batch, length, E))  # routing_probs.
    cast = lambda w: jax.tree.map(lambda a: a.astype(dtype), w)  # A list per expert, or stacked.
    weights = (cast(gate), cast(up), cast(down))
    if decode and self.has_variable(DECODE_WEIGHTS, "ffn"):
      # transposed_decode_weights: the same experts, transposed for few-row matmuls.
      ffn = self.get_variable(DECODE_WEIGHTS, "ffn")
      out_TxD = moe.dispatch_decode(h_TxD, routing, *cast((ffn["gate"], ffn["up"], ffn["down"])),
                                    transposed=True)
    elif decode:
      out_TxD = moe.dispatch_decode(h_TxD, routing, *(jnp.stack(w) if isinstance(w, list) else w
                                                      for w in weights))
    else:
      out_TxD = expert_parallel.moe_ffn(h_TxD, routing, *weights, config=c)
    return out_TxD.reshape(batch, length, dim)


class Block(nn.Module, _ParamMixin):
  """Reordered-norm block: norms on sublayer OUTPUTS, `x + norm(f(x))`."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, kv_segment_ids, cache_index,
               allowed_BxE):
    c = self.config
    post_attn_norm = self.norm_weight("post_attn_norm", c.d_model, "embed")
    post_ffn_norm = self.norm_weight("post_ffn_norm", c.d_model, "embed")
    attn = Attention(c, name="attn")(x_BxLxD, positions_BxL, segment_ids_BxL, kv_segment_ids,
                                     cache_index)
    h = x_BxLxD + rms_norm(attn, post_attn_norm, c.rms_norm_eps)
    self.sow("intermediates", "ffn_input", h)  # What the router sees; used for router init.
    decode = cache_index is not None and x_BxLxD.shape[1] <= attention.DECODE_QUERIES
    ffn = Mlp(c, name="mlp")(h, allowed_BxE, decode)
    return h + rms_norm(ffn, post_ffn_norm, c.rms_norm_eps), None


class Transformer(nn.Module, _ParamMixin):
  """OLMo-2 decoder; `num_experts > 0` makes every FFN a FlexOlmo mixture of experts."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, positions=None, segment_ids=None, expert_mask=None,
               cache_index=None, last_only=False):
    """Logits [B, L, V] in float32; last_only: of the last position only, [B, 1, V] (all a
    prefill needs: the lm_head over every prompt position would cost B x L x V outputs).

    positions / segment_ids [B, L]: packed documents (positions restart at 0, attention never
    crosses a segment). expert_mask [B, E] bool: experts each sequence may use (opt-out per
    request); top-k slots beyond the allowed experts get weight zero.

    Decoding: with the "cache" collection (init_cache) passed and mutable, `cache_index` (may be
    traced) is the cache slot of tokens_BxL[:, 0]; the tokens' keys, values and segment ids are
    written from there, and each token attends to the cache slots up to its own with its segment
    id (so left-padding a prompt with segment 0 hides the padding).
    """
    c = self.config
    dtype = jnp.dtype(c.dtype)
    batch, length = tokens_BxL.shape
    if positions is None:
      start = 0 if cache_index is None else cache_index
      positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
    if segment_ids is None:
      segment_ids = jnp.ones((batch, length), jnp.int32)
    embed = self.weight("embed", (c.vocab_size, c.d_model), ("vocab", "embed"))
    x = nn.with_logical_constraint(_embed(embed, tokens_BxL, dtype), ("batch", "length", "embed"))
    kv_segment_ids = None
    if cache_index is not None:
      if not self.has_variable("cache", "segment_ids"):
        raise ValueError(_NO_CACHE)
      cached = self.variable("cache", "segment_ids", lambda: None)
      cached.value = jax.lax.dynamic_update_slice_in_dim(cached.value, segment_ids, cache_index,
                                                         axis=1)
      kv_segment_ids = cached.value

    block = Block
    if c.remat != "none":
      block = nn.remat(Block, prevent_cse=False, policy=_REMAT_POLICIES[c.remat])
    layers = nn.scan(
        block,
        variable_axes={"params": 0, "router_stats": 0, "intermediates": 0, "routing": 0,
                       "cache": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast,) * 5,
        length=c.n_layers,
        unroll=1 if c.scan_layers else c.n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(c, name="layers")
    x, _ = layers(x, positions, segment_ids, kv_segment_ids, cache_index, expert_mask)

    final_norm = self.norm_weight("final_norm", c.d_model, "embed")
    lm_head = self.weight("lm_head", (c.d_model, c.vocab_size), ("embed", "vocab"))
    return _logits(x[:, -1:] if last_only else x, final_norm, lm_head, c)


def _embed(embed_VxD, tokens_BxL, dtype):
  return jnp.take(embed_VxD, tokens_BxL, axis=0).astype(dtype)


def _logits(x_BxLxD, final_norm, lm_head_DxV, c: ModelConfig):
  x = rms_norm(x_BxLxD, final_norm, c.rms_norm_eps)
  return jnp.einsum("bld,dv->blv", x, lm_head_DxV.astype(jnp.dtype(c.dtype)),
                    preferred_element_type=jnp.float32)


def init_cache(config: ModelConfig, batch: int, slots: int):
  """An empty KV cache ("cache" collection) of `slots` token slots per sequence.

  Keys and values are heads-major, [n_layers, B, K, slots, Dh], the layout a decoding step's
  attention matmuls read in place (attention.attend_cache)."""
  shape = (config.n_layers, batch, config.n_kv_heads, slots, config.resolved_head_dim)
  kv = jnp.zeros(shape, jnp.dtype(config.dtype))
  return {"layers": {"attn": {"k": kv, "v": kv}},
          "segment_ids": jnp.zeros((batch, slots), jnp.int32)}


def unstack_layers(tree, n_layers: int):
  """A list of n_layers per-layer trees from a tree whose leaves carry a leading [n_layers] axis
  (params["layers"], a cache's "layers")."""
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n_layers)]


def transposed_decode_weights(config: ModelConfig, layer_params):
  """Per-layer DECODE_WEIGHTS collections for decode_step, or None where there is nothing to
  transpose (a dense FFN, or experts.training_moe's layout).

  With 2 or more rows per step, XLA:CPU's kernels multiply by a weight stored [out, in] faster
  than by one stored [in, out] (16 rows x [768, 4096]: 15.8 against 21.5 ms; at 1 row the
  reverse, 9.1 against 7.2 ms; docs/performance.md, Decoding). The mixture's experts, most of a
  FlexOlmo step's bytes, are copied once per generate call into that layout."""
  mlp = layer_params[0]["mlp"]
  if not config.is_moe or "gate_proj" not in mlp:
    return None
  return [{"mlp": {"ffn": dict(zip(("gate", "up", "down"), moe.transposed_ffn(
      layer["mlp"]["gate_proj"], layer["mlp"]["up_proj"], layer["mlp"]["down_proj"])))}}
          for layer in layer_params]


def decode_step(config: ModelConfig, params, layer_params, layer_caches, tokens_BxL, positions_BxL,
                segment_ids_BxL, kv_segment_ids_BxS, cache_index, expert_mask=None,
                decode_weights=None):
  """`Transformer` with its KV cache, for a decoding loop: (logits [B, L, V], new layer caches).

  The same Blocks as Transformer.__call__ with cache_index, layer by layer over per-layer
  parameters and caches (unstack_layers) rather than a scan over the stacked ones: inside a
  decoding loop a scan copies every layer's weights out of the stacked arrays (a dynamic slice)
  and writes every layer's cache back into a stacked output on every step, about three times the
  bytes a step needs to read. kv_segment_ids_BxS: the cache's segment ids with this call's
  already written (the caller keeps them; they are the same for every layer).
  decode_weights: transposed_decode_weights(config, layer_params), or None.
  """
  c = config
  x = _embed(params["embed"], tokens_BxL, jnp.dtype(c.dtype))
  block = Block(c)
  new_caches = []
  for i, (weights, cache) in enumerate(zip(layer_params, layer_caches)):
    variables = {"params": weights, "cache": cache}
    if decode_weights is not None:
      variables[DECODE_WEIGHTS] = decode_weights[i]
    (x, _), state = block.apply(variables, x, positions_BxL,
                                segment_ids_BxL, kv_segment_ids_BxS, cache_index, expert_mask,
                                mutable=["cache"])
    new_caches.append(state["cache"])
  return _logits(x, params["final_norm"], params["lm_head"], c), new_caches


def routing_counts(state, valid_BxL):
  """[n_layers, B, E] float32: the top-k token slots routed to each expert over the valid tokens,
  from the decisions a forward pass with mutable=["routing"] sows (its returned state)."""
  (routed_NxBxLxE,) = state["routing"]["layers"]["mlp"]["routed"]
  return jnp.einsum("nble,bl->nbe", routed_NxBxLxE.astype(jnp.float32),
                    jnp.asarray(valid_BxL, jnp.float32))


def routing_probs(state, valid_BxL):
  """[n_layers, B, E] float32: each expert's router probability (softmax over all experts,
  before top-k) summed over the valid tokens, from the same state as routing_counts."""
  (probs_NxBxLxE,) = state["routing"]["layers"]["mlp"]["probs"]
  return jnp.einsum("nble,bl->nbe", probs_NxBxLxE, jnp.asarray(valid_BxL, jnp.float32))


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: ModelConfig, rng: jax.Array):
  """Randomly initialised parameters as a plain nested dict (logical-axis boxes removed)."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  return nn.unbox(Transformer(config).init(rng, tokens)["params"])


def logical_axes(config: ModelConfig):
  """The logical axis names of every parameter, as a tree of PartitionSpecs (nothing allocated)."""
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  boxed = jax.eval_shape(Transformer(config).init, jax.random.key(0), tokens)["params"]
  return nn.get_partition_spec(boxed)
