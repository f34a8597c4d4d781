"""Every MoE dispatch back end equals the dense oracle, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexolmo_jax import moe

TOL = dict(atol=2e-5, rtol=2e-5)


def _problem(num_tokens=37, dim=16, hidden=24, num_experts=6, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(keys[0], (num_tokens, dim))
  router = jax.random.normal(keys[1], (num_experts, dim))
  w_gate = jax.random.normal(keys[2], (num_experts, dim, hidden)) / 4
  w_up = jax.random.normal(keys[3], (num_experts, dim, hidden)) / 4
  w_down = jax.random.normal(keys[4], (num_experts, hidden, dim)) / 4
  return x, router, (w_gate, w_up, w_down)


def _moe_loss(backend, top_k, block_size=0, starve=()):
  def loss(x, router, weights):
    # A large negative bias pushes the starved experts out of every token's top-k.
    bias = jnp.zeros(router.shape[0]).at[jnp.array(starve, int)].set(-1e4)
    routing = moe.route(x, router, top_k, bias_E=bias)
    y = moe.dispatch(x, routing, *weights, backend=backend, block_size=block_size)
    return jnp.sum(jnp.sin(y)), y
  return loss


@pytest.mark.parametrize("backend,block_size", [("ragged", 0), ("blocked", 0), ("blocked", 8),
                                                ("blocked", 64)])
@pytest.mark.parametrize("top_k,starve", [pytest.param(1, (), marks=pytest.mark.slow), (2, (2, 4)),
                                          pytest.param(6, (), marks=pytest.mark.slow)])
def test_backend_matches_dense_oracle(backend, block_size, top_k, starve):
  x, router, weights = _problem()
  grad = lambda fn: jax.jit(jax.grad(fn, argnums=(0, 1, 2), has_aux=True))
  want_grads, want = grad(_moe_loss("dense", top_k, starve=starve))(x, router, weights)
  got_grads, got = grad(_moe_loss(backend, top_k, block_size, starve))(x, router, weights)
  np.testing.assert_allclose(got, want, **TOL)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, **TOL)
  if starve:  # Experts that got no tokens get exactly zero weight gradient.
    for g in got_grads[2]:
      assert not np.any(np.asarray(g)[list(starve)])


def test_dense_oracle_matches_explicit_sum():
  x, router, weights = _problem(num_tokens=5, num_experts=3)
  routing = moe.route(x, router, 2)
  y = moe.dispatch(x, routing, *weights, backend="dense")
  for t in range(5):
    want = sum(routing.top_weights_TxK[t, j] * moe.swiglu(
        x[t], *(w[routing.top_experts_TxK[t, j]] for w in weights)) for j in range(2))
    np.testing.assert_allclose(y[t], want, **TOL)


@pytest.mark.parametrize("top_k", [1, 2])
def test_decode_dispatch_matches_dense_oracle(top_k):
  x, router, weights = _problem(num_tokens=4, num_experts=3)
  routing = moe.route(x, router, top_k)
  np.testing.assert_allclose(moe.dispatch_decode(x, routing, *weights),
                             moe.dispatch(x, routing, *weights, backend="dense"), **TOL)
  np.testing.assert_allclose(
      moe.dispatch_decode(x, routing, *moe.transposed_ffn(*weights), transposed=True),
      moe.dispatch(x, routing, *weights, backend="dense"), **TOL)


def test_route_softmax_before_topk_not_renormalised():
  logits = jnp.array([[2.0, 1.0, 0.5, -1.0]])
  routing = moe.route(jnp.eye(4)[:1] * 0 + logits, jnp.eye(4), 2)
  probs = jax.nn.softmax(logits[0])
  np.testing.assert_allclose(routing.top_weights_TxK[0], probs[:2], rtol=1e-6)
  assert routing.top_experts_TxK.tolist() == [[0, 1]]
  renorm = moe.route(logits, jnp.eye(4), 2, norm_topk_prob=True)
  np.testing.assert_allclose(renorm.top_weights_TxK[0], probs[:2] / probs[:2].sum(), rtol=1e-6)


def test_route_bias_only_on_non_public_and_only_negative():
  x, eye = jnp.zeros((1, 3)), jnp.eye(3)
  biased = moe.route(x, eye, 3, bias_E=jnp.array([-5.0, -1.0, 3.0]))
  # Public logit untouched, expert 1 gets -1, expert 2's positive bias is clipped to 0.
  want = jax.nn.softmax(jnp.array([0.0, -1.0, 0.0]))
  got = jnp.zeros(3).at[biased.top_experts_TxK[0]].set(biased.top_weights_TxK[0])
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_route_statistics():
  x, router, _ = _problem(num_tokens=50, num_experts=4)
  routing = moe.route(x, router, 2)
  logits = x @ router.T
  np.testing.assert_allclose(routing.z_loss, np.mean(jax.nn.logsumexp(logits, -1) ** 2), rtol=1e-5)
  np.testing.assert_allclose(routing.load_E.sum(), 1.0, rtol=1e-6)
  counts = np.bincount(np.asarray(routing.top_experts_TxK).ravel(), minlength=4)
  np.testing.assert_allclose(routing.load_E, counts / 100, rtol=1e-6)
  np.testing.assert_allclose(routing.mean_prob_E, jax.nn.softmax(logits).mean(0), rtol=1e-5)


def test_allowed_mask_equals_removing_experts():
  x, router, weights = _problem(num_tokens=20, num_experts=5)
  keep = jnp.array([0, 1, 3])
  allowed = jnp.broadcast_to(jnp.isin(jnp.arange(5), keep), (20, 5))
  masked = moe.route(x, router, 3, allowed_TxE=allowed)
  removed = moe.route(x, router[keep], 3)
  y_masked = moe.dispatch(x, masked, *weights)
  y_removed = moe.dispatch(x, removed, *(w[keep] for w in weights))
  np.testing.assert_allclose(y_masked, y_removed, **TOL)


def test_block_size_auto_bounds_padding():
  for num_experts in (2, 4, 8, 16):
    block = moe.auto_block_size(8192, num_experts)
    assert 8 <= block <= 512
    assert num_experts * block <= 8192 // 4 + 1
