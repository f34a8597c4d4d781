r"""Router embeddings (docs/method.md, section 4): one vector per domain, the only thing owners exchange.

  python -m flexolmo_jax.embed --data=runs/data --domain=math --embedder=minilm \
      --public=runs/public --out=runs/router_embeddings.npz [--num_docs=1000]

Samples `num_docs` training documents of the domain (seeded), embeds each, L2-normalises it,
averages, and adds the row under the domain's name to the .npz that expert training reads
(`config.expert.router_embeddings`; flexolmo_jax.router_init.load_embeddings). Every owner
embeds "public" the same way, so the public row agrees. Embedders:
  public_hidden  the public model's own mean FFN input per layer: a [L, D] row (the paper's
                 weaker ablation); needs the public model's weights.
  minilm         all-MiniLM-L6-v2 (384-d, offline) projected to d_model by the shared matrix
                 `projection(projection_seed, 384, d_model)`: a [D] row. Only the public model's
                 manifest (its d_model) is read.
A JSON sidecar (`<out>.json`) records how each row was made; a row from another embedder or
projection seed is refused, since rows must be comparable.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Sequence

import numpy as np
from absl import app, flags

from flexolmo_jax import atomic, checkpoint, cli, progress, router_init, runs
from flexolmo_jax import data as data_lib
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.data import corpus

EMBEDDERS = ("public_hidden", "minilm")


def projection(seed: int, in_dim: int, out_dim: int) -> np.ndarray:
  """The shared projection [in_dim, out_dim]: N(0, 1/in_dim) entries from numpy's PCG64(seed).

  Public by construction: every owner who uses the same seed gets the same matrix.
  """
  rng = np.random.Generator(np.random.PCG64(seed))
  return (rng.standard_normal((in_dim, out_dim)) / np.sqrt(in_dim)).astype(np.float32)


def sample_documents(data: str, domain: str, num_docs: int, seed: int = 0) -> list[str]:
  """Up to `num_docs` training documents of `domain`, sampled without replacement."""
  data_lib.pipeline.ensure_domains(data_lib.DataConfig(path=data, domains=(domain,)))
  rows = corpus.read_text_split(data, domain, "train")
  if not rows:
    raise data_lib.DataError(f"domain {domain!r} in {data} has no training documents to embed")
  pick = np.random.default_rng(seed).permutation(len(rows))[:num_docs]
  return [rows[i]["text"] for i in sorted(pick)]


def _document_batches(tokenizer, texts: Sequence[str], max_tokens: int, batch_size: int):
  """One document per row, truncated to max_tokens: batches for mean_hidden_embedding."""
  for start in progress.bar(range(0, len(texts), batch_size), desc="embed", unit="batch"):
    ids = tokenizer.encode_batch(list(texts[start:start + batch_size]))
    tokens = np.zeros((len(ids), max_tokens), np.int32)
    mask = np.zeros((len(ids), max_tokens), np.float32)
    for i, doc in enumerate(ids):
      doc = doc[:max_tokens] or [tokenizer.eos_id]  # An empty document still gets one token.
      tokens[i, :len(doc)], mask[i, :len(doc)] = doc, 1.0
    positions = np.broadcast_to(np.arange(max_tokens, dtype=np.int32), tokens.shape)
    yield {"tokens": tokens, "positions": positions, "segment_ids": mask.astype(np.int32),
           "loss_mask": mask}


def embed_texts(texts: Sequence[str], embedder: str, public: str, *, data: str | None = None,
                projection_seed: int = 0, max_tokens: int = 512, batch_size: int = 16
                ) -> np.ndarray:
  """The router row of `texts`: [L, D] (public_hidden) or [D] (minilm, projected to d_model)."""
  if embedder == "public_hidden":
    config, params, _ = runs.load_params(public)
    if config.is_moe:
      raise ValueError(f"{public} is a mixture of experts; embed with the dense public model")
    if data is None:
      raise ValueError("the public_hidden embedder needs the corpus (its tokenizer)")
    tokenizer = data_lib.corpus.corpus_tokenizer(data)
    batches = _document_batches(tokenizer, texts, max_tokens, batch_size)
    return router_init.mean_hidden_embedding(config, params, batches)
  if embedder == "minilm":
    from flexolmo_jax import minilm  # pylint: disable=g-import-not-at-top
    d_model = ModelConfig.from_dict(checkpoint.read_manifest(public)["config"]).d_model
    encoder = minilm.MiniLM(batch_size=batch_size)
    mean = encoder.encode(texts).mean(axis=0)
    return (mean @ projection(projection_seed, encoder.width, d_model)).astype(np.float32)
  raise ValueError(f"embedder {embedder!r} not in {EMBEDDERS}")


def add_row(out: str, domain: str, row: np.ndarray, info: dict) -> None:
  """Adds (or replaces) `domain`'s row in the .npz at `out`, refusing incomparable rows."""
  sidecar = pathlib.Path(f"{out}.json")
  meta = json.loads(sidecar.read_text()) if sidecar.exists() else {}
  rows = {}
  if os.path.exists(out):
    with np.load(out) as existing:
      rows = {k: existing[k] for k in existing.files}
  recipe = lambda m: {k: m.get(k) for k in ("embedder", "projection_seed", "public_fingerprint")}
  for name, other in meta.items():
    if name != domain and recipe(other) != recipe(info):
      raise ValueError(f"{out} holds row {name!r} made with {recipe(other)}; this row is made "
                       f"with {recipe(info)}. Rows must come from the same embedder and "
                       "projection: write to another file or re-embed")
  rows[domain] = row
  router_init.save_embeddings(out, rows)
  meta[domain] = info
  atomic.write_text(sidecar, json.dumps(meta, indent=2, sort_keys=True) + "\n")


def embed_domain(data: str, domain: str, embedder: str, public: str, out: str, *,
                 num_docs: int = 1000, seed: int = 0, projection_seed: int = 0,
                 max_tokens: int = 512) -> np.ndarray:
  """Samples, embeds and averages `domain`'s documents; adds the row to `out`; returns it."""
  texts = sample_documents(data, domain, num_docs, seed)
  row = embed_texts(texts, embedder, public, data=data, projection_seed=projection_seed,
                    max_tokens=max_tokens)
  manifest = checkpoint.read_manifest(public)
  # The hidden-state embedder depends on the public weights; MiniLM only on d_model.
  public_id = (manifest.get("fingerprint") or checkpoint.fingerprint(runs.load_params(public)[1])
               if embedder == "public_hidden" else None)
  add_row(out, domain, row, {"embedder": embedder, "num_docs": len(texts), "seed": seed,
                             "projection_seed": projection_seed if embedder == "minilm" else None,
                             "public_fingerprint": public_id, "shape": list(row.shape)})
  return row


# ----------------------------------------------------------------------------- command line

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags, defined only when run as a program (other tools define --out too)."""
  flags.DEFINE_string("data", None, "Prepared corpus (python -m flexolmo_jax.data prepare).")
  flags.DEFINE_string("domain", None, "Domain to embed (\"public\" for the public row).")
  flags.DEFINE_enum("embedder", "minilm", EMBEDDERS, "How documents are embedded.")
  flags.DEFINE_string("public", None, "The dense public model (run dir or params artifact).")
  flags.DEFINE_string("out", None, "The embeddings .npz to add the row to (created if absent).")
  flags.DEFINE_integer("num_docs", 1000, "Documents sampled from the domain's training split.")
  flags.DEFINE_integer("seed", 0, "Document sampling seed.")
  flags.DEFINE_integer("projection_seed", 0, "Seed of the shared 384 -> d_model projection; "
                       "every owner must use the same one.")
  flags.DEFINE_integer("max_tokens", 512, "public_hidden: tokens kept per document.")
  flags.mark_flags_as_required(["data", "domain", "public", "out"])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.default_verbosity()
  row = embed_domain(FLAGS.data, FLAGS.domain, FLAGS.embedder, FLAGS.public, FLAGS.out,
                     num_docs=FLAGS.num_docs, seed=FLAGS.seed,
                     projection_seed=FLAGS.projection_seed, max_tokens=FLAGS.max_tokens)
  print(f"wrote row {FLAGS.domain!r} {list(row.shape)} to {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
