"""The trainable/frozen split of the model's parameters, described once per kind of run.

A run differentiates only its trainable tree; the frozen tree is a separate, non-differentiated
argument of the step, so it gets no gradient, no optimizer state, and stays bit-identical. A
Partition says how the model's parameters are made from the two (`join`), how each is laid out
on the mesh (`axes`), and which trainable leaves keep their initial value anyway (`fixed`). The
optimizer and the train step (objective.py), DP-SGD (which clips and noises only the trainable
tree), the loop (fit.py) and the memory plan all read it.

  public   every parameter trains: pretraining, dense fine-tuning.
  expert   one owner's expert (its FFN, router row and bias per layer, experts.py) against the
           frozen dense public model and public router row (docs/method.md, section 3).
  ffn      the solo ablation: the expert subtree, of which only the FFN trains, inside a dense
           model (no router); the router row and bias are carried unchanged into the expert.
  router   router tuning and BTX: only the router rows and expert biases of a merged MoE.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jax.sharding import PartitionSpec

from flexolmo_jax import experts
from flexolmo_jax.config import ModelConfig
from flexolmo_jax.model import logical_axes

ROUTER_KEYS = ("router", "expert_bias")


@dataclasses.dataclass(frozen=True)
class Partition:
  name: str
  join: Callable[[Any, Any], Any]  # (trainable, frozen) -> the model's parameters.
  axes: Callable[[ModelConfig, Any], tuple[Any, Any]]  # (config, trainable) -> logical axes.
  fixed: tuple[str, ...] = ()  # Top-level trainable keys that receive no update.


def split_router(params):
  """(trainable {router, expert_bias}, frozen rest) of MoE parameters."""
  mlp = params["layers"]["mlp"]
  trainable = {k: mlp[k] for k in ROUTER_KEYS if k in mlp}
  frozen_mlp = {k: v for k, v in mlp.items() if k not in ROUTER_KEYS}
  return trainable, {**params, "layers": {**params["layers"], "mlp": frozen_mlp}}


def join_router(trainable, frozen):
  mlp = {**frozen["layers"]["mlp"], **trainable}
  return {**frozen, "layers": {**frozen["layers"], "mlp": mlp}}


def _expert_axes(config: ModelConfig, trainable):
  """The expert subtree's axes: the MoE's expert tensors without their "expert" axis; the frozen
  public model's and public router row's axes."""
  moe = config if config.is_moe else config.replace(num_experts=2, top_k=2, expert_bias=True)
  mlp = logical_axes(moe)["layers"]["mlp"]
  drop = lambda spec: PartitionSpec(*[a for a in spec if a != "expert"])
  frozen = {"public": logical_axes(experts.dense_config(config)),
            "public_router": PartitionSpec("layers", "embed")}
  return {k: drop(mlp[k]) for k in trainable}, frozen


def _join_expert(trainable, frozen):
  return experts.training_moe(frozen["public"], frozen["public_router"], [trainable],
                              with_bias="expert_bias" in trainable)


def _join_ffn(trainable, frozen):
  public = frozen["public"]
  ffn = {k: trainable[k] for k in experts.FFN_KEYS}
  return {**public, "layers": {**public["layers"], "mlp": ffn}}


def _router_axes(config: ModelConfig, trainable):
  del trainable
  return split_router(logical_axes(config))


PUBLIC = Partition("public", join=lambda trainable, frozen: trainable,
                   axes=lambda config, trainable: (logical_axes(config), None))
EXPERT = Partition("expert", join=_join_expert, axes=_expert_axes)
FFN_ONLY = Partition("ffn", join=_join_ffn, axes=_expert_axes, fixed=ROUTER_KEYS)
ROUTER = Partition("router", join=join_router, axes=_router_axes)
BY_MODE = {"public": PUBLIC, "expert": EXPERT}  # train.py's config.mode -> its partition.
