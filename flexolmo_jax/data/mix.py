"""An owner's training batches with a fixed share of public rows mixed in (docs/research/public_mix.md).

A research extension beyond the paper: each owner also trains on a small share of the PUBLIC data,
which every owner may use, so that its router row also learns where to yield to the public expert.
Every batch is `batch_size - public_rows` rows of the owner's domain followed by `public_rows` rows
of "public"; the two come from separate pipelines, so the owner's run never reads any other closed
domain. With share 0 the owner's pipeline is returned unchanged (the paper's setting, and the
iterator state of every earlier run).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flexolmo_jax.data.config import DataConfig
from flexolmo_jax.data.pipeline import make_pipeline

PUBLIC = "public"


def public_rows(share: float, batch_size: int) -> int:
  """The public rows of a batch: `share` of it, rounded; a share that rounds to no row or to the
  whole batch is refused, since the run would then not be what was asked for."""
  if share == 0:
    return 0
  rows = round(share * batch_size)
  if not 0 < rows < batch_size:
    raise ValueError(f"config.expert.public_share={share} of a {batch_size}-row batch is {rows} "
                     f"public rows; choose a share between {1 / batch_size:.3g} and "
                     f"{1 - 1 / batch_size:.3g} (whole rows, and at least one of the owner's)")
  return rows


class MixedBatches:
  """Batches of the owner's rows then public rows, with a grain-like get_state/set_state."""

  def __init__(self, owner, public):
    self.owner, self.public = owner, public

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    own, pub = next(self.owner), next(self.public)
    return {k: np.concatenate([own[k], pub[k]]) for k in own}

  def get_state(self) -> dict[str, Any]:
    return {"owner": self.owner.get_state(), PUBLIC: self.public.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self.owner.set_state(state["owner"])
    self.public.set_state(state[PUBLIC])


def owner_batches(cfg: DataConfig, public_share: float, batch_size: int):
  """The training iterator of a run over `cfg.domains` (one owner's domain) with `public_share`
  of every `batch_size`-row batch drawn from the public domain instead."""
  rows = public_rows(public_share, batch_size)
  if not rows:
    return iter(make_pipeline(cfg, "train", batch_size=batch_size))
  if PUBLIC in cfg.domains:
    raise ValueError(f"public_share mixes public rows into an owner's batches; the run already "
                     f"reads {list(cfg.domains)}")
  owner = iter(make_pipeline(cfg, "train", batch_size=batch_size - rows))
  public = iter(make_pipeline(cfg.replace(domains=(PUBLIC,)), "train", batch_size=rows))
  return MixedBatches(owner, public)
