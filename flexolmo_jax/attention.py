"""Attention implementations behind one function, `attend` (docs/attention.md).

Every implementation computes the same thing. Query i sits at cache slot `q_offset + i` and sees
key slot j iff j <= q_offset + i and the two carry the same segment id (causal within each packed
document). Query head h reads kv head h // G (grouped-query attention). A query that sees no key
at all gets zeros.

  xla      the einsum over the full float32 score matrix [B, K, G, T, S]: the reference.
  chunked  blockwise with an online softmax and a backward pass that recomputes the blocks (the
           flash-attention recurrences in plain JAX): memory linear in the length; blocks above
           the causal diagonal are skipped.
  cudnn    `jax.nn.dot_product_attention`: cuDNN flash attention on GPU (float16/bfloat16 only);
           on other platforms the same call with its XLA implementation.
  splash   the Pallas TPU splash-attention kernel shipped with JAX, with its causal mask and
           segment ids; interpreted off TPU (slow: for tests only). Its masks are numpy
           structures fixed at trace time, so a call with a KV cache (a traced write offset)
           uses xla instead (`for_cache`).
  auto     splash on TPU, cudnn on GPU for 16-bit compute (else xla); on CPU xla up to one block
           of queries and chunked above (docs/attention.md, "The default").

A KV cache (model.init_cache) goes through `attend_cache`: a decoding step's few queries attend in
the cache's heads-major layout with the xla einsums; a prefill uses the implementations above.

Shape suffixes: B batch, T queries, S keys, H query heads, K kv heads, G = H // K, Dh head dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flexolmo_jax.config import ATTENTION_IMPLS

DEFAULT_BLOCK = 512
_SPLASH_LANES = 128  # splash tiles the sequence in multiples of 128.


def resolve(impl: str, dtype="float32", platform: str | None = None, *,
            length: int | None = None, block_size: int = 0) -> str:
  """The implementation `impl` names on `platform` (default: JAX's default backend) for
  `length` queries (None: unknown)."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl {impl!r} not in {ATTENTION_IMPLS}")
  if impl != "auto":
    return impl
  platform = platform or jax.default_backend()
  if platform == "tpu":
    return "splash"
  if platform == "gpu":
    # cuDNN's fused kernel takes 16-bit inputs only.
    return "cudnn" if jnp.dtype(dtype).itemsize == 2 else "xla"
  # Within one block, chunked computes xla's single score tile plus a recomputing backward.
  if length is not None and length <= (block_size or DEFAULT_BLOCK):
    return "xla"
  return "chunked"


def for_cache(impl: str) -> str:
  """The implementation used when attending over a KV cache (see the module docstring)."""
  return "xla" if impl == "splash" else impl


def attend(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_segment_BxT, kv_segment_BxS=None, *,
           q_offset=0, impl: str = "xla", block_size: int = 0):
  """Attention output [B, T, H, Dh] in the dtype of q.

  kv_segment_BxS None means self-attention over the same tokens (S == T, q_offset 0), where every
  query sees at least itself. q_offset may be traced (a KV cache's write slot). block_size: the
  chunked / splash tile (0: DEFAULT_BLOCK).
  """
  impl = resolve(impl, q_BxTxHxDh.dtype, length=q_BxTxHxDh.shape[1], block_size=block_size)
  scale = q_BxTxHxDh.shape[-1] ** -0.5
  block = block_size or DEFAULT_BLOCK
  self_attention = kv_segment_BxS is None
  if self_attention:
    kv_segment_BxS = q_segment_BxT
  q_offset = jnp.asarray(q_offset, jnp.int32)
  if impl in ("xla", "cudnn"):
    visible_BxTxS = visible(q_segment_BxT, kv_segment_BxS, q_offset)
  if impl == "xla":
    out = _xla(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, visible_BxTxS, scale)
  elif impl == "chunked":
    return _chunked(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_segment_BxT, kv_segment_BxS, q_offset,
                    scale, block)  # Queries that see nothing are exact zeros already.
  elif impl == "cudnn":
    out = _cudnn(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, visible_BxTxS, scale)
  elif impl == "splash":
    if not self_attention:
      raise ValueError("splash attention takes self-attention only; attend over a KV cache with "
                       "attention.for_cache(impl)")
    out = _splash(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_segment_BxT, scale, block)
  if self_attention:  # Every query sees at least itself (splash is self-attention only).
    return out
  return _zero_unseeing(out, visible_BxTxS)


# attend_cache: calls with at most this many queries (a decoding step) attend in the cache's own
# layout; longer ones (a prefill) transpose it once and run their implementation.
DECODE_QUERIES = 16


def attend_cache(q_BxTxHxDh, k_BxKxSxDh, v_BxKxSxDh, q_segment_BxT, kv_segment_BxS, *, q_offset,
                 impl: str = "xla", block_size: int = 0):
  """`attend` over a KV cache stored heads-major, k and v [B, K, S, Dh] (model.init_cache).

  A decoding step (at most DECODE_QUERIES queries) runs the xla einsums on that layout
  whatever `impl` says: their score matrix is a few rows, and in the [B, S, K, Dh] layout XLA
  transposes the whole cache for both matmuls on every step. Longer calls transpose once and use
  `for_cache(impl)`.
  """
  batch, length, heads, head_dim = q_BxTxHxDh.shape
  if length > DECODE_QUERIES:
    k_BxSxKxDh, v_BxSxKxDh = (x.transpose(0, 2, 1, 3) for x in (k_BxKxSxDh, v_BxKxSxDh))
    return attend(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_segment_BxT, kv_segment_BxS,
                  q_offset=q_offset, impl=for_cache(impl), block_size=block_size)
  q_offset = jnp.asarray(q_offset, jnp.int32)
  kv_heads = k_BxKxSxDh.shape[1]
  q_BxKxGxTxDh = q_BxTxHxDh.reshape(batch, length, kv_heads, heads // kv_heads,
                                    head_dim).transpose(0, 2, 3, 1, 4)
  scores = jnp.einsum("bkgtd,bksd->bkgts", q_BxKxGxTxDh, k_BxKxSxDh,
                      preferred_element_type=jnp.float32) * head_dim ** -0.5
  visible_BxTxS = visible(q_segment_BxT, kv_segment_BxS, q_offset)
  scores = jnp.where(visible_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q_BxTxHxDh.dtype)
  out = jnp.einsum("bkgts,bksd->btkgd", probs, v_BxKxSxDh).reshape(batch, length, heads, head_dim)
  return _zero_unseeing(out, visible_BxTxS)


def visible(q_segment_BxT, kv_segment_BxS, q_offset=0):
  """[B, T, S] bool: key j is visible to query i (causal by slot, same segment)."""
  length, slots = q_segment_BxT.shape[1], kv_segment_BxS.shape[1]
  causal_TxS = jnp.arange(slots)[None, :] <= (q_offset + jnp.arange(length))[:, None]
  return causal_TxS[None] & (q_segment_BxT[:, :, None] == kv_segment_BxS[:, None, :])


def _zero_unseeing(out_BxTxHxDh, visible_BxTxS):
  """Zeros for queries that see no key (a softmax over only masked scores would average every
  value instead)."""
  has_key_BxT = jnp.any(visible_BxTxS, axis=-1)
  return jnp.where(has_key_BxT[:, :, None, None], out_BxTxHxDh, 0).astype(out_BxTxHxDh.dtype)


# ----------------------------------------------------------------------------- xla (reference)


def _xla(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, visible_BxTxS, scale):
  batch, length, heads, head_dim = q_BxTxHxDh.shape
  kv_heads = k_BxSxKxDh.shape[2]
  q_BxTxKxGxDh = q_BxTxHxDh.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
  scores = jnp.einsum("blkgd,bmkd->bkglm", q_BxTxKxGxDh, k_BxSxKxDh,
                      preferred_element_type=jnp.float32) * scale
  scores = jnp.where(visible_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q_BxTxHxDh.dtype)
  out = jnp.einsum("bkglm,bmkd->blkgd", probs, v_BxSxKxDh)
  return out.reshape(batch, length, heads, head_dim)


# ----------------------------------------------------------------------------- cudnn


def _cudnn(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, visible_BxTxS, scale):
  # cuDNN's fused kernel refuses 32-bit inputs: those take XLA's path, on GPU as elsewhere.
  fused = jax.default_backend() == "gpu" and q_BxTxHxDh.dtype.itemsize == 2
  implementation = "cudnn" if fused else "xla"
  return jax.nn.dot_product_attention(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh,
                                      mask=visible_BxTxS[:, None], scale=scale,
                                      implementation=implementation)


# ----------------------------------------------------------------------------- splash


def _splash(q_BxLxHxDh, k_BxLxKxDh, v_BxLxKxDh, segment_BxL, scale, block):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=g-import-not-at-top

  _, length, heads, _ = q_BxLxHxDh.shape
  padded = -(-length // _SPLASH_LANES) * _SPLASH_LANES
  tile = max(t for t in (block, 256, _SPLASH_LANES)
             if t % _SPLASH_LANES == 0 and padded % t == 0)
  pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
  # Padding slots get their own segment (-1): they sit after every real token, so causality
  # already hides them from real queries, and no padded query is left without a key.
  segment_BxP = jnp.pad(segment_BxL, ((0, 0), (0, padded - length)), constant_values=-1)
  q, k, v = (jnp.pad(x, pad).transpose(0, 2, 1, 3)
             for x in (q_BxLxHxDh * jnp.asarray(scale, q_BxLxHxDh.dtype), k_BxLxKxDh, v_BxLxKxDh))
  mask = sa.MultiHeadMask([sa.CausalMask((padded, padded))] * heads)
  sizes = sa.BlockSizes(block_q=tile, block_kv=tile, block_kv_compute=tile, block_q_dkv=tile,
                        block_kv_dkv=tile, block_kv_dkv_compute=tile, block_q_dq=tile,
                        block_kv_dq=tile)
  kernel = sa.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                              interpret=jax.default_backend() != "tpu")
  out_BxHxPxDh = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(s, s)))(
      q, k, v, segment_BxP)
  return out_BxHxPxDh.transpose(0, 2, 1, 3)[:, :length]


# ----------------------------------------------------------------------------- chunked


def _chunked(q_BxTxHxDh, k_BxSxKxDh, v_BxSxKxDh, q_segment_BxT, kv_segment_BxS, q_offset, scale,
             block):
  batch, length, heads, head_dim = q_BxTxHxDh.shape
  slots, kv_heads = k_BxSxKxDh.shape[1:3]
  bq, bk = min(block, length), min(block, slots)
  tp, sp = -(-length // bq) * bq, -(-slots // bk) * bk
  q = jnp.pad(q_BxTxHxDh, ((0, 0), (0, tp - length), (0, 0), (0, 0)))
  q = q.reshape(batch, tp, kv_heads, heads // kv_heads, head_dim)
  k, v = (jnp.pad(x, ((0, 0), (0, sp - slots), (0, 0), (0, 0))) for x in (k_BxSxKxDh, v_BxSxKxDh))
  q_seg = jnp.pad(q_segment_BxT, ((0, 0), (0, tp - length)))
  kv_seg = jnp.pad(kv_segment_BxS, ((0, 0), (0, sp - slots)))
  if jax.default_backend() != "cpu" or tp == bq:
    out = _flash(q, k, v, q_seg, kv_seg, q_offset, scale, bq, bk, slots)
  else:
    # On CPU, rows of several query blocks go one sequence at a time: a [K, G, bq, bk] tile of
    # one row stays in the caches through the block's elementwise passes, where a [B, K, G, bq,
    # bk] tile did not (forward + backward at B 4, T 1024, 8 heads of 64: 323 ms batched, 4 x 66
    # ms one by one; T 2048: 1,016 vs 4 x 186 ms). Rows of one block keep the batched tile: one
    # by one, 8 x 256 forwards measured 9-15% slower (docs/performance.md). Accelerators keep
    # the batched blocks.
    out = jax.lax.map(
        lambda row: _flash(*(x[None] for x in row), q_offset, scale, bq, bk, slots)[0],
        (q, k, v, q_seg, kv_seg))
  return out[:, :length].reshape(batch, length, heads, head_dim)


class _Tiles:
  """Block bookkeeping shared by the forward and backward passes.

  q [B, Tp, K, G, Dh] and k, v [B, Sp, K, Dh], padded to whole blocks; `slots` real key slots.
  """

  def __init__(self, q, k, q_seg, kv_seg, q_offset, scale, bq, bk, slots):
    self.q_seg, self.kv_seg = q_seg, kv_seg
    self.offset, self.scale, self.bq, self.bk, self.slots = q_offset, scale, bq, bk, slots
    self.nq, self.nk = q.shape[1] // bq, k.shape[1] // bk

  def q_block(self, x, i):
    return jax.lax.dynamic_slice_in_dim(x, i * self.bq, self.bq, axis=1)

  def kv_block(self, x, j):
    return jax.lax.dynamic_slice_in_dim(x, j * self.bk, self.bk, axis=1)

  def kv_end(self, i):
    """Key blocks [0, kv_end) hold every key some query of block i can see."""
    return jnp.minimum(self.nk, (i * self.bq + self.bq - 1 + self.offset) // self.bk + 1)

  def q_start(self, j):
    """Query blocks [q_start, nq) hold every query that can see a key of block j."""
    return jnp.clip((j * self.bk - self.offset) // self.bq, 0, self.nq)

  def scores(self, i, j, q_blk, k_blk):
    """Scaled float32 scores [B, K, G, bq, bk], -inf where the key is not visible."""
    s = jnp.einsum("bqkgd,bckd->bkgqc", q_blk, k_blk, preferred_element_type=jnp.float32)
    q_slot = self.offset + i * self.bq + jnp.arange(self.bq)
    k_slot = j * self.bk + jnp.arange(self.bk)
    causal = (k_slot[None, :] <= q_slot[:, None]) & (k_slot < self.slots)[None, :]
    same = self.q_block(self.q_seg, i)[:, :, None] == self.kv_block(self.kv_seg, j)[:, None, :]
    return jnp.where((causal[None] & same)[:, None, None], s * self.scale, -jnp.inf)


def _finite_or_zero(x):
  return jnp.where(jnp.isfinite(x), x, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash(q, k, v, q_seg, kv_seg, q_offset, scale, bq, bk, slots):
  return _flash_forward(q, k, v, q_seg, kv_seg, q_offset, scale, bq, bk, slots)[0]


def _flash_forward(q, k, v, q_seg, kv_seg, q_offset, scale, bq, bk, slots):
  """Output [B, Tp, K, G, Dh] and the log-sum-exp [B, K, G, Tp] (-inf where nothing is seen)."""
  t = _Tiles(q, k, q_seg, kv_seg, q_offset, scale, bq, bk, slots)
  batch, _, kv_heads, groups, head_dim = q.shape

  def q_step(i):
    q_blk = t.q_block(q, i)

    def kv_step(j, carry):
      m, l, acc = carry
      s = t.scores(i, j, q_blk, t.kv_block(k, j))
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      m_safe = _finite_or_zero(m_new)  # Nothing seen yet: keep exp() away from inf - inf.
      p = jnp.exp(s - m_safe[..., None])
      correction = jnp.exp(m - m_safe)
      pv = jnp.einsum("bkgqc,bckd->bkgqd", p.astype(v.dtype), t.kv_block(v, j),
                      preferred_element_type=jnp.float32)
      return m_new, l * correction + jnp.sum(p, -1), acc * correction[..., None] + pv

    shape = (batch, kv_heads, groups, bq)
    init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(shape + (head_dim,)))
    m, l, acc = jax.lax.fori_loop(0, t.kv_end(i), kv_step, init)
    out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
    return out.astype(q.dtype), lse

  out_N, lse_N = jax.lax.map(q_step, jnp.arange(t.nq))  # [nq, B, K, G, bq, ...]
  out = jnp.moveaxis(out_N, 0, 3).reshape(batch, kv_heads, groups, -1, head_dim)
  lse = jnp.moveaxis(lse_N, 0, 3).reshape(batch, kv_heads, groups, -1)
  return out.transpose(0, 3, 1, 2, 4), lse


def _flash_fwd(q, k, v, q_seg, kv_seg, q_offset, scale, bq, bk, slots):
  out, lse = _flash_forward(q, k, v, q_seg, kv_seg, q_offset, scale, bq, bk, slots)
  return out, (q, k, v, q_seg, kv_seg, q_offset, out, lse)


def _flash_bwd(scale, bq, bk, slots, residuals, d_out):
  q, k, v, q_seg, kv_seg, q_offset, out, lse = residuals
  t = _Tiles(q, k, q_seg, kv_seg, q_offset, scale, bq, bk, slots)
  # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij, the softmax backward's row term.
  delta = jnp.einsum("bqkgd,bqkgd->bkgq", d_out.astype(jnp.float32), out.astype(jnp.float32))
  lse_safe = _finite_or_zero(lse)

  def probs(i, j, q_blk, k_blk):
    """Recomputed P [B, K, G, bq, bk] and the softmax backward dS = P (dP - delta)."""
    s = t.scores(i, j, q_blk, k_blk)
    p = jnp.exp(s - jax.lax.dynamic_slice_in_dim(lse_safe, i * bq, bq, axis=3)[..., None])
    dp = jnp.einsum("bqkgd,bckd->bkgqc", t.q_block(d_out, i), t.kv_block(v, j),
                    preferred_element_type=jnp.float32)
    ds = p * (dp - jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)[..., None])
    return p, ds

  # One pass: key blocks outside, the query blocks that see them inside, so each probability
  # block is recomputed once (not once for dQ and once for dK, dV). dQ is carried whole and each
  # query block's slice is added to in place; both loops run in ascending block order, so every
  # gradient sums its blocks in the same order as a dQ pass over key blocks would.
  def kv_step(dq, j):
    k_blk = t.kv_block(k, j)

    def q_step(i, carry):
      dq, dk, dv = carry
      q_blk, do_blk = t.q_block(q, i), t.q_block(d_out, i)
      p, ds = probs(i, j, q_blk, k_blk)
      dv += jnp.einsum("bkgqc,bqkgd->bckd", p.astype(v.dtype), do_blk,
                       preferred_element_type=jnp.float32)
      dk += jnp.einsum("bkgqc,bqkgd->bckd", ds, q_blk, preferred_element_type=jnp.float32)
      dq_blk = t.q_block(dq, i) + jnp.einsum("bkgqc,bckd->bqkgd", ds, k_blk,
                                             preferred_element_type=jnp.float32)
      return jax.lax.dynamic_update_slice_in_dim(dq, dq_blk, i * bq, axis=1), dk, dv

    zeros = jnp.zeros(k_blk.shape, jnp.float32)
    dq, dk, dv = jax.lax.fori_loop(t.q_start(j), t.nq, q_step, (dq, zeros, zeros))
    return dq, (dk, dv)

  dq, (dk_N, dv_N) = jax.lax.scan(kv_step, jnp.zeros(q.shape, jnp.float32), jnp.arange(t.nk))
  dq = dq * scale
  dk = jnp.moveaxis(dk_N, 0, 1).reshape(k.shape) * scale
  dv = jnp.moveaxis(dv_N, 0, 1).reshape(v.shape)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)

