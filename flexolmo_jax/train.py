"""Training: the public model, or one data owner's expert against the frozen public model.

  python -m flexolmo_jax.train --config=configs/public.py --workdir=runs/public
  python -m flexolmo_jax.train --config=configs/math_expert.py --workdir=runs/math
  python -m flexolmo_jax.train --config=configs/math_dense.py --config.init_from=runs/public

Public mode starts from a random init, or with `config.init_from` from an existing dense model's
parameters (a full fine-tune, fresh optimizer; shapes checked against `config.model`).

The optimizer only ever sees the trainable tree: the whole model in public mode; in expert mode
only the new expert (its FFN, router row and bias per layer). The frozen public parameters are a
separate, non-differentiated argument of the step, so they get no gradient, no optimizer state,
and stay bit-identical. A killed run resumes from its last complete checkpoint, data iterator
included, and reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from absl import app, flags
from ml_collections import config_flags

from flexolmo_jax import checkpoint, cli, distributed, dp, experts, router_init, runs, sharding
from flexolmo_jax import data as data_lib
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model import Transformer, init_params, logical_axes
from flexolmo_jax.train_config import (LossConfig, TrainConfig, check_override_keys, to_dict,
                                       train_config)


class NonFiniteError(RuntimeError):
  """The loss or gradient norm became NaN or Inf."""


# ----------------------------------------------------------------------------- model & loss


def build_full_params(mode: str, trainable, frozen, with_bias: bool):
  """The model's parameters from the trainable and frozen trees."""
  if mode == "public":
    return trainable
  return experts.assemble_moe(frozen["public"], frozen["public_router"], [trainable],
                              with_bias=with_bias)


def loss_terms(model_config: ModelConfig, params, batch, loss_cfg, num_tokens):
  """Summed (not averaged) token losses over `num_tokens`, plus router terms.

  Returns the objective to differentiate and per-term metrics. Token terms are divided by the
  whole batch's token count, so gradient accumulation over microbatches is exact.
  """
  logits, state = Transformer(model_config).apply(
      {"params": params}, batch["tokens"], positions=batch["positions"],
      segment_ids=batch["segment_ids"], mutable=["router_stats"])
  mask = batch["loss_mask"].astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
  ce = jnp.sum((log_z - target_logit) * mask) / num_tokens
  z = jnp.sum(log_z**2 * mask) / num_tokens
  objective = ce + loss_cfg.z_loss * z
  metrics = {"ce": ce, "z_loss": z}
  if model_config.is_moe:
    stats = state["router_stats"]["layers"]["mlp"]
    (router_z,), (load,), (mean_prob,) = stats["z_loss"], stats["load"], stats["mean_prob"]
    lb = model_config.num_experts * jnp.sum(load * mean_prob, axis=-1)
    objective += loss_cfg.router_z_loss * jnp.mean(router_z) + loss_cfg.load_balancing * jnp.mean(lb)
    metrics.update(router_z_loss=jnp.mean(router_z), load_balancing=jnp.mean(lb),
                   expert_load=jnp.mean(load, axis=0))
  return objective, metrics


def make_optimizer(config: TrainConfig, trainable):
  o = config.optim
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, o.lr, o.warmup_steps, max(config.steps, o.warmup_steps + 1), o.lr * o.min_lr_ratio)
  decay_mask = None
  if o.weight_decay and not o.decay_embeddings and "embed" in trainable:
    decay_mask = jax.tree_util.tree_map_with_path(
        lambda path, _: path[0].key != "embed", trainable)
  tx = optax.chain(optax.clip_by_global_norm(o.clip_norm),
                   optax.adamw(schedule, o.b1, o.b2, o.eps, weight_decay=o.weight_decay,
                               mask=decay_mask))
  return tx, schedule


def make_train_step(config: TrainConfig, model_config: ModelConfig, tx, schedule, dp_key=None):
  """(state, frozen, batch) -> (state, metrics), one optimizer step over grad_accum microbatches.

  With config.dp.enabled the gradient is DP-SGD's (dp.py), its noise drawn from `dp_key` folded
  with the step number.
  """
  with_bias = config.expert.bias
  if config.dp.enabled and dp_key is None:
    raise ValueError("config.dp.enabled needs a secret dp_key (dp.noise_key(workdir))")

  def objective(trainable, frozen, batch, num_tokens):
    params = build_full_params(config.mode, trainable, frozen, with_bias)
    return loss_terms(model_config, params, batch, config.loss, num_tokens)

  def step(state, frozen, batch):
    num_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    micro = jax.tree.map(lambda x: x.reshape(config.grad_accum, -1, *x.shape[1:]), batch)
    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def accumulate(grads, microbatch):
      (obj, metrics), g = grad_fn(state["params"], frozen, microbatch, num_tokens)
      return jax.tree.map(jnp.add, grads, g), (obj, metrics)

    if config.dp.enabled:
      # Each example's loss is its own token mean, so clipping bounds one example's influence.
      example_objective = lambda p, ex: objective(p, frozen, ex,
                                                  jnp.maximum(jnp.sum(ex["loss_mask"]), 1.0))
      grads, (objs, metrics) = dp.private_grads(
          example_objective, state["params"], micro, jax.random.fold_in(dp_key, state["step"]),
          clip_norm=config.dp.clip_norm, noise_multiplier=config.dp.noise_multiplier)
      objs = jnp.mean(objs, keepdims=True)
      metrics = {k: jnp.mean(v, 0) for k, v in metrics.items()}
    else:
      zeros = jax.tree.map(jnp.zeros_like, state["params"])
      grads, (objs, metrics) = jax.lax.scan(accumulate, zeros, micro)
      # Token terms were divided by the whole batch's count: sum them; router terms: average.
      metrics = {k: (jnp.sum(v, 0) if k in ("ce", "z_loss") else jnp.mean(v, 0))
                 for k, v in metrics.items()}
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics.update(loss=jnp.sum(objs), grad_norm=optax.global_norm(grads),
                   lr=schedule(state["step"]), tokens=num_tokens)
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  return step


def make_eval_step(config: TrainConfig, model_config: ModelConfig):
  def eval_step(trainable, frozen, batch):
    params = build_full_params(config.mode, trainable, frozen, config.expert.bias)
    terms, _ = loss_terms(model_config, params, batch, LossConfig(0.0, 0.0, 0.0), 1.0)
    return terms, jnp.sum(batch["loss_mask"])
  return eval_step


# ----------------------------------------------------------------------------- setup


def _domain_data(config: TrainConfig):
  """The DataConfig for training (the owner's domain only, in expert mode)."""
  if config.mode == "expert":
    return config.data.replace(domains=(config.expert.name,))
  return config.data


def _data_manifest_hash(path: str) -> str:
  manifest = pathlib.Path(path) / "manifest.json"
  return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.exists() else ""


def _vocab_check(model_config: ModelConfig, data_path: str) -> None:
  tokenizer_path = pathlib.Path(data_path) / "tokenizer.model"
  if tokenizer_path.exists():
    vocab = data_lib.load_tokenizer(str(tokenizer_path)).vocab_size
    if vocab > model_config.vocab_size:
      raise ValueError(f"the corpus tokenizer has {vocab} tokens but model.vocab_size is "
                       f"{model_config.vocab_size}; set config.model.vocab_size >= {vocab}")


def setup(config: TrainConfig):
  """Everything a run needs before its first step; raises (writing nothing) on bad input.

  Returns (model_config, trainable, frozen, manifest).
  """
  data_cfg = _domain_data(config)
  data_lib.pipeline.ensure_domains(data_cfg)  # Unknown domains fail here, listing the known ones.
  if config.mode == "public":
    _vocab_check(config.model, config.data.path)
    manifest = {"kind": "public", "config": config.model.to_dict()}
    if not config.init_from:
      return config.model, init_params(config.model, jax.random.key(config.seed)), None, manifest
    params = _init_from(config.model, config.init_from)
    manifest.update(init_from=str(config.init_from),
                    init_fingerprint=checkpoint.fingerprint(params))
    return config.model, params, None, manifest

  e = config.expert
  public_config, public_params, public_manifest = runs.load_params(e.public)
  if public_config.is_moe:
    raise ValueError(f"{e.public} holds a mixture of experts; expert training needs the dense "
                     "public model it started from")
  _vocab_check(public_config, config.data.path)
  model_config = experts.moe_config(public_config, 1, top_k=e.top_k, with_bias=e.bias,
                                    bias_init=e.bias_init).replace(**config.model_overrides)
  rows = _router_rows(config, public_config, public_params)
  frozen = {"public": public_params, "public_router": rows["public"]}
  trainable = experts.upcycle_expert(public_params, rows[e.name],
                                     bias_init=e.bias_init if e.bias else None)
  manifest = {
      "kind": "expert", "name": e.name, "config": model_config.to_dict(),
      "public_path": str(e.public), "public_fingerprint": checkpoint.fingerprint(public_params),
      "public_router_fingerprint": checkpoint.fingerprint({"r": rows["public"]}),
  }
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
  e = config.expert
  shape = (public_config.n_layers, public_config.d_model)
  if e.router_embeddings:
    return router_init.load_embeddings(e.router_embeddings, ["public", e.name], *shape)
  print("no router embeddings given: router rows from the public model's mean hidden state",
        flush=True)
  rows = {}
  for domain in ("public", e.name):
    data_cfg = config.data.replace(domains=(domain,), shuffle=False)
    batches = iter(data_lib.make_pipeline(data_cfg, "train", num_epochs=1))
    take = (b for _, b in zip(range(e.embed_batches), batches))
    rows[domain] = router_init.mean_hidden_embedding(public_config, public_params, take)
  return rows


# ----------------------------------------------------------------------------- the loop


def _check_resumable(workdir: pathlib.Path, manifest: dict) -> None:
  """Refuses to resume a workdir that belongs to a different run."""
  path = workdir / runs.MANIFEST
  if not path.exists():
    return
  old = json.loads(path.read_text())
  for key in ("kind", "name", "config", "public_fingerprint", "init_fingerprint"):
    before, now = old.get(key), manifest.get(key)
    if key == "config":  # How the model executes may change between sessions; what it is may not.
      before, now = _architecture(before), _architecture(now)
    if before != now:
      raise ValueError(f"{workdir} holds another run ({key} differs: {before!r} vs {now!r}); "
                       "use a new --workdir")


# ModelConfig fields that change how a step runs, not the parameters or the function computed.
_EXECUTION_FIELDS = ("moe_backend", "moe_block_size", "expert_parallel", "expert_capacity_factor",
                     "scan_layers", "remat")


def _architecture(config_dict):
  if config_dict is None:
    return None
  full = ModelConfig.from_dict(config_dict).to_dict()  # Fields added since the run started get defaults.
  return {k: v for k, v in full.items() if k not in _EXECUTION_FIELDS}


class _Metrics:
  """TensorBoard event files plus a metrics.jsonl that tests and scripts can read; written by
  the primary host only (every host computes the same global metrics)."""

  def __init__(self, workdir: pathlib.Path):
    self._enabled = distributed.is_primary()
    if not self._enabled:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(str(workdir / "tb"))
    self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self._enabled:
      return
    flat = {}
    for k, v in values.items():
      v = np.asarray(v)
      if v.ndim == 0:
        flat[k] = float(v)
      else:
        flat.update({f"{k}/{i}": float(x) for i, x in enumerate(v.ravel())})
    for k, v in flat.items():
      self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({"step": step, **flat}) + "\n")
    self._jsonl.flush()

  def close(self):
    if self._enabled:
      self._tb.close()
      self._jsonl.close()


def train(config: TrainConfig, workdir: str) -> dict[str, float]:
  """Runs (or resumes) training; returns the last logged metrics."""
  model_config, trainable, frozen, manifest = setup(config)
  workdir = pathlib.Path(workdir)
  manifest.update(train_config=to_dict(config), data_manifest_hash=_data_manifest_hash(
      config.data.path), versions=checkpoint.library_versions())
  _check_resumable(workdir, manifest)
  workdir.mkdir(parents=True, exist_ok=True)
  primary = distributed.is_primary()  # On a pod, the workdir is shared: one host writes files.
  if frozen is not None and primary:
    runs.write_public_router(workdir, frozen["public_router"])  # Merging needs r_pub itself.

  mesh = sharding.make_mesh(config.mesh)
  tx, schedule = make_optimizer(config, trainable)
  axes = _trainable_axes(config.mode, model_config)
  trainable = distributed.put(trainable, sharding.tree_shardings(trainable, axes, mesh))
  if frozen is not None:
    public_axes = logical_axes(model_config.replace(num_experts=0, expert_bias=False))
    frozen = {"public": distributed.put(frozen["public"], sharding.tree_shardings(
                  frozen["public"], public_axes, mesh)),
              "public_router": distributed.put(frozen["public_router"], sharding.logical_sharding(
                  frozen["public_router"].shape, ("layers", "embed"), mesh))}
  state = jax.jit(lambda p: {"params": p, "opt_state": tx.init(p), "step": jnp.int32(0)})(trainable)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  batch_sharding = sharding.batch_sharding(mesh)

  dp_key = None
  if config.dp.enabled:  # The primary host creates the secret key; every host uses its copy.
    key_data = (jax.random.key_data(dp.noise_key(workdir)) if primary
                else np.zeros(2, np.uint32))
    dp_key = jax.random.wrap_key_data(distributed.from_primary(np.asarray(key_data)),
                                      impl="threefry2x32")
  step_fn = on_mesh(mesh, jax.jit(make_train_step(config, model_config, tx, schedule, dp_key),
                                   in_shardings=(state_shardings, None, batch_sharding),
                                   out_shardings=(state_shardings, None), donate_argnums=0))
  eval_fn = on_mesh(mesh, jax.jit(make_eval_step(config, model_config)))

  data_cfg = _domain_data(config)
  # data.batch_size is the global batch; each host reads its own documents (pipeline.py shards
  # by jax.process_index()) and yields its share of the rows.
  train_data = data_lib.make_pipeline(
      data_cfg, "train", batch_size=distributed.host_batch_size(data_cfg.batch_size))
  batches = iter(train_data)
  manager = runs.checkpoint_manager(workdir, keep=config.keep_checkpoints,
                                    async_save=config.async_checkpoint)
  start = manager.latest_step() or 0
  if start:
    state, data_state = _restore(manager, start, state)
    data_lib.iterator_state_from_json(batches, data_state)
    print(f"resumed from step {start} in {workdir}", flush=True)
  if primary:
    runs.write_manifest(workdir, {**manifest, "step": start})

  metrics_out = _Metrics(workdir)
  eval_domains = config.eval_domains or (
      data_cfg.domains + (("public",) if config.mode == "expert" else ()))
  last: dict[str, float] = {}
  if start == 0:
    last = _evaluate(config, eval_fn, state["params"], frozen, eval_domains, batch_sharding)
    metrics_out.write(0, last)
  bar = tqdm.tqdm(total=config.steps, initial=start, disable=not config.progress,
                  desc=f"train {manifest.get('name', 'public')}", unit="step", file=sys.stdout)
  tokens_since, time_since = 0.0, time.perf_counter()
  try:
    for step in range(start + 1, config.steps + 1):
      host_batch = next(batches)
      # Counted on the host, no sync (scaled by the host count: hosts see similar counts).
      tokens_since += float(np.sum(host_batch["loss_mask"])) * jax.process_count()
      state, metrics = step_fn(state, frozen, distributed.global_batch(host_batch, batch_sharding))
      # One transfer per step: the NaN guard needs the loss and gradient norm.
      loss, grad_norm = map(float, jax.device_get((metrics["loss"], metrics["grad_norm"])))
      if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise NonFiniteError(
            f"non-finite loss ({loss}) or gradient norm at step {step}; the last good checkpoint "
            f"(step {manager.latest_step()}) in {workdir} is kept. Lower optim.lr, check the "
            "data, or resume from it after changing the config")
      bar.update(1)
      bar.set_postfix(loss=f"{loss:.3f}")
      if step % config.log_every == 0 or step == config.steps:
        elapsed = time.perf_counter() - time_since
        last = {k: np.asarray(v) for k, v in metrics.items()}
        last["tokens_per_sec"] = tokens_since / max(elapsed, 1e-9)
        tokens_since, time_since = 0.0, time.perf_counter()
        if step % config.eval_every == 0 or step == config.steps:
          last.update(_evaluate(config, eval_fn, state["params"], frozen, eval_domains,
                                batch_sharding))
        metrics_out.write(step, last)
      if step % config.checkpoint_every == 0 or step == config.steps:
        _save(manager, step, state, batches)
  finally:
    bar.close()
    manager.wait_until_finished()
    manager.close()
    metrics_out.close()
  if config.dp.enabled:
    manifest["dp"] = dp.report(config.dp, batch_size=data_cfg.batch_size, steps=config.steps,
                               num_examples=_num_examples(data_cfg))
  if primary:
    runs.write_manifest(workdir, {**manifest, "step": config.steps})
  return {k: float(np.mean(v)) for k, v in last.items()}


def on_mesh(mesh, fn):
  """`fn` called with `mesh` set, so that the model's expert-parallel shard_map finds it."""
  def call(*args):
    with jax.set_mesh(mesh):
      return fn(*args)
  return call


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


def _trainable_axes(mode: str, model_config: ModelConfig):
  """Logical axes of the trainable tree: the model's, or the expert subtree's."""
  full = logical_axes(model_config)
  if mode == "public":
    return full
  mlp = full["layers"]["mlp"]
  drop_expert = lambda spec: jax.sharding.PartitionSpec(*[a for a in spec if a != "expert"])
  return {k: drop_expert(v) for k, v in mlp.items()}


def _save(manager, step, state, batches):
  # Each host reads its own documents, so each has its own iterator position; JSON items are
  # written by the primary alone, so it saves every host's (gathered) state.
  states = distributed.gather_strings(data_lib.iterator_state_to_json(batches))
  data_iter = {"state": states[0], **({"per_host": states} if len(states) > 1 else {})}
  manager.save(step, args=ocp.args.Composite(
      params=ocp.args.StandardSave(state["params"]),
      opt_state=ocp.args.StandardSave(state["opt_state"]),
      meta=ocp.args.JsonSave({"step": step}),
      data_iter=ocp.args.JsonSave(data_iter)))


def _restore(manager, step, state_template):
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract["params"]),
      opt_state=ocp.args.StandardRestore(abstract["opt_state"]),
      data_iter=ocp.args.JsonRestore()))
  state = {"params": restored["params"], "opt_state": restored["opt_state"],
           "step": jnp.int32(step)}
  saved = restored["data_iter"]
  hosts = len(saved.get("per_host", [None]))
  if hosts != jax.process_count():
    raise ValueError(f"step {step} was saved by {hosts} host(s) and this run has "
                     f"{jax.process_count()}; each host's data position cannot be carried over: "
                     "resume with the same number of hosts")
  return state, saved["per_host"][jax.process_index()] if hosts > 1 else saved["state"]


def _evaluate(config, eval_fn, trainable, frozen, domains, batch_sharding) -> dict[str, float]:
  """Validation loss per domain over up to eval_batches batches of its validation split.

  On several hosts every host must run the same number of steps with full batches (each step
  is one global computation), so the split repeats and exactly eval_batches batches are read.
  """
  multi_host = jax.process_count() > 1
  out = {}
  for domain in domains:
    data_cfg = config.data.replace(domains=(domain,), shuffle=False)
    total, count = 0.0, 0.0
    batches = iter(data_lib.make_pipeline(
        data_cfg, "validation", num_epochs=None if multi_host else 1,
        drop_remainder=multi_host, batch_size=distributed.host_batch_size(data_cfg.batch_size)))
    for _, batch in zip(range(config.eval_batches), batches):
      batch = (distributed.global_batch(batch, batch_sharding) if multi_host
               else {k: jnp.asarray(v) for k, v in batch.items()})
      loss_sum, n = eval_fn(trainable, frozen, batch)
      total, count = total + float(loss_sum), count + float(n)
    if count:
      out[f"val_loss/{domain}"] = total / count
  return out


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
  try:
    config = train_config(raw)
    last = train(config, workdir)
  except (KeyError, ValueError, FileNotFoundError, NonFiniteError, data_lib.DataError) as err:
    message = err.args[0] if isinstance(err, KeyError) and err.args else err
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps({k: round(v, 4) for k, v in last.items()}, sort_keys=True))


if __name__ == "__main__":
  try:
    check_override_keys(sys.argv[1:])
  except KeyError as err:
    sys.exit(f"error: {err.args[0]}")
  _FLAGS = define_flags()
  app.run(lambda argv: main(argv, *_FLAGS))
