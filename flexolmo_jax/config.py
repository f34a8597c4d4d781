"""Model configuration: a frozen dataclass built from an ml_collections ConfigDict.

Config files (configs/*.py) hold ConfigDicts; code below them only ever sees `ModelConfig`.
Unknown keys are refused with the nearest valid names, so a typo never silently falls back to a
default.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

MOE_BACKENDS = ("dense", "ragged", "blocked")
REMAT_POLICIES = ("none", "full", "dots")
ATTENTION_IMPLS = ("auto", "xla", "chunked", "cudnn", "splash")  # attention.py
EXPERT_PARALLEL = ("none", "allgather", "all_to_all", "ragged_all_to_all")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """An OLMo-2 transformer whose FFN is dense (`num_experts == 0`) or a FlexOlmo MoE."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  ffn_hidden: int
  head_dim: int | None = None  # None: d_model // n_heads.
  rms_norm_eps: float = 1e-6
  rope_theta: float = 500_000.0
  # Mixture of experts. 0 means the dense public model; expert 0 is always the public FFN.
  num_experts: int = 0
  top_k: int = 1
  norm_topk_prob: bool = False  # Reference: False (kept weights are NOT renormalised).
  # Learned per-layer scalar bias on the non-public experts' router logits, applied as min(b, 0).
  expert_bias: bool = False
  expert_bias_init: float = 0.0
  moe_backend: str = "dense"
  moe_block_size: int = 0  # Rows per block of the "blocked" back end; 0 picks one from the shapes.
  # How experts sharded over the "expert" mesh axis meet their tokens (expert_parallel.py):
  # "none" leaves it to GSPMD; the others run the MoE FFN inside shard_map.
  expert_parallel: str = "none"
  # "all_to_all" only: slots each shard may send to each other shard, as a multiple of the
  # balanced share (tokens * top_k / shards). 0 is the worst case: dropless, exact. Below it,
  # slots past the capacity are dropped (they contribute zero).
  expert_capacity_factor: float = 0.0
  # Execution.
  scan_layers: bool = True  # False unrolls the same scanned layers (same parameter layout).
  remat: str = "none"
  # attention.py: "xla" (the einsum reference), "chunked", "cudnn", "splash", or "auto" (per
  # platform); attention_block_size is the chunked / splash tile (0: attention.DEFAULT_BLOCK).
  attention_impl: str = "auto"
  attention_block_size: int = 0
  dtype: str = "float32"  # Activations / matmul inputs.
  param_dtype: str = "float32"
  init_std: float = 0.02
  # Token ids (informational; used by generation and the HF converter).
  pad_token_id: int | None = None
  eos_token_id: int | None = None
  bos_token_id: int | None = None

  def __post_init__(self):
    def need(ok, msg):
      if not ok:
        raise ValueError(f"ModelConfig: {msg}")

    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden"):
      need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
    need(self.n_heads % self.n_kv_heads == 0,
         f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
    need(self.head_dim is not None or self.d_model % self.n_heads == 0,
         f"d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads}); set head_dim")
    need(self.resolved_head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.resolved_head_dim}")
    need(self.num_experts >= 0, f"num_experts must be >= 0, got {self.num_experts}")
    if self.num_experts:
      need(1 <= self.top_k <= self.num_experts,
           f"top_k ({self.top_k}) must lie in [1, num_experts={self.num_experts}]; "
           "use clamp_top_k() when experts are opted out")
    need(self.moe_backend in MOE_BACKENDS, f"moe_backend {self.moe_backend!r} not in {MOE_BACKENDS}")
    need(self.expert_parallel in EXPERT_PARALLEL,
         f"expert_parallel {self.expert_parallel!r} not in {EXPERT_PARALLEL}")
    need(self.expert_capacity_factor >= 0.0,
         f"expert_capacity_factor must be >= 0 (0: dropless), got {self.expert_capacity_factor}")
    need(self.attention_impl in ATTENTION_IMPLS,
         f"attention_impl {self.attention_impl!r} not in {ATTENTION_IMPLS}")
    need(self.attention_block_size >= 0,
         f"attention_block_size must be >= 0 (0: default), got {self.attention_block_size}")
    need(self.remat in REMAT_POLICIES, f"remat {self.remat!r} not in {REMAT_POLICIES}")
    need(self.expert_bias_init <= 0.0 or not self.expert_bias,
         f"expert_bias_init must be <= 0 (the bias is applied as min(b, 0)), got {self.expert_bias_init}")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

  @property
  def is_moe(self) -> bool:
    return self.num_experts > 0

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
    """Builds a config from a dict or ConfigDict, refusing unknown keys by name."""
    values = dict(values.to_dict() if hasattr(values, "to_dict") else values)
    check_keys(values, cls, "model")
    return cls(**values)


def check_keys(values: Mapping[str, Any], cls, where: str) -> None:
  """Raises a KeyError naming each unknown key and the nearest valid ones."""
  valid = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(values) - set(valid))
  if unknown:
    hints = []
    for key in unknown:
      near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
      near += [v for v in valid if (v in key or key in v) and v not in near]
      hints.append(f"{where}.{key}" + (f" (did you mean {', '.join(near)}?)" if near else ""))
    raise KeyError(f"unknown config key(s): {'; '.join(hints)}. Valid keys: {', '.join(valid)}")


def clamp_top_k(config: ModelConfig, num_experts: int) -> ModelConfig:
  """The config for `num_experts` experts, with top_k clamped to what is present."""
  return config.replace(num_experts=num_experts, top_k=min(config.top_k, num_experts))


# Model sizes. Tiny ones for tests and CPU runs; the real ones only ever meet jax.eval_shape here.

def tiny(**overrides) -> ModelConfig:
  base = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96,
              rope_theta=10_000.0, pad_token_id=1, eos_token_id=2)
  return ModelConfig(**{**base, **overrides})


def olmo2_7b(**overrides) -> ModelConfig:
  """The public OLMo-2 7B model."""
  base = dict(vocab_size=100_352, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
              ffn_hidden=11_008, rope_theta=500_000.0, pad_token_id=100_277, eos_token_id=100_257,
              dtype="bfloat16")
  return ModelConfig(**{**base, **overrides})


def flexolmo_7x7b(**overrides) -> ModelConfig:
  """The released FlexOlmo-7x7B-1T: 7 experts; top-k is a runtime setting (5 or 7 reported)."""
  return olmo2_7b(**{"num_experts": 7, "top_k": 5, "moe_backend": "ragged", **overrides})


def flexolmo_8x7b_top4(**overrides) -> ModelConfig:
  """The paper's full model: public + 7 closed-domain experts, top-4."""
  return olmo2_7b(**{"num_experts": 8, "top_k": 4, "moe_backend": "ragged", **overrides})


PRESETS = {
    "tiny": tiny,
    "olmo2_7b": olmo2_7b,
    "flexolmo_7x7b": flexolmo_7x7b,
    "flexolmo_8x7b_top4": flexolmo_8x7b_top4,
}
