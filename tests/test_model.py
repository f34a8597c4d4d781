"""Model options that must not change float32 results, the per-sequence expert mask, the sown
routing decisions, and decoding with the KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexolmo_jax import config as C
from flexolmo_jax import experts
from flexolmo_jax import model as M
from flexolmo_jax import moe

MOE = C.tiny(num_experts=4, top_k=2, expert_bias=True, expert_bias_init=-0.5)


def _tokens(batch=2, length=12, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, 128, jnp.int32)


def _loss_and_grad(config, params, tokens):
  def loss(p):
    return jnp.mean(M.Transformer(config).apply({"params": p}, tokens) ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("change", [dict(scan_layers=False), dict(remat="full"),
                                    dict(attention_impl="chunked", attention_block_size=5,
                                         remat="full"),
                                    pytest.param(dict(remat="dots"), marks=SLOW),
                                    pytest.param(dict(moe_backend="blocked"), marks=SLOW),
                                    pytest.param(dict(dtype="float32", param_dtype="float32"),
                                                 marks=SLOW)])
def test_execution_options_leave_float32_results_unchanged(change):
  params = M.init_params(MOE, jax.random.key(0))
  want_loss, want_grad = _loss_and_grad(MOE, params, _tokens())
  got_loss, got_grad = _loss_and_grad(MOE.replace(**change), params, _tokens())
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5)


def test_bfloat16_compute_is_close_to_float32():
  params = M.init_params(MOE, jax.random.key(0))
  want = M.Transformer(MOE).apply({"params": params}, _tokens())
  got = M.Transformer(MOE.replace(dtype="bfloat16")).apply({"params": params}, _tokens())
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, atol=0.05)


def test_parameter_tree_layout_and_logical_axes():
  params = M.init_params(MOE, jax.random.key(0))
  axes = M.logical_axes(MOE)
  assert jax.tree.structure(params) == jax.tree.structure(
      axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  for leaf, spec in zip(jax.tree.leaves(params), jax.tree.leaves(
      axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
    assert len(spec) == leaf.ndim and all(isinstance(a, str) for a in spec)
  mlp = params["layers"]["mlp"]
  assert mlp["gate_proj"].shape == (2, 4, 64, 96) and mlp["router"].shape == (2, 4, 64)
  np.testing.assert_array_equal(mlp["expert_bias"], -0.5)
  assert params["lm_head"].shape == (64, 128) and params["embed"].shape == (128, 64)


def test_expert_mask_equals_model_without_those_experts():
  params = M.init_params(MOE, jax.random.key(0))
  tokens = _tokens(batch=3)
  # Sequence 0 may use everything, sequence 1 not expert 2, sequence 2 only the public expert.
  mask = jnp.array([[1, 1, 1, 1], [1, 1, 0, 1], [1, 0, 0, 0]], bool)
  got = M.Transformer(MOE).apply({"params": params}, tokens, expert_mask=mask)
  for row, allowed in enumerate(mask):
    keep = np.flatnonzero(allowed)
    sub = jax.tree.map(lambda a: a, params)
    sub["layers"]["mlp"] = {k: v[:, keep] for k, v in params["layers"]["mlp"].items()}
    sub_config = C.clamp_top_k(MOE, len(keep))
    want = M.Transformer(sub_config).apply({"params": sub}, tokens[row:row + 1])
    np.testing.assert_allclose(got[row], want[0], atol=1e-5)


def test_rope_matches_rotate_half_formula():
  x = jax.random.normal(jax.random.key(0), (1, 3, 2, 8))
  pos = jnp.array([[0, 1, 5]])
  got = M.rope(x, pos, 10_000.0)
  inv = 10_000.0 ** (-np.arange(0, 8, 2) / 8)
  ang = np.concatenate([pos[0, :, None] * inv] * 2, -1)[None, :, None]
  x_np = np.asarray(x)
  rot = np.concatenate([-x_np[..., 4:], x_np[..., :4]], -1)
  np.testing.assert_allclose(got, x_np * np.cos(ang) + rot * np.sin(ang), atol=1e-5)
  np.testing.assert_allclose(got[:, 0], x[:, 0], atol=1e-6)  # Position 0 is the identity.


def test_routing_counts_equal_the_router_rerun_on_sown_ffn_inputs():
  params = M.init_params(MOE, jax.random.key(0))
  tokens = _tokens(batch=2)
  mask = jnp.array([[1, 1, 1, 1], [1, 0, 1, 0]], bool)
  valid = np.ones((2, 12), bool)
  valid[1, 7:] = False
  _, state = M.Transformer(MOE).apply({"params": params}, tokens, expert_mask=mask,
                                      mutable=["routing", "intermediates"])
  got = M.routing_counts(state, valid)
  (h_LxBxTxD,) = state["intermediates"]["layers"]["ffn_input"]
  mlp = params["layers"]["mlp"]
  for layer in range(MOE.n_layers):
    routing = moe.route(h_LxBxTxD[layer].reshape(24, -1), mlp["router"][layer], MOE.top_k,
                        bias_E=mlp["expert_bias"][layer], allowed_TxE=jnp.repeat(mask, 12, 0))
    top = np.asarray(routing.top_experts_TxK).reshape(2, 12, MOE.top_k)
    for row in range(2):
      want = np.zeros(4)
      for t in np.flatnonzero(valid[row]):
        for e in top[row, t]:
          want[e] += bool(mask[row, e])  # Slots past the allowed experts carry weight 0.
      np.testing.assert_array_equal(got[layer, row], want)
  assert got[:, 1, 1].sum() == got[:, 1, 3].sum() == 0
  np.testing.assert_array_equal(got[:, 0].sum(-1), 12 * MOE.top_k)


def test_kv_cache_prefill_then_steps_equal_one_full_forward():
  params = M.init_params(MOE, jax.random.key(0))
  tokens = _tokens(batch=2, length=10)
  want = M.Transformer(MOE).apply({"params": params}, tokens)
  model = M.Transformer(MOE)
  cache = M.init_cache(MOE, batch=2, slots=16)
  segments = jnp.ones((2, 10), jnp.int32)
  got, state = model.apply({"params": params, "cache": cache}, tokens[:, :6], segment_ids=
                           segments[:, :6], cache_index=0, mutable=["cache"])
  logits = [got]
  for i in range(6, 10):
    got, state = model.apply({"params": params, "cache": state["cache"]}, tokens[:, i:i + 1],
                             positions=jnp.full((2, 1), i), segment_ids=segments[:, i:i + 1],
                             cache_index=i, mutable=["cache"])
    logits.append(got)
  np.testing.assert_allclose(jnp.concatenate(logits, 1), want, atol=1e-5)
  assert state["cache"]["segment_ids"][:, 10:].sum() == 0  # slots past the last write are empty


@pytest.mark.parametrize("backend", ["dense", "blocked"])
def test_expert_training_layout_equals_the_assembled_moe(backend):
  # partition.EXPERT joins into experts.training_moe's layout (public FFN unstacked); the model
  # must compute exactly what it computes from the merged (assemble_moe) parameters.
  public_cfg = C.tiny(moe_backend=backend)
  public = M.init_params(public_cfg, jax.random.key(0))
  keys = jax.random.split(jax.random.key(1), 3)
  rows = jax.random.normal(keys[0], (public_cfg.n_layers, public_cfg.d_model))
  expert = experts.upcycle_expert(public, rows, bias_init=-0.5)
  expert = {k: v + 0.05 * jax.random.normal(keys[1], v.shape) for k, v in expert.items()}
  moe_cfg = experts.moe_config(public_cfg, 1, top_k=2, with_bias=True)
  tokens = jax.random.randint(keys[2], (2, 16), 0, public_cfg.vocab_size)

  def loss(expert, join):
    params = join(public, rows[::-1], [expert], with_bias=True)
    return jnp.sum(jnp.sin(M.Transformer(moe_cfg).apply({"params": params}, tokens)))

  want, want_grad = jax.value_and_grad(loss)(expert, experts.assemble_moe)
  got, got_grad = jax.value_and_grad(loss)(expert, experts.training_moe)
  assert got == want
  for k in expert:
    np.testing.assert_allclose(got_grad[k], want_grad[k], atol=1e-6, rtol=1e-5)


def test_last_only_logits_are_the_last_position_of_the_full_logits():
  params = M.init_params(MOE, jax.random.key(0))
  tokens = _tokens()
  full = M.Transformer(MOE).apply({"params": params}, tokens)
  last = M.Transformer(MOE).apply({"params": params}, tokens, last_only=True)
  assert last.shape == (2, 1, MOE.vocab_size)
  np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-6, rtol=1e-6)
