"""Expert parallelism (expert_parallel.py) equals the 1-device MoE: logits, every gradient, and
a whole train step, on 8 fake CPU devices.

XLA:CPU has no ragged-all-to-all, so the "ragged_all_to_all" strategy's bookkeeping (offsets,
sizes, the way back) is tested here with the collective emulated by an all-gather; the real
collective's test skips on CPU with the reason.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexolmo_jax import config as C
from flexolmo_jax import expert_parallel as EP
from flexolmo_jax import model as M
from flexolmo_jax import moe
from flexolmo_jax import sharding as S
from flexolmo_jax import objective, partition
from flexolmo_jax.fit import on_mesh
from flexolmo_jax.train_config import train_config

TOL = dict(atol=1e-5, rtol=1e-5)
MODELS = {"E8k2": dict(num_experts=8, top_k=2),
          "E4k3": dict(num_experts=4, top_k=3, expert_bias=True, expert_bias_init=-0.3)}


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes):
  """jax.lax.ragged_all_to_all's documented semantics, from an all-gather of every sender's
  rows: row r of sender j lands at output_offsets_j[me] + r - input_offsets_j[me] when it lies
  in the chunk j sends me."""
  del recv_sizes  # Implied by the senders' sizes.
  me, axis = jax.lax.axis_index(EP.EXPERT_AXIS), EP.EXPERT_AXIS
  rows_NxRx = jax.lax.all_gather(operand, axis)
  start_N, size_N, dest_N = (jax.lax.all_gather(a, axis)[:, me]
                             for a in (input_offsets, send_sizes, output_offsets))
  r_R = jnp.arange(operand.shape[0])
  inside_NxR = (r_R >= start_N[:, None]) & (r_R < (start_N + size_N)[:, None])
  to_NxR = jnp.where(inside_NxR, dest_N[:, None] + r_R - start_N[:, None], output.shape[0])
  return output.at[to_NxR.reshape(-1)].set(rows_NxRx.reshape(-1, *operand.shape[1:]),
                                           mode="drop")


@pytest.fixture
def ragged_on_cpu(monkeypatch):
  monkeypatch.setattr(EP, "ragged_all_to_all", emulated_ragged_all_to_all)


def _tokens_and_mask(num_experts, masked):
  tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, 128, jnp.int32)
  if not masked:
    return tokens, None
  mask = jax.random.bernoulli(jax.random.key(2), 0.6, (8, num_experts)).at[:, 0].set(True)
  return tokens, mask


def _loss(config, mask):
  def loss(params, tokens):
    logits = M.Transformer(config).apply({"params": params}, tokens, expert_mask=mask)
    return jnp.mean(jnp.sin(logits)), logits
  return jax.value_and_grad(loss, has_aux=True)


@functools.cache
def _reference(model, masked):
  """Params, inputs, logits and gradients of the 1-device model without expert parallelism."""
  config = C.tiny(**MODELS[model], moe_backend="dense")
  params = M.init_params(config, jax.random.key(0))
  tokens, mask = _tokens_and_mask(config.num_experts, masked)
  (_, logits), grads = jax.jit(_loss(config, mask))(params, tokens)
  return config, params, tokens, mask, logits, grads


def _check_matches_reference(strategy, mesh_shape, model, backend, masked=False):
  config, params, tokens, mask, want_logits, want_grads = _reference(model, masked)
  config = config.replace(expert_parallel=strategy, moe_backend=backend)
  mesh = S.make_mesh(mesh_shape)
  params = jax.device_put(params, S.tree_shardings(params, M.logical_axes(config), mesh))
  tokens = jax.device_put(tokens, S.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    lowered = jax.jit(_loss(config, mask)).lower(params, tokens)
    (_, logits), grads = lowered.compile()(params, tokens)
  assert "manual" in lowered.as_text()  # The expert-parallel shard_map ran.
  np.testing.assert_allclose(logits, want_logits, **TOL)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads),
                               jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, **TOL, err_msg=jax.tree_util.keystr(path))
  # Experts stay sharded: each device holds E / n of them.
  n = mesh.shape["expert"]
  assert params["layers"]["mlp"]["gate_proj"].addressable_shards[0].data.shape[1] == (
      config.num_experts // n)


def _case_id(strategy, mesh_shape, model, backend, masked):
  mesh = ".".join(f"{axis}{size}" for axis, size in mesh_shape.items())
  return f"{strategy}-{mesh}-{model}-{backend}" + ("-masked" if masked else "")


# Whole-model cases compile slowly on CPU, so they are marked slow: by default the layer-level
# tests below check every strategy's gradients and the train-step test a whole model.
# Every strategy on every mesh; the model and opt-out mask vary with the mesh so that each is
# covered without the full product (whole-model compiles dominate CI time).
MESH_CASES = (({"expert": 8}, "E8k2", False),
              ({"data": 2, "expert": 4}, "E4k3", True),
              ({"fsdp": 2, "expert": 2, "tensor": 2}, "E8k2", True))
GRID = [(s, m, model, b, masked)
        for s, b in (("allgather", "blocked"), ("all_to_all", "dense"),
                     ("ragged_all_to_all", "ragged"))
        for m, model, masked in MESH_CASES]


@pytest.mark.slow
@pytest.mark.parametrize("strategy,mesh_shape,model,backend,masked",
                         [pytest.param(*c, id=_case_id(*c)) for c in GRID])
def test_model_equals_single_device(strategy, mesh_shape, model, backend, masked, ragged_on_cpu):
  _check_matches_reference(strategy, mesh_shape, model, backend, masked)


def _layer_problem(num_tokens=37, dim=16, hidden=24, num_experts=8):
  keys = jax.random.split(jax.random.key(3), 5)
  x = jax.random.normal(keys[0], (num_tokens, dim))
  router = jax.random.normal(keys[1], (num_experts, dim))
  weights = tuple(jax.random.normal(k, shape) / 4 for k, shape in zip(
      keys[2:], [(num_experts, dim, hidden), (num_experts, dim, hidden),
                 (num_experts, hidden, dim)]))
  return x, router, weights


def _layer_loss(ffn, top_k=2):
  def loss(x, router, weights):
    y = ffn(x, moe.route(x, router, top_k), weights)
    return jnp.sum(jnp.sin(y)), y
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


@pytest.mark.parametrize("strategy,backend,mesh_shape", [
    ("allgather", "blocked", {"expert": 8}),
    ("all_to_all", "ragged", {"data": 2, "expert": 4}),
    ("ragged_all_to_all", "dense", {"fsdp": 2, "expert": 2, "tensor": 2})])
def test_layer_equals_local_dispatch(strategy, backend, mesh_shape, ragged_on_cpu):
  # 37 tokens do not split over the devices: padded with zero-weight slots, cut off again.
  x, router, weights = _layer_problem()
  (_, want), want_grads = _layer_loss(
      lambda x, r, w: moe.dispatch(x, r, *w, backend="dense"))(x, router, weights)
  config = C.tiny(num_experts=8, top_k=2, moe_backend=backend, expert_parallel=strategy)
  with jax.set_mesh(S.make_mesh(mesh_shape)):
    (_, got), grads = _layer_loss(
        lambda x, r, w: EP.moe_ffn(x, r, *w, config=config))(x, router, weights)
  np.testing.assert_allclose(got, want, **TOL)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, **TOL)


def test_all_to_all_capacity():
  assert EP.a2a_capacity(16, 2, 2, 4, 0.0) == 32  # Worst case: every token's k slots here.
  assert EP.a2a_capacity(16, 3, 2, 4, 0.0) == 32  # At most e of a token's slots per shard.
  assert EP.a2a_capacity(16, 2, 2, 4, 1.0) == 8  # The balanced share.
  assert EP.a2a_capacity(16, 2, 2, 4, 100.0) == 32  # Never above the worst case.
  x, router, weights = _layer_problem(num_tokens=64)
  routing = moe.route(x, router, 2)
  want = moe.dispatch(x, routing, *weights)
  config = C.tiny(num_experts=8, top_k=2, expert_parallel="all_to_all",
                  expert_capacity_factor=0.5)
  with jax.set_mesh(S.make_mesh({"expert": 8})):
    got = jax.jit(lambda x: EP.moe_ffn(x, routing, *weights, config=config))(x)
  # Half the balanced share: dropped slots contribute nothing, the rest equal the exact result.
  per_token_error = np.abs(np.asarray(got - want)).max(axis=1)
  assert np.any(per_token_error > 1e-3) and np.any(per_token_error < 1e-6)


def test_expert_axis_must_divide_experts():
  config = C.tiny(num_experts=4, top_k=2, expert_parallel="allgather")
  tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32)
  params = jax.eval_shape(M.init_params, config, jax.random.key(0))
  with jax.set_mesh(S.make_mesh({"expert": 8})):
    with pytest.raises(ValueError, match=r"does not divide.*'expert': 4.*expert_parallel='none'"):
      jax.eval_shape(M.Transformer(config).apply, {"params": params}, tokens)


def test_no_mesh_or_none_is_gspmd_and_unit_expert_axis_dispatches_per_device():
  config = C.tiny(num_experts=4, top_k=2, expert_parallel="all_to_all")
  params = jax.eval_shape(M.init_params, config, jax.random.key(0))
  tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32)
  lowered = lambda c: jax.jit(lambda p, t: M.Transformer(c).apply({"params": p}, t)).lower(
      params, tokens).as_text()
  assert "manual" not in lowered(config)
  with jax.set_mesh(S.make_mesh({"data": 8})):
    assert "manual" not in lowered(config.replace(expert_parallel="none"))
    assert "manual" in lowered(config)
    text = lowered(config)
  assert "all_to_all" not in text and "all_gather" not in text  # Nothing to exchange.


@pytest.mark.parametrize("strategy", ["allgather", "ragged_all_to_all"])
def test_unit_expert_axis_equals_local_dispatch(strategy):
  # Experts replicated, tokens split 8 ways: no collective (not even on CPU for the ragged one).
  x, router, weights = _layer_problem()
  (_, want), want_grads = _layer_loss(
      lambda x, r, w: moe.dispatch(x, r, *w, backend="dense"))(x, router, weights)
  config = C.tiny(num_experts=8, top_k=2, moe_backend="ragged", expert_parallel=strategy)
  with jax.set_mesh(S.make_mesh({"data": 8})):
    (_, got), grads = _layer_loss(
        lambda x, r, w: EP.moe_ffn(x, r, *w, config=config))(x, router, weights)
  np.testing.assert_allclose(got, want, **TOL)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, **TOL)


def test_real_ragged_all_to_all_or_skip():
  x, router, weights = _layer_problem(num_tokens=32)
  routing = moe.route(x, router, 2)
  config = C.tiny(num_experts=8, top_k=2, expert_parallel="ragged_all_to_all")
  with jax.set_mesh(S.make_mesh({"expert": -1})):
    if len(jax.devices()) == 1:
      pytest.skip("needs several devices")
    try:
      got = jax.jit(lambda x: EP.moe_ffn(x, routing, *weights, config=config))(x)
    except NotImplementedError as err:
      assert "XLA:CPU" in str(err)
      pytest.skip(str(err))
  np.testing.assert_allclose(got, moe.dispatch(x, routing, *weights), **TOL)


def test_train_step_loss_equals_single_device():
  model = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=48,
               num_experts=4, top_k=2, moe_backend="dense")
  raw = dict(mode="public", model=model, data=dict(path="unused", batch_size=8, seq_len=16),
             optim=dict(lr=1e-2, warmup_steps=0))
  config = train_config(raw)
  params = M.init_params(config.model, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (8, 17), 0, 128, jnp.int32)
  batch = dict(tokens=tokens[:, :-1], targets=tokens[:, 1:],
               positions=jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (8, 16)),
               segment_ids=jnp.ones((8, 16), jnp.int32), loss_mask=jnp.ones((8, 16), jnp.float32))

  def run(model_config, mesh):
    tx, schedule = objective.make_optimizer(config, params)
    placed = jax.device_put(params, S.tree_shardings(params, M.logical_axes(model_config), mesh))
    state = {"params": placed, "opt_state": jax.jit(tx.init)(placed), "step": jnp.int32(0)}
    step = on_mesh(mesh, jax.jit(objective.make_train_step(config, model_config, partition.PUBLIC,
                                                         tx, schedule)))
    state, metrics = step(state, None, jax.device_put(batch, S.batch_sharding(mesh)))
    return metrics, state["params"]

  want, want_params = run(config.model, S.make_mesh({"data": 1}))
  got, got_params = run(config.model.replace(expert_parallel="allgather"),
                        S.make_mesh({"data": 2, "expert": 4}))
  for key in ("loss", "ce", "router_z_loss", "grad_norm"):
    np.testing.assert_allclose(got[key], want[key], **TOL, err_msg=key)
  np.testing.assert_allclose(got_params["layers"]["mlp"]["down_proj"],
                             want_params["layers"]["mlp"]["down_proj"], **TOL)
