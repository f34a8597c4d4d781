"""Baselines on tiny models against hand-computed values: soup averages exactly, BTM weights are
the softmax of prefix log-likelihoods over the top-k and its mixture is the hand-mixed one,
prompt routing picks the argmax class, runs {public, chosen} and learns only from public proxy
documents, BTX trains only the router, the dense soups and BTM use the dense fine-tunes."""

import jax
import numpy as np
import pytest

from flexolmo_jax import baselines as B
from flexolmo_jax import evaluate, experts, router_tuning, scoring
from flexolmo_jax.data import corpus, load_manifest, load_tokenizer
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model import Transformer, init_params

TINY = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64,
            rope_theta=10_000.0, pad_token_id=0, eos_token_id=1)
NAMES = ["public", "math", "code"]


@pytest.fixture(scope="module")
def moe():
  config = ModelConfig(**TINY, num_experts=3, top_k=2, expert_bias=True, expert_bias_init=-0.5)
  return config, jax.tree.map(np.asarray, init_params(config, jax.random.key(0)))


@pytest.fixture(scope="module")
def batches(corpus_dir):
  return list(scoring.domain_batches(corpus_dir, "math", "validation", batch_size=4, seq_len=32,
                                     max_batches=2))


def test_soup_is_the_weighted_average_of_ffns_and_keeps_the_rest(moe):
  config, params = moe
  dense_config, soup = B.soup_from_merged(config, params, weights=[1.0, 2.0, 1.0])
  mlp = params["layers"]["mlp"]
  for key in ("gate_proj", "up_proj", "down_proj"):
    want = 0.25 * mlp[key][:, 0] + 0.5 * mlp[key][:, 1] + 0.25 * mlp[key][:, 2]
    np.testing.assert_allclose(soup["layers"]["mlp"][key], want, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(soup["layers"]["attn"]["q_proj"],
                                params["layers"]["attn"]["q_proj"])
  np.testing.assert_array_equal(soup["embed"], params["embed"])
  assert not dense_config.is_moe
  _, uniform = B.soup_from_merged(config, params)
  np.testing.assert_allclose(uniform["layers"]["mlp"]["up_proj"],
                             mlp["up_proj"].mean(axis=1), rtol=1e-6, atol=1e-7)
  Transformer(dense_config).apply({"params": soup}, np.ones((1, 4), np.int32))  # Runs dense.
  with pytest.raises(ValueError, match="soup weights"):
    B.soup_from_merged(config, params, weights=[1.0, 1.0])


def test_prefix_loglik_sums_earlier_targets_of_the_same_document():
  logp = np.log(np.array([[[0.5, 0.25, 0.5, 0.1, 0.2]],
                          [[0.1, 0.2, 0.3, 0.4, 0.5]]]))  # [M=2, B=1, L=5]
  positions = np.array([[0, 1, 2, 0, 1]])  # Two documents: tokens 0-2 and 3-4.
  mask = np.array([[1, 1, 1, 1, 0]])
  got = B.prefix_loglik(logp, positions, mask)
  want0 = [0.0, np.log(0.5), np.log(0.5 * 0.25), 0.0, np.log(0.1)]
  want1 = [0.0, np.log(0.1), np.log(0.1 * 0.2), 0.0, np.log(0.4)]
  np.testing.assert_allclose(got[:, 0], [want0, want1], atol=1e-12)


def test_btm_weights_are_softmax_over_top_k_and_mixture_is_hand_mixed():
  prefix = np.array([-1.0, -3.0, -2.0])[:, None, None]  # [M=3, B=1, L=1]
  w_all = np.exp(B.btm_log_weights(prefix, top_k=3))[:, 0, 0]
  np.testing.assert_allclose(w_all, np.exp([-1, -3, -2]) / np.exp([-1, -3, -2]).sum(), rtol=1e-12)
  log_w_top2 = B.btm_log_weights(prefix, top_k=2)[:, 0, 0]
  w_top2 = np.exp(log_w_top2)
  e = np.exp([-1.0, -2.0])
  np.testing.assert_allclose(w_top2, [e[0] / e.sum(), 0.0, e[1] / e.sum()], rtol=1e-12)
  dists = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.2, 0.5, 0.3]])  # [M, V]
  mixed = np.exp(B.mixture_logprobs(log_w_top2[:, None], np.log(dists)))
  np.testing.assert_allclose(mixed, w_top2 @ dists, rtol=1e-12)
  np.testing.assert_allclose(mixed.sum(), 1.0, rtol=1e-12)


def _dense(seed):
  config = ModelConfig(**TINY)
  return config, jax.tree.map(np.asarray, init_params(config, jax.random.key(seed)))


def test_btm_perplexity_equals_hand_mixed_next_token_distributions(batches):
  members = [_dense(1) + (None,), _dense(2) + (None,)]
  got = B.btm_perplexity(members, batches, top_k=2)
  total, count = 0.0, 0.0
  for batch in batches:
    probs = [np.asarray(jax.nn.softmax(Transformer(c).apply(
        {"params": p}, batch["tokens"], positions=batch["positions"],
        segment_ids=batch["segment_ids"]), axis=-1), np.float64) for c, p, _ in members]
    for b in range(batch["tokens"].shape[0]):
      prefix = np.zeros(2)
      for t in range(batch["tokens"].shape[1]):
        if batch["positions"][b, t] == 0:
          prefix = np.zeros(2)
        if not batch["loss_mask"][b, t]:
          continue
        w = np.exp(prefix - prefix.max())
        w /= w.sum()
        mix = w[0] * probs[0][b, t] + w[1] * probs[1][b, t]  # The whole distribution.
        target = batch["targets"][b, t]
        total, count = total - np.log(mix[target]), count + 1
        prefix += np.log([probs[0][b, t, target], probs[1][b, t, target]])
  np.testing.assert_allclose(got["nll"], total / count, rtol=1e-5)
  assert got["tokens"] == count
  alone = B.btm_perplexity(members[:1], batches, top_k=2)
  np.testing.assert_allclose(alone["nll"], scoring.perplexity(*members[0][:2], batches)["nll"],
                             rtol=1e-5)


def test_prompt_router_picks_the_argmax_class():
  router = B.PromptRouter(np.zeros((3, 1 << 14)), np.array([0.1, 0.3, 0.2]), NAMES)
  assert router.route(["anything", "else"]) == ["math", "math"]
  texts = {"public": ["the king ruled the land", "a river runs to the sea"] * 4,
           "math": ["solve 3 x plus 4 equals 10", "the sum of 7 and 8 is 15"] * 4,
           "code": ["def f ( x ) : return x", "import os ; print ( x )"] * 4}
  fitted = B.PromptRouter.fit(texts)
  scores = fitted.scores(["def g ( y ) : return y", "solve 2 x equals 8", "the sea and the land"])
  assert fitted.route(["def g ( y ) : return y", "solve 2 x equals 8", "the sea and the land"]) \
      == [NAMES[i] for i in np.argmax(scores, axis=1)] == ["code", "math", "public"]


def test_prompt_routing_runs_public_plus_the_chosen_expert(moe, batches):
  config, params = moe
  router = B.PromptRouter(np.zeros((3, 1 << 14)), np.array([0.0, 0.0, 1.0]), NAMES)  # Always code.
  got = B.prompt_routing_perplexity(config, params, NAMES, router, _Decoder(), batches)
  want = scoring.perplexity(config, params, batches, expert_mask=np.array([True, False, True]))
  np.testing.assert_allclose(got["nll"], want["nll"], rtol=1e-6)
  assert got["routed_to"] == {"public": 0.0, "math": 0.0, "code": 1.0}


def test_evaluate_scores_a_soup_baseline_as_the_soup_model(moe, corpus_dir, tmp_path):
  config, params = moe
  results = evaluate.evaluate(config, params, load_tokenizer(corpus_dir), ["perplexity"],
                              out_dir=str(tmp_path), data_root=corpus_dir, domains=["math"],
                              split="validation", names=NAMES, batch_size=4, seq_len=32,
                              baseline=B.get("soup_uniform"))
  everything = scoring.domain_batches(corpus_dir, "math", "validation", batch_size=4, seq_len=32)
  want = scoring.perplexity(*B.soup_from_merged(config, params), everything)
  assert results["perplexity"]["math"] == want
  assert results["perplexity"]["average"]["nll"] == want["nll"]
  with pytest.raises(ValueError, match="baseline soup_uniform needs a merged model"):
    evaluate.evaluate(config, params, None, ["perplexity", "mc_math"], out_dir=str(tmp_path),
                      data_root=corpus_dir, domains=["math"], names=NAMES,
                      baseline=B.get("soup_uniform"))


def test_btm_baseline_is_the_ensemble_of_public_and_each_owner(moe, corpus_dir, batches):
  config, params = moe
  parts = B.Parts.from_merged(config, params, NAMES, corpus_dir)
  public = (B.dense_config(config), experts.dense_public_params(params)[0], None)
  members = [public] + [(config.replace(top_k=2), params, np.array([n in ("public", d) for n in NAMES]))
                        for d in NAMES[1:]]
  want = B.btm_perplexity(members, batches, top_k=2)
  assert B.get("btm", B.Options(btm_top_k=2)).build(parts)(batches) == want
  with pytest.raises(ValueError, match="unknown baseline 'bmt'; baselines: soup_uniform, "
                     "soup_weighted, btm, btx, prompt_routing"):
    B.get("bmt")


class _Decoder:
  def decode(self, ids):
    return " ".join(map(str, ids))


@pytest.mark.slow
def test_btx_starts_from_random_rows_and_trains_only_the_router(moe, corpus_dir):
  config, params = moe
  rconfig, rparams = B.random_router(config, params, seed=3)
  assert not rconfig.expert_bias and "expert_bias" not in rparams["layers"]["mlp"]
  assert abs(np.std(rparams["layers"]["mlp"]["router"]) - config.init_std) < 0.1 * config.init_std
  cfg = router_tuning.RouterTuningConfig(merged="", data=corpus_dir, proxies="", out="",
                                         public_slice=8, steps=2, seq_len=16, batch_size=2,
                                         warmup_steps=0, log_every=100)
  bconfig, trained = B.btx(config, params, corpus_dir, cfg)
  assert bconfig == rconfig
  assert not np.array_equal(trained["layers"]["mlp"]["router"], rparams["layers"]["mlp"]["router"])
  for key in ("gate_proj", "up_proj", "down_proj"):
    np.testing.assert_array_equal(trained["layers"]["mlp"][key], params["layers"]["mlp"][key])


def _public_proxies(corpus_dir):
  """Hand-made proxy sets: public training documents 0-4 for math, 5-9 for code."""
  rows = corpus.read_text_split(corpus_dir, corpus.PUBLIC, "train")
  return rows, {d: {"indices": list(ids), "hashes": [rows[i]["hash"] for i in ids]}
                for d, ids in (("math", range(5)), ("code", range(5, 10)))}


def test_prompt_router_learns_only_from_public_proxy_documents(moe, corpus_dir, batches,
                                                               monkeypatch):
  rows, proxies = _public_proxies(corpus_dir)
  reads, fitted = [], []
  real_read, real_fit = corpus.read_text_split, B.PromptRouter.fit.__func__

  def spy_read(data, domain, split):
    reads.append((domain, split))
    return real_read(data, domain, split)

  def spy_fit(cls, texts_by_class, **options):
    fitted.append(texts_by_class)
    return real_fit(cls, texts_by_class, **options)

  monkeypatch.setattr(corpus, "read_text_split", spy_read)
  monkeypatch.setattr(B.PromptRouter, "fit", classmethod(spy_fit))
  config, params = moe
  parts = B.Parts.from_merged(config, params, NAMES, corpus_dir)
  score = B.get("prompt_routing", B.Options(proxies=proxies)).build(parts)
  assert set(reads) == {(corpus.PUBLIC, "train")}  # Never a closed domain's documents.
  (texts,) = fitted
  assert list(texts) == ["public", "math", "code"]
  assert texts["math"] == [rows[i]["text"] for i in range(5)]  # Labels: the proxy sets' owners.
  assert texts["code"] == [rows[i]["text"] for i in range(5, 10)]
  assert not set(texts["public"]) & set(texts["math"] + texts["code"])
  public_texts = {r["text"] for r in rows}
  assert all(t in public_texts for group in texts.values() for t in group)
  assert set(score(batches)["routed_to"]) == set(NAMES)
  assert set(reads) == {(corpus.PUBLIC, "train")}
  bad = {"math": {"indices": [0], "hashes": ["0" * 64]}}
  with pytest.raises(ValueError, match="proxy set 'math' names public document 0"):
    B.train_prompt_router(corpus_dir, bad)


def test_per_token_scores_sum_to_the_loss(moe, batches):
  config, params = moe
  members = [_dense(1) + (None,), (config, params, np.array([True, True, False]))]
  for got in (scoring.perplexity(config, params, batches, per_token=True),
              B.btm_perplexity(members, batches, top_k=2, per_token=True)):
    rows = got["token_nll"]
    assert [r.shape for r in rows] == [b["tokens"].shape for b in batches]
    assert all(np.all(r[b["loss_mask"] == 0] == 0) for r, b in zip(rows, batches))
    assert sum(r.sum() for r in rows) / got["tokens"] == pytest.approx(got["nll"], rel=1e-12)
  assert "token_nll" not in scoring.perplexity(config, params, batches)


def test_dense_baselines_average_and_ensemble_the_dense_fine_tunes(moe, corpus_dir, batches):
  config, params = moe
  public, math_ft, code_ft = _dense(0), _dense(1), _dense(2)
  parts = B.Parts(public, (config, params, tuple(NAMES)), corpus_dir,
                  (("math",) + math_ft, ("code",) + code_ft))
  want = B.btm_perplexity([m + (None,) for m in (public, math_ft, code_ft)], batches, top_k=2)
  assert B.get("btm_dense", B.Options(btm_top_k=2)).build(parts)(batches) == want
  tree = B.dense_soup([public[1], math_ft[1], code_ft[1]])
  for get in (lambda p: p["embed"], lambda p: p["layers"]["attn"]["q_proj"],
              lambda p: p["layers"]["mlp"]["up_proj"]):  # Every tensor is averaged.
    np.testing.assert_allclose(get(tree), (get(public[1]) + get(math_ft[1]) + get(code_ft[1])) / 3,
                               rtol=1e-6, atol=1e-7)
  got = B.get("soup_dense_uniform").build(parts)(batches)
  assert got == scoring.perplexity(public[0], tree, batches)
  tokens = load_manifest(corpus_dir)["domains"]
  weights = [tokens[d]["train"]["tokens"] for d in NAMES]
  assert B.get("soup_dense_weighted").build(parts)(batches) == scoring.perplexity(
      public[0], B.dense_soup([public[1], math_ft[1], code_ft[1]], weights), batches)
  with pytest.raises(ValueError, match="need dense fine-tunes of the public model"):
    B.get("btm_dense").build(B.Parts.from_merged(config, params, NAMES, corpus_dir))


def test_prompt_router_public_class_falls_back_when_proxies_cover_every_public_document(corpus_dir):
  rows = corpus.read_text_split(corpus_dir, corpus.PUBLIC, "train")
  every = {"indices": list(range(len(rows))), "hashes": [r["hash"] for r in rows]}
  router = B.train_prompt_router(corpus_dir, {"math": every}, docs_per_class=4)
  assert router.classes == ["public", "math"]
