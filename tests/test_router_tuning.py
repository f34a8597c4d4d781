"""Router tuning: the proxy classifier separates an owner's data from public data, only router
rows and biases train (everything else bit-identical), every row moves, and the command line."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import killing
from flexolmo_jax import checkpoint, merge
from flexolmo_jax import router_tuning as R
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.data import corpus
from flexolmo_jax.model import init_params

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_MODEL = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64,
                  rope_theta=10_000.0, pad_token_id=0, eos_token_id=1)
NAMES = ["public", "math", "code"]


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
  """A small merged artifact {public, math, code} with a learned bias (random weights)."""
  path = tmp_path_factory.mktemp("router") / "merged"
  config = ModelConfig(**TINY_MODEL, num_experts=3, top_k=2, expert_bias=True,
                       expert_bias_init=-0.5)
  params = jax.tree.map(np.asarray, init_params(config, jax.random.key(0)))
  checkpoint.save_params_artifact(path, config, params, "merged",
                                  extra_manifest={"expert_names": NAMES, "bias": "kept"})
  return str(path)


@pytest.fixture(scope="module")
def proxies(corpus_dir, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("proxies") / "proxies.json")
  for domain in ("math", "code"):
    R.save_proxies(path, domain, R.select_proxies(corpus_dir, domain, 6))
  return path


def test_classifier_separates_owner_from_public_on_held_out_documents(corpus_dir):
  texts = lambda d, s: [r["text"] for r in corpus.read_text_split(corpus_dir, d, s)]
  w, b = R.train_classifier(R.hashed_features(texts("code", "train")),
                            R.hashed_features(texts("public", "train")))
  own = R.hashed_features(texts("code", "validation") + texts("code", "test")) @ w + b
  public = R.hashed_features(texts("public", "validation") + texts("public", "test")) @ w + b
  accuracy = (np.mean(own > 0) + np.mean(public < 0)) / 2
  assert accuracy > 0.8, accuracy


def test_proxy_sets_name_public_documents_by_index_and_hash(corpus_dir, proxies):
  sets = json.loads(pathlib.Path(proxies).read_text())
  public = corpus.read_text_split(corpus_dir, "public", "train")
  for domain in ("math", "code"):
    chosen = sets[domain]
    assert len(chosen["indices"]) == 6
    assert [public[i]["hash"] for i in chosen["indices"]] == chosen["hashes"]
    assert chosen["scores"] == sorted(chosen["scores"], reverse=True)
  assert sets["math"]["indices"] != sets["code"]["indices"]


def _tune(merged, corpus_dir, proxies, out, **overrides):
  cfg = R.tuning_config(dict(merged=merged, data=corpus_dir, proxies=proxies, out=str(out),
                             public_slice=8, steps=6, warmup_steps=2, seq_len=32, batch_size=4,
                             log_every=100, **overrides))
  return R.tune(cfg)


def test_only_router_rows_and_biases_change_and_every_row_moves(merged, corpus_dir, proxies,
                                                                tmp_path):
  manifest = _tune(merged, corpus_dir, proxies, tmp_path / "tuned", lr=1e-2)
  _, before, _ = checkpoint.load_params_artifact(merged)
  config, after, _ = checkpoint.load_params_artifact(tmp_path / "tuned")
  assert manifest["expert_names"] == NAMES and config.top_k == 2  # Inference top-k is kept.
  flat_before, flat_after = checkpoint.flatten(before), checkpoint.flatten(after)
  assert sorted(flat_before) == sorted(flat_after)
  for key, value in flat_before.items():
    if key in ("layers/mlp/router", "layers/mlp/expert_bias"):
      continue
    np.testing.assert_array_equal(flat_after[key], value, err_msg=key)  # Bit-identical.
  router_before, router_after = flat_before["layers/mlp/router"], flat_after["layers/mlp/router"]
  moved = np.any(router_after != router_before, axis=-1)  # [L, E]: every row of every layer.
  assert moved.all(), moved
  bias_before = flat_before["layers/mlp/expert_bias"]
  bias_after = flat_after["layers/mlp/expert_bias"]
  assert np.all(bias_after[:, 1:] != bias_before[:, 1:])  # The public entry is never applied.
  # Opt-out still works on the tuned model.
  out_config, _, names = merge.opt_out(config, after, manifest["expert_names"], ["code"])
  assert names == ["public", "math"] and out_config.num_experts == 2


def test_proxies_from_another_corpus_are_refused(merged, corpus_dir, tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"math": {"indices": [0], "hashes": ["0" * 64], "scores": [1.0]}}))
  with pytest.raises(ValueError, match="select proxies on the same corpus"):
    _tune(merged, corpus_dir, str(bad), tmp_path / "never")
  assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_select_command_line(corpus_dir, tmp_path):
  out = tmp_path / "p.json"
  subprocess.run([sys.executable, "-m", "flexolmo_jax.router_tuning", "select",
                  f"--data={corpus_dir}", "--domain=news", "--num_proxies=3", f"--out={out}"],
                 cwd=REPO, check=True, capture_output=True,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert len(json.loads(out.read_text())["news"]["indices"]) == 3


@pytest.mark.slow
def test_tuning_resumes_exactly_after_sigkill(merged, corpus_dir, proxies, tmp_path):
  cfg = lambda out: dict(merged=merged, data=corpus_dir, proxies=proxies, out=str(tmp_path / out),
                         public_slice=8, steps=8, warmup_steps=2, seq_len=32, batch_size=4,
                         lr=1e-2, log_every=1, checkpoint_every=3)
  R.tune(R.tuning_config(cfg("straight")))
  killing.run_killed_after(5, "import json, sys\nfrom flexolmo_jax import router_tuning as R\n"
                           "R.tune(R.tuning_config(json.loads(sys.argv[1])))",
                           json.dumps(cfg("killed")))
  assert max(killing.losses(tmp_path / "killed.run")) == 5
  assert not (tmp_path / "killed").exists()
  R.tune(R.tuning_config(cfg("killed")))
  steps = killing.logged_steps(tmp_path / "killed.run")
  assert steps.count(1) == 1 and steps.count(4) == 2  # Resumed from the step-3 checkpoint.
  want, got = killing.losses(tmp_path / "straight.run"), killing.losses(tmp_path / "killed.run")
  assert sorted(got) == list(range(1, 9)) and got == want
  _, tuned, _ = checkpoint.load_params_artifact(tmp_path / "straight")
  _, resumed, _ = checkpoint.load_params_artifact(tmp_path / "killed")
  for key, value in checkpoint.flatten(tuned).items():
    np.testing.assert_array_equal(checkpoint.flatten(resumed)[key], value, err_msg=key)

