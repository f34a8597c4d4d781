"""The training objective: loss terms, the optimizer, and the train and eval steps.

Every run (public, expert, dense fine-tune, solo ablation, router tuning, BTX) steps through
`make_train_step` over its partition (partition.py): the optimizer sees only the trainable
tree; the frozen tree is a non-differentiated argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from flexolmo_jax import dp, routing_diagnostics
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model import Transformer
from flexolmo_jax.partition import Partition
from flexolmo_jax.train_config import LossConfig, TrainConfig


def _forward(model_config: ModelConfig, params, batch, mutable):
  return Transformer(model_config).apply(
      {"params": params}, batch["tokens"], positions=batch["positions"],
      segment_ids=batch["segment_ids"], mutable=mutable)


def _token_sums(logits, batch):
  """(summed next-token cross-entropy, summed logsumexp(logits)^2) over the loss mask."""
  mask = batch["loss_mask"].astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
  return jnp.sum((log_z - target_logit) * mask), jnp.sum(log_z**2 * mask)


def loss_terms(model_config: ModelConfig, params, batch, loss_cfg, num_tokens):
  """Summed (not averaged) token losses over `num_tokens`, plus router terms.

  Returns the objective to differentiate and per-term metrics. Token terms are divided by the
  whole batch's token count, so gradient accumulation over microbatches is exact.

  Router terms are SUMMED over layers, one loss per router, as in OLMo-core, the reference
  trainer: each `MoERouter.forward` (olmo_core/nn/moe/router.py, ai2-olmo-core 3.0.0) scales its
  own layer's `router_z_loss` (olmo_core/nn/moe/loss.py) by the weight and attaches it to its
  layer's output (`attach_auxiliary_loss`), so the objective gets weight * z_l for every layer l.
  The metrics `router_z_loss` and `load_balancing` are those sums (unweighted).
  """
  logits, state = _forward(model_config, params, batch, ["router_stats"])
  ce, z = (total / num_tokens for total in _token_sums(logits, batch))
  objective = ce + loss_cfg.z_loss * z
  metrics = {"ce": ce, "z_loss": z}
  if model_config.is_moe:
    stats = state["router_stats"]["layers"]["mlp"]
    (router_z,), (load,), (mean_prob,) = stats["z_loss"], stats["load"], stats["mean_prob"]
    router_z = jnp.sum(router_z)
    lb = jnp.sum(model_config.num_experts * jnp.sum(load * mean_prob, axis=-1))
    objective += loss_cfg.router_z_loss * router_z + loss_cfg.load_balancing * lb
    metrics.update(router_z_loss=router_z, load_balancing=lb, expert_load=jnp.mean(load, axis=0))
  return objective, metrics


def make_optimizer(config: TrainConfig, trainable, fixed: tuple[str, ...] = ()):
  """(AdamW with clipping and warmup-cosine schedule, the schedule) over `trainable`; the
  top-level keys in `fixed` (a partition's fixed leaves) get no update and no moments."""
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
  if any(k in trainable for k in fixed):
    labels = {k: "fixed" if k in fixed else "train" for k in trainable}
    tx = optax.multi_transform({"train": tx, "fixed": optax.set_to_zero()}, labels)
  return tx, schedule


def make_train_step(config: TrainConfig, model_config: ModelConfig, part: Partition, tx, schedule,
                    dp_key=None):
  """(state, frozen, batch) -> (state, metrics), one optimizer step over grad_accum microbatches.

  With config.dp.enabled the gradient is DP-SGD's (dp.py), its noise drawn from `dp_key` folded
  with the step number.
  """
  if config.dp.enabled and dp_key is None:
    raise ValueError("config.dp.enabled needs a secret dp_key (runs.dp_noise_key)")

  def objective(trainable, frozen, batch, num_tokens):
    return loss_terms(model_config, part.join(trainable, frozen), batch, config.loss, num_tokens)

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


def make_eval_step(model_config: ModelConfig, part: Partition, diagnose_expert: int | None = None):
  """(trainable, frozen, batch) -> (summed token loss, token count, routing sums).

  With `diagnose_expert` (an expert index of an MoE), the routing sums are that expert's
  routing_diagnostics.batch_sums over the batch's real tokens, from the same forward pass;
  otherwise they are {}.
  """
  def eval_step(trainable, frozen, batch):
    params = part.join(trainable, frozen)
    count = jnp.sum(batch["loss_mask"])
    if diagnose_expert is None:
      terms, _ = loss_terms(model_config, params, batch, LossConfig(0.0, 0.0, 0.0), 1.0)
      return terms, count, {}
    logits, state = _forward(model_config, params, batch, ["routing", "intermediates"])
    ce, _ = _token_sums(logits, batch)
    return ce, count, routing_diagnostics.batch_sums(state, batch["segment_ids"] != 0,
                                                     diagnose_expert)
  return eval_step
