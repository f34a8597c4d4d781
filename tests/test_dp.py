"""DP-SGD: per-example clipping bounds each example's contribution, the noise has std
sigma*C/B, the accountant reproduces a published epsilon, and an expert run records epsilon; the
router row never comes from the owner's data, and the noise key lives outside the run directory."""

import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexolmo_jax import dp, runs
from flexolmo_jax import train as T
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.data import corpus
from flexolmo_jax.model import init_params
from flexolmo_jax.train_config import train_config

TINY = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64,
            rope_theta=10_000.0, pad_token_id=0, eos_token_id=1)


def _linear_loss(w, example):
  """Per-example squared error of a linear model: gradient = 2 (w.x - y) x."""
  pred = jnp.sum(example["x"] * w["w"], axis=-1)
  loss = jnp.mean((pred - example["y"]) ** 2)
  return loss, {"loss": loss}


def test_clipping_bounds_each_example():
  w = {"w": jnp.zeros((4,))}
  x = jnp.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1e6, 0]])  # Example 2: a huge gradient.
  batch = {"x": x, "y": jnp.array([0.1, 0.2, 1e6])}
  _, grads = dp.per_example_grads(_linear_loss, w, batch)
  np.testing.assert_allclose(grads["w"][0], [-0.2, 0, 0, 0], rtol=1e-6)  # 2 (0 - 0.1) x.
  clip = 1.0
  summed, norms = dp.clip_and_sum(grads, clip)
  assert norms[2] > 1e11
  # The small examples pass unchanged; the huge one contributes exactly C along its direction.
  np.testing.assert_allclose(summed["w"], [-0.2, -0.4, -clip, 0.0], rtol=1e-6)
  # Removing any one example moves the sum by at most C (the sensitivity DP-SGD relies on).
  for i in range(3):
    keep = [j for j in range(3) if j != i]
    rest, _ = dp.clip_and_sum(jax.tree.map(lambda g: g[jnp.array(keep)], grads), clip)
    assert float(jnp.linalg.norm(summed["w"] - rest["w"])) <= clip * (1 + 1e-6)


def test_noise_std_is_sigma_c_over_b():
  zeros = {"a": jnp.zeros((200_000,)), "b": jnp.zeros((50, 100))}
  clip, sigma, batch = 0.5, 1.3, 8
  noisy = dp.noisy_mean(zeros, jax.random.key(0), clip_norm=clip, noise_multiplier=sigma,
                        batch_size=batch)
  sample = np.concatenate([np.ravel(v) for v in jax.tree.leaves(noisy)])
  expected = sigma * clip / batch
  # Sample std of n = 205,000 normals: relative standard error 1/sqrt(2n) ~ 0.16%.
  assert abs(sample.std() / expected - 1) < 0.01
  assert abs(sample.mean()) < 5 * expected / math.sqrt(sample.size)


def test_private_grads_zero_noise_is_mean_of_clipped():
  w = {"w": jnp.ones((3,))}
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(6, 3)) * 3, jnp.float32),
           "y": jnp.asarray(rng.normal(size=(6,)), jnp.float32)}
  micro = jax.tree.map(lambda v: v.reshape(2, 3, *v.shape[1:]), batch)
  grads, (losses, _) = dp.private_grads(_linear_loss, w, micro, jax.random.key(0), clip_norm=0.7,
                                        noise_multiplier=0.0)
  _, per = dp.per_example_grads(_linear_loss, w, batch)
  summed, _ = dp.clip_and_sum(per, 0.7)
  np.testing.assert_allclose(grads["w"], summed["w"] / 6, rtol=1e-5)
  assert losses.shape == (6,)


def test_epsilon_matches_abadi_et_al():
  """Abadi et al. 2016, "Deep Learning with Differential Privacy", section 3.1: q = 0.01,
  sigma = 4, delta = 1e-5, T = 10000 steps give epsilon ~ 1.26 with the moments accountant.

  The moments accountant is RDP at integer orders with the classic conversion
  eps = min_a RDP(a) + log(1/delta) / (a - 1): that reproduces 1.26 from dp-accounting's RDP
  curve. `dp.epsilon` uses dp-accounting's tighter conversion and finer orders, so it must be
  lower: 1.035.
  """
  import dp_accounting  # pylint: disable=g-import-not-at-top
  orders = np.arange(2, 65)
  accountant = dp_accounting.rdp.RdpAccountant(list(orders))
  accountant.compose(dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(4.0)),
                     10_000)
  classic = np.min(np.asarray(accountant._rdp) + math.log(1e5) / (orders - 1))  # pylint: disable=protected-access
  assert round(float(classic), 2) == 1.26
  eps = dp.epsilon(sampling_prob=0.01, noise_multiplier=4.0, steps=10_000, delta=1e-5)
  assert eps == pytest.approx(1.0355, abs=1e-3)
  assert eps < classic


def test_epsilon_bad_input():
  with pytest.raises(ValueError, match="sampling probability"):
    dp.epsilon(sampling_prob=0.0, noise_multiplier=1.0, steps=10, delta=1e-5)
  with pytest.raises(ValueError, match="delta"):
    dp.epsilon(sampling_prob=0.1, noise_multiplier=1.0, steps=10, delta=0.0)


def test_public_mode_refuses_dp(corpus_dir):
  with pytest.raises(ValueError, match="dp.enabled needs mode 'expert'"):
    train_config(dict(mode="public", model=dict(vocab_size=512, d_model=32, n_layers=1, n_heads=2,
                                                n_kv_heads=1, ffn_hidden=64),
                      data=dict(path=corpus_dir), dp=dict(enabled=True)))
  with pytest.raises(KeyError, match="noise_multiplier"):
    train_config(dict(mode="expert", expert=dict(name="math", public="x"),
                      data=dict(path=corpus_dir), dp=dict(noise_multipler=1.0)))


@pytest.mark.slow
def test_dp_expert_run_records_epsilon(corpus_dir, tmp_path):
  common = dict(log_every=1, eval_every=100, eval_batches=1, checkpoint_every=100,
                progress=False, async_checkpoint=False)
  public = tmp_path / "public"
  T.train(train_config(dict(mode="public", model=TINY, steps=2, data=dict(
      path=corpus_dir, seq_len=32, batch_size=8), **common)), str(public))
  expert = tmp_path / "expert"
  cfg = train_config(dict(
      mode="expert", expert=dict(name="math", public=str(public), embed_batches=1,
                                 router_source="public"),
      model_overrides=dict(moe_backend="dense"), data=dict(path=corpus_dir, seq_len=32,
                                                           batch_size=8),
      optim=dict(lr=1e-3, warmup_steps=1), grad_accum=2, steps=3,
      dp=dict(enabled=True, clip_norm=1.0, noise_multiplier=1.1, delta=1e-5), **common))
  last = T.train(cfg, str(expert))
  assert math.isfinite(last["loss"])
  manifest = json.loads((expert / "manifest.json").read_text())
  record = manifest["dp"]
  expected = dp.epsilon(sampling_prob=record["sampling_prob"], noise_multiplier=1.1, steps=3,
                        delta=1e-5)
  assert record["epsilon"] == pytest.approx(expected) and record["epsilon"] > 0
  assert record["num_examples"] > 8 and record["steps"] == 3
  key_file = pathlib.Path(f"{expert}.secrets") / runs.NOISE_KEY_FILE
  assert key_file.exists() and (key_file.stat().st_mode & 0o077) == 0
  assert (key_file.parent.stat().st_mode & 0o777) == 0o700
  assert not list(expert.rglob(runs.NOISE_KEY_FILE))  # Nothing merge reads holds it.
  assert record["router_row"]["source"] == "public"


@pytest.mark.slow
def test_dp_run_resumes_exactly_with_the_key_from_its_secrets_dir(corpus_dir, tmp_path):
  common = dict(log_every=1, eval_every=100, eval_batches=1, progress=False,
                async_checkpoint=False, data=dict(path=corpus_dir, seq_len=32, batch_size=8))
  public = tmp_path / "public"
  T.train(train_config(dict(mode="public", model=TINY, steps=1, checkpoint_every=1, **common)),
          str(public))
  secrets, expert = tmp_path / "vault", tmp_path / "expert"
  cfg = train_config(dict(
      mode="expert", expert=dict(name="math", public=str(public), embed_batches=1,
                                 router_source="public"),
      model_overrides=dict(moe_backend="dense"), optim=dict(lr=1e-2, warmup_steps=1), steps=4,
      checkpoint_every=2, secrets_dir=str(secrets), dp=dict(enabled=True, noise_multiplier=1.0),
      **common))
  T.train(cfg, str(expert))
  _, uninterrupted, _ = runs.load_params(expert)
  shutil.rmtree(expert / "checkpoints" / "4")
  T.train(cfg, str(expert))  # Resumes from step 2, drawing the same noise from the same key.
  _, resumed, _ = runs.load_params(expert)
  jax.tree.map(np.testing.assert_array_equal, uninterrupted, resumed)
  assert (secrets / runs.NOISE_KEY_FILE).exists() and not pathlib.Path(f"{expert}.secrets").exists()
  # Without its key the run is refused, not continued with other noise.
  shutil.rmtree(expert / "checkpoints" / "4")
  (secrets / runs.NOISE_KEY_FILE).unlink()
  with pytest.raises(ValueError, match="is missing; restore the key"):
    T.train(cfg, str(expert))


def _dp_expert(corpus_dir, **expert):
  return dict(mode="expert", expert=dict(name="math", public="runs/public", **expert),
              data=dict(path=corpus_dir, seq_len=32, batch_size=8), dp=dict(enabled=True))


@pytest.mark.parametrize("expert", [{}, {"router_embeddings": "rows.npz"}])
def test_dp_run_refuses_a_router_row_from_the_owner_data(corpus_dir, expert):
  with pytest.raises(ValueError, match="router_source='public', or 'proxies'"):
    train_config(_dp_expert(corpus_dir, **expert))
  with pytest.raises(ValueError, match="go together"):
    train_config(_dp_expert(corpus_dir, router_source="proxies"))


def test_proxy_router_row_embeds_the_proxy_documents_and_is_recorded(corpus_dir, tmp_path):
  public = corpus.read_text_split(corpus_dir, corpus.PUBLIC, "train")
  proxies = tmp_path / "proxies.json"
  proxies.write_text(json.dumps({"math": {"indices": [3, 7, 11],
                                          "hashes": [public[i]["hash"] for i in (3, 7, 11)]}}))
  config = ModelConfig(**TINY)
  params = init_params(config, jax.random.key(0))
  cfg = train_config(_dp_expert(corpus_dir, router_source="proxies", router_proxies=str(proxies),
                                embed_batches=1))
  rows, record = T._router_rows(cfg, config, params)  # pylint: disable=protected-access
  assert record == {"source": "proxies", "router_proxies": str(proxies), "documents": 3,
                    "embed_batches": 1,
                    "reads": "the owner's proxy set (public training documents)"}
  assert rows["math"].shape == (2, 32) and np.all(np.isfinite(rows["math"]))
  assert not np.allclose(rows["math"], rows["public"])
  public_cfg = train_config(_dp_expert(corpus_dir, router_source="public", embed_batches=1))
  rows, record = T._router_rows(public_cfg, config, params)  # pylint: disable=protected-access
  assert record["source"] == "public"
  np.testing.assert_array_equal(rows["math"], rows["public"])
  proxies.write_text(json.dumps({"code": {"indices": [], "hashes": []}}))
  with pytest.raises(ValueError, match="no proxy set for 'math'"):
    T._router_rows(cfg, config, params)  # pylint: disable=protected-access


def test_noise_key_lives_outside_the_run_directory(tmp_path):
  workdir = tmp_path / "runs" / "math_dp"
  secrets = runs.secrets_dir(workdir)
  assert secrets == tmp_path / "runs" / "math_dp.secrets"
  key = jax.random.key_data(runs.dp_noise_key(workdir, secrets))
  np.testing.assert_array_equal(key, jax.random.key_data(runs.dp_noise_key(workdir, secrets)))
  assert (secrets.stat().st_mode & 0o777) == 0o700
  assert ((secrets / runs.NOISE_KEY_FILE).stat().st_mode & 0o777) == 0o600
  assert not workdir.exists()
  with pytest.raises(ValueError, match="inside the run directory"):
    runs.secrets_dir(workdir, str(workdir / "secrets"))
  # A key an earlier version wrote into the run directory is moved out, unchanged.
  old = tmp_path / "old"
  (old / "checkpoints" / "10").mkdir(parents=True)
  (secrets / runs.NOISE_KEY_FILE).rename(old / runs.NOISE_KEY_FILE)
  moved = runs.dp_noise_key(old, runs.secrets_dir(old))
  np.testing.assert_array_equal(jax.random.key_data(moved), key)
  assert not (old / runs.NOISE_KEY_FILE).exists()
  # A run with checkpoints whose key is gone is refused: other noise would break exact resume.
  with pytest.raises(ValueError, match="is missing; restore the key"):
    runs.dp_noise_key(old, tmp_path / "elsewhere")
