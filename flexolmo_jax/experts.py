"""Expert subtrees: upcycling the public FFN, and assembling MoE parameters from experts.

An expert is a small tree holding ONLY what its owner trains, per layer:
  {"gate_proj": [L, D, F], "up_proj": [L, D, F], "down_proj": [L, F, D], "router": [L, D],
   "expert_bias": [L]  (when the bias is enabled)}
The public model contributes expert 0 (its dense FFN) and the public router row `r_pub` [L, D].
Training and merging both build the MoE the same way, with `assemble_moe` (training with its
`training_moe` layout, which leaves the frozen public FFN unstacked), so a model trained as
{public, math} and one merged from {public, math, code} place the math expert identically.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from flexolmo_jax.config import ModelConfig

FFN_KEYS = ("gate_proj", "up_proj", "down_proj")


def upcycle_expert(public_params, router_row_LxD, *, bias_init: float | None = None):
  """A new expert that starts as a copy of the public FFN, with its router row (and bias)."""
  mlp = public_params["layers"]["mlp"]
  if "router" in mlp:
    raise ValueError("upcycling needs the dense public model; got MoE parameters (with a router)")
  expert = {k: jnp.array(mlp[k], copy=True) for k in FFN_KEYS}
  num_layers = mlp["gate_proj"].shape[0]
  expert["router"] = jnp.broadcast_to(jnp.asarray(router_row_LxD, mlp["gate_proj"].dtype),
                                      (num_layers, mlp["gate_proj"].shape[1]))
  if bias_init is not None:
    expert["expert_bias"] = jnp.full((num_layers,), bias_init, mlp["gate_proj"].dtype)
  return expert


def assemble_moe(public_params, public_router_LxD, experts: Sequence[Mapping[str, jax.Array]],
                 *, with_bias: bool):
  """MoE parameters: expert 0 is the public FFN, expert j the j-th given expert.

  Every non-FFN tensor comes from the public model unchanged. With `with_bias`, each expert must
  carry "expert_bias"; the public expert gets a zero bias (it is never applied to expert 0).
  """
  mlp = public_params["layers"]["mlp"]
  moe = _routers(public_params, public_router_LxD, experts, with_bias=with_bias)
  moe.update({k: jnp.stack([mlp[k]] + [e[k] for e in experts], axis=1) for k in FFN_KEYS})
  return {**public_params, "layers": {**public_params["layers"], "mlp": moe}}


def training_moe(public_params, public_router_LxD, experts: Sequence[Mapping[str, jax.Array]],
                 *, with_bias: bool):
  """`assemble_moe`'s model in the layout expert training reads (partition.EXPERT).

  The router rows and biases are stacked as in `assemble_moe`; the FFNs are not: the public
  FFN stays whole under "public_ffn" and the given experts' FFNs are stacked under "new_ffn"
  ([L, E - 1, ...]). `model.Mlp` computes the same output from either layout; from this one
  the frozen public FFN is neither copied into a stacked tensor nor differentiated (no weight
  gradient is computed for it) in every training step.
  """
  mlp = public_params["layers"]["mlp"]
  moe = _routers(public_params, public_router_LxD, experts, with_bias=with_bias)
  moe["public_ffn"] = {k: mlp[k] for k in FFN_KEYS}
  moe["new_ffn"] = {k: jnp.stack([e[k] for e in experts], axis=1) for k in FFN_KEYS}
  return {**public_params, "layers": {**public_params["layers"], "mlp": moe}}


def _routers(public_params, public_router_LxD, experts, *, with_bias):
  """The stacked router rows (and biases) of the MoE: the public row first."""
  dtype = public_params["layers"]["mlp"]["gate_proj"].dtype
  stack = lambda rows: jnp.stack(rows, axis=1)
  moe = {"router": stack([jnp.asarray(public_router_LxD, dtype)] + [e["router"] for e in experts])}
  if with_bias:
    missing = [j + 1 for j, e in enumerate(experts) if "expert_bias" not in e]
    if missing:
      raise ValueError(f"experts {missing} have no expert_bias; merge with the bias dropped")
    moe["expert_bias"] = stack([jnp.zeros_like(experts[0]["expert_bias"])]
                               + [e["expert_bias"] for e in experts])
  return moe


def dense_config(config: ModelConfig) -> ModelConfig:
  """The dense (public-model) config of an MoE config: moe_config's inverse."""
  return config.replace(num_experts=0, top_k=1, expert_bias=False, expert_bias_init=0.0)


def moe_config(public_config: ModelConfig, num_new_experts: int, *, top_k: int,
               with_bias: bool, bias_init: float = 0.0, backend: str | None = None) -> ModelConfig:
  """The config of the public model with its FFN turned into 1 + num_new_experts experts."""
  experts = 1 + num_new_experts
  return public_config.replace(num_experts=experts, top_k=min(top_k, experts),
                               expert_bias=with_bias, expert_bias_init=bias_init if with_bias else 0.0,
                               moe_backend=backend or public_config.moe_backend)


def extract_expert(moe_params, index: int):
  """Expert `index` (>= 1) of MoE parameters, in the expert-subtree layout."""
  mlp = moe_params["layers"]["mlp"]
  expert = {k: mlp[k][:, index] for k in FFN_KEYS + ("router",)}
  if "expert_bias" in mlp:
    expert["expert_bias"] = mlp["expert_bias"][:, index]
  return expert


def dense_public_params(moe_params):
  """The dense public model inside MoE parameters (expert 0) and its router row."""
  mlp = moe_params["layers"]["mlp"]
  dense = {**moe_params, "layers": {**moe_params["layers"],
                                    "mlp": {k: mlp[k][:, 0] for k in FFN_KEYS}}}
  return dense, mlp["router"][:, 0]
