"""Extraction study: Levenshtein similarity, the Wilson interval, a memorised document is
extracted, and a tiny end-to-end study writes its table."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flexolmo_jax import config as config_lib
from flexolmo_jax import model, privacy
from flexolmo_jax import train as T
from flexolmo_jax.generate import Sampling
from flexolmo_jax.train_config import train_config


@pytest.mark.parametrize("a, b, distance", [
    ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "abc", 0),
    ("intention", "execution", 5), ("abcdef", "azced", 3)])
def test_levenshtein_hand_computed(a, b, distance):
  assert privacy.levenshtein(list(a), list(b)) == distance
  assert privacy.levenshtein(list(b), list(a)) == distance


def test_similarity_on_tokens():
  assert privacy.similarity([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
  assert privacy.similarity([1, 2, 3, 4], [1, 9, 3, 4]) == 0.75
  assert privacy.similarity(list(range(10)), list(range(1, 11))) == pytest.approx(0.8)
  assert privacy.similarity([], []) == 1.0


def test_wilson_interval_known_values():
  # Wilson (1927) / Newcombe (1998), table I: 81 of 263 -> [0.2553, 0.3662]; 0 of 10 -> [0, 0.2775].
  low, high = privacy.wilson_interval(81, 263)
  assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
  low, high = privacy.wilson_interval(0, 10)
  assert low == 0.0 and round(high, 4) == 0.2775
  with pytest.raises(ValueError):
    privacy.wilson_interval(0, 0)


@pytest.mark.slow
def test_memorised_document_is_extracted():
  """A tiny model trained until it memorises one document reproduces it; a fresh one does not."""
  cfg = config_lib.tiny(vocab_size=64, d_model=32, n_heads=2, n_kv_heads=1, ffn_hidden=64)
  doc = np.random.default_rng(0).integers(3, 64, size=24).tolist()
  other = np.random.default_rng(1).integers(3, 64, size=24).tolist()
  tokens = jnp.asarray([doc[:-1]])
  targets = jnp.asarray([doc[1:]])
  params = model.init_params(cfg, jax.random.key(0))
  fresh = params
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    def loss(p):
      logits = model.Transformer(cfg).apply({"params": p}, tokens)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(150):
    params, opt_state = step(params, opt_state)
  kwargs = dict(prefix=8, length=16, samples=3, sampling=Sampling(1.0, 50, 0.95), threshold=0.9)
  memorised = privacy.extraction(cfg, params, [doc, other], **kwargs)
  assert memorised["best_similarity"][0] == 1.0
  assert memorised["extracted"] == 1 and memorised["documents"] == 2
  assert privacy.extraction(cfg, fresh, [doc], **kwargs)["extracted"] == 0


@pytest.mark.slow
def test_tiny_study_writes_table(corpus_dir, tmp_path):
  tiny = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64,
              rope_theta=10_000.0, pad_token_id=0, eos_token_id=1)
  common = dict(log_every=1, eval_every=100, eval_batches=1, checkpoint_every=100,
                progress=False, async_checkpoint=False)
  data = dict(path=corpus_dir, seq_len=32, batch_size=8)
  public = tmp_path / "public"
  T.train(train_config(dict(mode="public", model=tiny, steps=2, data=data, **common)), str(public))
  # The closed-domain runs train on the first 6 math documents only (the memorisation setting).
  subset = dict(data, train_subset={"math": 6})
  dense = tmp_path / "dense"
  T.train(train_config(dict(mode="public", model=tiny, init_from=str(public), steps=2,
                            data=dict(subset, domains=("math",)), **common)), str(dense))

  def expert_run(name, router_source="owner_data", **extra):
    workdir = tmp_path / name
    T.train(train_config(dict(mode="expert", expert=dict(name="math", public=str(public),
                                                         embed_batches=1,
                                                         router_source=router_source),
                              model_overrides=dict(moe_backend="dense"), data=subset, steps=2,
                              optim=dict(lr=1e-3, warmup_steps=1), **extra, **common)),
            str(workdir))
    return str(workdir)

  expert = expert_run("expert")
  dp_expert = expert_run("dp", router_source="public", dp=dict(enabled=True, noise_multiplier=1.0))
  out = tmp_path / "study"
  study = dict(data=corpus_dir, domain="math", public=str(public), prefix=8, length=8)
  results = privacy.run_study(**study, expert=expert, dense=str(dense), dp_expert=dp_expert,
                              out=str(out), num_docs=4, samples=2, train_docs=6)
  assert [r["documents"] for r in results["rows"]] == [4] * 5
  assert results["rows"][4]["epsilon"] > 0
  table = (out / "results.md").read_text().strip().splitlines()
  assert len(table) == 4 + 5 and table[2].startswith("| model |")
  assert "of the first 6" in table[0]
  assert table[4].startswith("| public |") and "dense fine-tuned" in table[5]
  assert "opted out" in table[7] and "DP" in table[8]
  assert json.loads((out / "results.json").read_text())["documents_available"] == 4
  with pytest.raises(ValueError, match="not trained with DP-SGD"):
    privacy.run_study(**study, expert=expert, dp_expert=expert, out=str(tmp_path / "x"),
                      num_docs=1, samples=1, train_docs=6)
  with pytest.raises(ValueError, match="trained on the first 6 math documents"):
    privacy.run_study(**study, expert=expert, out=str(tmp_path / "x"), num_docs=1, samples=1)
  with pytest.raises(ValueError, match="is not a dense model"):
    privacy.run_study(**study, expert=expert, dense=expert, out=str(tmp_path / "x"), num_docs=1,
                      samples=1, train_docs=6)
