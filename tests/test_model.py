"""Model options that must not change float32 results, and the per-sequence expert mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexolmo_jax import config as C
from flexolmo_jax import model as M

MOE = C.tiny(num_experts=4, top_k=2, expert_bias=True, expert_bias_init=-0.5)


def _tokens(batch=2, length=12, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, 128, jnp.int32)


def _loss_and_grad(config, params, tokens):
  def loss(p):
    return jnp.mean(M.Transformer(config).apply({"params": p}, tokens) ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("change", [dict(scan_layers=False), dict(remat="full"),
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
