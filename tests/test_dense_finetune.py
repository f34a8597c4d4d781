"""The extraction study's extra training paths: a dense fine-tune that starts from existing
parameters (config.init_from) and training on a known subset of a domain (data.train_subset)."""

import json
import pathlib

import jax
import numpy as np
import pytest

from flexolmo_jax import checkpoint, objective, partition, privacy
from flexolmo_jax import data as data_lib
from flexolmo_jax import fit
from flexolmo_jax import train as T
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.data import corpus
from flexolmo_jax.model import init_params
from flexolmo_jax.train_config import train_config

TINY = dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64,
            rope_theta=10_000.0, pad_token_id=0, eos_token_id=1)


def _source(tmp_path, **model):
  """A dense params artifact from a random init (seed 1, unlike the fine-tune's seed 0)."""
  config = ModelConfig(**{**TINY, **model})
  params = jax.tree.map(np.asarray, init_params(config, jax.random.key(1)))
  path = tmp_path / "source"
  checkpoint.save_params_artifact(path, config, params, "public")
  return str(path), params


def _finetune_config(corpus_dir, init_from, **model):
  return train_config(dict(
      mode="public", model={**TINY, **model}, init_from=init_from,
      data=dict(path=corpus_dir, domains=("math",), seq_len=32, batch_size=8),
      optim=dict(lr=1e-3, warmup_steps=1), steps=1, eval_domains=("math",), eval_batches=2,
      mesh=dict(data=1), progress=False, async_checkpoint=False))


def test_init_from_starts_at_the_loaded_params(corpus_dir, tmp_path):
  source, params = _source(tmp_path)
  _, start, frozen, manifest = T.setup(_finetune_config(corpus_dir, source))
  assert frozen is None and manifest.init_from == source
  assert manifest.init_fingerprint == checkpoint.fingerprint(params)
  jax.tree.map(np.testing.assert_array_equal, start, params)


@pytest.mark.slow
def test_init_from_run_starts_at_the_source_loss(corpus_dir, tmp_path):
  source, params = _source(tmp_path)
  config = _finetune_config(corpus_dir, source)
  # The run's step-0 validation loss is the source model's own loss on the fine-tuning domain.
  eval_fn = jax.jit(objective.make_eval_step(config.model, partition.PUBLIC))
  want = fit.evaluate_domains(config.data, eval_fn, params, None, ("math",), config.eval_batches,
                               None)["val_loss/math"]
  T.train(config, str(tmp_path / "dense"))
  rows = [json.loads(line) for line in open(tmp_path / "dense" / "metrics.jsonl")]
  assert rows[0]["step"] == 0 and rows[0]["val_loss/math"] == pytest.approx(want, rel=1e-5)
  written = json.loads((tmp_path / "dense" / "manifest.json").read_text())
  assert written["init_fingerprint"] == checkpoint.fingerprint(params)


def test_init_from_refuses_a_mismatched_source(corpus_dir, tmp_path):
  source, _ = _source(tmp_path, d_model=64)
  with pytest.raises(ValueError, match=r"config.init_from=.*source: parameter .* has shape "
                                       r".*config.model must describe the architecture"):
    T.setup(_finetune_config(corpus_dir, source))
  with pytest.raises(ValueError, match="init_from needs mode 'public'"):
    train_config(dict(mode="expert", init_from=source, data=dict(path=corpus_dir),
                      expert=dict(name="math", public=source)))


def test_train_subset_reads_only_the_first_documents(corpus_dir):
  cfg = data_lib.data_config(dict(path=corpus_dir, domains=("public", "math"), seq_len=16,
                                  batch_size=4, train_subset={"math": 3}))
  full = data_lib.data_config(dict(path=corpus_dir, domains=("math",)))
  records = data_lib.pipeline.documents(cfg, "train")
  publics = len(data_lib.pipeline.documents(cfg.replace(domains=("public",)), "train"))
  everything = data_lib.pipeline.documents(full, "train")
  assert len(records) == publics + 3
  assert [records[publics + i] for i in range(3)] == [everything[i] for i in range(3)]
  # Only training is cut: validation stays whole, and DP accounting counts the subset's tokens.
  assert len(data_lib.pipeline.documents(cfg, "validation")) == \
      len(data_lib.pipeline.documents(cfg.replace(train_subset={}), "validation"))
  math_only = cfg.replace(domains=("math",))
  tokens = sum(len(np.frombuffer(everything[i], np.int32)) for i in range(3))
  assert T._num_examples(math_only) == max(tokens // 16, 1)
  batches = data_lib.make_pipeline(math_only, "train")
  seen = {t for _, b in zip(range(20), batches) for t in b["tokens"][b["loss_mask"] > 0]}
  allowed = {t for i in range(3) for t in np.frombuffer(everything[i], np.int32).tolist()}
  assert seen <= allowed
  with pytest.raises(ValueError, match="train_subset sizes must be >= 1"):
    data_lib.data_config(dict(path=corpus_dir, train_subset={"math": 0}))


def test_study_probes_the_subset_the_runs_trained_on(corpus_dir):
  rows = corpus.read_text_split(corpus_dir, "math", "train")
  docs = privacy.load_documents(corpus_dir, "math", min_tokens=1, limit=100, first=3)
  tok = data_lib.load_tokenizer(str(pathlib.Path(corpus_dir) / "tokenizer.model"))
  assert docs == [tok.encode(r["text"]) for r in rows[:3]]
  unseen = corpus.read_text_split(corpus_dir, "math", "validation")
  control = privacy.load_documents(corpus_dir, "math", min_tokens=1, limit=2, split="validation")
  assert control == [tok.encode(r["text"]) for r in unseen[:2]]
  results = {"domain": "math", "documents_available": 2, "train_docs": 3, "split": "validation",
             "protocol": dict(prefix=8, generate=8, samples=1, top_k=50, top_p=0.95,
                              temperature=1.0, threshold=0.9), "rows": []}
  assert "2 math validation documents (a control" in privacy.format_table(results)
  results["split"] = "train"
  assert "2 of the first 3 (the closed-domain" in privacy.format_table(results)
  manifest = {"train_config": {"data": {"train_subset": {"math": 32}}}}
  privacy.check_subset(manifest, "run", "math", 32)
  privacy.check_subset({}, "artifact", "math", 32)  # A params artifact records no training data.
  with pytest.raises(ValueError, match="trained on the first 32 math documents but the study "
                                       "probes all math documents; pass --train_docs=32"):
    privacy.check_subset(manifest, "run", "math", 0)
  with pytest.raises(ValueError, match="trained on all math documents"):
    privacy.check_subset({"train_config": {"data": {}}}, "run", "math", 32)
