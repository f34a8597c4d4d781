"""The manifest.json of every run directory and artifact, as a typed, versioned record.

Its fields are what this package writes; keys it does not know (written by a later tool, or an
artifact's extra provenance such as tool's provenance) are kept in `extra` and written back, so a
manifest survives a read and a write. Manifests written before the version field existed are
version 1; a version this package does not know is refused with the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from flexolmo_jax import atomic, paths

VERSION = 1
FILE = "manifest.json"


@dataclasses.dataclass(frozen=True)
class Manifest:
  kind: str  # public / expert / merged (artifacts and runs), router_tuning (its workdir).
  config: Mapping[str, Any]  # The ModelConfig, as ModelConfig.to_dict() writes it.
  version: int = VERSION
  step: int | None = None  # Runs: the last saved step.
  name: str | None = None  # Expert runs: the owner's domain.
  fingerprint: str | None = None  # Artifacts: checkpoint.fingerprint of the parameters.
  public_path: str | None = None  # Expert runs: the public model it trained against, ...
  public_fingerprint: str | None = None  # ... its fingerprint, ...
  public_router_fingerprint: str | None = None  # ... and that of the public router row.
  init_from: str | None = None  # Dense fine-tunes and router tuning: the starting parameters.
  init_fingerprint: str | None = None
  train_config: Mapping[str, Any] | None = None
  data_manifest_hash: str | None = None
  versions: Mapping[str, str] | None = None  # Library versions (checkpoint.library_versions).
  dp: Mapping[str, Any] | None = None  # DP runs: dp.report.
  ablation: str | None = None  # "solo" for the no-coordinated-training ablation.
  expert_names: tuple[str, ...] | list[str] | None = None  # MoE models: one name per expert.
  tokenizer_fingerprint: str | None = None  # data/tokenizer.py fingerprint of the token ids' tokenizer.
  tokenizer_path: str | None = None  # Where that tokenizer file lives (runs and their merges).
  added_to: str | None = None  # `merge --merged --experts`: the released model experts joined.
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_dict(cls, raw: Mapping[str, Any], where: str = "manifest") -> "Manifest":
    version = raw.get("version", 1)
    if version != VERSION:
      raise ValueError(f"{where}: manifest version {version!r} is not one this flexolmo_jax "
                       f"reads ({VERSION}); use the flexolmo_jax version that wrote it")
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    return cls(**{k: v for k, v in raw.items() if k in names},
               extra={k: v for k, v in raw.items() if k not in names})

  def to_dict(self) -> dict[str, Any]:
    """The JSON object: every set field, and the extra keys at the top level."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
    return {**{k: v for k, v in out.items() if v is not None}, **self.extra}

  def replace(self, **changes) -> "Manifest":
    return dataclasses.replace(self, **changes)


def read(directory: str | os.PathLike) -> Manifest:
  """The manifest of the run directory or artifact at `directory`."""
  path = paths.path(directory) / FILE
  return Manifest.from_dict(json.loads(path.read_text()), str(path))


def of(manifest: Manifest | Mapping[str, Any]) -> Manifest:
  """`manifest` as a Manifest (a dict is read as manifest.json would be)."""
  return manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest)


def write(directory: str | os.PathLike, manifest: Manifest | Mapping[str, Any]) -> None:
  """Writes `manifest` into `directory` atomically (temp file + rename)."""
  atomic.write_text(paths.path(directory) / FILE,
                    json.dumps(of(manifest).to_dict(), indent=2, sort_keys=True) + "\n")
