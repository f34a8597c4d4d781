"""Parameter counts of a model config, from the model's own abstract init (nothing allocated)."""

from __future__ import annotations

import functools
import math

import jax

from flexolmo_jax import model
from flexolmo_jax.config import ModelConfig

_EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def count_params(config: ModelConfig) -> tuple[int, int]:
  """(total, active) parameter counts.

  Active counts what one token uses: everything except the FFNs of the `num_experts - top_k`
  experts it is not routed to (every router row is used, so the router counts as active).
  A dense config has active == total.
  """
  shapes = jax.eval_shape(functools.partial(model.init_params, config), jax.random.key(0))
  total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
  if not config.is_moe:
    return total, total
  mlp = shapes["layers"]["mlp"]
  per_expert = sum(math.prod(mlp[name].shape) for name in _EXPERT_WEIGHTS) // config.num_experts
  return total, total - (config.num_experts - config.top_k) * per_expert
