"""Routing analysis: shares per layer and domain against hand-computed top-k counts and the
model's own router_stats, padding excluded, the expert mask honoured, and the JSON/PNG report."""

import json

import jax
import numpy as np
import pytest

from flexolmo_jax import config as config_lib
from flexolmo_jax import routing_analysis
from flexolmo_jax.data import load_manifest
from flexolmo_jax.model import Transformer, init_params

MOE = config_lib.tiny(vocab_size=512, d_model=32, n_heads=2, n_kv_heads=1, ffn_hidden=48,
                      pad_token_id=0, eos_token_id=1, num_experts=3, top_k=2, expert_bias=True,
                      expert_bias_init=-0.1)


@pytest.fixture(scope="module")
def params():
  return init_params(MOE, jax.random.key(3))


def _batch(tokens, segment_ids=None):
  tokens = np.asarray(tokens, np.int32)
  segment_ids = np.ones_like(tokens) if segment_ids is None else np.asarray(segment_ids, np.int32)
  positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape).copy()
  return {"tokens": tokens, "positions": positions, "segment_ids": segment_ids}


def _tokens(rows, length, seed=0):
  return np.random.RandomState(seed).randint(3, 512, (rows, length))


def test_fixed_router_gives_hand_computed_shares(params):
  # Router rows all zero: every logit is 0 except the (negative) biases of experts 1 and 2, so
  # top-2 is always {public, expert 1}; masking expert 1 out leaves {public, expert 2}; allowing
  # only the public expert leaves one weighted slot per token.
  fixed = jax.tree.map(np.asarray, params)
  fixed["layers"]["mlp"]["router"] = np.zeros_like(fixed["layers"]["mlp"]["router"])
  fixed["layers"]["mlp"]["expert_bias"] = np.tile([0.0, -1.0, -2.0], (MOE.n_layers, 1)).astype(np.float32)
  batch = _batch(_tokens(2, 16))
  for mask, expected in ((None, [0.5, 0.5, 0.0]), ([True, False, True], [0.5, 0.0, 0.5]),
                         ([True, False, False], [1.0, 0.0, 0.0])):
    shares, tokens = routing_analysis.routing_shares(MOE, fixed, [batch], expert_mask=mask)
    assert tokens == 32
    np.testing.assert_allclose(shares, np.tile(expected, (MOE.n_layers, 1)), atol=1e-7)


def test_shares_equal_router_stats_and_exclude_padding(params):
  full, partial = _tokens(2, 16, seed=1), _tokens(1, 16, seed=2)
  sown_load = jax.jit(lambda p, t: Transformer(MOE).apply(
      {"params": p}, t, mutable=["router_stats"])[1]["router_stats"]["layers"]["mlp"]["load"][0])
  loads = [np.asarray(sown_load(params, t), np.float64) for t in (full, partial[:, :10])]
  # The second row is padded after 10 tokens: its padding must not count, and padding rows
  # added to fill a batch neither.
  padded = np.zeros((2, 16), np.int32)
  padded[0] = partial[0]
  segments = np.zeros((2, 16), np.int32)
  segments[0, :10] = 1
  shares, tokens = routing_analysis.routing_shares(
      MOE, params, [_batch(full), _batch(padded, segments)])
  assert tokens == 32 + 10
  # Hand-combined: slot counts are load * tokens * k, summed over the two batches.
  expected = (loads[0] * 32 + loads[1] * 10) / 42
  np.testing.assert_allclose(shares, expected, atol=1e-6)
  np.testing.assert_allclose(shares.sum(axis=1), 1.0, atol=1e-6)


def test_domain_shares_and_report(params, corpus_dir, tmp_path):
  by_domain = routing_analysis.domain_shares(MOE, params, corpus_dir, ["math", "news"],
                                             split="validation", batch_size=4, seq_len=32)
  manifest = load_manifest(corpus_dir)["domains"]
  for domain in ("math", "news"):
    split = manifest[domain]["validation"]
    # Every token but each document's last (EOS, never an input) is routed.
    assert by_domain[domain]["tokens"] == split["tokens"] - split["documents"]
    np.testing.assert_allclose(by_domain[domain]["shares"].sum(axis=1), 1.0, atol=1e-6)
  paths = routing_analysis.write_report(by_domain, ["public", "math", "code"], str(tmp_path))
  report = json.loads(open(paths["json"]).read())
  assert report["experts"] == ["public", "math", "code"] and report["domains"] == ["math", "news"]
  np.testing.assert_allclose(report["shares"]["news"], by_domain["news"]["shares"])
  with open(paths["png"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="2 expert names for 3 experts"):
    routing_analysis.write_report(by_domain, ["a", "b"], str(tmp_path))


def test_dense_model_is_refused():
  dense = MOE.replace(num_experts=0, expert_bias=False, expert_bias_init=0.0)
  with pytest.raises(ValueError, match="mixture-of-experts"):
    routing_analysis.routing_shares(dense, {}, [])


def _drawn_label_texts(fig):
  """Every heatmap panel's x/y tick label strings, after a draw (labels are laid out then)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  canvas = FigureCanvasAgg(fig)  # What savefig renders PNGs with.
  canvas.draw()
  renderer = canvas.get_renderer()
  figure_box = fig.bbox
  out = []
  for ax in fig.axes:
    if not ax.images:
      continue  # the colour bar
    for label in ax.get_xticklabels() + ax.get_yticklabels():
      if label.get_text():
        box = label.get_window_extent(renderer)
        # Whole on the canvas: nothing cut off at an edge.
        assert (box.x0 >= figure_box.x0 and box.y0 >= figure_box.y0 and box.x1 <= figure_box.x1
                and box.y1 <= figure_box.y1), label.get_text()
        out.append(label.get_text())
  return out


def test_heatmap_colour_scale_labels_and_cell_values():
  names = ["public", "academic", "educational"]
  domains = ["academic", "news"]
  shares = np.random.default_rng(0).dirichlet(np.ones(3), size=(2, 4)) * 0.35  # all <= 0.35
  fig = routing_analysis.heatmap_figure(shares, domains, names)
  images = [ax.images[0] for ax in fig.axes if ax.images]
  assert len(images) == 4  # one panel per layer
  for image in images:
    np.testing.assert_allclose(image.get_clim(), (shares.min(), shares.max()))
  texts = _drawn_label_texts(fig)
  assert set(texts) == set(names) | set(domains)
  for layer, image in enumerate(images):
    cells = sorted((t.get_position(), t.get_text()) for t in image.axes.texts)
    expected = sorted(((e, d), f"{shares[d, layer, e]:.2f}") for d in range(2) for e in range(3))
    assert cells == expected


def test_heatmap_of_a_deep_model_is_the_layer_mean_with_its_spread():
  layers = routing_analysis.MAX_LAYER_PANELS + 1
  shares = np.random.default_rng(1).dirichlet(np.ones(2), size=(1, layers))
  fig = routing_analysis.heatmap_figure(shares, ["math"], ["public", "math"])
  (image,) = [ax.images[0] for ax in fig.axes if ax.images]
  mean = shares.mean(axis=1)
  np.testing.assert_allclose(image.get_array(), mean)
  np.testing.assert_allclose(image.get_clim(), (mean.min(), mean.max()))
  texts = [t.get_text() for t in image.axes.texts]
  assert texts == [f"{mean[0, e]:.2f}\n[{shares[0, :, e].min():.2f}-{shares[0, :, e].max():.2f}]"
                   for e in range(2)]
