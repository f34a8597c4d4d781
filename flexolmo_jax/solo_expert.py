r"""The "no coordinated training" ablation (docs/method.md, section 6): an owner trains its FFN alone, as
a dense model (the public model with the FFN swapped for its own copy), on its own data only,
never seeing the public expert; the FFN is then merged as an expert like any other.

  python -m flexolmo_jax.solo_expert --config=configs/math_expert.py --workdir=runs/solo/math

Same config, setup (upcycled FFN, router row from the domain, bias at its initial value) and
run-directory layout as flexolmo_jax.train's expert mode, so flexolmo_jax.merge reads the result
unchanged; only the FFN is differentiated: the router row and bias keep their initial values,
since a dense model has no router to train them.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from absl import app

from flexolmo_jax import cli, experts, runs
from flexolmo_jax import data as data_lib
from flexolmo_jax import train as train_lib
from flexolmo_jax.train_config import to_dict, train_config


def _dense_params(public, ffn):
  return {**public, "layers": {**public["layers"], "mlp": dict(ffn)}}


def train_solo(config, workdir: str) -> dict[str, float]:
  """Trains the owner's FFN alone as a dense model; writes an expert run at `workdir`; returns
  the last metrics (loss, and validation loss per evaluated domain)."""
  if config.mode != "expert":
    raise ValueError("the solo ablation trains an owner's expert: use an expert config")
  model_config, trainable, frozen, manifest = train_lib.setup(config)
  dense_config = model_config.replace(num_experts=0, top_k=1, expert_bias=False,
                                      expert_bias_init=0.0)
  ffn = {k: trainable[k] for k in experts.FFN_KEYS}
  fixed = {k: v for k, v in trainable.items() if k not in experts.FFN_KEYS}
  tx, _ = train_lib.make_optimizer(config, ffn)
  public = frozen["public"]

  def objective(ffn, batch, num_tokens):
    return train_lib.loss_terms(dense_config, _dense_params(public, ffn), batch, config.loss,
                                num_tokens)

  @jax.jit
  def step(ffn, opt_state, batch):
    num_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(ffn, batch, num_tokens)
    updates, opt_state = tx.update(grads, opt_state, ffn)
    return optax.apply_updates(ffn, updates), opt_state, {**metrics, "loss": loss}

  @jax.jit
  def eval_sums(ffn, batch):
    mask = batch["loss_mask"].astype(jnp.float32)
    _, metrics = objective(ffn, batch, 1.0)
    return metrics["ce"], jnp.sum(mask)

  opt_state = tx.init(ffn)
  batches = iter(data_lib.make_pipeline(config.data.replace(domains=(config.expert.name,)),
                                        "train"))
  last = {}
  for i in tqdm.trange(1, config.steps + 1, desc=f"solo {config.expert.name}", unit="step",
                       file=sys.stdout, disable=not config.progress):
    ffn, opt_state, metrics = step(ffn, opt_state, jax.tree.map(jnp.asarray, next(batches)))
    last = {"loss": float(metrics["loss"])}
    if not math.isfinite(last["loss"]):
      raise train_lib.NonFiniteError(f"non-finite loss at step {i}; lower optim.lr")
  for domain in (config.expert.name, "public"):
    cfg = config.data.replace(domains=(domain,), shuffle=False)
    valid = data_lib.make_pipeline(cfg, "validation", num_epochs=1, drop_remainder=False)
    sums = [eval_sums(ffn, jax.tree.map(jnp.asarray, b))
            for _, b in zip(range(config.eval_batches), valid)]
    last[f"val_loss/{domain}"] = float(sum(s for s, _ in sums) / sum(n for _, n in sums))

  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  expert = jax.tree.map(np.asarray, {**ffn, **fixed})
  manager = runs.checkpoint_manager(workdir, keep=1, async_save=False)
  manager.save(config.steps, args=ocp.args.Composite(params=ocp.args.StandardSave(expert)))
  manager.wait_until_finished()
  manager.close()
  runs.write_public_router(workdir, frozen["public_router"])
  runs.write_manifest(workdir, {**manifest, "step": config.steps, "ablation": "solo",
                                "train_config": to_dict(config)})
  return last


def main(argv, config_flag, workdir_flag, distributed_flag):
  del argv
  if distributed_flag.value:
    sys.exit("error: the solo-expert ablation runs in one process; --distributed is not supported")
  cli.default_verbosity()
  raw = config_flag.value.to_dict()
  workdir = workdir_flag.value or raw.get("workdir")
  raw.pop("workdir", None)
  try:
    last = train_solo(train_config(raw), workdir)
  except (KeyError, ValueError, FileNotFoundError, train_lib.NonFiniteError,
          data_lib.DataError) as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps({k: round(v, 4) for k, v in last.items()}, sort_keys=True))


if __name__ == "__main__":
  _FLAGS = train_lib.define_flags()  # The trainer's --config, --workdir and --distributed.
  app.run(lambda argv: main(argv, *_FLAGS))
