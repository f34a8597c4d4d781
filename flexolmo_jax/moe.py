"""FlexOlmo routing and expert dispatch.

Routing follows the reference exactly: softmax over ALL experts in float32, then top-k, with the
kept weights renormalised only when asked. Three interchangeable dispatch back ends compute
`sum_{e in topk} p_e FFN_e(x)`:

- "dense":   every expert on every token, masked combine. Simple; the reference for the others.
- "ragged":  tokens sorted by expert, `jax.lax.ragged_dot` grouped matmuls. Dropless; the fast
             path on TPU/GPU. (XLA:CPU computes every group for every row, so it is slow there.)
- "blocked": tokens sorted by expert into fixed-size blocks; a scan over experts runs each
             expert's SwiGLU on its blocks only (dynamic trip count). Dropless; the fast path on
             CPU. Its cost grows with k, not E.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
  """Per-token routing decisions and the statistics a trainer regularises with."""

  top_weights_TxK: jax.Array  # float32 router weight of each kept expert.
  top_experts_TxK: jax.Array  # int32 expert index of each kept expert.
  z_loss: jax.Array  # mean over tokens of logsumexp(router logits)^2.
  load_E: jax.Array  # fraction of token-slots routed to each expert (sums to 1).
  mean_prob_E: jax.Array  # mean router probability of each expert.
  probs_TxE: jax.Array  # float32 router probability of every expert for each token.

  @property
  def load_balancing_loss(self) -> jax.Array:
    """Switch-style auxiliary loss E * sum_e load_e * mean_prob_e (1.0 when balanced)."""
    return self.load_E.shape[0] * jnp.sum(self.load_E * self.mean_prob_E)


def route(
    x_TxD: jax.Array,
    router_ExD: jax.Array,
    top_k: int,
    *,
    norm_topk_prob: bool = False,
    bias_E: jax.Array | None = None,
    allowed_TxE: jax.Array | None = None,
) -> Routing:
  """Softmax over all experts, then top-k (docs/method.md, section 1).

  `bias_E` is the learned negative bias: `min(b_e, 0)` is added to the logit of every expert but
  the public one (expert 0). `allowed_TxE` excludes experts per token before the softmax, exactly
  as if their router rows were absent.
  """
  num_experts = router_ExD.shape[0]
  logits_TxE = jnp.einsum("td,ed->te", x_TxD.astype(jnp.float32), router_ExD.astype(jnp.float32))
  if bias_E is not None:
    not_public_E = jnp.arange(num_experts) > 0
    logits_TxE = logits_TxE + jnp.where(not_public_E, jnp.minimum(bias_E.astype(jnp.float32), 0.0), 0.0)
  if allowed_TxE is not None:
    logits_TxE = jnp.where(allowed_TxE, logits_TxE, -jnp.inf)
  probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
  top_weights_TxK, top_experts_TxK = jax.lax.top_k(probs_TxE, top_k)
  if norm_topk_prob:
    top_weights_TxK = top_weights_TxK / jnp.sum(top_weights_TxK, axis=-1, keepdims=True)
  if allowed_TxE is not None:
    # A token allowed fewer than k experts keeps only those: the extra slots get weight 0.
    top_weights_TxK = jnp.where(jnp.take_along_axis(allowed_TxE, top_experts_TxK, axis=-1),
                                top_weights_TxK, 0.0)
    logits_TxE = jnp.where(allowed_TxE, logits_TxE, -1e30)  # finite for the z-loss.
  z_loss = jnp.mean(jax.nn.logsumexp(logits_TxE, axis=-1) ** 2)
  slots_E = jnp.zeros((num_experts,), jnp.float32).at[top_experts_TxK.reshape(-1)].add(1.0)
  return Routing(top_weights_TxK, top_experts_TxK.astype(jnp.int32), z_loss,
                 slots_E / top_experts_TxK.size, jnp.mean(probs_TxE, axis=0), probs_TxE)


def swiglu(x, w_gate, w_up, w_down):
  return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


def dispatch(
    x_TxD: jax.Array,
    routing: Routing,
    w_gate_ExDxF: jax.Array,
    w_up_ExDxF: jax.Array,
    w_down_ExFxD: jax.Array,
    *,
    backend: str = "dense",
    block_size: int = 0,
) -> jax.Array:
  """Computes the weighted sum of the chosen experts' SwiGLU outputs for every token."""
  return dispatch_slots(x_TxD, routing.top_weights_TxK, routing.top_experts_TxK, w_gate_ExDxF,
                        w_up_ExDxF, w_down_ExFxD, backend=backend, block_size=block_size)


def dispatch_slots(
    x_TxD: jax.Array,
    weights_TxK: jax.Array,
    experts_TxK: jax.Array,
    w_gate_ExDxF: jax.Array,
    w_up_ExDxF: jax.Array,
    w_down_ExFxD: jax.Array,
    *,
    backend: str = "dense",
    block_size: int = 0,
) -> jax.Array:
  """`dispatch` on explicit slots. A slot whose expert index is E (one past the last expert)
  contributes nothing and costs no expert compute: expert parallelism marks the slots that
  another shard's experts serve this way."""
  weights_TxK = weights_TxK.astype(x_TxD.dtype)
  weights = (w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
  if backend == "dense":
    return _dense_oracle(x_TxD, weights_TxK, experts_TxK, *weights)
  if backend == "ragged":
    return _sorted_ragged(x_TxD, weights_TxK, experts_TxK, *weights)
  if backend == "blocked":
    return _sorted_blocked(x_TxD, weights_TxK, experts_TxK, *weights, block_size=block_size)
  raise ValueError(f"unknown MoE backend {backend!r}; choose dense, ragged or blocked")


def _skip_absent(y_SxD, expert_S, num_experts):
  """Zeros the rows of slots that belong to no local expert (not merely weight 0: garbage
  times 0 could be NaN)."""
  return jnp.where((expert_S < num_experts)[:, None], y_SxD, 0)


def _dense_oracle(x_TxD, weights_TxK, experts_TxK, w_gate, w_up, w_down):
  num_experts = len(w_gate)
  combine_TxE = jnp.sum(jax.nn.one_hot(experts_TxK, num_experts, dtype=x_TxD.dtype)
                        * weights_TxK[..., None], axis=1)
  # One chain of plain 2D [T, D] x [D, F] GEMMs per expert, summed in expert order. An einsum
  # over the stacked [E, D, F] weights makes XLA:CPU lay the hidden activations out as [E, F, T]:
  # its SwiGLU and their gradients then run as transposing copies, slower than the GEMMs
  # themselves (docs/performance.md).
  out_TxD = None
  for e in range(num_experts):
    y_TxD = swiglu(x_TxD, w_gate[e], w_up[e], w_down[e]) * combine_TxE[:, e:e + 1]
    out_TxD = y_TxD if out_TxD is None else out_TxD + y_TxD
  return out_TxD


def dispatch_decode(x_TxD, routing: Routing, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, *,
                    transposed: bool = False):
  """`dispatch` for the few tokens of a decoding step: the dense back end's sum, with the expert
  as the matmuls' leading batch dimension. The dense einsum "td,edf->tef" makes XLA:CPU
  transpose every expert's weights into one [D, E*F] operand on every call, a copy of the whole
  FFN per step; here each expert's weights are read where they lie. Every expert runs: with top-k
  of E, skipping the unchosen ones would need a gather of the chosen weights (a copy), which only
  pays when 2 * tokens * k < E (docs/performance.md, Decoding).

  transposed: the weights come as [E, F, D], [E, F, D], [E, D, F] (transposed_ffn), the layout in
  which XLA:CPU's kernels multiply a few rows fastest from 2 rows up (docs/performance.md)."""
  num_experts = w_gate_ExDxF.shape[0]
  combine_TxE = jnp.sum(jax.nn.one_hot(routing.top_experts_TxK, num_experts, dtype=x_TxD.dtype)
                        * routing.top_weights_TxK.astype(x_TxD.dtype)[..., None], axis=1)
  x_ExTxD = jnp.broadcast_to(x_TxD, (num_experts,) + x_TxD.shape)
  up_spec, down_spec = ("etd,efd->etf", "etf,edf->etd") if transposed else ("etd,edf->etf",
                                                                            "etf,efd->etd")
  h_ExTxF = jax.nn.silu(jnp.einsum(up_spec, x_ExTxD, w_gate_ExDxF)) * jnp.einsum(
      up_spec, x_ExTxD, w_up_ExDxF)
  y_ExTxD = jnp.einsum(down_spec, h_ExTxF, w_down_ExFxD)
  return jnp.einsum("etd,te->td", y_ExTxD, combine_TxE)


def transposed_ffn(w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD):
  """The expert weights in dispatch_decode's transposed layout (a copy)."""
  return tuple(jnp.swapaxes(w, 1, 2) for w in (w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD))


def sort_by_expert(experts_TxK):
  """Token-slot order grouped by expert, each sorted slot's token and its expert."""
  flat_experts = experts_TxK.reshape(-1)
  order = jnp.argsort(flat_experts, stable=True)
  return order, order // experts_TxK.shape[1], flat_experts[order]


def combine_slots(y_SxD, order, weights_TxK):
  """Un-sorts per-slot outputs and sums each token's k weighted slots."""
  num_tokens, k = weights_TxK.shape
  y_SxD = y_SxD[jnp.argsort(order)].reshape(num_tokens, k, -1)
  return jnp.einsum("tkd,tk->td", y_SxD, weights_TxK)


def _sorted_ragged(x_TxD, weights_TxK, experts_TxK, w_gate, w_up, w_down):
  num_experts = w_gate.shape[0]
  order, token_S, expert_S = sort_by_expert(experts_TxK)
  group_sizes = jnp.bincount(expert_S, length=num_experts).astype(jnp.int32)
  x_SxD = x_TxD[token_S]
  h_SxF = jax.nn.silu(jax.lax.ragged_dot(x_SxD, w_gate, group_sizes)) * jax.lax.ragged_dot(
      x_SxD, w_up, group_sizes)
  y_SxD = _skip_absent(jax.lax.ragged_dot(h_SxF, w_down, group_sizes), expert_S, num_experts)
  return combine_slots(y_SxD, order, weights_TxK)


def auto_block_size(num_slots: int, num_experts: int) -> int:
  """Rows per block: big enough for an efficient matmul, small enough that the at most one
  partly filled block per expert costs little (about a quarter of the real rows)."""
  target = max(num_slots // (4 * num_experts), 1)
  return int(min(max(1 << (target.bit_length() - 1), 8), 512))


def _sorted_blocked(x_TxD, weights_TxK, experts_TxK, w_gate, w_up, w_down, *, block_size):
  num_experts = w_gate.shape[0]
  num_tokens, dim = x_TxD.shape
  num_slots = experts_TxK.size
  block = block_size or auto_block_size(num_slots, num_experts)
  # Every expert's group is padded to whole blocks: at most one partial block per expert.
  num_blocks = -(-num_slots // block) + num_experts
  order, token_S, expert_S = sort_by_expert(experts_TxK)
  group_sizes = jnp.bincount(expert_S, length=num_experts)
  blocks_E = -(-group_sizes // block)
  padded_sizes = blocks_E * block
  padded_starts = jnp.cumsum(padded_sizes) - padded_sizes
  group_starts = jnp.cumsum(group_sizes) - group_sizes
  dest_S = padded_starts[expert_S] + jnp.arange(num_slots) - group_starts[expert_S]
  # Absent slots (expert index E, sorted last) get a row past the buffer: dropped, read as 0.
  dest_S = jnp.where(expert_S < num_experts, dest_S, num_blocks * block)
  # Rows of the padded buffer that hold no slot read the appended zero row (index num_tokens).
  buffer_token = jnp.full((num_blocks * block,), num_tokens, jnp.int32).at[dest_S].set(
      token_S, mode="drop")
  x_ext = jnp.concatenate([x_TxD, jnp.zeros((1, dim), x_TxD.dtype)])
  x_NxBxD = x_ext[buffer_token].reshape(num_blocks, block, dim)
  w_gate, w_up, w_down = (_vary_like(w, x_NxBxD) for w in (w_gate, w_up, w_down))
  y_NxBxD = blocked_swiglu(x_NxBxD, w_gate, w_up, w_down,
                           (padded_starts // block).astype(jnp.int32), blocks_E.astype(jnp.int32))
  y_SxD = y_NxBxD.reshape(-1, dim).at[dest_S].get(mode="fill", fill_value=0)
  return combine_slots(y_SxD, order, weights_TxK)


def _vary_like(a, *like):
  """`a`, marked as varying over every manual mesh axis that any of `like` varies over.

  Inside shard_map (expert parallelism) a loop carry must keep its type while the loop adds
  token-dependent values to it, and a custom VJP must return each gradient with its input's
  type: weights that are the same on every token shard are marked varying before entering,
  so that autodiff of the mark sums their gradient over those shards.
  """
  varying = lambda x: jax.typeof(x).manual_axis_type.varying
  missing = frozenset().union(*(varying(x) for x in like)) - varying(a)
  return jax.lax.pcast(a, tuple(sorted(missing)), to="varying") if missing else a


def _zeros(shape, dtype, *like):
  return _vary_like(jnp.zeros(shape, dtype), *like)


def _row(a, n):
  return jax.lax.dynamic_index_in_dim(a, n, keepdims=False)


def _set_row(a, value, n):
  return jax.lax.dynamic_update_index_in_dim(a, value.astype(a.dtype), n, 0)


@jax.custom_vjp
def blocked_swiglu(x_NxBxD, w_gate, w_up, w_down, first_block_E, num_blocks_E):
  """y[n] = SwiGLU_e(x[n]) for the blocks n in [first_block_E[e], + num_blocks_E[e]), zeros after.

  An outer scan over experts slices each expert's three weight matrices once; an inner loop with
  a dynamic trip count runs that expert's blocks, so empty experts and the unused tail blocks
  cost nothing. The custom VJP accumulates each expert's weight gradient in a local [I, O]
  carry and writes it once per expert: autodiff of a loop would add a full [E, I, O] array per
  block, so cost would grow with E.
  """
  return _blocked_swiglu_fwd(x_NxBxD, w_gate, w_up, w_down, first_block_E, num_blocks_E)[0]


def _blocked_swiglu_fwd(x, w_gate, w_up, w_down, first_block_E, num_blocks_E):
  num_blocks, block, dim = x.shape
  hidden = w_gate.shape[2]

  def expert(carry, inputs):
    w_gate_e, w_up_e, w_down_e, first, count = inputs

    def one_block(n, carry):
      y, gate, up = carry
      x_b = _row(x, n)
      gate_b, up_b = x_b @ w_gate_e, x_b @ w_up_e
      y_b = (jax.nn.silu(gate_b) * up_b) @ w_down_e
      return _set_row(y, y_b, n), _set_row(gate, gate_b, n), _set_row(up, up_b, n)

    return jax.lax.fori_loop(first, first + count, one_block, carry), None

  like = (x, w_gate, w_up, w_down)
  init = (_zeros((num_blocks, block, dim), x.dtype, *like),
          _zeros((num_blocks, block, hidden), x.dtype, *like),
          _zeros((num_blocks, block, hidden), x.dtype, *like))
  (y, gate, up), _ = jax.lax.scan(expert, init,
                                  (w_gate, w_up, w_down, first_block_E, num_blocks_E))
  return y, (x, w_gate, w_up, w_down, first_block_E, num_blocks_E, gate, up)


def _blocked_swiglu_bwd(residuals, dy):
  x, w_gate, w_up, w_down, first_block_E, num_blocks_E, gate, up = residuals
  f32 = jnp.float32
  like = (x, w_gate, w_up, w_down, gate, up, dy)

  def expert(dx, inputs):
    w_gate_e, w_up_e, w_down_e, first, count = inputs

    def one_block(n, carry):
      dx, dw_gate, dw_up, dw_down = carry
      x_b, gate_b, up_b, dy_b = _row(x, n), _row(gate, n), _row(up, n), _row(dy, n)
      sig = jax.nn.sigmoid(gate_b)
      act = gate_b * sig  # silu(gate)
      dw_down = dw_down + jnp.einsum("bf,bd->fd", act * up_b, dy_b, preferred_element_type=f32)
      dh = jnp.einsum("bd,fd->bf", dy_b, w_down_e)
      d_up = dh * act
      d_gate = dh * up_b * (sig * (1 + gate_b * (1 - sig)))
      dw_gate = dw_gate + jnp.einsum("bd,bf->df", x_b, d_gate, preferred_element_type=f32)
      dw_up = dw_up + jnp.einsum("bd,bf->df", x_b, d_up, preferred_element_type=f32)
      dx_b = jnp.einsum("bf,df->bd", d_gate, w_gate_e) + jnp.einsum("bf,df->bd", d_up, w_up_e)
      return _set_row(dx, dx_b, n), dw_gate, dw_up, dw_down

    zeros = lambda w: _zeros(w.shape, f32, *like)
    dx, *dw = jax.lax.fori_loop(first, first + count, one_block,
                                (dx, zeros(w_gate_e), zeros(w_up_e), zeros(w_down_e)))
    return dx, tuple(dw)

  dx, (dw_gate, dw_up, dw_down) = jax.lax.scan(
      expert, _zeros(x.shape, x.dtype, *like), (w_gate, w_up, w_down, first_block_E, num_blocks_E))
  return (dx, dw_gate.astype(w_gate.dtype), dw_up.astype(w_up.dtype),
          dw_down.astype(w_down.dtype), None, None)


blocked_swiglu.defvjp(_blocked_swiglu_fwd, _blocked_swiglu_bwd)
