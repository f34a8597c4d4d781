"""Training configuration: ConfigDicts from configs/*.py become one frozen TrainConfig.

Every level refuses unknown keys, naming the nearest valid ones, so `--config.optim.lr_peak=...`
fails loudly instead of training with the default.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from flexolmo_jax.cli import check_name
from flexolmo_jax.config import ModelConfig, check_keys
from flexolmo_jax.data.config import DataConfig, data_config

MODES = ("public", "expert")
MASTER_DTYPES = ("float32", "bfloat16")  # docs/precision.md
# Fields of ModelConfig an expert run may set: how to execute, never the architecture, which
# comes from the public checkpoint.
EXECUTION_FIELDS = ("moe_backend", "moe_block_size", "expert_parallel", "expert_capacity_factor",
                    "scan_layers", "remat", "dtype", "attention_impl", "attention_block_size")
# TrainConfig keys a resumed run may change: how it executes, logs and saves (model_overrides
# holds only execution fields), and `steps`, to extend a run (its learning-rate schedule then
# follows the new length), and where the secrets are kept (a moved key is found there; a missing
# one is refused, runs.dp_noise_key). Any other change is refused on resume.
RESUME_MAY_CHANGE = ("steps", "model_overrides", "mesh", "progress", "async_checkpoint",
                     "secrets_dir", "keep_checkpoints", "log_every", "eval_every", "eval_batches",
                     "eval_domains", "checkpoint_every", "data.num_workers", "frozen_dtype",
                     "profile_steps",
                     *(f"model.{field}" for field in EXECUTION_FIELDS))


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with global-norm clipping, linear warmup and cosine decay to min_lr_ratio * lr."""

  lr: float = 9e-4
  warmup_steps: int = 2000
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.0
  decay_embeddings: bool = False  # OLMo-2 applies no weight decay to the embedding.
  clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class LossConfig:
  z_loss: float = 1e-5  # * logsumexp(logits)^2, the output z-loss.
  router_z_loss: float = 1e-3
  load_balancing: float = 0.0


# Where an expert's router row comes from (docs/method.md, section 4), and what it reads:
ROUTER_SOURCES = {
    # router_embeddings, or the public model's mean hidden state over the owner's training data.
    "owner_data": "the owner's training data",
    # The public row (public data only); training moves it, under DP-SGD in a DP run.
    "public": "public training data (the public row)",
    # The mean hidden state of the owner's proxy set: public documents.
    "proxies": "the owner's proxy set (public training documents)",
}


@dataclasses.dataclass(frozen=True)
class ExpertConfig:
  """One data owner's expert, trained against a frozen public model (docs/method.md, section 3)."""

  name: str = ""  # The owner's domain; the run reads only this domain's data.
  public: str = ""  # Public model: a public training run's workdir or a converted HF checkpoint.
  # A .npz of router embeddings with arrays "public" and `name` ([D] or [L, D]); see
  # flexolmo_jax.router_init. Empty: the documented fallback, the public model's own mean
  # hidden state (FFN input) over `embed_batches` batches of public and of the owner's data.
  router_embeddings: str = ""
  embed_batches: int = 8
  # Where the expert's router row comes from (ROUTER_SOURCES). A DP run may not use
  # "owner_data": that row would release the owner's data with no noise and no accounting.
  router_source: str = "owner_data"
  router_proxies: str = ""  # router_source "proxies": a proxies JSON (router_tuning select).
  bias: bool = True
  bias_init: float = -0.5
  top_k: int = 2  # Both experts on every token while training (top-2 of 2).
  # A research extension beyond the paper (flexolmo_jax/data/mix.py): this share of every batch's
  # rows comes from the public data instead of the owner's domain. 0: the paper's setting.
  public_share: float = 0.0

  def __post_init__(self):
    if self.name:
      check_name(self.name, "config.expert.name")
    if self.router_source not in ROUTER_SOURCES:
      raise ValueError(f"config.expert.router_source {self.router_source!r} is not one of "
                       f"{tuple(ROUTER_SOURCES)}")
    if (self.router_source == "proxies") != bool(self.router_proxies):
      raise ValueError("config.expert.router_source='proxies' and config.expert.router_proxies "
                       "(a proxies JSON from python -m flexolmo_jax.router_tuning select) go "
                       "together; set both or neither")
    if not 0 <= self.public_share < 1:
      raise ValueError(f"config.expert.public_share {self.public_share} must be in [0, 1): the "
                       "share of each batch's rows drawn from public data")
    if self.router_embeddings and self.router_source != "owner_data":
      raise ValueError("config.expert.router_embeddings gives the rows itself (router_source "
                       f"'owner_data'); drop it or router_source={self.router_source!r}")


@dataclasses.dataclass(frozen=True)
class DPConfig:
  """DP-SGD for expert training (flexolmo_jax/dp.py): per-example clipping plus Gaussian noise."""

  enabled: bool = False
  clip_norm: float = 1.0  # C: each example's gradient is clipped to this global L2 norm.
  noise_multiplier: float = 1.0  # sigma: noise std is sigma * C on the summed gradient.
  delta: float = 1e-5  # The manifest reports epsilon at this delta.

  def __post_init__(self):
    if self.clip_norm <= 0 or self.noise_multiplier < 0 or not 0 < self.delta < 1:
      raise ValueError(f"dp needs clip_norm > 0, noise_multiplier >= 0 and 0 < delta < 1; got "
                       f"{self.clip_norm}, {self.noise_multiplier}, {self.delta}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  mode: str
  data: DataConfig
  model: ModelConfig | None = None  # Public mode: the architecture.
  model_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # Expert mode.
  # Public mode: start from this run directory's or params artifact's parameters (whose shapes
  # must match `model`) instead of a random init, with a fresh optimizer; e.g. the dense model
  # fully fine-tuned on a closed domain that the extraction study compares with (privacy.py).
  init_from: str = ""
  expert: ExpertConfig = ExpertConfig()
  optim: OptimConfig = OptimConfig()
  loss: LossConfig = LossConfig()
  dp: DPConfig = DPConfig()  # Expert mode only.
  steps: int = 1000
  grad_accum: int = 1
  seed: int = 0
  mesh: Mapping[str, int] = dataclasses.field(default_factory=lambda: {"data": -1})
  log_every: int = 10
  eval_every: int = 200
  eval_batches: int = 8
  eval_domains: tuple[str, ...] = ()  # Empty: the training domains (plus "public" for experts).
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  progress: bool = True
  # DP runs keep their secret noise key here, never in the run directory that merge and convert
  # read; "" is WORKDIR.secrets beside it (runs.secrets_dir).
  secrets_dir: str = ""

  # Mixed precision (docs/precision.md): the trained tree and its AdamW moments are kept in
  # master_dtype; the frozen tree (an expert's public model, router tuning's experts) is stored
  # in frozen_dtype ("": as loaded). Compute is model.dtype / model_overrides.dtype.
  master_dtype: str = "float32"
  frozen_dtype: str = ""
  # "START:END": a jax.profiler trace of steps START..END (inclusive) into WORKDIR/profile.
  profile_steps: str = ""

  @property
  def profile_range(self) -> tuple[int, int] | None:
    """(first, last) step to trace, or None."""
    if not self.profile_steps:
      return None
    start, end = (int(x) for x in self.profile_steps.split(":"))
    return start, end

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode {self.mode!r} not in {MODES}")
    if self.mode == "public" and self.model is None:
      raise ValueError("mode 'public' needs config.model (the architecture to pretrain)")
    if self.mode == "expert" and not (self.expert.name and self.expert.public):
      raise ValueError("mode 'expert' needs config.expert.name (the owner's domain) and "
                       "config.expert.public (the public model's directory)")
    if self.init_from and self.mode != "public":
      raise ValueError("config.init_from needs mode 'public' (a dense run started from existing "
                       "parameters); an expert always starts from config.expert.public")
    if self.dp.enabled and self.mode != "expert":
      raise ValueError("config.dp.enabled needs mode 'expert': DP-SGD protects one owner's data "
                       "in its expert; the public model is trained on public data without it")
    if self.dp.enabled and self.expert.public_share:
      raise ValueError("config.dp.enabled with config.expert.public_share: the DP accounting "
                       "counts only the owner's examples; set public_share=0 for a DP run")
    if self.dp.enabled and self.expert.router_source == "owner_data":
      raise ValueError(
          "config.dp.enabled: the expert's router row would be embedded from the owner's "
          "training data (config.expert.router_source='owner_data', the default, or "
          "router_embeddings) and released with no noise and no accounting; set "
          "config.expert.router_source='public', or 'proxies' with "
          "config.expert.router_proxies=PROXIES.json (python -m flexolmo_jax.router_tuning select)")
    bad = sorted(set(self.model_overrides) - set(EXECUTION_FIELDS))
    if bad:
      raise KeyError(f"config.model_overrides may only set {EXECUTION_FIELDS}; got {bad} "
                     "(an expert's architecture comes from its public model)")
    if self.data.batch_size % self.grad_accum:
      raise ValueError(f"data.batch_size ({self.data.batch_size}) must be a multiple of "
                       f"grad_accum ({self.grad_accum})")
    if self.master_dtype not in MASTER_DTYPES:
      raise ValueError(f"master_dtype {self.master_dtype!r} not in {MASTER_DTYPES}")
    if self.frozen_dtype not in ("", *MASTER_DTYPES):
      raise ValueError(f"frozen_dtype {self.frozen_dtype!r} not in {('', *MASTER_DTYPES)} "
                       "('': as the checkpoint stores it)")
    if self.profile_steps:
      parts = self.profile_steps.split(":")
      if not (len(parts) == 2 and all(p.isdigit() for p in parts)
              and 1 <= int(parts[0]) <= int(parts[1])):
        raise ValueError(f"profile_steps {self.profile_steps!r} is not START:END with "
                         "1 <= START <= END (e.g. 10:12)")
    for name in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _sub(cls, values, where):
  values = dict(values)
  check_keys(values, cls, where)
  return cls(**values)


def train_config(cd: ml_collections.ConfigDict | Mapping[str, Any]) -> TrainConfig:
  """A TrainConfig from a ConfigDict; unknown keys at any level are refused by name."""
  raw = cd.to_dict() if isinstance(cd, ml_collections.ConfigDict) else dict(cd)
  check_keys(raw, TrainConfig, "config")
  raw["data"] = data_config(raw["data"])
  if raw.get("model") is not None:
    raw["model"] = ModelConfig.from_dict(raw["model"])
  for key, cls in (("expert", ExpertConfig), ("optim", OptimConfig), ("loss", LossConfig),
                   ("dp", DPConfig)):
    if key in raw:
      raw[key] = _sub(cls, raw[key], f"config.{key}")
  for key in ("eval_domains",):
    if key in raw:
      raw[key] = tuple(raw[key])
  for key in ("mesh", "model_overrides"):
    if key in raw:
      raw[key] = dict(raw[key])
  return TrainConfig(**raw)


def to_dict(config: TrainConfig) -> dict[str, Any]:
  """JSON-ready dict of a TrainConfig (for manifests)."""
  return dataclasses.asdict(config)


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "expert": ExpertConfig,
             "optim": OptimConfig, "loss": LossConfig, "dp": DPConfig}
_FREE_FORM = ("mesh", "model_overrides")  # Dicts whose keys are not fixed.


def default_config() -> ml_collections.ConfigDict:
  """A ConfigDict holding every TrainConfig key at its default; config files start from it, so
  any key can be overridden on the command line."""
  c = ml_collections.ConfigDict()
  for field in dataclasses.fields(TrainConfig):
    if field.name in ("mode", "model"):
      continue
    if field.name == "data":
      c.data = ml_collections.ConfigDict(dataclasses.asdict(DataConfig()))
    elif field.default is not dataclasses.MISSING and dataclasses.is_dataclass(field.default):
      c[field.name] = ml_collections.ConfigDict(dataclasses.asdict(field.default))
    elif field.default_factory is not dataclasses.MISSING:
      c[field.name] = ml_collections.ConfigDict(field.default_factory())
    else:
      c[field.name] = field.default
  c.mode = ""
  c.model = None
  c.workdir = ""
  return c


def check_override_keys(argv) -> None:
  """Refuses `--config.KEY=...` overrides naming unknown keys, before ml_collections sees them
  (whose own error names neither the path nor the valid keys)."""
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0].split(".")
    if path[0] == "workdir":
      continue
    if path[0] not in _SECTIONS and path[0] not in _FREE_FORM:
      check_keys({path[0]: None}, TrainConfig, "config")
    elif path[0] in _SECTIONS and len(path) > 1:
      check_keys({path[1]: None}, _SECTIONS[path[0]], f"config.{path[0]}")
