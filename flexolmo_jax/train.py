"""Training: the public model, or one data owner's expert against the frozen public model.

  python -m flexolmo_jax.train --config=configs/public.py --workdir=runs/public
  python -m flexolmo_jax.train --config=configs/math_expert.py --workdir=runs/math
  python -m flexolmo_jax.train --config=configs/math_dense.py --config.init_from=runs/public

Public mode starts from a random init, or with `config.init_from` from an existing dense model's
parameters (a full fine-tune, fresh optimizer; shapes checked against `config.model`).

This module holds the command line and the setups (what a run trains and against what); the
objective is objective.py, the trainable/frozen split partition.py ("public" or "expert", by
mode), and the loop, with exact resume, fit.py.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from flexolmo_jax import checkpoint, cli, distributed, dp, experts, partition, paths, router_init
from flexolmo_jax import router_tuning, runs
from flexolmo_jax import data as data_lib
from flexolmo_jax.data import mix as data_mix
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.fit import NonFiniteError, fit
from flexolmo_jax.manifest import Manifest
from flexolmo_jax.model import init_params
from flexolmo_jax.train_config import ROUTER_SOURCES, TrainConfig, check_override_keys, to_dict
from flexolmo_jax.train_config import train_config


# ----------------------------------------------------------------------------- setup


def _domain_data(config: TrainConfig):
  """The DataConfig for training (the owner's domain only, in expert mode)."""
  if config.mode == "expert":
    return config.data.replace(domains=(config.expert.name,))
  return config.data


def _data_manifest_hash(path: str) -> str:
  manifest = pathlib.Path(path) / "manifest.json"
  return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.exists() else ""


def _tokenizer_check(model_config: ModelConfig, data_path: str,
                     public_manifest: dict | None = None) -> dict:
  """Refuses a corpus tokenized for another model (another tokenizer than the public model's, or
  more tokens than the model has); returns the manifest keys that record the tokenizer."""
  tok = data_lib.corpus.corpus_tokenizer(data_path)
  if public_manifest is not None:
    data_lib.tokenizer.check_matches(public_manifest, tok, model="the public model")
  if tok.vocab_size > model_config.vocab_size:
    raise ValueError(f"the corpus tokenizer has {tok.vocab_size} tokens but model.vocab_size is "
                     f"{model_config.vocab_size}; set config.model.vocab_size >= {tok.vocab_size}")
  return data_lib.tokenizer.manifest_entry(tok)


def setup(config: TrainConfig):
  """Everything a run needs before its first step; raises (writing nothing) on bad input.

  Returns (model_config, trainable, frozen, manifest).
  """
  data_cfg = _domain_data(config)
  data_lib.pipeline.ensure_domains(data_cfg)  # Unknown domains fail here, listing the known ones.
  if config.mode == "public":
    manifest = Manifest(kind="public", config=config.model.to_dict(),
                        **_tokenizer_check(config.model, config.data.path))
    if not config.init_from:
      return config.model, init_params(config.model, jax.random.key(config.seed)), None, manifest
    params = _init_from(config.model, config.init_from)
    manifest = manifest.replace(init_from=str(config.init_from),
                                init_fingerprint=checkpoint.fingerprint(params))
    return config.model, params, None, manifest

  e = config.expert
  public_config, public_params, public_manifest = runs.load_params(e.public)
  if public_config.is_moe:
    raise ValueError(f"{e.public} holds a mixture of experts; expert training needs the dense "
                     "public model it started from")
  tokenizer_keys = _tokenizer_check(public_config, config.data.path, public_manifest)
  model_config = experts.moe_config(public_config, 1, top_k=e.top_k, with_bias=e.bias,
                                    bias_init=e.bias_init).replace(**config.model_overrides)
  rows, router_row = _router_rows(config, public_config, public_params)
  frozen = {"public": public_params, "public_router": rows["public"]}
  trainable = experts.upcycle_expert(public_params, rows[e.name],
                                     bias_init=e.bias_init if e.bias else None)
  manifest = Manifest(
      kind="expert", name=e.name, config=model_config.to_dict(), public_path=str(e.public),
      public_fingerprint=checkpoint.fingerprint(public_params),
      public_router_fingerprint=checkpoint.fingerprint({"r": rows["public"]}),
      # A DP run records where the released row came from (never the owner's data, TrainConfig).
      dp={"router_row": router_row} if config.dp.enabled else None, **tokenizer_keys)
  return model_config, trainable, frozen, manifest


def _init_from(model_config: ModelConfig, path: str):
  """A dense model's parameters from `path` (run directory or params artifact), checked to fit
  `model_config` tensor by tensor, so a fine-tune never silently trains another architecture."""
  source_config, params, manifest = runs.load_params(path)
  if manifest.get("kind") == "expert" or source_config.is_moe:
    raise ValueError(f"config.init_from={path} holds an expert or a mixture of experts; a dense "
                     "fine-tune starts from a dense model (e.g. the public run)")
  runs.check_shapes(model_config, params, f"config.init_from={path}",
                    hint="config.model must describe the architecture of the model it starts from")
  return jax.tree.map(lambda x: np.asarray(x, model_config.param_dtype), params)


def _router_rows(config: TrainConfig, public_config: ModelConfig, public_params):
  """({"public": r_pub, name: the expert's row}, each [L, D]; a record of where the expert's row
  came from), by config.expert.router_source (train_config.ROUTER_SOURCES)."""
  e = config.expert
  shape = (public_config.n_layers, public_config.d_model)
  source = {"source": e.router_source, "reads": ROUTER_SOURCES[e.router_source]}
  if e.router_embeddings:
    rows = router_init.load_embeddings(e.router_embeddings, ["public", e.name], *shape)
    return rows, {**source, "router_embeddings": str(e.router_embeddings)}
  embed = lambda batches: router_init.mean_hidden_embedding(
      public_config, public_params, (b for _, b in zip(range(e.embed_batches), batches)))
  domain_batches = lambda domain: iter(data_lib.make_pipeline(
      config.data.replace(domains=(domain,), shuffle=False), "train", num_epochs=1))
  rows = {"public": embed(domain_batches("public"))}
  if e.router_source == "public":
    rows[e.name] = rows["public"]
  elif e.router_source == "proxies":
    proxy_set = _proxy_set(e.router_proxies, e.name)
    records = router_tuning.tuning_documents(config.data.path, {e.name: proxy_set}, 0)
    rows[e.name] = embed(router_tuning.tuning_batches(
        records, config.data.seq_len, config.data.batch_size, config.seed))
    source = {**source, "router_proxies": str(e.router_proxies), "documents": len(records)}
  else:
    print("no router embeddings given: router rows from the public model's mean hidden state",
          flush=True)
    rows[e.name] = embed(domain_batches(e.name))
  return rows, {**source, "embed_batches": e.embed_batches}


def _proxy_set(path: str, name: str) -> dict:
  """`name`'s proxy set from the proxies JSON at `path`."""
  if not pathlib.Path(path).is_file():
    raise FileNotFoundError(f"config.expert.router_proxies={path} does not exist; select a proxy "
                            f"set with python -m flexolmo_jax.router_tuning select --domain={name}")
  sets = json.loads(pathlib.Path(path).read_text())
  if name not in sets:
    raise ValueError(f"{path} holds no proxy set for {name!r} (it holds {sorted(sets)}); select "
                     f"one with python -m flexolmo_jax.router_tuning select --domain={name}")
  return sets[name]


# ----------------------------------------------------------------------------- the run


def train(config: TrainConfig, workdir: str) -> dict[str, float]:
  """Runs (or resumes) training; returns the last logged metrics."""
  runs.require_local_workdir(workdir)
  paths.require_local(config.data.path, "data.path", "the corpus is read as local array_record "
                      "files")
  model_config, trainable, frozen, manifest = setup(config)
  manifest = manifest.replace(train_config=to_dict(config), versions=checkpoint.library_versions(),
                              data_manifest_hash=_data_manifest_hash(config.data.path))
  runs.check_resumable(workdir, manifest)
  if frozen is not None and distributed.is_primary():
    runs.write_public_router(workdir, frozen["public_router"])  # Merging needs r_pub itself.
  data_cfg = _domain_data(config)
  # data.batch_size is the global batch; each host reads its own documents (pipeline.py shards
  # by jax.process_index()) and yields its share of the rows.
  batches = data_mix.owner_batches(data_cfg, config.expert.public_share,
                                   distributed.host_batch_size(data_cfg.batch_size))
  eval_domains = config.eval_domains or (
      data_cfg.domains + (("public",) if config.mode == "expert" else ()))
  _, last = fit(config, workdir, model_config, partition.BY_MODE[config.mode], trainable, frozen,
                batches, manifest=manifest, eval_domains=eval_domains,
                label=f"train {manifest.name or 'public'}")
  if config.dp.enabled:
    manifest = manifest.replace(dp={**manifest.dp, **dp.report(
        config.dp, batch_size=data_cfg.batch_size, steps=config.steps,
        num_examples=_num_examples(data_cfg))})
  if distributed.is_primary():
    runs.write_manifest(workdir, manifest.replace(step=config.steps))
  return last


def _num_examples(data_cfg) -> int:
  """Training sequences per epoch of the run's domains (for DP accounting): tokens / seq_len."""
  if any(d in data_cfg.train_subset for d in data_cfg.domains):
    # A subset is fewer examples, hence a larger sampling probability: count what is trained on.
    records = data_lib.pipeline.documents(data_cfg, "train")
    tokens = sum(len(records[i]) // 4 for i in range(len(records)))  # int32 ids incl. EOS.
  else:
    domains = data_lib.load_manifest(data_cfg.path)["domains"]
    tokens = sum(domains[d]["train"]["tokens"] for d in data_cfg.domains)
  return max(tokens // data_cfg.seq_len, 1)


# ----------------------------------------------------------------------------- command line

def define_flags():
  """Defines --config and --workdir; only when run as a program, so importing this module
  next to another command's flags never clashes."""
  config = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).")
  workdir = flags.DEFINE_string("workdir", None, "Run directory (default: the config's workdir).")
  dist = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (one process "
                           "per host); also done when a multi-process launch is detected, see "
                           "flexolmo_jax/distributed.py.")
  flags.mark_flags_as_required(["config"])
  return config, workdir, dist


def run_single_process(what: str, run) -> None:
  """The command line of a trainer that runs in one process (the solo ablation, the unrestricted
  MoE): the trainer's flags and override-key check; `run(raw config dict, workdir)` returns the
  final metrics, printed as one JSON line."""
  try:
    check_override_keys(sys.argv[1:])
  except KeyError as err:
    cli.fail(err)
  config_flag, workdir_flag, distributed_flag = define_flags()

  def main(argv):
    del argv
    if distributed_flag.value:
      cli.fail(f"{what} runs in one process; drop --distributed")
    cli.default_verbosity()
    raw = config_flag.value.to_dict()
    workdir = workdir_flag.value or raw.get("workdir")
    raw.pop("workdir", None)
    if not workdir:
      cli.fail("--workdir is required (the config names no default workdir)")
    last = run(raw, workdir)
    print(json.dumps({k: round(v, 4) for k, v in last.items()}, sort_keys=True))

  cli.run(main, errors=(NonFiniteError,))


def main(argv, config_flag, workdir_flag, distributed_flag):
  del argv
  cli.default_verbosity()
  distributed.initialize(distributed_flag.value)  # Before anything touches a backend.
  raw = config_flag.value
  workdir = workdir_flag.value or raw.get("workdir")
  if not workdir:
    raise app.UsageError("--workdir is required (the config names no default workdir)")
  raw = raw.to_dict()
  raw.pop("workdir", None)
  last = train(train_config(raw), workdir)
  print(json.dumps({k: round(v, 4) for k, v in last.items()}, sort_keys=True))


if __name__ == "__main__":
  try:
    check_override_keys(sys.argv[1:])
  except KeyError as err:
    cli.fail(err)
  _FLAGS = define_flags()
  cli.run(lambda argv: main(argv, *_FLAGS), errors=(NonFiniteError,))
