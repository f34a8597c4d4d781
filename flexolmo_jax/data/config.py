"""DataConfig: what the input pipeline reads, built from an ml_collections ConfigDict."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

import ml_collections


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The data side of a training run.

  path: a corpus prepared by `python -m flexolmo_jax.data prepare --out=PATH`.
  domains: the domains mixed into this run's batches ("public", or closed domain names); documents
    are sampled in proportion to each domain's size.
  owner_dirs: extra domains from a data owner's directory of `.txt` / `.jsonl` files, name -> dir;
    `text_field` names the JSON field that holds the text.
  tfds_domains: extra domains from tfds datasets already on local disk, name -> tfds name
    (e.g. "my_set:1.0.0"), read from `tfds_data_dir`.
  num_epochs: None repeats forever (training); an integer stops after that many passes.
  num_workers: grain worker processes (0 = in-process; on 2 CPU cores use 0 or 1).
  train_subset: domain -> N keeps only the first N documents of that domain's train split (the
    first N rows of its text/<domain>/train.jsonl): many epochs over a small known set, for the
    memorisation setting of the extraction study (privacy.py). Other splits are unaffected.
  """
  path: str = ""
  domains: tuple[str, ...] = ("public",)
  owner_dirs: Mapping[str, str] = dataclasses.field(default_factory=dict)
  text_field: str = "text"
  tfds_domains: Mapping[str, str] = dataclasses.field(default_factory=dict)
  tfds_data_dir: str | None = None
  seq_len: int = 512
  batch_size: int = 8
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None
  num_workers: int = 0
  train_subset: Mapping[str, int] = dataclasses.field(default_factory=dict)

  def replace(self, **changes) -> "DataConfig":
    return dataclasses.replace(self, **changes)


def _fields() -> list[str]:
  return [f.name for f in dataclasses.fields(DataConfig)]


def data_config(cd: ml_collections.ConfigDict | Mapping[str, Any]) -> DataConfig:
  """A DataConfig from a ConfigDict (or dict); unknown keys are refused, naming the nearest ones."""
  raw = cd.to_dict() if isinstance(cd, ml_collections.ConfigDict) else dict(cd)
  valid = _fields()
  unknown = sorted(set(raw) - set(valid))
  if unknown:
    hints = []
    for key in unknown:
      near = difflib.get_close_matches(key, valid, n=3)
      hints.append(key + (f" (did you mean {', '.join(near)}?)" if near else ""))
    raise KeyError(f"unknown data config key(s): {'; '.join(hints)}. Valid keys: {', '.join(valid)}")
  if "domains" in raw:
    raw["domains"] = (raw["domains"],) if isinstance(raw["domains"], str) else tuple(raw["domains"])
  for key in ("owner_dirs", "tfds_domains", "train_subset"):
    if key in raw:
      raw[key] = dict(raw[key])
  cfg = DataConfig(**raw)
  if cfg.seq_len < 1 or cfg.batch_size < 1:
    raise ValueError(f"seq_len and batch_size must be positive (got {cfg.seq_len}, {cfg.batch_size}).")
  if any(n < 1 for n in cfg.train_subset.values()):
    raise ValueError(f"train_subset sizes must be >= 1 (got {dict(cfg.train_subset)}).")
  if not cfg.domains:
    raise ValueError("DataConfig.domains is empty: name at least one domain.")
  return cfg


def default_config() -> ml_collections.ConfigDict:
  """A ConfigDict with every DataConfig field at its default, for config files to override."""
  return ml_collections.ConfigDict(dataclasses.asdict(DataConfig()))
