"""Expert parallelism: the MoE FFN with experts sharded over the "expert" mesh axis.

Routing (`moe.route`) runs outside, in GSPMD, so its statistics (z-loss, load, mean
probability) are global means exactly as without expert parallelism. The dispatch runs inside
`jax.shard_map`: tokens split over the batch axes of `sharding.DEFAULT_RULES` ("data", "fsdp",
"expert"), each device holding E / n experts, n the size of the "expert" axis. Three ways for
tokens to meet their experts:

- "allgather": all-gather the tokens of the n expert shards, run this shard's experts on every
  gathered slot routed to them (the local back end skips the others), reduce-scatter the sums
  back. Moves n x tokens x D in and out whatever the routing; works everywhere, CPU included.
- "all_to_all": each token slot goes to the shard owning its expert in a fixed-size buffer
  per (sender, receiver) pair, and its output comes back the same way. Capacity 0 (the default)
  sizes the buffer for the worst case, tokens x min(k, E/n) rows per receiver, so no slot can
  be dropped and the result is exact; a capacity factor c sizes it c x tokens x k / n (fewer
  bytes; slots past it are dropped and contribute zero).
- "ragged_all_to_all": `jax.lax.ragged_all_to_all` sends each receiver exactly the slots it
  serves: dropless with the minimum bytes on the wire. The receive buffer is still sized for
  the worst case (static shapes). Not implemented by XLA:CPU; for TPU and GPU.

Every strategy combines a token's k expert outputs with the same weighted sum as `moe.dispatch`
and equals it within float tolerance, forward and backward. With an expert axis of size 1 they
all reduce to each device dispatching its own tokens to its own copy of every expert.

Shape suffixes: T tokens (global), t tokens on one device, K top-k, D d_model, F ffn hidden,
E experts (global), e experts on one shard, S slots, R received rows, N expert shards.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from flexolmo_jax import moe, sharding
from flexolmo_jax.config import ModelConfig

EXPERT_AXIS = "expert"


def expert_shards(mesh) -> int:
  """Size of the mesh's expert axis; 1 when there is no mesh or no such axis."""
  if mesh is None or mesh.empty or EXPERT_AXIS not in mesh.axis_names:
    return 1
  return int(mesh.shape[EXPERT_AXIS])


def moe_ffn(x_TxD, routing: moe.Routing, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, *,
            config: ModelConfig):
  """`moe.dispatch` under the config's expert parallelism, on the current mesh.

  The mesh is the one set by `jax.set_mesh` (train.py sets it around the step). Without a mesh
  (or one that does not split tokens), or with `expert_parallel="none"`, this is `moe.dispatch`
  under GSPMD. With an expert axis of size 1 every device holds every expert and dispatches its
  own tokens inside shard_map: GSPMD cannot split the sort-based back ends' global sort over
  tokens, and would run the whole batch's dispatch on every device.
  """
  weights = (w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
  mesh = jax.sharding.get_abstract_mesh()
  axes = () if mesh.empty else sharding.batch_axes(mesh)
  if config.expert_parallel == "none" or not axes:
    return moe.dispatch(x_TxD, routing, *weights, backend=config.moe_backend,
                        block_size=config.moe_block_size)
  num_shards = expert_shards(mesh)
  num_experts = w_gate_ExDxF.shape[0]
  if num_experts % num_shards:
    raise ValueError(
        f"expert_parallel={config.expert_parallel!r} shards {num_experts} experts over a mesh "
        f"'expert' axis of size {num_shards}, which does not divide them; make the expert axis a "
        f"divisor of num_experts (e.g. mesh {{'expert': {math.gcd(num_experts, num_shards)}, "
        f"'data': -1}}) or set expert_parallel='none'")
  if num_shards > 1 and EXPERT_AXIS not in axes:
    raise ValueError(f"expert_parallel needs tokens split over the '{EXPERT_AXIS}' axis; the "
                     f"batch rule gives {axes}")
  # shard_map splits tokens evenly; pad with zero-weight slots (they add nothing).
  num_tokens = x_TxD.shape[0]
  devices = math.prod(mesh.shape[a] for a in axes)
  pad = -num_tokens % devices
  probs_TxK, experts_TxK = routing.top_weights_TxK, routing.top_experts_TxK
  if pad:
    x_TxD = jnp.pad(x_TxD, ((0, pad), (0, 0)))
    probs_TxK = jnp.pad(probs_TxK, ((0, pad), (0, 0)))
    experts_TxK = jnp.pad(experts_TxK, ((0, pad), (0, 0)))

  strategy = _STRATEGIES[config.expert_parallel] if num_shards > 1 else _local
  local = functools.partial(strategy, config=config, tokens_per_device=x_TxD.shape[0] // devices)
  tokens, experts = P(axes), P(EXPERT_AXIS if num_shards > 1 else None)
  y_TxD = jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens) + (experts,) * 3,
                        out_specs=tokens)(x_TxD, probs_TxK, experts_TxK, *weights)
  return y_TxD[:num_tokens]


def _block_size(config: ModelConfig, tokens_per_device, top_k, local_experts):
  """The blocked back end's block for the slots one shard serves when routing is balanced
  (tokens_per_device * top_k), not for its worst-case buffer."""
  return config.moe_block_size or moe.auto_block_size(tokens_per_device * top_k, local_experts)


def _local_dispatch(x_RxD, experts_RxK, weights, *, config, tokens_per_device, top_k):
  """Each received row through its local expert(s), weight 1 (the sender applies the router
  weight); rows marked with expert index e (past the last) cost nothing and give zeros."""
  local_experts = weights[0].shape[0]
  return moe.dispatch_slots(
      x_RxD, jnp.ones(experts_RxK.shape, x_RxD.dtype), experts_RxK, *weights,
      backend=config.moe_backend,
      block_size=_block_size(config, tokens_per_device, top_k, local_experts))


def _local(x_txD, probs_txK, experts_txK, w_gate, w_up, w_down, *, config, tokens_per_device):
  """Expert axis of size 1: this device's tokens through its copy of every expert."""
  del tokens_per_device
  return moe.dispatch_slots(x_txD, probs_txK, experts_txK, w_gate, w_up, w_down,
                            backend=config.moe_backend, block_size=config.moe_block_size)


def _localise(experts_TxK, local_experts):
  """Global expert ids -> this shard's local ids; experts of other shards -> e (absent)."""
  local_TxK = experts_TxK - jax.lax.axis_index(EXPERT_AXIS) * local_experts
  return jnp.where((local_TxK >= 0) & (local_TxK < local_experts), local_TxK, local_experts)


def _allgather(x_txD, probs_txK, experts_txK, w_gate, w_up, w_down, *, config,
               tokens_per_device):
  local_experts = w_gate.shape[0]
  gather = lambda a: jax.lax.all_gather(a, EXPERT_AXIS, tiled=True)
  x_TxD, probs_TxK, experts_TxK = gather(x_txD), gather(probs_txK), gather(experts_txK)
  top_k = experts_txK.shape[1]
  y_TxD = moe.dispatch_slots(
      x_TxD, probs_TxK, _localise(experts_TxK, local_experts), w_gate, w_up, w_down,
      backend=config.moe_backend,
      block_size=_block_size(config, tokens_per_device, top_k, local_experts))
  # Each token's output is the sum, over the expert shards, of its slots each one served.
  return jax.lax.psum_scatter(y_TxD, EXPERT_AXIS, scatter_dimension=0, tiled=True)


def a2a_capacity(tokens_per_device: int, top_k: int, local_experts: int, num_shards: int,
                 capacity_factor: float) -> int:
  """Rows one device sends each expert shard. A token's k slots name k distinct experts, so
  one shard can receive at most min(k, e) of them: capacity 0 means that worst case."""
  worst = tokens_per_device * min(top_k, local_experts)
  if capacity_factor <= 0:
    return worst
  return min(worst, math.ceil(capacity_factor * tokens_per_device * top_k / num_shards))


def _all_to_all(x_txD, probs_txK, experts_txK, w_gate, w_up, w_down, *, config,
                tokens_per_device):
  num_shards = jax.lax.axis_size(EXPERT_AXIS)
  local_experts = w_gate.shape[0]
  tokens, top_k = experts_txK.shape
  capacity = a2a_capacity(tokens, top_k, local_experts, num_shards,
                          config.expert_capacity_factor)
  expert_S = experts_txK.reshape(-1)
  dest_S = expert_S // local_experts
  # Each slot's place in its receiver's buffer: its rank among this device's slots to there.
  sent_before_SxN = jnp.cumsum(jax.nn.one_hot(dest_S, num_shards, dtype=jnp.int32), axis=0)
  rank_S = jnp.take_along_axis(sent_before_SxN, dest_S[:, None], axis=1)[:, 0] - 1
  # Slots past the capacity get a row past the buffer: the scatter drops them.
  row_S = jnp.where(rank_S < capacity, dest_S * capacity + rank_S, num_shards * capacity)
  rows = num_shards * capacity
  send_x = jnp.zeros((rows, x_txD.shape[1]), x_txD.dtype).at[row_S].set(
      x_txD[jnp.arange(expert_S.size) // top_k], mode="drop")
  send_e = jnp.full((rows,), local_experts, jnp.int32).at[row_S].set(
      expert_S % local_experts, mode="drop")
  exchange = lambda a: jax.lax.all_to_all(a, EXPERT_AXIS, 0, 0, tiled=True)
  y_RxD = _local_dispatch(exchange(send_x), exchange(send_e)[:, None], (w_gate, w_up, w_down),
                          config=config, tokens_per_device=tokens_per_device, top_k=top_k)
  y_SxD = exchange(y_RxD).at[row_S].get(mode="fill", fill_value=0)
  return jnp.einsum("tkd,tk->td", y_SxD.reshape(tokens, top_k, -1), probs_txK.astype(y_SxD.dtype))


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
  """`jax.lax.ragged_all_to_all` over the expert axis, refusing XLA:CPU (which lacks it) by
  name at trace time rather than failing deep in compilation."""
  if jax.default_backend() == "cpu":
    raise NotImplementedError(
        "expert_parallel='ragged_all_to_all' needs the ragged-all-to-all collective, which "
        "XLA:CPU does not implement; on CPU use 'allgather' or 'all_to_all' (TPU and GPU run it)")
  return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                   recv_sizes, axis_name=EXPERT_AXIS)


def _exclusive_cumsum(a, axis=0):
  return jnp.cumsum(a, axis=axis) - a


def _ragged_all_to_all(x_txD, probs_txK, experts_txK, w_gate, w_up, w_down, *, config,
                       tokens_per_device):
  num_shards = jax.lax.axis_size(EXPERT_AXIS)
  local_experts = w_gate.shape[0]
  tokens, top_k = experts_txK.shape
  # Sorting slots by expert also groups them by receiving shard, in shard order.
  order, token_S, expert_S = moe.sort_by_expert(experts_txK)
  send_N = jnp.bincount(expert_S // local_experts, length=num_shards).astype(jnp.int32)
  sent_NxN = jax.lax.all_gather(send_N, EXPERT_AXIS)  # [sender, receiver]
  me = jax.lax.axis_index(EXPERT_AXIS)
  # Receivers stack what they get in sender order: my chunk starts after lower senders' ones.
  there_N = _exclusive_cumsum(sent_NxN)[me]
  recv_N = sent_NxN[:, me]
  offsets_N = _exclusive_cumsum(send_N)
  capacity = num_shards * tokens * min(top_k, local_experts)  # Worst case: dropless.

  def there(operand, fill):
    out = jnp.full((capacity,) + operand.shape[1:], fill, operand.dtype)
    return ragged_all_to_all(operand, out, offsets_N, send_N, there_N, recv_N)

  x_RxD = there(x_txD[token_S], 0)
  experts_R = there(expert_S % local_experts, local_experts)  # Unfilled rows: absent.
  y_RxD = _local_dispatch(x_RxD, experts_R[:, None], (w_gate, w_up, w_down), config=config,
                          tokens_per_device=tokens_per_device, top_k=top_k)
  # The way back: the received chunks return to where each sender's chunk started.
  back = jnp.zeros((expert_S.size, x_txD.shape[1]), y_RxD.dtype)
  y_SxD = ragged_all_to_all(y_RxD, back, _exclusive_cumsum(recv_N), recv_N,
                            jax.lax.all_to_all(offsets_N, EXPERT_AXIS, 0, 0, tiled=True), send_N)
  return moe.combine_slots(y_SxD, order, probs_txK.astype(y_SxD.dtype))


_STRATEGIES = {
    "allgather": _allgather,
    "all_to_all": _all_to_all,
    "ragged_all_to_all": _ragged_all_to_all,
}
