"""The mixed-precision policy of a training run (docs/precision.md).

Three dtypes, each set per run:
  compute  ModelConfig.dtype (expert runs: model_overrides.dtype): activations and matmul
           inputs; weights are cast to it where they are used. Router logits and softmax, norms,
           RoPE, attention scores, logits and the loss stay float32 whatever it is (model.py,
           moe.py, attention.py, objective.py).
  master   TrainConfig.master_dtype (default float32): the trained tree, hence its gradients and
           AdamW moments (optax keeps them in the parameters' dtype).
  frozen   TrainConfig.frozen_dtype ("": as loaded): the frozen tree, e.g. an expert's public
           model; never updated, so bfloat16 storage loses nothing across steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cast_floating(tree, dtype):
  """`tree` with its floating-point leaves in `dtype` (integer leaves untouched)."""
  dtype = jnp.dtype(dtype)
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def apply(config, trainable, frozen):
  """(trainable, frozen) in the run's master and frozen dtypes (`config`: a TrainConfig)."""
  trainable = cast_floating(trainable, config.master_dtype)
  if frozen is not None and config.frozen_dtype:
    frozen = cast_floating(frozen, config.frozen_dtype)
  return trainable, frozen
