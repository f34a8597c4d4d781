r"""Optional router tuning of a merged model (docs/method.md, section 5).

Each owner, on its own machine, picks proxy documents: a logistic-regression classifier on
hashed bag-of-words features, trained on the owner's documents against public documents,
scores every public training document; the top `num_proxies` are the owner's proxy set. Only
their ids (index and hash into the public training split) leave the owner:

  python -m flexolmo_jax.router_tuning select --data=runs/data --domain=math \
      --num_proxies=200 --out=runs/proxies.json

Then the model builder trains ONLY the router rows [L, E, D] and expert biases [L, E] of the
merged model, on every proxy set plus a slice of public data, with top-k = all experts:

  python -m flexolmo_jax.router_tuning tune --config=configs/router_tuning.py

Every other parameter is a frozen, non-differentiated argument of the step, so it stays
bit-identical; the output is a merged artifact with the same expert names, so opt-out still works.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import tempfile
import zlib
from typing import Mapping, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from flexolmo_jax import atomic, checkpoint, cli, partition, paths, runs
from flexolmo_jax import data as data_lib
from flexolmo_jax import fit as fit_lib
from flexolmo_jax.config import check_keys
from flexolmo_jax.data import DataConfig, corpus, pipeline
from flexolmo_jax.manifest import Manifest
from flexolmo_jax.train_config import LossConfig, OptimConfig, TrainConfig, to_dict

_WORD = re.compile(r"\w+|[^\w\s]")
# Hashed bag-of-words width: 4096 buckets separate these domains as well as 16k did at a quarter
# of the classifier's cost (its full-batch matmuls dominate proxy selection).
FEATURE_DIM = 1 << 12

# ----------------------------------------------------------------------------- proxy selection


def hashed_features(texts: Sequence[str], dim: int = FEATURE_DIM) -> np.ndarray:
  """[N, dim] float32: log(1 + count) of crc32-hashed lower-cased words, each row L2-normalised."""
  flat = [i * dim + zlib.crc32(w.encode()) % dim
          for i, text in enumerate(texts) for w in _WORD.findall(text.lower())]
  counts = np.bincount(np.asarray(flat, np.int64), minlength=len(texts) * dim)
  out = np.log1p(counts.reshape(len(texts), dim).astype(np.float32))
  return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)


def train_classifier(positive: np.ndarray, negative: np.ndarray, *, steps: int = 300,
                     lr: float = 0.1, l2: float = 1e-4) -> tuple[np.ndarray, float]:
  """Class-balanced logistic regression (full-batch Adam); returns (weights [dim], bias)."""
  x = jnp.asarray(np.concatenate([positive, negative]))
  y = jnp.concatenate([jnp.ones(len(positive)), jnp.zeros(len(negative))])
  weight = jnp.where(y > 0, 0.5 / len(positive), 0.5 / len(negative))

  def loss(p):
    logits = x @ p["w"] + p["b"]
    return jnp.sum(weight * optax.sigmoid_binary_cross_entropy(logits, y)) + l2 * jnp.sum(p["w"]**2)

  tx = optax.adam(lr)

  @jax.jit
  def fit(p):
    def step(carry, _):
      p, s = carry
      updates, s = tx.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, updates), s), None
    (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), length=steps)
    return p

  p = fit({"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())})
  return np.asarray(p["w"]), float(p["b"])


def select_proxies(data: str, domain: str, num_proxies: int, *, max_train_docs: int = 2000,
                   seed: int = 0) -> dict:
  """The owner's proxy set: {"indices", "hashes", "scores"} of the public training documents
  its classifier scores as most like `domain`."""
  data_lib.pipeline.ensure_domains(data_lib.DataConfig(path=data, domains=(domain,)))
  public = corpus.read_text_split(data, corpus.PUBLIC, "train")
  own = corpus.read_text_split(data, domain, "train")
  rng = np.random.default_rng(seed)
  sample = lambda rows: [rows[i]["text"] for i in rng.permutation(len(rows))[:max_train_docs]]
  w, b = train_classifier(hashed_features(sample(own)), hashed_features(sample(public)))
  scores = hashed_features([r["text"] for r in public]) @ w + b
  top = np.argsort(-scores, kind="stable")[:num_proxies]
  return {"indices": [int(i) for i in top], "hashes": [public[i]["hash"] for i in top],
          "scores": [float(scores[i]) for i in top]}


def save_proxies(path: str, domain: str, proxies: Mapping) -> None:
  """Adds (or replaces) `domain`'s proxy set in the JSON file at `path`, atomically."""
  path = pathlib.Path(path)
  sets = json.loads(path.read_text()) if path.exists() else {}
  sets[domain] = dict(proxies)
  atomic.write_text(path, json.dumps(sets, indent=1, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- router training


@dataclasses.dataclass(frozen=True)
class RouterTuningConfig:
  """What `tune` reads; configs/router_tuning.py documents each field."""

  merged: str
  data: str
  proxies: str
  out: str
  public_slice: int = 500  # Public training documents added to the proxy sets.
  steps: int = 300
  seq_len: int = 128
  batch_size: int = 16
  lr: float = 2e-3
  weight_decay: float = 0.1
  warmup_steps: int = 100
  clip_norm: float = 1.0
  router_z_loss: float = 1e-3
  seed: int = 0
  log_every: int = 50
  checkpoint_every: int = 100
  workdir: str = ""  # Checkpoints, to resume a killed run; default: OUT.run next to `out`.


def tuning_config(raw: Mapping) -> RouterTuningConfig:
  """A RouterTuningConfig from a ConfigDict or dict; unknown keys are refused by name."""
  raw = dict(raw.to_dict() if hasattr(raw, "to_dict") else raw)
  check_keys(raw, RouterTuningConfig, "config")
  return RouterTuningConfig(**raw)


def check_proxies(data: str, rows: Sequence[Mapping], proxies: Mapping[str, Mapping]) -> None:
  """Refuses a proxy set naming a document that `rows` (data's public training split) lacks."""
  for domain, proxy in proxies.items():
    for i, h in zip(proxy["indices"], proxy["hashes"]):
      if i >= len(rows) or rows[i]["hash"] != h:
        raise ValueError(f"proxy set {domain!r} names public document {i} ({h[:12]}...) that "
                         f"this corpus does not hold; select proxies on the same corpus ({data})")


def tuning_documents(data: str, proxies: Mapping[str, Mapping], public_slice: int,
                     seed: int = 0) -> list[bytes]:
  """Token records of the union of proxy sets plus `public_slice` other public documents."""
  rows = corpus.read_text_split(data, corpus.PUBLIC, "train")
  check_proxies(data, rows, proxies)
  chosen = {i for proxy in proxies.values() for i in proxy["indices"]}
  rest = [i for i in np.random.default_rng(seed).permutation(len(rows)) if i not in chosen]
  indices = sorted(chosen) + sorted(int(i) for i in rest[:public_slice])
  (path,) = corpus.token_paths(data, [corpus.PUBLIC], "train")
  source = grain.sources.ArrayRecordDataSource([path])
  return [source[i] for i in indices]


def tuning_batches(records: Sequence[bytes], seq_len: int, batch_size: int, seed: int):
  """The training pipeline's packing and batch format over an in-memory list of documents."""
  ds = grain.MapDataset.source(list(records)).shuffle(seed=seed).repeat(None)
  ds = ds.map(pipeline._next_token_pairs).to_iter_dataset()  # pylint: disable=protected-access
  ds = grain.experimental.ConcatThenSplitIterDataset(
      ds, length_struct={"inputs": seq_len, "targets": seq_len})
  ds = ds.batch(batch_size, drop_remainder=True)
  return iter(ds.map(pipeline._to_batch))  # pylint: disable=protected-access


def _records_hash(records: Sequence[bytes]) -> str:
  """sha256 over the tuning documents, so a resumed run refuses other documents."""
  digest = hashlib.sha256()
  for record in records:
    digest.update(len(record).to_bytes(8, "little") + record)
  return digest.hexdigest()


def _train_config(model_config, cfg: RouterTuningConfig) -> TrainConfig:
  """The training core's settings for `cfg`: AdamW (b2 0.999) with clipping, warmup and cosine
  decay to lr / 10; token cross-entropy plus the router z-loss, no output z-loss; one device.
  Checkpoints are written synchronously: the trainable tree is a few router rows."""
  return TrainConfig(
      mode="public", model=model_config, mesh={"data": 1},
      data=DataConfig(path=cfg.data, seq_len=cfg.seq_len, batch_size=cfg.batch_size),
      optim=OptimConfig(lr=cfg.lr, warmup_steps=cfg.warmup_steps, min_lr_ratio=0.1, b2=0.999,
                        weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm),
      loss=LossConfig(z_loss=0.0, router_z_loss=cfg.router_z_loss, load_balancing=0.0),
      steps=cfg.steps, seed=cfg.seed, log_every=cfg.log_every, eval_every=cfg.steps,
      checkpoint_every=cfg.checkpoint_every, async_checkpoint=False, progress=False)


def train_router(config, params, records: Sequence[bytes], cfg: RouterTuningConfig,
                 workdir: str | os.PathLike | None = None, init_fingerprint: str | None = None):
  """Trains only the router rows and biases of MoE `params` on `records` (top-k = all experts);
  returns (host params, last metrics). With `workdir`, a killed run resumes exactly from there;
  without, it trains in a temporary directory. `init_fingerprint`: the fingerprint of `params` when
  the caller already has it (hashing a 7x7B model takes about a minute)."""
  if workdir is None:
    with tempfile.TemporaryDirectory() as tmp:
      # Never resumed, so there is no start to check a resume against: skip the hash.
      return train_router(config, params, records, cfg, tmp, init_fingerprint="")
  model_config = config.replace(top_k=config.num_experts)  # Every expert sees every token.
  trainable, frozen = partition.split_router(jax.tree.map(np.asarray, params))
  train_config = _train_config(model_config, cfg)
  manifest = Manifest(kind="router_tuning", config=model_config.to_dict(),
                      init_fingerprint=(checkpoint.fingerprint(params) if init_fingerprint is None
                                        else init_fingerprint),
                      train_config=to_dict(train_config), versions=checkpoint.library_versions(),
                      data_manifest_hash=_records_hash(records),
                      extra={"router_tuning": dataclasses.asdict(cfg)})
  runs.check_resumable(workdir, manifest)
  trained, metrics = fit_lib.fit(train_config, workdir, model_config, partition.ROUTER, trainable,
                                 frozen, tuning_batches(records, cfg.seq_len, cfg.batch_size, cfg.seed),
                                 manifest=manifest, label="router tuning")
  return partition.join_router(jax.tree.map(np.asarray, trained), frozen), metrics


def tune(cfg: RouterTuningConfig) -> dict:
  """Tunes the merged model's router on proxies + public slice; writes `cfg.out`; returns its
  manifest (with the last metrics)."""
  checkpoint.require_local_artifact(cfg.out)
  runs.require_local_workdir(cfg.workdir or cfg.out)
  config, params, manifest = checkpoint.load_params_artifact(cfg.merged)
  if not config.is_moe or manifest.get("kind") != "merged":
    raise ValueError(f"{cfg.merged} is not a merged model; build one with python -m "
                     "flexolmo_jax.merge")
  proxies = json.loads(pathlib.Path(cfg.proxies).read_text())
  missing = sorted(set(manifest.get("expert_names", [])[1:]) - set(proxies))
  if missing:
    logging.warning("no proxy set for experts %s: their rows learn only from the others' data",
                    missing)
  records = tuning_documents(cfg.data, proxies, cfg.public_slice, cfg.seed)
  # load_params_artifact verified the manifest's fingerprint against these parameters.
  tuned, metrics = train_router(config, params, records, cfg, cfg.workdir or f"{cfg.out}.run",
                                init_fingerprint=manifest["fingerprint"])
  extra = {k: v for k, v in manifest.items()
           if k not in ("kind", "config", "fingerprint", "versions")}
  extra["router_tuning"] = {"from": str(paths.absolute(cfg.merged)),
                            "config": dataclasses.asdict(cfg), "documents": len(records),
                            "proxy_sets": sorted(proxies), "final_ce": float(metrics["ce"])}
  return checkpoint.save_params_artifact(cfg.out, config, tuned, "merged", extra_manifest=extra)


# ----------------------------------------------------------------------------- command line

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Flags, defined only when run as a program."""
  config_flags.DEFINE_config_file("config", None, "tune: configs/router_tuning.py")
  flags.DEFINE_string("data", None, "select: the prepared corpus.")
  flags.DEFINE_string("domain", None, "select: the owner's domain.")
  flags.DEFINE_integer("num_proxies", 200, "select: public documents to pick.")
  flags.DEFINE_integer("seed", 0, "select: document sampling seed.")
  flags.DEFINE_string("out", None, "select: the proxies JSON to add the set to.")


def main(argv: Sequence[str]) -> None:
  cli.default_verbosity()
  if len(argv) != 2 or argv[1] not in ("select", "tune"):
    raise app.UsageError("usage: python -m flexolmo_jax.router_tuning select|tune [flags]")
  if argv[1] == "select":
    if not (FLAGS.data and FLAGS.domain and FLAGS.out):
      raise app.UsageError("select needs --data, --domain and --out")
    cli.check_name(FLAGS.domain, "--domain")
    proxies = select_proxies(FLAGS.data, FLAGS.domain, FLAGS.num_proxies, seed=FLAGS.seed)
    save_proxies(FLAGS.out, FLAGS.domain, proxies)
    print(f"{FLAGS.domain}: {len(proxies['indices'])} proxy documents written to {FLAGS.out}")
  else:
    if FLAGS.config is None:
      raise app.UsageError("tune needs --config=configs/router_tuning.py")
    manifest = tune(tuning_config(FLAGS.config))
    print(f"wrote {manifest['router_tuning']['config']['out']}")


if __name__ == "__main__":
  define_flags()
  cli.run(main, errors=(fit_lib.NonFiniteError,))
