"""Router embeddings: the JAX MiniLM equals transformers' BertModel + mean pooling, the shared
projection, both embedders end to end into the file expert training reads, and refusals."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from flexolmo_jax import checkpoint, embed, minilm, router_init
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model import init_params

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_MODEL = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64,
                  rope_theta=10_000.0, pad_token_id=0, eos_token_id=1)
TEXTS = ["The cat sat on the mat.", "def f(x):\n    return x + 1\n",
         "The integral of x^2 dx is x^3 / 3 + C. " * 80, "ok", ""]


@pytest.fixture(scope="module")
def public(tmp_path_factory):
  path = tmp_path_factory.mktemp("embed") / "public"
  config = ModelConfig(**TINY_MODEL)
  params = jax.tree.map(np.asarray, init_params(config, jax.random.key(0)))
  checkpoint.save_params_artifact(path, config, params, "public")
  return str(path)


def test_minilm_matches_transformers_bert_with_mean_pooling():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  path = minilm.model_dir()
  ours = minilm.MiniLM(path).encode(TEXTS)
  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  model = transformers.BertModel.from_pretrained(path).eval()
  batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
  with torch.no_grad():
    hidden = model(**batch).last_hidden_state
  mask = batch["attention_mask"][..., None].float()
  want = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
  assert ours.shape == (len(TEXTS), 384)
  np.testing.assert_allclose(ours, want, atol=2e-5)
  np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)


def test_projection_is_shared_and_scaled():
  a, b = embed.projection(7, 384, 32), embed.projection(7, 384, 32)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (384, 32) and not np.array_equal(a, embed.projection(8, 384, 32))
  assert abs(np.std(a) * np.sqrt(384) - 1.0) < 0.05


@pytest.mark.slow
def test_minilm_rows_separate_domains_and_feed_expert_training(corpus_dir, public, tmp_path):
  out = str(tmp_path / "emb.npz")
  rows = {d: embed.embed_domain(corpus_dir, d, "minilm", public, out, num_docs=12)
          for d in ("public", "code", "math")}
  loaded = router_init.load_embeddings(out, ["public", "code", "math"], 2, 32)
  for d, row in rows.items():
    assert row.shape == (32,)
    np.testing.assert_array_equal(loaded[d], np.broadcast_to(row, (2, 32)))
  cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
  assert cos(rows["code"], rows["math"]) < 0.95  # Different domains give different rows.
  # Deterministic: re-embedding replaces the row with the same values.
  again = embed.embed_domain(corpus_dir, "code", "minilm", public, out, num_docs=12)
  np.testing.assert_array_equal(again, rows["code"])
  with pytest.raises(ValueError, match="same embedder and projection"):
    embed.embed_domain(corpus_dir, "news", "minilm", public, out, num_docs=4, projection_seed=1)


@pytest.mark.slow
def test_public_hidden_command_line(corpus_dir, public, tmp_path):
  out = tmp_path / "hidden.npz"
  for domain in ("public", "math"):
    subprocess.run([sys.executable, "-m", "flexolmo_jax.embed", f"--data={corpus_dir}",
                    f"--domain={domain}", "--embedder=public_hidden", f"--public={public}",
                    f"--out={out}", "--num_docs=6", "--max_tokens=32"],
                   cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
  rows = router_init.load_embeddings(str(out), ["public", "math"], 2, 32)
  assert rows["public"].shape == (2, 32) and np.all(np.isfinite(rows["math"]))
  assert not np.allclose(rows["public"], rows["math"])
  result = subprocess.run([sys.executable, "-m", "flexolmo_jax.embed", f"--data={corpus_dir}",
                           "--domain=code", "--embedder=minilm", f"--public={public}",
                           f"--out={out}", "--num_docs=2"],
                          cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode != 0 and "public_hidden" in result.stderr


def test_unknown_domain_is_refused(corpus_dir, public, tmp_path):
  with pytest.raises(Exception, match="astrology"):
    embed.embed_domain(corpus_dir, "astrology", "minilm", public, str(tmp_path / "x.npz"))
  assert not (tmp_path / "x.npz").exists()
