"""Routing diagnostics (routing_diagnostics.py): the sums of the evaluation step against the
router recomputed by hand on the sown router inputs, the metrics, the cosine, and the plot; and
the router z-loss's weighting against the same hand computation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexolmo_jax import config as C
from flexolmo_jax import model as M
from flexolmo_jax import objective, partition
from flexolmo_jax import routing_diagnostics as RD
from flexolmo_jax.train_config import LossConfig

MOE = C.tiny(num_experts=3, top_k=2, expert_bias=True, expert_bias_init=-0.5)


def _batch(batch=2, length=12):
  tokens = jax.random.randint(jax.random.key(1), (batch, length), 2, 128, jnp.int32)
  segment_ids = np.ones((batch, length), np.int32)
  segment_ids[1, 8:] = 0  # Padding: excluded from every sum.
  return {"tokens": tokens, "positions": jnp.broadcast_to(jnp.arange(length), (batch, length)),
          "segment_ids": jnp.asarray(segment_ids), "targets": jnp.roll(tokens, -1, axis=1),
          "loss_mask": jnp.asarray(segment_ids, jnp.float32)}


def _by_hand(config, params, batch, expert):
  """The probabilities, top-k membership and router inputs recomputed in numpy from the router
  weights and the sown FFN inputs."""
  _, state = M.Transformer(config).apply({"params": params}, batch["tokens"],
                                         positions=batch["positions"],
                                         segment_ids=batch["segment_ids"],
                                         mutable=["intermediates"])
  (h_NxBxLxD,) = state["intermediates"]["layers"]["ffn_input"]
  h = np.asarray(h_NxBxLxD, np.float64)
  valid = np.asarray(batch["segment_ids"]) != 0
  mlp = params["layers"]["mlp"]
  prob, routed, hidden = [], [], []
  for layer in range(config.n_layers):
    logits = h[layer] @ np.asarray(mlp["router"][layer], np.float64).T
    bias = np.minimum(np.asarray(mlp["expert_bias"][layer], np.float64), 0.0)
    logits[..., 1:] += bias[1:]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top = np.argsort(-p, axis=-1)[..., :config.top_k]
    prob.append(p[..., expert][valid].sum())
    routed.append(np.any(top == expert, axis=-1)[valid].sum())
    hidden.append(h[layer][valid].sum(0))
  return np.array(prob), np.array(routed, float), np.stack(hidden), valid.sum()


@pytest.mark.parametrize("top_k", [2, 3])
def test_eval_step_routing_sums_match_the_router_by_hand(top_k):
  config = MOE.replace(top_k=top_k)
  params = M.init_params(config, jax.random.key(0))
  # Rows far apart, so that top-k decisions are not ties that float error could flip.
  params["layers"]["mlp"]["router"] = 0.5 * jax.random.normal(
      jax.random.key(2), params["layers"]["mlp"]["router"].shape)
  batch = _batch()
  step = jax.jit(objective.make_eval_step(config, partition.PUBLIC, diagnose_expert=2))
  loss, count, sums = step(params, None, batch)
  prob, routed, hidden, tokens = _by_hand(config, params, batch, 2)
  np.testing.assert_allclose(sums["prob"], prob, rtol=1e-5)
  np.testing.assert_array_equal(sums["routed"], routed)
  np.testing.assert_allclose(sums["hidden"], hidden, rtol=1e-5, atol=1e-5)
  assert float(sums["tokens"]) == tokens == 20
  # The same loss as the evaluation step without diagnostics.
  plain_loss, plain_count, plain_sums = jax.jit(objective.make_eval_step(
      config, partition.PUBLIC))(params, None, batch)
  assert plain_sums == {} and float(count) == float(plain_count)
  np.testing.assert_allclose(float(loss), float(plain_loss), rtol=1e-6)

  got = RD.metrics("math", jax.device_get(sums), np.zeros_like(hidden))
  layers = range(config.n_layers)
  assert sorted(got) == sorted(
      [f"diag/math/{n}" for n in RD.NAMES]
      + [f"diag/math/{n}/layer_{i}" for n in RD.NAMES for i in layers])
  for i in layers:
    assert 0.0 <= got[f"diag/math/new_expert_prob/layer_{i}"] <= 1.0
    assert got[f"diag/math/row_cos/layer_{i}"] == 0.0  # An unmoved row.
  np.testing.assert_allclose(got["diag/math/new_expert_prob"], np.mean(prob / tokens), rtol=1e-5)
  np.testing.assert_allclose(got["diag/math/topk_share"], np.mean(routed / tokens), rtol=1e-6)
  if top_k == config.num_experts:  # Every expert is in the top-k of every token.
    assert got["diag/math/topk_share"] == 1.0


def test_row_cosine_equals_numpy_and_is_zero_for_an_unmoved_row():
  a = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-1.0, 0.5, 2.0]])
  b = np.array([[3.0, -1.0, 0.5], [1.0, 1.0, 1.0], [-2.0, 1.0, 4.0]])
  got = RD.row_cosine(a, b)
  want0 = a[0] @ b[0] / (np.linalg.norm(a[0]) * np.linalg.norm(b[0]))
  np.testing.assert_allclose(got, [want0, 0.0, 1.0], rtol=1e-12)


def test_plot_reads_the_layer_means_per_domain_and_refuses_a_run_without_them(tmp_path):
  rows = [{"step": 0, "diag/math/row_cos": 0.0, "diag/math/row_cos/layer_0": 0.0,
           "diag/public/row_cos": 0.0},
          {"step": 5, "loss": 3.0},
          {"step": 10, "diag/math/row_cos": 0.2, "diag/public/row_cos": 0.5},
          {"step": 10, "diag/math/row_cos": 0.3, "diag/public/row_cos": 0.6}]  # Resumed: last wins.
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  domains, series = RD.read(path)
  assert domains == ["math", "public"]
  assert series["row_cos"]["math"] == ([0, 10], [0.0, 0.3])
  assert series["topk_share"]["public"] == ([], [])
  png = RD.plot(path, tmp_path / "out" / "diag.png")
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  (tmp_path / "none.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
  with pytest.raises(ValueError, match="no diag/ metrics"):
    RD.plot(tmp_path / "none.jsonl", tmp_path / "none.png")


def test_router_z_loss_is_summed_over_layers_as_olmo_core_does():
  """One z-loss per router, each weighted in full (OLMo-core's MoERouter): the objective's
  router term is weight * sum over layers of mean_t logsumexp(router logits)^2."""
  params = M.init_params(MOE, jax.random.key(0))
  params["layers"]["mlp"]["router"] = jax.random.normal(
      jax.random.key(3), params["layers"]["mlp"]["router"].shape)
  batch = _batch()
  terms = lambda loss: objective.loss_terms(MOE, params, batch, loss, 1.0)
  with_router, metrics = terms(LossConfig(0.0, 0.25, 0.0))
  without, _ = terms(LossConfig(0.0, 0.0, 0.0))
  _, state = M.Transformer(MOE).apply({"params": params}, batch["tokens"],
                                      positions=batch["positions"],
                                      segment_ids=batch["segment_ids"], mutable=["intermediates"])
  (h_NxBxLxD,) = state["intermediates"]["layers"]["ffn_input"]
  mlp, per_layer = params["layers"]["mlp"], []
  for layer in range(MOE.n_layers):
    logits = np.asarray(h_NxBxLxD[layer], np.float64) @ np.asarray(mlp["router"][layer]).T
    logits[..., 1:] += np.minimum(np.asarray(mlp["expert_bias"][layer]), 0.0)[1:]
    top = logits.max(-1, keepdims=True)
    per_layer.append(np.mean((top[..., 0] + np.log(np.exp(logits - top).sum(-1))) ** 2))
  assert MOE.n_layers > 1 and per_layer[0] != per_layer[1]
  np.testing.assert_allclose(float(metrics["router_z_loss"]), sum(per_layer), rtol=1e-5)
  np.testing.assert_allclose(float(with_router - without), 0.25 * sum(per_layer), rtol=1e-4)
